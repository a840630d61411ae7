"""HTTP benchmark of ``llmcache-node`` with a real load generator (``wrk``) on the same machine.

    python tests/bench/bench_http.py [--workers 2] [--duration 10] [--connections 64]
                                     [--cases 1,2,3,4,5] [--rate 5000] [--commit REV]
                                     [--json out.json]

The script starts its own ``llmcache-node`` (``--workers`` server workers) on free loopback ports
in a temporary directory (running the installed working tree, or with ``--commit`` that commit's
code exported there: a shared work tree can change under a run), with RLIMIT_NOFILE raised for
it and its children, preloads data through the HTTP API, then drives it with ``wrk`` (Lua
scripts build the POST bodies; a ``done`` hook prints the summary and latency percentiles as
JSON). Cases, each for ``--duration`` seconds at ``--connections`` connections after a short
warm-up:

1. **exact**: ``POST /v1/cache/lookup {"text": ...}`` cycling over ``--text-entries`` stored
   texts (every answer an exact HIT). Then the p99 at a fixed rate of ``--rate`` req/s: with
   ``wrk2 -R`` when ``wrk2`` is installed; otherwise (plain wrk has no rate limit) two
   estimates: (a) at the fewest connections whose closed-loop rate still reaches ``--rate``
   (halving from ``--connections``, then bisecting; each probe a full-length run, the chosen
   one's own numbers reported), (b) at ``--connections`` connections paced by a Lua
   ``delay()`` tuned until the rate is within 3 % of ``--rate``. Neither is open-loop (a slow
   answer holds back its connection's next request). No p99 is given when the saturated rate
   is below ``--rate``: an open-loop load above capacity queues without bound.
2. **semantic**: lookups with a caller-supplied 384-d vector in a namespace whose embedder is
   ``supplied``, preloaded with ``--vec-entries`` entries in one scope; each query is a noisy
   copy (cosine ~0.95) of a stored vector under a text that is not stored.
3. **embed**: lookups whose text the default embedder embeds: a distinct text per request (a
   counter in the text, so the embedding cache never hits), then one repeated text (every
   request an embedding-cache hit); both search the ``--text-entries`` scope.
4. **5,000 connections**: case 1's requests over ``--many-connections`` keep-alive connections
   for ``--many-duration`` seconds (default 30: SYNs dropped while the node's accept queue is
   full are retried by the kernel after 1, 3, 7 s, so connections come up over several
   seconds); wrk's socket errors (connect, read, write, timeout = an answer slower than
   ``--timeout``) must all be 0. wrk counts a connection still retrying its SYN as no error, so
   the script also samples /proc/net/tcp: when the server first held all of them, and the
   fewest it held from then on.
5. **bare aiohttp**: case 1's requests and settings against a tiny aiohttp app (its own
   processes, as many as the node has workers, sharing the port with reuse_port) that reads the
   body and returns a constant JSON (the node's own answer to the first lookup, so the bytes are
   the same); the node/bare ratio of req/s.

Every row also has the load average before and after, the CPU the server's processes used
(cores, and CPU µs per request), wrk's own CPU seconds, the peak of the server's RSS (summed
over its process tree, from /proc) and the peak numbers of established (server side),
still-connecting (client side SYN_SENT) and half-open (server side SYN_RECV) connections to the
server port, sampled once a second.
Latency percentiles are wrk's (its histogram, which wrk 4 corrects for coordinated omission
by adding synthetic samples, measured from the moment a request is written). The node's RSS
and PSS after the run are reported too. The node is stopped with SIGTERM (killed by PID if it
has not exited after 60 s). Targets are printed, not asserted. Not collected by pytest.

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install -y wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[2]
DIM = 384
VEC_NAMESPACE = "vec"
STARTUP_DEADLINE_S = 180.0
STOP_TIMEOUT_S = 60.0
WARMUP_S = 2.0
MAX_PROBES = 12
PACED_TRIES = 5
NOFILE_WANTED = 65536
LOOKUP = "/v1/cache/lookup"
STORE = "/v1/cache/store"
TARGETS = {
    "exact": ">= 10,000 req/s",
    "semantic": ">= 4,000 req/s",
    "embed-distinct": ">= 250 req/s",
    "many-connections": "0 socket errors",
}
WRK_MISSING = """\
wrk is not installed; this benchmark needs it as its load generator.
  Debian/Ubuntu: apt-get update && apt-get install -y wrk
  macOS:         brew install wrk
(wrk2, for a fixed-rate p99, is optional: the script falls back to fewer connections.)"""

FloatArray = npt.NDArray[np.float32]


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_nofile() -> None:
    """preexec_fn: lift the soft open-files limit (and the hard one when allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NOFILE_WANTED:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_WANTED, NOFILE_WANTED))
            return
        except (ValueError, OSError):
            pass  # not privileged: the hard limit it is
    new = NOFILE_WANTED if hard == resource.RLIM_INFINITY else max(soft, min(hard, NOFILE_WANTED))
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    pending = [root]
    while pending and len(tree) < 10_000:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def _status_kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int) -> dict[str, int]:
    """RSS and PSS (bytes) summed over ``root``'s process tree, and the number of processes."""
    pids = process_tree(root)
    rss = sum(_status_kb(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids)
    pss = sum(_status_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids)
    return {"rss_bytes": rss * 1024, "pss_bytes": pss * 1024, "processes": len(pids)}


def tree_cpu_s(roots: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes of ``roots``' trees."""
    ticks = 0
    for root in roots:
        for pid in process_tree(root):
            fields = _stat_fields(pid)
            if fields is not None:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def connections(port: int) -> tuple[int, int, int]:
    """TCP sockets to ``port`` now: the server's ESTABLISHED ones (accepted or in the accept
    queue), the clients' still in SYN_SENT (their SYN dropped, waiting to retransmit) and the
    server's in SYN_RECV (the client's final ACK dropped because the accept queue was full: the
    client believes it is connected and has sent its request)."""
    hex_port = f":{port:04X}"
    server, connecting, half_open = 0, 0, 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split(maxsplit=4)
            if len(parts) < 4:
                continue
            if parts[3] == "01" and parts[1].endswith(hex_port):
                server += 1
            elif parts[3] == "02" and parts[2].endswith(hex_port):
                connecting += 1
            elif parts[3] == "03" and parts[1].endswith(hex_port):
                half_open += 1
    return server, connecting, half_open


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def nofile_limits(root: int) -> list[str]:
    """The distinct soft open-files limits over ``root``'s process tree (from /proc)."""
    found = set()
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    found.add(line.split()[3])
        except OSError:
            pass
    return sorted(found)


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def kill_pids(snapshot: Sequence[tuple[int, str | None]]) -> list[int]:
    """SIGKILL each (pid, start time) still alive with the same start time; returns those."""
    killed = []
    for pid, started in snapshot:
        if started is not None and _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> str:
    """SIGTERM ``proc``; SIGKILL it (and whatever it left) by PID if it outlives ``timeout``."""
    if proc.poll() is not None:
        return f"exited {proc.returncode}"
    tree = [(pid, _start_time(pid)) for pid in process_tree(proc.pid)]
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
        time.sleep(2.0)
        left = kill_pids(tree[1:])
        return f"killed after {timeout:.0f} s (and {len(left)} children)"
    deadline = time.monotonic() + 10.0  # children exit before the supervisor, its
    while (
        time.monotonic() < deadline
        and any(  # resource tracker right after it
            started is not None and _start_time(pid) == started for pid, started in tree[1:]
        )
    ):
        time.sleep(0.1)
    left = kill_pids(tree[1:])
    return f"exited {code}" + (f"; killed {len(left)} leftover children" if left else "")


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.decode(errors='replace')}")
    return out.stdout.decode()


def code_under_test(commit: str | None, root: Path) -> tuple[Path | None, str]:
    """The node code to run and its description: ``commit``'s node/, cluster/ and client/
    exported (git archive) as an ``llmcache`` package under ``root``, or the installed
    (editable) working tree, whose uncommitted changes are counted: on a shared work tree they
    may change between runs."""
    if commit is None:
        try:
            head = git("rev-parse", "--short", "HEAD").strip()
            dirty = git("status", "--porcelain", "--", "node", "cluster", "client").splitlines()
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            return None, "installed llmcache (not a git checkout)"
        return None, f"working tree at {head} + {len(dirty)} uncommitted changes in the node code"
    sha = git("rev-parse", "--verify", "--short", f"{commit}^{{commit}}").strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", sha, "node", "cluster", "client"],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    package = root / "src" / "llmcache"
    package.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(package, filter="data")
    (package / "__init__.py").touch()
    return root / "src", f"commit {sha} (exported)"


def node_command() -> list[str]:
    exe = Path(sys.executable).parent / "llmcache-node"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("llmcache-node")
    return [found] if found else [sys.executable, "-m", "llmcache.node.main"]


class Node:
    """One ``llmcache-node`` on free loopback ports under ``root``."""

    def __init__(self, root: Path, workers: int, source: Path | None = None) -> None:
        self.root = root
        self.workers = workers
        self.source = source
        """A directory holding an ``llmcache`` package to run instead of the installed one."""
        self.port = free_port()
        self.raft_port = free_port()
        self.log_path = root / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            *node_command(),
            "--port", str(self.port), "--raft-port", str(self.raft_port),
            "--data-dir", str(self.root / "data"), "--workers", str(self.workers),
        ]  # fmt: skip
        env = dict(os.environ)
        if self.source is not None:  # ahead of the editable install's finder (sys.meta_path)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.source), env.get("PYTHONPATH")) if p
            )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=raise_nofile
            )
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        ready = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            if not ready:
                ready = http_status(self.url + "/readyz") == 200
            # Ready means one worker answers; wait until every worker has opened its indexes.
            if ready and self.log().count(": indexes ") >= self.workers:
                time.sleep(1.0)  # the last one binds the port right after that line
                return
            time.sleep(0.25)
        raise RuntimeError(f"node not ready within {STARTUP_DEADLINE_S:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        return stop_process(self.proc) if self.proc is not None else "not started"


BARE_SERVER = """
import os, sys
from aiohttp import web
BODY = open(sys.argv[2], "rb").read()
PID = str(os.getpid())
async def handle(request):
    await request.read()
    return web.Response(body=BODY, content_type="application/json", headers={"X-Pid": PID})
app = web.Application()
app.router.add_post(sys.argv[3], handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), reuse_port=True, print=None,
            access_log=None)
"""


class BareServer:
    """``processes`` copies of a constant-JSON aiohttp app sharing one port (reuse_port)."""

    def __init__(self, root: Path, processes: int, body: bytes) -> None:
        self.root = root
        self.port = free_port()
        self.processes = processes
        self.body_path = root / "bare-body.json"
        self.body_path.write_bytes(body)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-c", BARE_SERVER, str(self.port), str(self.body_path), LOOKUP]
        with (self.root / "bare.log").open("ab") as log:
            for _ in range(self.processes):
                self.procs.append(
                    subprocess.Popen(
                        args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile
                    )
                )
        want = {str(p.pid) for p in self.procs}
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while seen != want and time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"bare server exited with {p.returncode}")
            pid = bare_pid(self.url + LOOKUP)
            if pid:
                seen.add(pid)
            else:
                time.sleep(0.1)
        if seen != want:
            raise RuntimeError(f"bare server: only {len(seen)} of {self.processes} processes up")

    def stop(self) -> str:
        return ", ".join(stop_process(p) for p in self.procs)

    def memory(self) -> dict[str, int]:
        total = {"rss_bytes": 0, "pss_bytes": 0, "processes": 0}
        for p in self.procs:
            for key, value in tree_memory(p.pid).items():
                total[key] += value
        return total


def http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def bare_pid(url: str) -> str | None:
    import urllib.request

    req = urllib.request.Request(url, data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
            pid: str | None = resp.headers.get("X-Pid")
            return pid
    except OSError:
        return None


# -- data --------------------------------------------------------------------------------------


def question(i: int) -> str:
    topics = ("billing address", "password", "API key", "invoice", "team plan", "export")
    verbs = ("change", "reset", "rotate", "download", "cancel", "share")
    return f"How do I {verbs[i % 6]} the {topics[(i // 6) % 6]} of account number {i}?"


def response_text(i: int, size: int) -> str:
    head = f"Answer {i}: "
    return head + "x" * max(0, size - len(head))


def unit_vectors(n: int, seed: int) -> FloatArray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    out: FloatArray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def noisy(v: FloatArray, seed: int, cosine: float = 0.95) -> FloatArray:
    """Unit vectors at cosine ~``cosine`` to the rows of ``v``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(v.shape).astype(np.float32)
    noise -= (noise * v).sum(axis=1, keepdims=True) * v  # orthogonal to v
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    sin = float(np.sqrt(1 - cosine * cosine))
    out: FloatArray = (cosine * v + sin * noise).astype(np.float32)
    return out


def vector_json(v: FloatArray) -> str:
    return "[" + ",".join(f"{x:.5f}" for x in v.tolist()) + "]"


async def _post_all(
    url: str, bodies: Sequence[str], concurrency: int, check: Callable[[int, Any], None]
) -> float:
    """POST every body (JSON text) with ``concurrency`` in flight; returns bodies per second."""
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        queue = iter(enumerate(bodies))

        async def one_worker() -> None:
            for i, body in queue:
                headers = {"Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as resp:
                    check(resp.status, await resp.json(content_type=None))
                    if resp.status >= 300:
                        raise RuntimeError(f"POST {url} #{i}: {resp.status} {await resp.text()}")

        await asyncio.gather(*(one_worker() for _ in range(concurrency)))
    return len(bodies) / (time.perf_counter() - started)


def post_all(
    url: str,
    bodies: Sequence[str],
    concurrency: int = 16,
    check: Callable[[int, Any], None] = lambda status, body: None,
) -> float:
    return asyncio.run(_post_all(url, bodies, concurrency, check))


async def _post_collect(url: str, bodies: Sequence[str]) -> list[tuple[int, Any, bytes]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        out = []
        for body in bodies:
            headers = {"Content-Type": "application/json"}
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                out.append((resp.status, json.loads(raw), raw))
        return out


def post_collect(url: str, bodies: Sequence[str]) -> list[tuple[int, Any, bytes]]:
    """POST each body in turn; (status, decoded JSON, raw bytes) of each answer."""
    return asyncio.run(_post_collect(url, bodies))


def put_json(url: str, body: Any) -> None:
    import urllib.request

    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="PUT")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


# -- wrk ---------------------------------------------------------------------------------------

LUA_COMMON = """
local thread_no = 0
function setup(thread)
  thread:set("id", thread_no)
  thread_no = thread_no + 1
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"duration_us": %.0f, "requests": %.0f, "bytes": %.0f, "connect": %.0f, ' ..
    '"read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f, "min_us": %.0f, ' ..
    '"max_us": %.0f, "mean_us": %.1f, "p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f, ' ..
    '"p999_us": %.0f}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.min, latency.max, latency.mean, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


def lua_long_string(text: str) -> str:
    if "]==]" in text:
        raise ValueError("body holds ]==]")
    return f"[==[{text}]==]"


def lua_cycle(path: str, bodies: Sequence[str], delay_ms: float | None = None) -> str:
    """A script that cycles over pre-formatted POSTs of ``bodies`` (each thread from its own
    offset); with ``delay_ms``, each connection waits that long on average (wrk's delays are
    whole milliseconds: the fraction is a coin toss) before each request."""
    items = ",\n".join(lua_long_string(b) for b in bodies)
    pacing = ""
    if delay_ms is not None:
        pacing = f"""
local delay_ms = {delay_ms:.4f}
function delay()
  local base = math.floor(delay_ms)
  if math.random() < delay_ms - base then return base + 1 end
  return base
end
"""
    return (
        LUA_COMMON
        + pacing
        + f"local bodies = {{\n{items}\n}}\n"
        + f"""
local reqs = {{}}
local i = 0
function init(args)
  for k, b in ipairs(bodies) do
    reqs[k] = wrk.format("POST", "{path}", {{["Content-Type"] = "application/json"}}, b)
  end
  i = (id or 0) * 7919
end
function request()
  i = i + 1
  return reqs[(i % #reqs) + 1]
end
"""
    )


def distinct_text(thread: int, n: int, nonce: str) -> str:
    """The text :func:`lua_distinct_texts` sends as request ``n`` of wrk thread ``thread``."""
    verbs = ("change", "reset", "rotate", "download", "cancel", "share")
    topics = ("billing address", "password", "API key", "invoice", "team plan", "export")
    return (
        f"Could you tell me how to {verbs[n % 6]} the {topics[(n // 6) % 6]} "
        f"for customer {thread}-{n} in run {nonce}?"
    )


def lua_distinct_texts(path: str, nonce: str) -> str:
    """A script whose every request carries a text never sent before (counter per thread)."""
    return (
        LUA_COMMON
        + f"""
local n = 0
local headers = {{["Content-Type"] = "application/json"}}
local verbs = {{"change", "reset", "rotate", "download", "cancel", "share"}}
local topics = {{"billing address", "password", "API key", "invoice", "team plan", "export"}}
function request()
  n = n + 1
  local text = "Could you tell me how to " .. verbs[(n % 6) + 1] .. " the " ..
    topics[(math.floor(n / 6) % 6) + 1] .. " for customer " .. (id or 0) .. "-" .. n ..
    " in run {nonce}?"
  return wrk.format("POST", "{path}", headers, '{{"text": "' .. text .. '"}}')
end
"""
    )


@dataclass
class WrkRun:
    label: str
    tool: str
    connections: int
    threads: int
    duration_s: float
    rate: int | None
    rps: float
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]
    load_before: float
    load_after: float
    peak_rss_bytes: int
    peak_established: int
    peak_syn_sent: int
    peak_syn_recv: int
    conn_series: list[tuple[float, int, int, int]]
    """(seconds since wrk started, server-side ESTABLISHED, client-side SYN_SENT, server-side
    SYN_RECV) samples."""
    server_cpu_s: float
    """CPU seconds used by the server's processes during the run."""
    wrk_cpu_s: float
    raw: str = field(repr=False, default="")

    @property
    def all_connected_after_s(self) -> float | None:
        """When the server first held all ``connections`` (None: never, as sampled)."""
        return next((t for t, n, _, _ in self.conn_series if n >= self.connections), None)

    @property
    def held_min(self) -> int | None:
        """The fewest connections the server held from when it first held them all until
        wrk began to close them (None if it never held them all)."""
        start = self.all_connected_after_s
        if start is None:
            return None
        end = self.duration_s * 0.95
        return min((n for t, n, _, _ in self.conn_series if start <= t <= end), default=None)

    @property
    def server_cores(self) -> float:
        return self.server_cpu_s / self.duration_s if self.duration_s else 0.0

    @property
    def server_cpu_us_per_request(self) -> float:
        return self.server_cpu_s / self.requests * 1e6 if self.requests else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(self.errors[k] for k in ("connect", "read", "write", "timeout"))


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_latency_table(out: str) -> dict[float, float]:
    """The percentiles (ms) of wrk's ``--latency`` table (wrk2's HdrHistogram table as well)."""
    found: dict[float, float] = {}
    for m in re.finditer(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        found.setdefault(float(m[1]), float(m[2]) * _UNIT_MS[m[3]])
    return found


def parse_wrk(out: str) -> dict[str, Any]:
    """The ``done`` hook's JSON line, with the --latency table as a fallback for percentiles."""
    m = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if m is None:
        raise RuntimeError(f"no BENCHJSON line in wrk's output:\n{out}")
    data: dict[str, Any] = json.loads(m[1])
    table = parse_latency_table(out)
    for pct, key in ((50.0, "p50_us"), (90.0, "p90_us"), (99.0, "p99_us")):
        if not data.get(key) and pct in table:
            data[key] = table[pct] * 1000
    return data


class Sampler:
    """Once a ``period``: the RSS of the servers' process trees and the connections to their
    port (server side ESTABLISHED and SYN_RECV, client side SYN_SENT), kept as a series."""

    def __init__(self, pids: Sequence[int], port: int, period: float = 1.0) -> None:
        self.pids, self.port, self.period = pids, port, period
        self.peak_rss = 0
        self.series: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            rss = sum(
                _status_kb(Path(f"/proc/{pid}/status"), "VmRSS:") * 1024
                for root in self.pids
                for pid in process_tree(root)
            )
            self.peak_rss = max(self.peak_rss, rss)
            server, connecting, half_open = connections(self.port)
            elapsed = round(time.monotonic() - t0, 2)
            self.series.append((elapsed, server, connecting, half_open))
            self._stop.wait(self.period)

    @property
    def peak_conns(self) -> int:
        return max((s[1] for s in self.series), default=0)

    @property
    def peak_syn_sent(self) -> int:
        return max((s[2] for s in self.series), default=0)

    @property
    def peak_syn_recv(self) -> int:
        return max((s[3] for s in self.series), default=0)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Wrk:
    def __init__(self, scripts_dir: Path, threads: int, timeout_s: float) -> None:
        self.scripts_dir = scripts_dir
        self.threads = threads
        self.timeout_s = timeout_s
        self.wrk = shutil.which("wrk") or "wrk"
        self.wrk2 = shutil.which("wrk2")
        self.version = self._version()

    def _version(self) -> str:
        out = subprocess.run([self.wrk, "-v"], capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).splitlines()[0].strip() if out.stdout or out.stderr else ""

    def script(self, name: str, text: str) -> Path:
        path = self.scripts_dir / f"{name}.lua"
        path.write_text(text)
        return path

    def run(
        self,
        label: str,
        url: str,
        script: Path,
        *,
        connections: int,
        duration: float,
        watch: Sequence[int],
        port: int,
        rate: int | None = None,
    ) -> WrkRun:
        """One wrk (or wrk2 with ``rate``) run; ``watch`` are PIDs whose trees' RSS is sampled."""
        exe = self.wrk2 if rate is not None else self.wrk
        assert exe is not None
        # wrk gives each thread connections // threads: use a thread count that divides them.
        threads = next(
            t for t in range(min(self.threads, connections), 0, -1) if connections % t == 0
        )
        args = [
            exe, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", f"{self.timeout_s:g}s", "--latency", "-s", str(script),
        ]  # fmt: skip
        if rate is not None:
            args += ["-R", str(rate)]
        args.append(url)
        load_before = loadavg()
        cpu_before = tree_cpu_s(watch)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with Sampler(watch, port) as sampler:
            # No preexec_fn here (the sampler thread runs): wrk inherits main()'s raised limit.
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                raw, _ = proc.communicate(timeout=duration + self.timeout_s + 120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=30)
                raise RuntimeError(f"{label}: wrk did not finish") from None
        server_cpu = tree_cpu_s(watch) - cpu_before
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_cpu = (children.ru_utime - children_before.ru_utime) + (
            children.ru_stime - children_before.ru_stime
        )
        out = raw.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: wrk exited {proc.returncode}:\n{out}")
        data = parse_wrk(out)
        seconds = data["duration_us"] / 1e6
        return WrkRun(
            label=label,
            tool="wrk2" if rate is not None else "wrk",
            connections=connections,
            threads=threads,
            duration_s=round(seconds, 2),
            rate=rate,
            rps=round(data["requests"] / seconds, 1) if seconds else 0.0,
            requests=int(data["requests"]),
            p50_ms=round(data["p50_us"] / 1000, 3),
            p90_ms=round(data["p90_us"] / 1000, 3),
            p99_ms=round(data["p99_us"] / 1000, 3),
            p999_ms=round(data["p999_us"] / 1000, 3),
            max_ms=round(data["max_us"] / 1000, 3),
            mean_ms=round(data["mean_us"] / 1000, 3),
            errors={k: int(data[k]) for k in ("connect", "read", "write", "timeout", "status")},
            load_before=load_before,
            load_after=loadavg(),
            peak_rss_bytes=sampler.peak_rss,
            peak_established=sampler.peak_conns,
            peak_syn_sent=sampler.peak_syn_sent,
            peak_syn_recv=sampler.peak_syn_recv,
            conn_series=sampler.series,
            server_cpu_s=round(server_cpu, 2),
            wrk_cpu_s=round(wrk_cpu, 2),
            raw=out,
        )


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    node: Node
    wrk: Wrk
    runs: list[WrkRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    exact_bodies: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def measure(
        self,
        label: str,
        url: str,
        script: Path,
        *,
        connections: int | None = None,
        warmup: bool = True,
        duration: float | None = None,
        **kw: Any,
    ) -> WrkRun:
        """Warm-up (not kept), then the measured run."""
        conns = connections or self.args.connections
        assert self.node.proc is not None
        watch = kw.pop("watch", [self.node.proc.pid])
        port = kw.pop("port", self.node.port)
        if warmup and self.args.warmup > 0:
            self.wrk.run(
                label, url, script, connections=conns, duration=self.args.warmup, watch=watch,
                port=port,
            )  # fmt: skip
        run = self.wrk.run(
            label, url, script, connections=conns, duration=duration or self.args.duration,
            watch=watch, port=port, **kw,
        )  # fmt: skip
        self.runs.append(run)
        self.say(
            f"  {label}: {run.rps:,.0f} req/s at {conns} connections, p50 {run.p50_ms} ms, "
            f"p99 {run.p99_ms} ms, errors {run.errors}, server {run.server_cores:.2f} cores "
            f"({run.server_cpu_us_per_request:,.0f} CPU µs/req), wrk {run.wrk_cpu_s} CPU s, "
            f"load {run.load_before} -> {run.load_after}"
        )
        return run

    # preload ---------------------------------------------------------------------------------

    def preload_texts(self) -> None:
        n = self.args.text_entries
        bodies = [
            json.dumps(
                {"text": question(i), "response": response_text(i, self.args.response_bytes)}
            )
            for i in range(n)
        ]
        rate = post_all(self.node.url + STORE, bodies, concurrency=8)
        self.facts["preload_texts"] = {"entries": n, "stores_per_s": round(rate, 1)}
        self.say(f"preloaded {n} text entries (default embedder) at {rate:,.0f} stores/s")
        self.exact_bodies = [json.dumps({"text": question(i)}) for i in range(n)]
        sample = post_collect(self.node.url + LOOKUP, self.exact_bodies[:20])
        hits = sum(1 for status, body, _ in sample if status == 200 and body["status"] == "HIT")
        if hits != len(sample):
            raise RuntimeError(f"exact lookups: only {hits} of {len(sample)} sampled are HITs")
        self.facts["exact_answer_bytes"] = len(sample[0][2])
        self.facts["exact_answer"] = sample[0][2].decode()

    def preload_vectors(self) -> list[str]:
        n = self.args.vec_entries
        url = self.node.url
        put_json(
            f"{url}/v1/tenants/default/settings",
            {"namespace": VEC_NAMESPACE, "values": {"embedder": "supplied"}},
        )
        stored = unit_vectors(n, seed=1)
        size = self.args.response_bytes
        bodies = [
            f'{{"namespace": "{VEC_NAMESPACE}", "text": "stored vector {i}", '
            f'"response": {json.dumps(response_text(i, size))}, '
            f'"vector": {vector_json(stored[i])}}}'
            for i in range(n)
        ]
        rate = post_all(url + STORE, bodies, concurrency=16)
        self.facts["preload_vectors"] = {"entries": n, "stores_per_s": round(rate, 1)}
        self.say(f"preloaded {n} vector entries ({DIM}-d, supplied) at {rate:,.0f} stores/s")
        q = min(self.args.vec_queries, n)
        rng = np.random.default_rng(2)
        targets = rng.choice(n, size=q, replace=False)
        queries = noisy(stored[targets], seed=3)
        query_bodies = [
            f'{{"namespace": "{VEC_NAMESPACE}", "text": "query {j}", '
            f'"vector": {vector_json(queries[j])}}}'
            for j in range(q)
        ]
        sample_n = min(100, q)
        sample = post_collect(url + LOOKUP, query_bodies[:sample_n])
        right = sum(
            1
            for (status, body, _), t in zip(sample, targets[:sample_n], strict=True)
            if status == 200
            and body["status"] == "SEMANTIC_HIT"
            and body["entry"]["text"] == f"stored vector {t}"
        )
        self.facts["semantic_sample"] = {"queries": sample_n, "hit_own_entry": right}
        self.say(f"semantic sample: {right}/{sample_n} queries hit their own entry")
        return query_bodies

    def wait_caught_up(self, streak: int = 20, deadline_s: float = 600.0) -> None:
        """Until every worker's indexes hold the preloaded entries.

        A worker's index feed catches up lazily (on its next search, or /readyz), holding a
        lock meanwhile: after a bulk preload the first searches on a worker would wait seconds.
        /readyz catches up (answering 503 after 2 s while it goes on); each probe is a new
        connection, which the kernel gives to any worker, so ``streak`` 200s in a row mean every
        worker is current (a worker missed 20 times in a row has odds 2**-20 with 2 workers).
        """
        deadline = time.monotonic() + deadline_s
        ok = 0
        while ok < streak:
            if time.monotonic() > deadline:
                raise RuntimeError(f"indexes not caught up within {deadline_s:.0f} s")
            ok = ok + 1 if http_status(self.node.url + "/readyz") == 200 else 0
        self.say(f"every worker's indexes caught up ({streak} /readyz 200s in a row)")

    # cases ------------------------------------------------------------------------------------

    def case_exact(self) -> None:
        script = self.wrk.script("exact", lua_cycle(LOOKUP, self.exact_bodies))
        saturated = self.measure("1 exact", self.node.url + LOOKUP, script)
        self.fixed_rate(script, saturated)

    def _probe(self, label: str, script: Path, connections: int) -> WrkRun:
        assert self.node.proc is not None
        run = self.wrk.run(
            label, self.node.url + LOOKUP, script, connections=connections,
            duration=self.args.probe_duration or self.args.duration,
            watch=[self.node.proc.pid], port=self.node.port,
        )  # fmt: skip
        self.say(
            f"  probe {label}: {connections} connections -> {run.rps:,.0f} req/s, "
            f"p50 {run.p50_ms} ms, p99 {run.p99_ms} ms, server {run.server_cores:.2f} cores"
        )
        return run

    def fixed_rate(self, script: Path, saturated: WrkRun) -> None:
        """Case 1's p99 at ``--rate`` req/s: wrk2 -R when installed, else two estimates with
        plain wrk (closed-loop: each connection sends its next request when the answer came)."""
        target = self.args.rate
        if self.wrk.wrk2:
            run = self.measure(
                f"1 exact @ {target}/s (wrk2 -R)", self.node.url + LOOKUP, script, rate=target
            )
            self.facts["fixed_rate"] = {"method": "wrk2 -R", "rate": target, "p99_ms": run.p99_ms}
            return
        if saturated.rps < target:
            note = (
                f"fixed rate: {target:,} req/s is above what the node served at "
                f"{saturated.connections} connections ({saturated.rps:,.0f} req/s): an open-loop "
                f"load of {target:,} req/s would queue without bound, so there is no p99 at it"
            )
            self.notes.append(note)
            self.say("  " + note)
            self.facts["fixed_rate"] = {
                "method": "none (rate not reachable)",
                "rate": target,
                "max_rps": saturated.rps,
            }
            return
        self.facts["fixed_rate"] = {
            "rate": target,
            "fewer_connections": self.fixed_rate_fewer(script, saturated),
            "paced": self.fixed_rate_paced(target),
        }

    def fixed_rate_fewer(self, script: Path, saturated: WrkRun) -> dict[str, Any]:
        """The fewest connections whose closed-loop rate still reaches the target: halving
        from ``--connections``, then bisecting; every probe a full-length run, and the chosen
        probe's own numbers reported (a rerun would spread its few connections over the workers
        differently: with reuse_port the kernel may put them all on one)."""
        target = self.args.rate
        runs = {saturated.connections: saturated}
        hi, lo = saturated.connections, 0
        c = hi // 2
        while c >= 1 and len(runs) < MAX_PROBES:
            runs[c] = self._probe("fewer", script, c)
            if runs[c].rps >= target:
                hi, c = c, c // 2
            else:
                lo = c
                break
        while hi - lo > 1 and len(runs) < MAX_PROBES:
            mid = (lo + hi) // 2
            runs[mid] = self._probe("fewer", script, mid)
            if runs[mid].rps >= target:
                hi = mid
            else:
                lo = mid
        chosen = dataclasses.replace(runs[hi], label=f"1 exact, fewest conns reaching {target:,}/s")
        self.runs.append(chosen)
        return {
            "method": "wrk2 not installed: the fewest wrk connections reaching the rate",
            "connections": hi,
            "rps": chosen.rps,
            "p50_ms": chosen.p50_ms,
            "p99_ms": chosen.p99_ms,
            "probes": {str(k): r.rps for k, r in sorted(runs.items())},
        }

    def fixed_rate_paced(self, target: int) -> dict[str, Any]:
        """``--connections`` connections, each waiting a delay (wrk's Lua ``delay()``) before its
        next request, the delay adjusted until the total rate is within 3 % of the target."""
        conns = self.args.connections
        period_ms = conns * 1000 / target  # per connection
        delay = period_ms * 0.9
        tries: list[tuple[float, WrkRun]] = []
        while len(tries) < PACED_TRIES:
            script = self.wrk.script("paced", lua_cycle(LOOKUP, self.exact_bodies, delay))
            run = self._probe(f"paced (delay {delay:.2f} ms)", script, conns)
            tries.append((delay, run))
            if not run.rps or abs(run.rps - target) <= 0.03 * target:
                break
            overhead = conns * 1000 / run.rps - delay  # per request, besides the delay
            delay = period_ms - overhead
            if delay < 0:
                break
        delay, best = min(tries, key=lambda t: abs(t[1].rps - target))
        chosen = dataclasses.replace(best, label=f"1 exact, {conns} conns paced to ~{target:,}/s")
        self.runs.append(chosen)
        return {
            "method": f"{conns} wrk connections paced by a Lua delay() per request",
            "delay_ms": round(delay, 3),
            "rps": chosen.rps,
            "p50_ms": chosen.p50_ms,
            "p99_ms": chosen.p99_ms,
            "tries": [{"delay_ms": round(d, 3), "rps": r.rps} for d, r in tries],
        }

    def case_bare(self, node_run: WrkRun | None) -> None:
        body = self.facts["exact_answer"].encode()
        bare = BareServer(self.root, self.node.workers, body)
        try:
            bare.start()
            script = self.wrk.script("bare", lua_cycle(LOOKUP, self.exact_bodies))
            run = self.measure(
                f"5 bare aiohttp x{bare.processes}",
                bare.url + LOOKUP,
                script,
                watch=[p.pid for p in bare.procs],
                port=bare.port,
            )
            self.facts["bare_memory"] = bare.memory()
        finally:
            self.facts["bare_stop"] = bare.stop()
        if node_run is not None and run.rps:
            ratio = round(node_run.rps / run.rps, 3)
            self.facts["node_over_bare"] = ratio
            self.say(f"  node/bare = {ratio}")

    def case_semantic(self, query_bodies: list[str]) -> None:
        script = self.wrk.script("semantic", lua_cycle(LOOKUP, query_bodies))
        self.measure("2 semantic (supplied vector)", self.node.url + LOOKUP, script)

    def case_embed(self) -> None:
        nonce = secrets.token_hex(4)
        distinct = self.wrk.script("embed-distinct", lua_distinct_texts(LOOKUP, nonce))
        probe = [json.dumps({"text": distinct_text(99, n, "sample")}) for n in range(1, 21)]
        statuses = [
            body.get("status") for _, body, _ in post_collect(self.node.url + LOOKUP, probe)
        ]
        self.facts["embed_distinct_sample"] = {s: statuses.count(s) for s in set(statuses)}
        text = "Could you tell me how to reset the password of account number 7?"
        sample = post_collect(self.node.url + LOOKUP, [json.dumps({"text": text})])
        self.facts["embed_repeated_status"] = sample[0][1].get("status")
        repeated = self.wrk.script(
            "embed-repeated", lua_cycle(LOOKUP, [json.dumps({"text": text})])
        )
        self.measure("3 embed, distinct texts", self.node.url + LOOKUP, distinct)
        self.measure("3 embed, repeated text", self.node.url + LOOKUP, repeated)

    def case_many(self) -> None:
        script = self.wrk.script("many", lua_cycle(LOOKUP, self.exact_bodies))
        n = self.args.many_connections
        run = self.measure(
            f"4 exact, {n} conns",
            self.node.url + LOOKUP,
            script,
            connections=n,
            warmup=False,  # a warm-up would only open and close them all once more
            duration=self.args.many_duration,
        )
        self.facts["many_connections"] = {
            "connections": n,
            "socket_errors": run.socket_errors,
            "all_established_after_s": run.all_connected_after_s,
            "peak_established": run.peak_established,
            "peak_syn_sent": run.peak_syn_sent,
            "peak_syn_recv": run.peak_syn_recv,
            "held_min_after_all_established": run.held_min,
        }
        if run.socket_errors:
            self.notes.append(f"case 4: {run.socket_errors} socket errors ({run.errors})")
        if run.held_min is None or run.held_min < n:
            self.notes.append(
                f"case 4: the server never held all {n} connections at once (peak "
                f"{run.peak_established}; wrk counts a connection still retrying its SYN as no "
                "error)"
                if run.held_min is None
                else f"case 4: after holding all {n}, the server held as few as {run.held_min}"
            )
        self.facts["after_many_readyz"] = http_status(self.node.url + "/readyz")


# -- output ------------------------------------------------------------------------------------


def target_of(label: str) -> str:
    if label.startswith("1 exact") and "conns" not in label and "@" not in label:
        return TARGETS["exact"]
    if label.startswith("2 "):
        return TARGETS["semantic"]
    if label.startswith("3 embed, distinct"):
        return TARGETS["embed-distinct"]
    if label.startswith("4 "):
        return TARGETS["many-connections"]
    return ""


def table(runs: Sequence[WrkRun]) -> str:
    head = (
        "| case | tool | conns | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | socket errors "
        "c/r/w/t | non-2xx | peak conns (SYN_SENT/SYN_RECV) | server cores "
        "| server CPU µs/req | wrk CPU s | server RSS peak MB | load before → after | target |"
    )
    lines = [head, "|" + " --- |" * 17]
    for r in runs:
        e = r.errors
        lines.append(
            f"| {r.label} | {r.tool} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:g} | "
            f"{r.p90_ms:g} | {r.p99_ms:g} | {r.p999_ms:g} | "
            f"{e['connect']}/{e['read']}/{e['write']}/{e['timeout']} | {e['status']} | "
            f"{r.peak_established} ({r.peak_syn_sent}/{r.peak_syn_recv}) | "
            f"{r.server_cores:.2f} | "
            f"{r.server_cpu_us_per_request:,.0f} | {r.wrk_cpu_s:g} | "
            f"{r.peak_rss_bytes / 2**20:,.0f} | "
            f"{r.load_before} → {r.load_after} | {target_of(r.label)} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=2, help="node server workers (default 2)")
    p.add_argument("--cases", default="1,2,3,4,5", help="which cases, e.g. 1,5 (default all)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds of warm-up per case")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="wrk request timeout, seconds")
    p.add_argument("--rate", type=int, default=5000, help="fixed rate for case 1's p99 (req/s)")
    p.add_argument(
        "--probe-duration", type=float, help="seconds per fixed-rate probe (default --duration)"
    )
    p.add_argument("--many-connections", type=int, default=5000, help="case 4's connections")
    p.add_argument(
        "--many-duration", type=float, default=30.0, help="case 4's seconds (connects ramp up)"
    )
    p.add_argument("--text-entries", type=int, default=1000, help="stored texts (cases 1,3,4,5)")
    p.add_argument("--vec-entries", type=int, default=10_000, help="stored vectors (case 2)")
    p.add_argument("--vec-queries", type=int, default=1000, help="distinct vector queries")
    p.add_argument("--response-bytes", type=int, default=1024, help="stored response size")
    p.add_argument(
        "--commit",
        help="run the node code of this git commit (exported into the temporary directory) "
        "instead of the installed working tree",
    )
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = {int(c) for c in args.cases.split(",") if c.strip()}
    if not cases <= {1, 2, 3, 4, 5}:
        print(f"--cases: unknown case in {args.cases!r}", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print(WRK_MISSING, file=sys.stderr)
        return 2
    raise_nofile()  # for wrk's sockets (inherited); the servers also get it in a preexec_fn
    root = Path(tempfile.mkdtemp(prefix="bench-http-"))
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        source, code_desc = code_under_test(args.commit, root)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"--commit {args.commit}: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        return 2
    node = Node(root, args.workers, source)
    bench = Bench(args, root, node, Wrk(root, args.threads, args.timeout))
    bench.facts["code"] = code_desc
    print(
        f"bench_http: {started}, {os.cpu_count()} CPUs, load {os.getloadavg()}, "
        f"{bench.wrk.version}, wrk2 {'found' if bench.wrk.wrk2 else 'not installed'}, "
        f"workers {args.workers}, code: {code_desc}, tmp {root}",
        flush=True,
    )
    code = 0
    try:
        with timed(bench, "node_start_s"):
            node.start()
        assert node.proc is not None
        bench.facts["memory_after_start"] = tree_memory(node.proc.pid)
        bench.facts["node_nofile_soft"] = nofile_limits(node.proc.pid)
        if cases & {1, 3, 4, 5}:
            bench.preload_texts()
        query_bodies = bench.preload_vectors() if 2 in cases else []
        with timed(bench, "index_catch_up_s"):
            bench.wait_caught_up()
        bench.facts["memory_after_preload"] = tree_memory(node.proc.pid)
        node_exact: WrkRun | None = None
        if 1 in cases:
            bench.case_exact()
            node_exact = next(r for r in bench.runs if r.label == "1 exact")
        if 5 in cases:
            if node_exact is None:  # the ratio needs the node's number under the same settings
                script = bench.wrk.script("exact", lua_cycle(LOOKUP, bench.exact_bodies))
                node_exact = bench.measure("1 exact", node.url + LOOKUP, script)
            bench.case_bare(node_exact)
        if 2 in cases:
            bench.case_semantic(query_bodies)
        if 3 in cases:
            bench.case_embed()
        if 4 in cases:
            bench.case_many()
        bench.facts["memory_after_run"] = tree_memory(node.proc.pid)
    except Exception as exc:
        print(f"bench_http: failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        bench.facts["node_stop"] = node.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(bench, started)
    return code


@contextmanager
def timed(bench: Bench, key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    bench.facts[key] = round(time.perf_counter() - t0, 2)


def report(bench: Bench, started: str) -> None:
    args = bench.args
    print()
    print(
        f"llmcache-node, {args.workers} worker(s); wrk {args.threads} threads, "
        f"{args.duration:g} s per run after {args.warmup:g} s warm-up, timeout {args.timeout:g} s"
    )
    print(table(bench.runs))
    f = bench.facts
    print()
    for key in ("memory_after_start", "memory_after_preload", "memory_after_run", "bare_memory"):
        if key in f:
            m = f[key]
            rss, pss = m["rss_bytes"] / 2**20, m["pss_bytes"] / 2**20
            print(f"{key}: RSS {rss:,.0f} MB, PSS {pss:,.0f} MB over {m['processes']} processes")
    for key in (
        "code",
        "node_start_s",
        "node_nofile_soft",
        "index_catch_up_s",
        "preload_texts",
        "preload_vectors",
        "semantic_sample",
        "exact_answer_bytes",
        "embed_distinct_sample",
        "embed_repeated_status",
        "fixed_rate",
        "node_over_bare",
        "many_connections",
        "after_many_readyz",
        "node_stop",
        "bare_stop",
    ):
        if key in f:
            print(f"{key}: {f[key]}")
    for note in bench.notes:
        print(f"note: {note}")
    print(f"load average at the end: {os.getloadavg()}")
    if args.json:
        out = {
            "started": started,
            "host": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "wrk": bench.wrk.version,
                "wrk2": bench.wrk.wrk2,
                "aiohttp": aiohttp.__version__,
            },
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": [
                {k: v for k, v in asdict(r).items() if k != "raw"}
                | {
                    "server_cores": round(r.server_cores, 3),
                    "server_cpu_us_per_request": round(r.server_cpu_us_per_request, 1),
                }
                for r in bench.runs
            ],
            "facts": {k: v for k, v in f.items() if k != "exact_answer"},
            "notes": bench.notes,
            "load_at_end": os.getloadavg(),
        }
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
