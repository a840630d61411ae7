"""The group's clock: TTLs decided by the leader's clock, whatever a node's own clock says
(node/clock.py, ``commands.rebase``, the leader's stamp in idle periods)."""

from __future__ import annotations

import time
from pathlib import Path

from llmcache.cluster import commands as c
from llmcache.cluster.fsm import StateMachine
from llmcache.node.clock import ClusterClock
from llmcache.node.store import Store
from tests.cluster_process import ClusterProcess

SKEW = Path(__file__).resolve().parents[1] / "jepsen_like" / "skew"
HOUR_S = 3600


def put(**times: int) -> c.Put:
    return c.Put(
        tenant="t", namespace="n", scope="s", exact_key=b"k" * 32, kind="kv", key="k", **times
    )


def test_rebase_moves_a_put_onto_the_leaders_clock() -> None:
    now = 10_000_000
    ahead = put(ts_ms=now + HOUR_S * 1000, created_at_ms=now + HOUR_S * 1000,
                expires_at_ms=now + HOUR_S * 1000 + 5_000)  # fmt: skip
    moved = c.decode(c.rebase(c.encode(ahead), now))
    assert isinstance(moved, c.Put)
    assert (moved.ts_ms, moved.created_at_ms, moved.expires_at_ms) == (now, now, now + 5_000)
    never = c.decode(c.rebase(c.encode(put(ts_ms=now - 60_000, created_at_ms=now - 60_000)), now))
    assert isinstance(never, c.Put) and never.expires_at_ms == 0  # no TTL stays no TTL
    close = c.encode(put(ts_ms=now - 300, created_at_ms=now - 300, expires_at_ms=now + 700))
    assert c.rebase(close, now) == close  # within the tolerance: the same bytes
    unstamped = c.encode(c.Noop())
    assert c.rebase(unstamped, now) == unstamped
    assert c.rebase(b"\x01garbage", now) == b"\x01garbage"


def test_the_state_machine_keeps_the_latest_leader_stamp(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", durable=False)
    fsm = StateMachine(store)
    fsm.apply(1, c.encode(c.Noop(ts_ms=5_000)))
    assert store.last_ts_ms() == 5_000
    # A new leader whose clock is behind its predecessor's: its time takes over.
    fsm.apply(2, c.encode(c.Noop(ts_ms=4_000)))
    assert store.last_ts_ms() == 4_000
    # Forwarded by pysyncobj, never stamped by the leader: ignored.
    fsm.apply(3, c.encode(c.Touch(ids=(), hits=(), last_hit_ms=(), ts_ms=9_000_000)))
    fsm.apply(4, c.encode(c.Advertise(address="a:1", http_url="http://a:2", ts_ms=9_000_000)))
    assert store.last_ts_ms() == 4_000
    store.close()


def test_the_cluster_clock_follows_stamps_with_monotonic_time(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", durable=False)
    fsm = StateMachine(store)
    mono = [100.0]
    clock = ClusterClock(store.last_ts_ms, monotonic=lambda: mono[0], wall=lambda: 42.0)
    assert clock() == 42.0  # no stamp yet: the local clock
    fsm.apply(1, c.encode(c.Noop(ts_ms=7_000_000)))
    assert clock() == 7_000.0
    mono[0] += 2.5
    assert clock() == 7_002.5  # runs on from the stamp, never from the local wall clock
    fsm.apply(2, c.encode(c.Noop(ts_ms=7_010_000)))
    assert clock() == 7_010.0
    # A local clock that agrees within a second is used as it is (the stamp lags a little).
    local = ClusterClock(store.last_ts_ms, monotonic=lambda: mono[0], wall=lambda: 7_010.6)
    assert local() == 7_010.6
    store.close()


def test_ttl_is_decided_by_the_leaders_clock_on_skewed_nodes(tmp_path: Path) -> None:
    cluster = ClusterProcess(tmp_path)
    for node, skew in zip(cluster.nodes[1:], (HOUR_S, -HOUR_S), strict=True):
        node.env |= {"PYTHONPATH": str(SKEW), "LCJ_CLOCK_OFFSET_S": str(skew)}
    try:
        cluster.start()
        steady, ahead, behind = cluster.nodes
        leader = cluster.leader()
        if leader is not steady:
            code, _, body = leader.request(
                "POST", "/v1/cluster/transfer-leader", {"to": cluster.raft_address(steady)}
            )
            assert code == 200, body
            assert cluster.leader() is steady
        # Writes through a node an hour ahead are forwarded (stamped with the group's clock)
        # and their TTL counts from the leader's clock.
        # (Retried on 503 as a client would: just after the leader changed, the group's clock
        # is the previous leader's until the new one stamps the log.)
        body = {"key": "short", "response": "r", "ttl_s": 2, "request_id": "short-1"}
        deadline = time.monotonic() + 15
        code, _, stored = ahead.request("POST", "/v1/cache/store", body)
        while code == 503 and time.monotonic() < deadline:
            time.sleep(0.3)
            code, _, stored = ahead.request("POST", "/v1/cache/store", body)
        assert code == 201, stored
        code, _, entry = steady.request("GET", f"/v1/cache/entries/{stored['id']}")
        assert code == 200, entry
        assert abs(entry["created_at_ms"] - time.time() * 1000) < 30_000, entry
        # Visible on every node until it expires, then gone on every node, the one an hour
        # behind included (it would serve it for an hour on its own clock).
        read = {"key": "short", "min_index": stored["index"]}
        for node in cluster.nodes:
            code, _, found = node.request("POST", "/v1/cache/lookup", read)
            assert code == 200 and found["status"] == "HIT", (node.url, found)
        time.sleep(3.5)
        for node in cluster.nodes:
            code, _, found = node.request("POST", "/v1/cache/lookup", read)
            assert code == 200 and found["status"] == "MISS", (node.url, found)
        # An entry with an hour to live is served by the node an hour ahead, too.
        code, _, stored = behind.request(
            "POST", "/v1/cache/store", {"key": "long", "response": "r", "ttl_s": 600}
        )
        assert code == 201, stored
        read = {"key": "long", "min_index": stored["index"]}
        code, _, found = ahead.request("POST", "/v1/cache/lookup", read)
        assert code == 200 and found["status"] == "HIT", found
    finally:
        cluster.stop()
