"""The harness end to end on real nodes: a short run on loopback hosts (the fallback when no
network namespaces can be made) with the leader killed under writes, the refusal of network
faults there, item 12 of the suite, and the cleanup of leftover namespaces.

The network-fault items of the suite (1, 3, 4, 6 in namespaces) run in ``.ci/run`` as
``python -m jepsen_like suite --short``: they need root.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jepsen_like import hosts, nodes, suite
from jepsen_like.history import load
from jepsen_like.runner import Spec, run


def test_kill_leader_on_loopback_hosts_loses_nothing(tmp_path: Path) -> None:
    spec = Spec("loopback-kill-leader", nemesis=["kill-leader"], workload="set", time_limit=10.0)
    spec.hosts, spec.clients = "loopback", 3
    result = run(spec, tmp_path)
    out = Path(result["dir"])
    assert result["hosts"] == "loopback"
    assert result["valid"] is True, json.dumps(result, indent=1, default=str)[:4000]
    checks = result["checks"]
    assert checks["set"]["acknowledged"] > 0 and checks["set"]["lost_count"] == 0
    assert checks["convergence"]["valid"] is True
    events = load(out / "history.jsonl")
    assert {"start", "stop"} <= {e["phase"] for e in events if e["type"] == "nemesis"}
    assert json.loads((out / "results.json").read_text())["valid"] is True
    assert (out / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert all((out / f"n{i}" / "node.log").stat().st_size > 0 for i in range(3))
    assert not nodes.STARTED, "every node the run started was reaped"


def test_network_faults_are_refused_on_loopback_before_anything_starts(tmp_path: Path) -> None:
    spec = Spec("loopback-partition", nemesis=["partition-leader"], hosts="loopback")
    with pytest.raises(hosts.Unsupported, match="partition-leader"):
        run(spec, tmp_path)
    assert not nodes.STARTED


def test_a_node_with_a_journal_but_no_full_dump_refuses_to_start(tmp_path: Path) -> None:
    result = suite.bad_config(tmp_path)
    assert result["valid"] is True, result
    assert result["exit_code"] != 0


@pytest.mark.skipif(not hosts.netns_available(), reason="needs root and ip/iptables/tc")
def test_cleanup_removes_leftover_namespaces_and_links() -> None:
    left = hosts.NetnsHosts("t" + hosts.random.randbytes(3).hex()[:5], 2)
    left.open()  # a run that crashed before closing
    prefix = hosts.PREFIX + left.run_id
    removed = hosts.cleanup(prefix)
    assert {h.netns for h in left.hosts} <= set(removed) and left.bridge in removed
    listed = hosts.sh("ip", "netns", "list").stdout + hosts.sh("ip", "-o", "link").stdout
    assert prefix not in listed
