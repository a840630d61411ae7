"""CompactionHold on a real pysyncobj node (a group of one, ticked by hand, loopback port).

The transfers are pysyncobj's own: ``Serializer.getTransmissionData`` opens the dump file for a
follower as the leader does; only the follower itself is absent. The clock is the hold's own
parameter, so the bounds are checked without waiting for them. The real transfers, between
real nodes, are in test_cluster_snapshot_hold.py.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf

from llmcache.cluster.compaction import CompactionHold

FOLLOWER = "127.0.0.1:1"  # a transmission's key: pysyncobj keys them by follower


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(name="leader")
def leader_fixture(tmp_path: Path) -> Iterator[Any]:
    dump = tmp_path / "dump"
    conf = SyncObjConf(
        autoTick=False,
        appendEntriesPeriod=0.001,
        raftMinTimeout=0.01,
        raftMaxTimeout=0.02,
        fullDumpFile=str(dump),
        logCompactionMinEntries=50,
        logCompactionMinTime=3600.0,  # never due here: pysyncobj would fork to write it
    )
    node = SyncObj(f"127.0.0.1:{free_port()}", [], conf)
    try:
        for _ in range(200):
            node.doTick(0.01)
            if node._isLeader():
                break
        assert node._isLeader()
        dump.write_bytes(b"a snapshot" * 1000)  # what a transfer sends (pysyncobj would have
        yield node  # loaded it at its start)
    finally:
        node.destroy()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def held(node: Any) -> bool:
    conf = node._SyncObj__conf
    return bool(conf.logCompactionMinTime == math.inf and conf.logCompactionMinEntries > 50)


def start_transfer(node: Any) -> None:
    data = node._SyncObj__serializer.getTransmissionData(FOLLOWER)
    assert data is not None and data[1], "pysyncobj did not start a transmission"


def transfers(node: Any) -> dict[Any, Any]:
    result: dict[Any, Any] = node._SyncObj__serializer._Serializer__transmissions
    return result


def test_holds_while_a_snapshot_is_sent_then_for_the_grace(leader: Any) -> None:
    clock = Clock()
    hold = CompactionHold(leader, grace_s=60.0, clock=clock)
    hold.tick()
    assert not held(leader)
    start_transfer(leader)
    hold.tick()
    assert held(leader)
    assert leader._SyncObj__conf.logCompactionMinEntries == 50_000  # max(10 x 50, 50,000)
    leader._SyncObj__serializer.cancelTransmisstion(FOLLOWER)  # the transfer ended
    hold.tick()
    assert held(leader), "the follower has not installed it and confirmed the log tail yet"
    clock.now += 59
    hold.tick()
    assert held(leader)
    clock.now += 2
    hold.tick()
    assert not held(leader)
    assert leader._SyncObj__conf.logCompactionMinEntries == 50
    assert leader._SyncObj__conf.logCompactionMinTime == 3600.0


def test_a_transfer_held_too_long_lets_compaction_run_once(
    leader: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    hold = CompactionHold(leader, max_hold_s=600.0, clock=clock)
    start_transfer(leader)
    hold.tick()
    assert held(leader)
    clock.now += 599
    hold.tick()
    assert held(leader)
    clock.now += 2
    with caplog.at_level(logging.WARNING, "llmcache.raft"):
        hold.tick()
    assert not held(leader)
    assert "compacting anyway" in caplog.text
    clock.now += 100
    hold.tick()
    assert not held(leader), "no new hold until that compaction started"
    # The compaction starts (pysyncobj's serializer is busy from serialize() until it is
    # told the outcome): the transfer, of a snapshot older than the log will start, is
    # cancelled and pysyncobj restarts it from the new one; that restart is held again.
    serializer = leader._SyncObj__serializer
    serializer._Serializer__pid = -2
    hold.tick()
    assert FOLLOWER not in transfers(leader)
    serializer._Serializer__pid = 0
    start_transfer(leader)
    hold.tick()
    assert held(leader)


def test_a_node_that_no_longer_leads_drops_its_transfers(leader: Any) -> None:
    clock = Clock()
    hold = CompactionHold(leader, clock=clock)
    start_transfer(leader)
    hold.tick()
    assert held(leader)
    leader._SyncObj__raftState = 0  # pysyncobj's _RAFT_STATE.FOLLOWER
    hold.tick()
    assert not held(leader)
    assert not transfers(leader), "a later leadership would resume it mid-file"
