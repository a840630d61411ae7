"""``llmcache-cli``: use and operate LLM-Cache over its HTTP API.

Commands here: ``cluster status``, ``cluster add``, ``cluster remove``, ``cluster
transfer-leader`` and ``dev-cluster``; ``commands.py`` adds ``cache``, ``tenant``, ``export``,
``import`` and ``bench``. Output is for humans unless ``--json`` is given (one JSON document on
stdout). Exit codes: 0 ok/healthy; 1 the cluster is unhealthy or the node refused the operation;
2 a usage error or no node could be reached; 3 a ``cache lookup`` missed.

Which nodes are asked: the ``--url`` options; without any, ``$LLMCACHE_URL``; else the URLs of
the local dev cluster from its state file (``$LLMCACHE_DEV_STATE``, else
``./llmcache-dev/dev-cluster.json``, written by ``dev-cluster`` and removed when it stops); else
``http://127.0.0.1:8080``. The token is ``--token`` or ``$LLMCACHE_TOKEN`` (sent as
``X-LLMCache-Token``); a dev cluster runs in open access and needs none.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from llmcache.client import commands
from llmcache.client.targets import (
    DEFAULT_DEV_DIR,
    DEV_STATE_NAME,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    fail,
    seed_urls,
)

MAX_NODES = 64
"""A bound on discovery: more members than this are not asked."""
RAFT_PORT_OFFSET = 100
"""dev-cluster: node i listens for HTTP on base_port + i and for Raft on base_port + 100 + i."""


class Unreachable(Exception):
    """No HTTP answer from a node (refused, timed out, not HTTP)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            return f"{error.get('code')}: {error.get('message')}"
        return f"HTTP {self.status}"


def call(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    timeout: float = 10.0,
) -> Answer:
    """One JSON request; :class:`Unreachable` when no HTTP answer came."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("X-LLMCache-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (OSError, ValueError) as exc:  # URLError, timeouts, resets, a malformed URL
        raise Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None
    try:
        return Answer(status, json.loads(raw) if raw else None)
    except ValueError:
        return Answer(status, raw.decode(errors="replace"))


def discover(seeds: list[str], token: str | None) -> list[str]:
    """``seeds`` plus every member URL their ``/v1/cluster/members`` name (transitively)."""
    known = list(dict.fromkeys(seeds))
    for url in known:  # grows while iterating: a breadth-first walk, bounded by MAX_NODES
        try:
            answer = call(url, "GET", "/v1/cluster/members", token=token, timeout=5.0)
        except Unreachable:
            continue
        if answer.ok:
            for member in answer.body.get("members", []):
                other = member.get("url")
                fresh = other and not member.get("self") and other.rstrip("/") not in known
                if fresh and len(known) < MAX_NODES:
                    known.append(other.rstrip("/"))
    return known


def sample(urls: list[str], token: str | None) -> dict[str, dict[str, Any]]:
    """``/v1/cluster/status`` and ``/readyz`` of each URL (``{"error"}`` when unreachable)."""
    views: dict[str, dict[str, Any]] = {}
    for url in urls:
        try:
            status = call(url, "GET", "/v1/cluster/status", token=token, timeout=5.0)
            if not status.ok:  # e.g. 401: a missing or wrong token
                views[url] = {"error": status.error()}
                continue
            ready = call(url, "GET", "/readyz", timeout=5.0)
            views[url] = {**status.body, "ready": ready.ok}
            if not ready.ok:
                views[url]["not_ready_because"] = ready.error()
        except Unreachable as exc:
            views[url] = {"error": str(exc)}
    return views


def _leader_commit(views: Iterable[dict[str, Any]]) -> int:
    """The commit index of the leader of the highest term (else the highest one seen)."""
    views = [v for v in views if "error" not in v]
    leaders = [v for v in views if v["role"] == "leader"]
    if leaders:
        return int(max(leaders, key=lambda v: v["term"])["commit_index"])
    return max((int(v["commit_index"]) for v in views), default=0)


def assess(
    first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-node rows and the cluster's problems, from two samples taken some time apart
    (``first`` may be ``second``: then no stall can be seen).

    ``lag`` is the leader's commit index minus the node's applied index. It includes the
    entries Raft keeps for itself (a new leader's no-op, membership changes), which never
    reach the state machine, so a small constant lag is normal. A node is *stalled* when its
    applied index did not move between the samples although the leader's commit index did, or
    although another node has applied more."""
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    views = {url: v for url, v in second.items() if "error" not in v}
    leaders = [v for v in views.values() if v["role"] == "leader"]
    top = max(leaders, key=lambda v: v["term"], default=None)
    commit, commit_before = _leader_commit(views.values()), _leader_commit(first.values())
    most_applied = max((v["applied_index"] for v in views.values()), default=0)
    for url, view in second.items():
        if "error" in view:
            rows.append({"url": url, "reachable": False, "error": view["error"]})
            problems.append(f"{url} is unreachable ({view['error']})")
            continue
        if view["node_id"] in seen:  # the same node under two URLs
            continue
        seen.add(view["node_id"])
        before = first.get(url, {})
        lag = max(0, commit - view["applied_index"])
        moved = view["applied_index"] != before.get("applied_index")
        row = {"url": url, "reachable": True, "lag": lag, "applied_moved": moved}
        row.update({k: view.get(k) for k in ROW_FIELDS})
        rows.append(row)
        name = f"{view['node_id']} ({url})"
        behind = commit != commit_before or view["applied_index"] < most_applied
        if before is not view and not moved and lag and behind:
            problems.append(f"{name}: applied index stalled at {view['applied_index']} (lag {lag})")
        if not view["has_quorum"]:
            problems.append(f"{name} has no quorum")
        if view["leader"] is None:
            problems.append(f"{name} knows no leader")
        contact = view.get("leader_contact_ms")
        if view["role"] != "leader" and contact is not None and contact > LEADER_SILENCE_MS:
            problems.append(f"{name} has not heard the leader for {contact} ms")
        if not view["ready"]:
            problems.append(f"{name} is not ready ({view.get('not_ready_because')})")
    by_term: dict[int, list[str]] = {}
    for view in leaders:
        by_term.setdefault(view["term"], []).append(view["node_id"])
    for term, names in sorted(by_term.items()):
        if len(set(names)) > 1:
            problems.append(f"{len(set(names))} nodes claim leadership in term {term}: {names}")
    believed = sorted({v["leader"] for v in views.values() if v["leader"]})
    if len(believed) > 1:
        problems.append(f"nodes believe in different leaders: {', '.join(believed)}")
    if views and not leaders:
        problems.append("no node is the leader")
    if top is not None:
        down = sorted(p for p, info in top.get("peers", {}).items() if not info.get("connected"))
        if down:
            problems.append(f"the leader has no connection to {', '.join(down)}")
    return rows, problems


ROW_FIELDS = (
    "node_id", "role", "term", "commit_index", "applied_index", "leader", "leader_contact_ms",
    "has_quorum", "ready",
)  # fmt: skip
LEADER_SILENCE_MS = 1500
"""A follower that has not heard the leader for longer (heartbeats every 0.1 s; elections
start after 1.5-3 s of silence) is reported as a problem."""


def render_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "NODE",
        "URL",
        "ROLE",
        "TERM",
        "COMMIT",
        "APPLIED",
        "LAG",
        "LEADER",
        "CONTACT",
        "QUORUM",
        "READY",
    ]
    lines = [header]
    for r in rows:
        if not r["reachable"]:
            lines.append(["?", r["url"], "unreachable"] + [""] * 8)
            continue
        cells = [r[k] for k in ("node_id", "url", "role", "term", "commit_index")]
        contact = r.get("leader_contact_ms")
        cells += [r["applied_index"], r["lag"], r["leader"] or "-"]
        cells += ["-" if contact is None else f"{contact / 1000:.1f}s"]
        cells += ["yes" if r["has_quorum"] else "NO", "yes" if r["ready"] else "NO"]
        lines.append([str(c) for c in cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


# -- click ---------------------------------------------------------------------------------------

url_option = click.option(
    "--url", "urls", multiple=True, help="A node's base URL (repeatable); see --help of the group."
)
token_option = click.option(
    "--token", envvar="LLMCACHE_TOKEN", help="Admin token (default $LLMCACHE_TOKEN)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Use and operate LLM-Cache. Exit codes: 0 ok, 1 unhealthy or refused by the server,
    2 usage or connection error, 3 lookup miss. Nodes: --url, else $LLMCACHE_URL, else the
    local dev cluster's state file ($LLMCACHE_DEV_STATE or ./llmcache-dev/dev-cluster.json),
    else http://127.0.0.1:8080."""


@main.group()
def cluster() -> None:
    """Status, membership and leadership of a Raft group."""


@cluster.command("status")
@url_option
@token_option
@json_option
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between the two samples that detect a stalled applied index (0: one sample).",
)
def status_command(
    urls: tuple[str, ...], token: str | None, as_json: bool, interval: float
) -> None:
    """Every node's role, term, commit/applied index, lag, leader, quorum and readiness.

    Asks every node it finds (discovered through /v1/cluster/members) twice, --interval apart;
    exits 1 when a node is unreachable, not ready or without quorum, when no node or two nodes
    lead in one term, when nodes believe in different leaders, when the leader lost a peer, or
    when a lagging node's applied index did not move between the samples."""
    nodes = discover(seed_urls(urls), token)
    first = sample(nodes, token)
    if all("error" in v for v in first.values()):  # nothing to assess: unreachable or refused
        errors = [f"{url}: {v['error']}" for url, v in first.items()]
        if as_json:
            click.echo(json.dumps({"healthy": False, "problems": errors, "nodes": []}))
        fail("no node gave its status: " + "; ".join(errors), EXIT_USAGE)
    second = first
    if interval > 0:
        time.sleep(interval)
        second = sample(nodes, token)
    rows, problems = assess(first, second)
    if as_json:
        click.echo(json.dumps({"healthy": not problems, "problems": problems, "nodes": rows}))
    else:
        click.echo(render_table(rows))
        click.echo("healthy" if not problems else "UNHEALTHY:")
        for problem in problems:
            click.echo(f"  - {problem}")
    sys.exit(EXIT_UNHEALTHY if problems else EXIT_OK)


def _operate(
    urls: tuple[str, ...],
    token: str | None,
    as_json: bool,
    method: str,
    path: str,
    body: Any,
    describe: Callable[[Any], str],
) -> None:
    url = seed_urls(urls)[0]
    try:
        answer = call(url, method, path, body, token, timeout=60.0)
    except Unreachable as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(answer.body))
    if not answer.ok:
        fail(answer.error(), EXIT_UNHEALTHY)
    if not as_json:
        click.echo(describe(answer.body))


@cluster.command("add")
@click.argument("address")
@url_option
@token_option
@json_option
def add_command(address: str, urls: tuple[str, ...], token: str | None, as_json: bool) -> None:
    """Add the node whose Raft address is ADDRESS (host:raftport) to the group; it should
    already run with the group's members as its peers. Returns once the change committed."""
    body = {"address": address}
    path = "/v1/cluster/members"
    _operate(urls, token, as_json, "POST", path, body, lambda b: f"added {b['added']}")


@cluster.command("remove")
@click.argument("address")
@url_option
@token_option
@json_option
def remove_command(address: str, urls: tuple[str, ...], token: str | None, as_json: bool) -> None:
    """Remove the node with Raft address ADDRESS from the group (committed on return)."""
    path = f"/v1/cluster/members/{urllib.parse.quote(address, safe=':')}"
    _operate(urls, token, as_json, "DELETE", path, None, lambda b: f"removed {b['removed']}")


@cluster.command("transfer-leader")
@click.option("--to", help="The Raft address of the new leader (default: the best follower).")
@url_option
@token_option
@json_option
def transfer_command(
    to: str | None, urls: tuple[str, ...], token: str | None, as_json: bool
) -> None:
    """Hand leadership over; returns once the old leader stepped down."""
    body = {"to": to}
    path = "/v1/cluster/transfer-leader"

    def describe(b: Any) -> str:
        return f"leader now {b['leader'] or '(election running)'}"

    _operate(urls, token, as_json, "POST", path, body, describe)


# -- dev-cluster ---------------------------------------------------------------------------------


@dataclass
class DevNode:
    index: int
    url: str
    raft: str
    data_dir: str
    log: str
    pid: int = 0


def _plan(nodes: int, base_port: int, data_dir: Path) -> list[DevNode]:
    return [
        DevNode(
            index=i + 1,
            url=f"http://127.0.0.1:{base_port + i}",
            raft=f"127.0.0.1:{base_port + RAFT_PORT_OFFSET + i}",
            data_dir=str((data_dir / f"node-{i + 1}").resolve()),
            log=str((data_dir / f"node-{i + 1}.log").resolve()),
        )
        for i in range(nodes)
    ]


def _start(
    plan: list[DevNode], password: str, embedder: str | None
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for node in plan:
        peers = ",".join(f"{n.raft}|{n.url}" for n in plan if n is not node)
        port, raft_port = node.url.rsplit(":", 1)[1], node.raft.rsplit(":", 1)[1]
        args = [
            sys.executable, "-m", "llmcache.node.main", "--host", "127.0.0.1", "--port", port,
            "--raft-port", raft_port, "--data-dir", node.data_dir, "--peers", peers,
        ]  # fmt: skip
        env = {**os.environ, "LLMCACHE_RAFT_PASSWORD": password}
        if embedder:
            env["LLMCACHE_EMBEDDER"] = embedder
        with open(node.log, "ab") as log:
            # Own session: a terminal's Ctrl-C reaches dev-cluster only, which stops the nodes.
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        node.pid = proc.pid
        procs.append(proc)
    return procs


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every node, then SIGKILL (by PID) those still running after ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_ready(plan: list[DevNode], procs: list[subprocess.Popen[bytes]], stop: threading.Event,
                timeout: float) -> str | None:  # fmt: skip
    """None once every node's /readyz answers 200, else why not."""
    deadline = time.monotonic() + timeout
    pending = list(zip(plan, procs, strict=True))
    while pending and time.monotonic() < deadline and not stop.is_set():
        for node, proc in list(pending):
            if proc.poll() is not None:
                return f"node {node.index} exited with {proc.returncode}; see {node.log}"
            try:
                if call(node.url, "GET", "/readyz", timeout=2.0).ok:
                    pending.remove((node, proc))
            except Unreachable:
                pass
        stop.wait(0.3)
    if stop.is_set():
        return "interrupted"
    return (
        f"not ready within {timeout} s: nodes {[n.index for n, _ in pending]}" if pending else None
    )


@main.command("dev-cluster")
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--base-port", type=click.IntRange(1024, 65000), default=8080, show_default=True)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DEV_DIR, show_default=True
)
@click.option("--embedder", type=click.Choice(["default", "remote", "none"]), default=None,
              help="LLMCACHE_EMBEDDER of every node (default: the node's default).")  # fmt: skip
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True)
@click.option("--stop-timeout", type=click.FloatRange(min=1), default=45.0, show_default=True)
def dev_cluster(
    nodes: int,
    base_port: int,
    data_dir: Path,
    embedder: str | None,
    ready_timeout: float,
    stop_timeout: float,
) -> None:
    """Run a local group of NODES nodes on 127.0.0.1 until Ctrl-C or SIGTERM.

    Node i (from 1) serves HTTP on BASE_PORT+i-1 and Raft on BASE_PORT+100+i-1, keeps its data
    in DATA_DIR/node-i and logs to DATA_DIR/node-i.log. The Raft password is
    $LLMCACHE_RAFT_PASSWORD, else a fresh random one. Once all are ready it prints their URLs
    and writes the state file (DATA_DIR/dev-cluster.json, or $LLMCACHE_DEV_STATE) that other
    commands read; on Ctrl-C/SIGTERM it stops every node (SIGTERM, then SIGKILL by PID after
    --stop-timeout) and removes the state file. A node that dies is reported, not restarted.
    Exits 1 when the nodes did not all become ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    state_path = Path(os.environ.get("LLMCACHE_DEV_STATE") or data_dir / DEV_STATE_NAME)
    password = os.environ.get("LLMCACHE_RAFT_PASSWORD") or secrets.token_urlsafe(24)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    plan = _plan(nodes, base_port, data_dir)
    procs = _start(plan, password, embedder)
    try:
        problem = _wait_ready(plan, procs, stop, ready_timeout)
        if problem is not None:
            fail(problem, EXIT_UNHEALTHY)
        state = {"pid": os.getpid(), "nodes": [asdict(node) for node in plan]}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)
        click.echo(f"dev cluster of {nodes} nodes ready; state in {state_path}; Ctrl-C stops it")
        for node in plan:
            click.echo(f"  node {node.index}  {node.url}  raft {node.raft}  pid {node.pid}")
        click.echo(f"export LLMCACHE_URL={plan[0].url}")
        reported: set[int] = set()
        while not stop.wait(0.5):
            for node, proc in zip(plan, procs, strict=True):
                if proc.poll() is not None and node.index not in reported:
                    reported.add(node.index)
                    click.echo(f"node {node.index} exited with {proc.returncode}; see {node.log}")
    finally:
        click.echo("stopping the nodes")
        _stop(procs, stop_timeout)
        if state_path.exists() and json.loads(state_path.read_text()).get("pid") == os.getpid():
            state_path.unlink()
    click.echo("stopped")


for command in commands.COMMANDS:
    main.add_command(command)

from llmcache.client.quality_cli import register  # noqa: E402 (after main is defined)

register(main)


if __name__ == "__main__":
    main()
