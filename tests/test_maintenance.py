"""Leader maintenance: victim policies, Touch apply, access buffering, and real processes
(llmcache-node end to end through HTTP; a 3-node raft-core group converging after maintenance).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from llmcache.cluster import commands as c
from llmcache.cluster.fsm import StateMachine
from llmcache.cluster.ipc import IpcProposer
from llmcache.cluster.maintenance import (
    AccessBuffer,
    Candidate,
    choose_victims,
    evictions,
    lfu,
    lru,
    ttl_first,
)
from llmcache.node.errors import MalformedCommand
from llmcache.node.store import Store
from tests.node_process import NodeProcess
from tests.test_raft_core import (  # noqa: F401  (spawn_fixture provides the `spawn` fixture)
    RaftProcess,
    converged,
    eventually,
    spawn_fixture,
    wait_default_tenant,
    wait_leader,
)

# -- policies on hand-built candidates -----------------------------------------------------------


def cand(i: int, *, created: int = 0, expires: int = 0, hits: int = 0, last: int = 0) -> Candidate:
    return Candidate(i, 100, created, expires, hits, last)


def test_lru_evicts_least_recently_used_and_falls_back_to_creation_time() -> None:
    pool = [
        cand(1, created=10, last=500),  # hit recently
        cand(2, created=20),  # never hit, created late
        cand(3, created=5),  # never hit, created first
        cand(4, created=1, last=300),  # created first, but hit since
    ]
    victims = choose_victims(pool, lru, entries=4, size=400, max_entries=2, max_bytes=None)
    assert victims == [3, 2]


def test_lfu_evicts_fewest_hits_then_oldest() -> None:
    pool = [
        cand(1, created=1, hits=5, last=100),
        cand(2, created=2, hits=1, last=900),
        cand(3, created=3, hits=1, last=200),
        cand(4, created=4),  # never hit: 0 hits
    ]
    victims = choose_victims(pool, lfu, entries=4, size=400, max_entries=1, max_bytes=None)
    assert victims == [4, 3, 2]


def test_ttl_first_evicts_soonest_expiry_and_entries_without_ttl_last() -> None:
    pool = [
        cand(1, created=1),  # no TTL, oldest of all
        cand(2, created=2, expires=9_000),
        cand(3, created=3, expires=5_000, last=10_000),
        cand(4, created=4),  # no TTL
    ]
    victims = choose_victims(pool, ttl_first, entries=4, size=400, max_entries=1, max_bytes=None)
    assert victims == [3, 2, 1]


def test_victims_are_chosen_until_both_entries_and_bytes_fit_and_within_the_limit() -> None:
    pool = [Candidate(i, size, i, 0, 0, 0) for i, size in ((1, 10), (2, 500), (3, 10), (4, 10))]
    # 4 entries, 530 bytes; at most 200 bytes: 1 (10 B) is not enough, 2 (500 B) is.
    assert choose_victims(pool, lru, entries=4, size=530, max_entries=None, max_bytes=200) == [
        1,
        2,
    ]
    assert choose_victims(pool, lru, entries=4, size=530, max_entries=10, max_bytes=1_000) == []
    assert choose_victims(
        pool, lru, entries=4, size=530, max_entries=0, max_bytes=None, limit=3
    ) == [
        1,
        2,
        3,
    ]


# -- Touch applied by the state machine ----------------------------------------------------------


def kv(i: int, *, created: int, expires: int = 0, tenant: str = "t1") -> c.Put:
    return c.Put(
        tenant=tenant,
        namespace="ns",
        scope="kv",
        exact_key=hashlib.sha256(f"{tenant}/{i}".encode()).digest(),
        kind="kv",
        key=f"k{i}",
        response=b"x" * 10,
        created_at_ms=created,
        expires_at_ms=expires,
        ts_ms=created,
    )


class Log:
    """A state machine over a real LMDB store, fed commands at consecutive indexes."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path, durable=False)
        self.fsm = StateMachine(self.store)
        self.index = 0

    def apply(self, cmd: c.Command) -> dict[str, Any]:
        self.index += 1
        result = self.fsm.apply(self.index, c.encode(cmd))
        assert result.ok, result
        return result.value

    def touch(self, rows: list[tuple[int, int, int]], request_id: str = "") -> dict[str, Any]:
        ids, hits, last = (tuple(col) for col in zip(*rows, strict=True))
        return self.apply(c.Touch(ids=ids, hits=hits, last_hit_ms=last, request_id=request_id))

    def access(self, entry_id: int) -> tuple[int, int]:
        with self.store.read() as txn:
            return self.store.access(txn, entry_id)


@pytest.fixture(name="log")
def log_fixture(tmp_path: Path) -> Iterator[Log]:
    log = Log(tmp_path / "store")
    log.apply(c.TenantUpsert(tenant="t1"))
    yield log
    log.store.close()


def test_touch_adds_hits_keeps_the_latest_hit_and_ignores_unknown_ids(log: Log) -> None:
    a = log.apply(kv(1, created=1))["id"]
    b = log.apply(kv(2, created=2))["id"]
    assert log.touch([(a, 2, 100), (b, 1, 50), (999, 7, 7)]) == {"touched": 2}
    assert log.touch([(a, 3, 80), (a, 1, 120)]) == {"touched": 1}
    assert log.access(a) == (6, 120) and log.access(b) == (1, 50)
    assert log.access(999) == (0, 0)  # never a row for an id that does not exist
    with log.store.read() as txn:
        assert log.store.entry(txn, 999) is None
    # A repeated request id is answered, not counted twice.
    log.touch([(b, 5, 60)], request_id="touch-1")
    again = log.touch([(b, 5, 60)], request_id="touch-1")
    assert "duplicate_of" in again and log.access(b) == (6, 60)


def test_deleting_an_entry_deletes_its_access_row(log: Log) -> None:
    ids = [log.apply(kv(i, created=i))["id"] for i in range(3)]
    log.touch([(i, 1, 10) for i in ids])
    log.apply(c.Evict(ids=(ids[0],)))
    log.apply(c.Delete(tenant="t1", ids=(ids[1],)))
    log.apply(kv(2, created=9))  # same key: replaces ids[2]
    assert [log.access(i) for i in ids] == [(0, 0)] * 3
    with log.store.read() as txn:
        assert list(log.store.prefix(txn, "access", b"")) == []


def test_a_touch_of_unequal_lengths_or_negative_counts_is_malformed() -> None:
    for bad in (
        c.Touch(ids=(1, 2), hits=(1,), last_hit_ms=(1, 2)),
        c.Touch(ids=(1,), hits=(-1,), last_hit_ms=(1,)),
    ):
        with pytest.raises(MalformedCommand):
            c.decode(c.encode(bad))


def test_evictions_read_replicated_access_and_follow_each_tenants_policy(log: Log) -> None:
    log.apply(c.TenantUpsert(tenant="t2", config={"max_entries": 2, "eviction": "lfu"}))
    t1 = [log.apply(kv(i, created=100 + i))["id"] for i in range(6)]
    t2 = [log.apply(kv(i, created=100 + i, tenant="t2"))["id"] for i in range(4)]
    log.touch([(t1[0], 1, 1_000), (t1[1], 1, 900), (t2[0], 3, 150), (t2[3], 2, 160)])
    assert evictions(log.store) == {"t2": [t2[1], t2[2]]}  # t1 has no capacity set
    log.apply(c.TenantUpsert(tenant="t1", config={"max_entries": 3}))  # default policy: LRU
    assert evictions(log.store) == {"t1": [t1[2], t1[3], t1[4]], "t2": [t2[1], t2[2]]}
    log.apply(c.TenantUpsert(tenant="t1", config={"max_bytes": 1, "eviction": "ttl"}))
    # No TTLs: LRU order among them, and all must go to fit one byte.
    assert evictions(log.store)["t1"] == [*t1[2:], t1[1], t1[0]]
    assert evictions(log.store, limit=2)["t1"] == [t1[2], t1[3]]


def test_the_access_buffer_sums_reports_bounds_ids_and_chunks_touches() -> None:
    buffer = AccessBuffer(max_ids=3)
    assert buffer.add([1, 2], [1, 1], [10, 20]) == 2
    assert buffer.add([2, 3, 4], [2, 1, 1], [15, 30, 40]) == 2  # id 4 is over the bound
    assert buffer.dropped == 1
    (touch,) = buffer.take()
    assert (touch.ids, touch.hits, touch.last_hit_ms) == ((1, 2, 3), (1, 3, 1), (10, 20, 30))
    assert buffer.take() == []
    big = AccessBuffer()
    n = c.MAX_TOUCH_IDS + 5
    big.add(range(n), [1] * n, [1] * n)
    assert [len(t.ids) for t in big.take()] == [c.MAX_TOUCH_IDS, 5]


# -- a real node, end to end through HTTP --------------------------------------------------------

FAST = {
    "LLMCACHE_EMBEDDER": "none",
    "LLMCACHE_DURABLE": "false",
    "LLMCACHE_MAINTENANCE_PERIOD_S": "0.5",
    "LLMCACHE_ACCESS_REPORT_PERIOD_S": "0.3",
}
DEADLINE_S = 60.0


def wait_for(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def read_store(data_dir: Path, fn: Callable[[Store, Any], Any]) -> Any:
    try:
        with Store(data_dir / "store", readonly=True) as store, store.read() as txn:
            return fn(store, txn)
    except lmdb.Error:
        return None


def test_a_node_expires_ttl_entries_and_evicts_the_least_recently_looked_up(
    tmp_path: Path,
) -> None:
    node = NodeProcess(tmp_path / "n", env=FAST).start()
    try:
        for i in range(5):
            status, _, _ = node.request(
                "POST", "/v1/cache/store", {"key": f"ttl{i}", "response": "r", "ttl_s": 1}
            )
            assert status == 201
        ids = {}
        for i in range(30):
            status, _, body = node.request(
                "POST", "/v1/cache/store", {"key": f"k{i}", "response": f"value {i}"}
            )
            assert status == 201
            ids[body["id"]] = f"k{i}"
        looked_up = {f"k{i}" for i in range(3, 30, 3)}  # 9 keys, spread over creation order
        looked_up.add("k0")  # the oldest entry, but used
        for key in sorted(looked_up):
            _, headers, body = node.request("POST", "/v1/cache/lookup", {"key": key})
            assert headers["X-LLMCache-Status"] == "HIT", body

        def ttl_purged(store: Store, txn: Any) -> bool:
            gone = all(store.key_id(txn, "default", "default", f"ttl{i}") is None for i in range(5))
            return gone and store.stats(txn, "default")["expired"] == 5

        wait_for(lambda: read_store(node.data_dir, ttl_purged), "TTL entries purged by Expire")

        def touched(store: Store, txn: Any) -> bool:
            return all(store.access(txn, i)[0] >= 1 for i, k in ids.items() if k in looked_up)

        wait_for(lambda: read_store(node.data_dir, touched), "lookups reported through Touch")
        with Store(node.data_dir / "store", readonly=True) as store, store.read() as txn:
            assert store.stats(txn, "default")["entries"] == 30
            assert all(store.access(txn, i) == (0, 0) for i, k in ids.items() if k not in looked_up)

        status, _, _ = node.request(
            "POST", "/v1/tenants", {"tenant": "default", "config": {"max_entries": 10}}
        )
        assert status == 200

        def evicted(store: Store, txn: Any) -> dict[str, int] | None:
            stats = store.stats(txn, "default")
            return stats if stats["entries"] <= 10 else None

        stats = wait_for(lambda: read_store(node.data_dir, evicted), "eviction down to 10")
        assert stats["entries"] == 10 and stats["evicted"] == 20
        survivors = set()
        for key in sorted(ids.values()):
            _, headers, _ = node.request("POST", "/v1/cache/lookup", {"key": key})
            if headers["X-LLMCache-Status"] == "HIT":
                survivors.add(key)
        assert survivors == looked_up
        assert node.stop() == 0
    finally:
        node.kill()


# -- a 3-node raft-core group ---------------------------------------------------------------------


def test_three_nodes_expire_and_evict_identically_with_reports_from_a_follower(
    spawn: Callable[..., list[RaftProcess]],
) -> None:
    nodes = spawn(3, ["--maintenance-period", "0.5"])

    async def scenario() -> RaftProcess:
        leader, _ = await wait_leader(nodes)
        await wait_default_tenant(leader)
        proposer = IpcProposer(leader.sock)
        follower = IpcProposer(next(n for n in nodes if n is not leader).sock)
        now = int(time.time() * 1000)
        try:
            await proposer.propose(c.TenantUpsert(tenant="t1"))
            for i in range(4):  # expire in 1 s
                await proposer.propose(kv(100 + i, created=now, expires=now + 1_000))
            ids = []
            for i in range(12):
                p = await proposer.propose(kv(i, created=now + i))
                assert p.result is not None and p.result.ok
                ids.append(p.result.value["id"])
            used = ids[:3]  # the oldest three, but hit: they must survive LRU
            await follower.report_access({i: (2, now + 10_000) for i in used})

            def touched(store: Store, txn: Any) -> bool:
                return all(store.access(txn, i) == (2, now + 10_000) for i in used)

            async def reported() -> bool:
                return all(read_store(n.data, touched) for n in nodes)

            await eventually(reported, "a follower's report applied on every node")

            def expired(store: Store, txn: Any) -> bool:
                return store.stats(txn, "t1") == {
                    "entries": 12,
                    "bytes": store.stats(txn, "t1")["bytes"],
                    "evicted": 0,
                    "expired": 4,
                }

            async def all_expired() -> bool:
                return all(read_store(n.data, expired) for n in nodes)

            await eventually(all_expired, "TTL entries purged on every node")
            await proposer.propose(c.TenantUpsert(tenant="t1", config={"max_entries": 5}))

            def settled(store: Store, txn: Any) -> dict[str, int] | None:
                stats = store.stats(txn, "t1")
                return stats if stats["entries"] == 5 else None

            async def all_settled() -> bool:
                return all(read_store(n.data, settled) for n in nodes)

            await eventually(all_settled, "expiry and eviction on every node")
        finally:
            await proposer.close()
            await follower.close()
        await converged(nodes)
        expected = {*used, *ids[-2:]}
        for node in nodes:

            def live(store: Store, txn: Any) -> set[int]:
                return {i for i in ids if store.entry(txn, i) is not None}

            assert read_store(node.data, live) == expected
            assert read_store(node.data, lambda s, t: s.stats(t, "t1")["evicted"]) == 7
        return leader

    leader = asyncio.run(scenario())

    # The new leader takes maintenance over: TTL entries written after the handover expire.
    assert leader.stop() == 0
    rest = [n for n in nodes if n is not leader]

    async def after_handover() -> None:
        new_leader, _ = await wait_leader(rest)
        proposer = IpcProposer(new_leader.sock)
        now = int(time.time() * 1000)
        try:
            for i in range(3):
                put = kv(i, created=now, expires=now + 500, tenant="default")
                await proposer.propose(put)
        finally:
            await proposer.close()

        async def purged() -> bool:
            return all(
                read_store(n.data, lambda s, t: s.stats(t, "default")["expired"] == 3) for n in rest
            )

        await eventually(purged, "expiry by the new leader")
        await converged(rest)

    asyncio.run(after_handover())
