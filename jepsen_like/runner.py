"""One test run: hosts up, cluster up, clients and nemesis for ``time_limit`` seconds, heal,
final reads, checkers, report in ``store/<test>/<time>/``.

The report directory holds ``history.jsonl``, ``results.json``, ``latency.png`` and every
node's ``n*/node.log``. Data directories live in ``$TMPDIR/lcjdata-<run id>/`` (the Unix
socket inside must have a short path) and are removed at the end unless ``keep_data``.
Whatever happens (an exception, Ctrl-C, SIGTERM), the nodes this run started are killed by
PID and its namespaces and links removed; atexit covers an interpreter that exits otherwise.
"""

from __future__ import annotations

import atexit
import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from jepsen_like import checkers, history, nemesis, plots
from jepsen_like.hosts import PREFIX, Hosts, make_hosts
from jepsen_like.nodes import Cluster, kill_started
from jepsen_like.workloads import WORKLOADS, client_loop

CONVERGE_DEADLINE_S = 60.0


@dataclass
class Spec:
    """What to run and what to expect. ``expect`` names checkers whose *failure* is the
    expected outcome (a known weakness that the checker must detect)."""

    name: str
    nodes: int = 3
    nemesis: list[str] = field(default_factory=list)
    schedule: str = "single"
    workload: str = "register"
    consistency: str = "linearizable"
    time_limit: float = 30.0
    seed: int = 7
    clients: int = 6
    pace_s: float = 0.05
    interval_s: float = 10.0
    stale_bound_s: float | None = None
    max_write_gap_s: float | None = None
    expect_invalid: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    hosts: str = "auto"
    expect_log: str | None = None
    """Text every victim of the nemesis must have logged (``victims_logged``)."""


_CLEANUPS: list[Hosts] = []


def _cleanup() -> None:
    kill_started()
    while _CLEANUPS:
        _CLEANUPS.pop().close()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    _cleanup()
    sys.exit(128 + signum)


def install_handlers() -> None:
    """Clean up on exit, Ctrl-C and SIGTERM (only in the main thread)."""
    atexit.register(_cleanup)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)


def converge(cluster: Cluster) -> dict[str, Any]:
    """Wait until every member applied the same index, then compare LMDB digests; equal
    digests at equal indexes is convergence, different ones divergence."""
    deadline = time.monotonic() + CONVERGE_DEADLINE_S
    states: dict[str, tuple[int, str]] = {}
    while time.monotonic() < deadline:
        states = {n.name: n.store_state() for n in cluster.members}
        indexes = {a for a, _ in states.values()}
        if len(indexes) == 1:
            digests = {d for _, d in states.values()}
            return {"valid": len(digests) == 1, "applied_index": indexes.pop(), "digests": states}
        time.sleep(1.0)
    return {"valid": False, "reason": "applied indexes never met", "states": states}


def one_configuration(cluster: Cluster) -> dict[str, Any]:
    """Every member's view of the group (``GET /v1/cluster/members``) is the same set: the
    members the run ended with."""
    expected = sorted(n.host.raft_address for n in cluster.members)
    views: dict[str, Any] = {}
    for node in cluster.members:
        code, _, body = node.request("GET", "/v1/cluster/members", timeout=10.0)
        views[node.name] = sorted(m["address"] for m in body["members"]) if code == 200 else code
    return {
        "valid": all(v == expected for v in views.values()),
        "expected": expected,
        "views": views,
    }


def victims_logged(cluster: Cluster, hist: history.History, text: str) -> dict[str, Any]:
    """Every member a nemesis hit has ``text`` in its log (e.g. that it installed a snapshot,
    checksums verified before use, or that it stepped down as leader)."""
    victims = {
        name
        for e in hist.events
        if e["type"] == "nemesis" and e["phase"] == "start"
        for name in str(e["detail"]).split()
    }
    nodes = [n for n in cluster.members if n.name in victims]
    found = {n.name: text in n.log_path.read_text(errors="replace") for n in nodes}
    return {"valid": bool(found) and all(found.values()), "looked_for": text, "found": found}


def run(spec: Spec, store: Path = Path("store"), keep_data: bool = False) -> dict[str, Any]:
    """Run ``spec``; the results (also written to ``results.json``), ``valid`` overall."""
    install_handlers()
    run_id = secrets.token_hex(3)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out = store / spec.name / f"{stamp}-{run_id}"
    out.mkdir(parents=True, exist_ok=True)
    spare = 1 if "membership" in spec.nemesis else 0
    hosts = make_hosts(run_id, spec.nodes + spare, spec.hosts)
    nemesis.check_supported(spec.nemesis, hosts)
    hist = history.History()
    _CLEANUPS.append(hosts)
    data_root = Path(tempfile.gettempdir()) / f"{PREFIX}data-{run_id}"
    results: dict[str, Any] = {"spec": asdict(spec), "hosts": hosts.kind, "dir": str(out)}
    try:
        cluster = Cluster(hosts.open(), out, data_root, spec.nodes, spec.env)
        cluster.start()
        if cluster.leader(deadline_s=60.0) is None:
            raise RuntimeError("the cluster elected no leader")
        workload = WORKLOADS[spec.workload](cluster, hist, spec.seed, spec.consistency)
        nemeses = [nemesis.Nemesis(n, cluster, hosts, hist, spec.seed) for n in spec.nemesis]
        schedule = nemesis.Schedule(
            nemeses, spec.schedule, spec.time_limit, spec.seed, hist, spec.interval_s
        )
        hist.t0 = time.monotonic()
        stop = threading.Event()
        clients = [
            threading.Thread(
                target=client_loop,
                args=(workload, p, stop, spec.seed, spec.pace_s),
                name=f"client-{p}",
                daemon=True,
            )
            for p in range(spec.clients)
        ]
        for thread in clients:
            thread.start()
        schedule.thread.start()
        stop.wait(spec.time_limit)
        stop.set()
        for thread in clients:
            thread.join(30)
        end = hist.now()
        schedule.heal()
        if cluster.leader(deadline_s=60.0) is None:
            raise RuntimeError("no leader after healing")
        workload.final_reads()
        results["nemesis_errors"] = schedule.errors
        results["checks"] = check(spec, hist, workload.final, end, out)
        results["checks"]["convergence"] = converge(cluster)
        if "membership" in spec.nemesis:
            results["checks"]["configuration"] = one_configuration(cluster)
        if spec.expect_log:
            results["checks"]["victims_logged"] = victims_logged(cluster, hist, spec.expect_log)
    except Exception as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        hist.save(out / "history.jsonl")
        _cleanup()
        results["valid"] = verdict(spec, results)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if keep_data:
            shutil.move(data_root, out / "data")
        else:
            shutil.rmtree(data_root, ignore_errors=True)
    return results


def check(
    spec: Spec, hist: history.History, final: dict[str, Any], end: float, out_dir: Path
) -> dict[str, Any]:
    ops = history.pair(hist.events)
    faults = history.windows(hist.events, end)
    out: dict[str, Any] = {"summary": checkers.summarize(ops)}
    if spec.workload == "register":
        out["linearizable"] = checkers.linearizable(ops)
        out["stale_reads"] = checkers.stale_reads(ops, spec.stale_bound_s)
    elif spec.workload == "set":
        out["set"] = checkers.set_checker(ops, final)
    elif spec.workload == "cache":
        out["cache"] = checkers.cache_checker(ops, final)
    out["availability"] = checkers.availability(ops, faults, end, spec.max_write_gap_s)
    out["summary"]["fault_windows"] = [
        {"start": round(a, 3), "stop": round(b, 3), "nemesis": n} for a, b, n in faults
    ]
    if hist.events:
        plots.latency_plot(ops, faults, out_dir / "latency.png", spec.name)
    return out


def verdict(spec: Spec, results: dict[str, Any]) -> bool:
    """Every checker passed, except those expected to fail, which must have failed."""
    if "error" in results or results.get("nemesis_errors"):
        return False
    outcome = True
    for name, result in results.get("checks", {}).items():
        if not isinstance(result, dict) or "valid" not in result:
            continue
        expected_bad = name in spec.expect_invalid
        result["expected"] = "invalid" if expected_bad else "valid"
        passed = (result["valid"] is False) if expected_bad else (result["valid"] is True)
        result["passed"] = passed
        outcome = outcome and passed
    return outcome
