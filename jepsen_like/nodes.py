"""The nodes of a run: real ``llmcache-node`` processes on their hosts, killed only by PID.

Every process a run starts is in :data:`STARTED` until it is reaped, so the atexit and signal
handlers of the runner (:func:`kill_started`) can kill exactly those, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from jepsen_like.hosts import Host

STARTED: dict[int, subprocess.Popen[bytes]] = {}
"""pid → supervisor process of every node started and not yet reaped."""

READY_DEADLINE_S = 90.0
SKEW_DIR = Path(__file__).parent / "skew"


def kill_started() -> None:
    """SIGKILL every node this process started (children first, by PID) and reap them."""
    for proc in list(STARTED.values()):
        for pid in tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        STARTED.pop(proc.pid, None)


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants from ``/proc``, deepest first (bounded depth)."""
    found: list[int] = []
    level = [pid]
    for _ in range(6):
        children: list[int] = []
        for p in level:
            for task in Path(f"/proc/{p}/task").glob("*"):
                with contextlib.suppress(OSError):
                    children += [int(c) for c in (task / "children").read_text().split()]
        if not children:
            break
        found = children + found
        level = children
    return [*found, pid]


class Node:
    """One member: a host, a data dir, a log file, and the process when it runs."""

    def __init__(self, host: Host, root: Path, data_dir: Path, cluster: Cluster) -> None:
        self.host = host
        self.root = root
        self.data_dir = data_dir
        """Short, under the temp dir: the Unix socket inside must fit in 108 bytes."""
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.skew_s = 0.0
        """Wall-clock offset (seconds) applied from the next start (see skew/sitecustomize.py)."""
        root.mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return f"n{self.host.index}"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "llmcache.node.main",
            "--host", self.host.ip, "--port", str(self.host.http_port),
            "--raft-port", str(self.host.raft_port), "--data-dir", str(self.data_dir),
            "--workers", "1",
        ]  # fmt: skip
        return self.host.wrap(cmd)

    def start(self) -> None:
        peers = [n for n in self.cluster.members if n is not self]
        env = {
            **os.environ,
            "LLMCACHE_PEERS": ",".join(f"{p.host.raft_address}|{p.host.url}" for p in peers),
            "LLMCACHE_RAFT_PASSWORD": self.cluster.password,
            "LLMCACHE_ADMIN_TOKEN": self.cluster.token,
            "LLMCACHE_EMBEDDER": "none",
            **self.cluster.env,
        }
        if self.skew_s:
            path = [str(SKEW_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
            env |= {"PYTHONPATH": os.pathsep.join(path), "LCJ_CLOCK_OFFSET_S": str(self.skew_s)}
        with self.log_path.open("ab") as log:
            skew = f" (clock {self.skew_s:+g} s)" if self.skew_s else ""
            log.write(f"\n=== start {time.time():.3f}{skew} {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        STARTED[self.proc.pid] = self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.running and self.proc else []

    def signal(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """kill -9 the whole node at once (children first) and reap it."""
        self.signal(signal.SIGCONT)  # a paused node must die too, not linger stopped
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            STARTED.pop(self.proc.pid, None)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a graceful stop that hands leadership over), then wait."""
        if self.proc is None or not self.running:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            STARTED.pop(self.proc.pid, None)

    def wipe(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 5.0
    ) -> tuple[int, dict[str, str], Any]:
        """One HTTP request with the admin token; JSON in and out."""
        return http(self.host.url + path, method, body, self.cluster.token, timeout)

    def status(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            code, _, body = self.request("GET", "/v1/cluster/status", timeout=2.0)
            if code == 200 and isinstance(body, dict):
                return body
        return None

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            with contextlib.suppress(OSError, ValueError):
                if self.request("GET", "/readyz", timeout=2.0)[0] == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready within {deadline_s} s; see {self.log_path}")

    def store_state(self) -> tuple[int, str]:
        """``(applied index, Store.digest())`` of this node's LMDB, read-only in a subprocess."""
        script = (
            "import json, sys\n"
            "from llmcache.node.store import Store\n"
            "s = Store(sys.argv[1], readonly=True)\n"
            "for _ in range(50):\n"
            "    a = s.applied_index(); d = s.digest()\n"
            "    if s.applied_index() == a: break\n"
            "print(json.dumps([a, d]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, str(self.data_dir / "store")],
            capture_output=True,
            timeout=60,
            check=True,
        )
        applied, digest = json.loads(out.stdout)
        return int(applied), str(digest)


def http(
    url: str, method: str, body: Any, token: str, timeout: float
) -> tuple[int, dict[str, str], Any]:
    """``(status, headers, JSON body or raw bytes)``; raises OSError when no answer came."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("X-LLMCache-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, headers = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        raw, status, headers = err.read(), err.code, dict(err.headers)
    if "json" in headers.get("Content-Type", ""):
        return status, headers, json.loads(raw)
    return status, headers, raw


class Cluster:
    """The group under test: its members (the nodes in the Raft configuration) and spares
    (started later by a membership nemesis)."""

    def __init__(
        self,
        hosts: list[Host],
        root: Path,
        data_root: Path,
        members: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.password = secrets.token_urlsafe(16)
        self.token = secrets.token_urlsafe(16)
        self.env = env or {}
        self.nodes = [Node(h, root / f"n{h.index}", data_root / f"n{h.index}", self) for h in hosts]
        self.members = self.nodes[:members]

    def start(self) -> None:
        for node in self.members:
            node.start()
        for node in self.members:
            node.wait_ready()

    def by_raft(self, address: str | None) -> Node | None:
        return next((n for n in self.nodes if n.host.raft_address == address), None)

    def leader(self, among: list[Node] | None = None, deadline_s: float = 30.0) -> Node | None:
        """The node every running node of ``among`` (default: members) agrees leads, or None."""
        deadline = time.monotonic() + deadline_s
        nodes = [n for n in (among or self.members) if n.running]
        while time.monotonic() < deadline:
            believed = {(s or {}).get("leader") for s in (n.status() for n in nodes)}
            if len(believed) == 1:
                leader = self.by_raft(believed.pop())
                if leader is not None and leader in nodes:
                    return leader
            time.sleep(0.2)
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
