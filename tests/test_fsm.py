"""The state machine over a real LMDB store: apply semantics, determinism, idempotency."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcache.cluster import commands as c
from llmcache.cluster.fsm import StateMachine
from llmcache.node.errors import StoreFull
from llmcache.node.index_feed import IndexFeed
from llmcache.node.store import Store, scope_key
from tests.strategies import COMMANDS, DIM


def put(tenant: str = "t1", text: str = "q", **kw: object) -> c.Put:
    v = np.ones(DIM, np.float32) / 2
    fields: dict[str, object] = {
        "tenant": tenant,
        "namespace": "ns1",
        "scope": "s1",
        "exact_key": hashlib.sha256(f"{tenant}{text}".encode()).digest(),
        "kind": "prompt",
        "text": text,
        "prompt": text,
        "vector": v.tobytes(),
        "embedder": "e",
        "dim": DIM,
        "response": b"answer",
        **kw,
    }
    return c.Put(**fields)  # type: ignore[arg-type]


class Log:
    """A store, its state machine, and the next log index: a one-node log for tests."""

    def __init__(self, path: Path, **store_kw: object) -> None:
        self.store = Store(path, durable=False, **store_kw)  # type: ignore[arg-type]
        self.fsm = StateMachine(self.store)
        self.entries: list[tuple[int, bytes]] = []

    def apply(self, command: c.Command | bytes) -> object:
        data = command if isinstance(command, bytes) else c.encode(command)
        self.entries.append((len(self.entries) + 1, data))
        return self.fsm.apply(*self.entries[-1])


@pytest.fixture
def log(tmp_path: Path) -> Log:
    log = Log(tmp_path / "s")
    log.apply(c.TenantUpsert(tenant="t1"))
    log.apply(c.TenantUpsert(tenant="t2"))
    return log


def test_put_then_replace_by_exact_key(log: Log) -> None:
    first = log.apply(put(response=b"one"))
    second = log.apply(put(response=b"two"))
    assert first.value == {"id": 1, "replaced": None}
    assert second.value == {"id": 2, "replaced": 1}
    with log.store.read() as txn:
        assert log.store.entry(txn, 1) is None
        entry = log.store.entry(txn, 2)
        assert entry is not None and entry.response == b"two"
        assert log.store.exact_id(txn, "t1", put().exact_key) == 2
        assert log.store.stats(txn, "t1")["entries"] == 1
        assert list(log.store.scope_ids(txn, scope_key("t1", "ns1", "s1"))) == [2]
        feed = list(log.store.changes_since(txn, 0))
    assert [changes for _, changes in feed] == [
        [(1, 1, scope_key("t1", "ns1", "s1"))],
        [(0, 1, scope_key("t1", "ns1", "s1")), (1, 2, scope_key("t1", "ns1", "s1"))],
    ]


def test_unknown_tenant_and_dimension_mismatch_change_nothing(log: Log) -> None:
    log.apply(put())
    before = log.store.digest()
    assert log.apply(put(tenant="nobody")).error == "unknown_tenant"
    wrong = put(text="other", vector=b"\0" * 8, dim=2)
    assert log.apply(wrong).error == "dimension_mismatch"
    other_embedder = put(text="other", embedder="e2")
    assert log.apply(other_embedder).error == "dimension_mismatch"
    # Only the applied index moved.
    assert log.store.applied_index() == 6
    with log.store.read() as txn:
        assert log.store.stats(txn, "t1")["entries"] == 1
    assert log.store.digest() != before  # applied index differs...
    fresh = Log(log.store.path.parent / "fresh")
    for index, data in log.entries:
        fresh.fsm.apply(index, data)
    assert fresh.store.digest() == log.store.digest()


def test_malformed_entry_never_half_applies(log: Log) -> None:
    log.apply(put())
    before = _content(log.store)
    result = log.apply(b"\x09garbage")
    assert result.error == "malformed_command"  # type: ignore[attr-defined]
    assert "version byte 9" in result.message  # type: ignore[attr-defined]
    assert _content(log.store) == before
    assert log.store.applied_index() == 4


def _content(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every db but meta (where the applied index moves)."""
    with store.read() as txn:
        return {
            name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
            for name, db in store.dbs.items()
            if name != "meta"
        }


def test_request_id_makes_retries_idempotent(log: Log) -> None:
    first = log.apply(put(request_id="req-1"))
    retry = log.apply(put(request_id="req-1", response=b"different"))
    assert retry.value["id"] == first.value["id"]
    assert retry.value["duplicate_of"] == 3
    with log.store.read() as txn:
        assert log.store.stats(txn, "t1")["entries"] == 1
        entry = log.store.entry(txn, first.value["id"])
        assert entry is not None and entry.response == b"answer"


def test_replayed_index_is_a_noop(log: Log) -> None:
    log.apply(put())
    digest = log.store.digest()
    for index, data in log.entries:
        assert log.fsm.apply(index, data).value == {"skipped": True}
    assert log.store.digest() == digest
    # Raft's own entries take indexes too: a gap is fine, going back is a no-op.
    assert log.fsm.apply(10, c.encode(c.Noop())).value == {}
    assert log.fsm.apply(9, c.encode(c.Noop())).value == {"skipped": True}
    assert log.store.applied_index() == 10


def test_invalidate_filters(log: Log) -> None:
    ids = {}
    for name, ns, tags in [("a", "ns1", ("x",)), ("b", "ns1", ("y",)), ("c", "ns2", ("x", "y"))]:
        ids[name] = log.apply(put(text=name, namespace=ns, tags=tags)).value["id"]
    kv = {}
    for key in ("user/1/profile", "user/1/orders", "user/2/profile"):
        kv[key] = log.apply(
            c.Put(
                tenant="t1",
                namespace="ns1",
                scope="kv",
                kind="kv",
                key=key,
                exact_key=hashlib.sha256(key.encode()).digest(),
                response=b"v",
            )
        ).value["id"]
    other = log.apply(put(tenant="t2", text="a", tags=("x",))).value["id"]

    def live() -> set[int]:
        with log.store.read() as txn:
            return {i for i in [*ids.values(), *kv.values(), other] if log.store.entry(txn, i)}

    assert log.apply(c.Invalidate(tenant="t1", tags=("x",), namespace="ns2")).value == {
        "deleted": 1
    }
    assert ids["c"] not in live() and ids["a"] in live()
    assert log.apply(c.Invalidate(tenant="t1", key_prefix="user/1/")).value == {"deleted": 2}
    assert live() == {ids["a"], ids["b"], kv["user/2/profile"], other}
    assert log.apply(c.Invalidate(tenant="t1", ids=(ids["a"], other))).value == {"deleted": 1}
    assert other in live()  # another tenant's id is never touched
    assert log.apply(c.Invalidate(tenant="t1", tags=("x",))).value == {"deleted": 0}
    assert log.apply(c.Invalidate(tenant="t1", namespace="ns1")).value == {"deleted": 2}
    assert live() == {other}


def test_delete_ignores_other_tenants(log: Log) -> None:
    mine = log.apply(put()).value["id"]
    theirs = log.apply(put(tenant="t2")).value["id"]
    assert log.apply(c.Delete(tenant="t1", ids=(mine, theirs))).value == {"deleted": 1}
    with log.store.read() as txn:
        assert log.store.entry(txn, theirs) is not None


def test_expire_checks_the_leaders_time_and_counts(log: Log) -> None:
    soon = log.apply(put(text="soon", expires_at_ms=1_000)).value["id"]
    later = log.apply(put(text="later", expires_at_ms=9_000)).value["id"]
    never = log.apply(put(text="never")).value["id"]
    with log.store.read() as txn:
        assert log.store.expiring(txn, 5_000, 10) == [soon]
    result = log.apply(c.Expire(ids=(soon, later, never), ts_ms=5_000))
    assert result.value == {"expired": 1}
    assert log.apply(c.Evict(ids=(later,))).value == {"evicted": 1}
    with log.store.read() as txn:
        assert log.store.stats(txn, "t1") == {
            "entries": 1,
            "bytes": log.store.entry(txn, never).size,  # type: ignore[union-attr]
            "evicted": 1,
            "expired": 1,
        }
        assert log.store.expiring(txn, 10**12, 10) == []


def test_tenant_delete_and_config(log: Log) -> None:
    log.apply(put())
    log.apply(c.ConfigSet(tenant="t1", namespace="ns1", values={"threshold": 0.5}))
    log.apply(c.ConfigSet(tenant="t1", values={"ttl_s": 5}))
    with log.store.read() as txn:
        assert log.store.config(txn, "t1", "ns1") == {"threshold": 0.5}
    log.apply(c.ConfigSet(tenant="t1", namespace="ns1", values={"threshold": None}))
    with log.store.read() as txn:
        assert log.store.config(txn, "t1", "ns1") == {}
    assert log.apply(c.TenantDelete(tenant="t1")).value == {"deleted": 1}
    assert log.apply(c.ConfigSet(tenant="t1", values={"x": 1})).error == "unknown_tenant"
    with log.store.read() as txn:
        assert log.store.tenant(txn, "t1") is None
        assert log.store.config(txn, "t1") == {}
        assert log.store.nsmeta(txn, "t1", "ns1") is None
        assert list(log.store.prefix(txn, "members", b"t1\0")) == []


def test_a_read_in_flight_survives_heavy_writes(tmp_path: Path) -> None:
    # The map used to start small and double: resizing it killed every open transaction of the
    # process (py-lmdb), such as a lookup in another thread or a snapshot being copied.
    log = Log(tmp_path / "s")
    log.apply(c.TenantUpsert(tenant="t1"))
    with log.store.read() as txn:
        for i in range(60):
            assert log.apply(put(text=str(i), response=b"x" * 50_000)).error is None  # type: ignore[attr-defined]
        assert log.store.stats(txn, "t1")["entries"] == 0  # its own snapshot, still readable
    with log.store.read() as txn:
        assert log.store.stats(txn, "t1")["entries"] == 60


def test_store_full_at_hard_limit(tmp_path: Path) -> None:
    log = Log(tmp_path / "s", max_map_size=2 << 20)
    log.apply(c.TenantUpsert(tenant="t1"))
    with pytest.raises(StoreFull):
        for i in range(100):
            log.apply(put(text=str(i), response=b"x" * 100_000))
    # Nothing half-written: the failed apply left the previous state intact and readable.
    applied = log.store.applied_index()
    with log.store.read() as txn:
        assert log.store.stats(txn, "t1")["entries"] == applied - 1


SMALL_MAP_READER = """
import sys, threading
from llmcache.node.store import Store
store = Store(sys.argv[1], readonly=True, max_map_size=1 << 20)
held, release, seen = threading.Event(), threading.Event(), {}
def hold():
    with store.read() as txn:
        seen["before"] = store.applied_index(txn)
        held.set()
        release.wait(10)
        seen["after"] = store.applied_index(txn)
thread = threading.Thread(target=hold)
thread.start()
held.wait(10)
print("held", flush=True)
sys.stdin.readline()  # the writer has written past this reader's map
threading.Timer(0.5, release.set).start()
now = store.applied_index()  # must wait for hold()'s read before adopting the larger map
thread.join()
print(seen["before"], seen["after"], now, flush=True)
"""


def test_a_reader_with_a_smaller_map_adopts_the_writers_without_killing_reads(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path / "s")
    log.apply(c.TenantUpsert(tenant="t1"))
    reader = subprocess.Popen(
        [sys.executable, "-c", SMALL_MAP_READER, str(tmp_path / "s")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdin and reader.stdout
        assert reader.stdout.readline().strip() == "held"
        for i in range(40):
            log.apply(put(text=str(i), response=b"x" * 50_000))
        reader.stdin.write("go\n")
        reader.stdin.flush()
        out, err = reader.communicate(timeout=60)
        assert out.split() == ["1", "1", "41"], err
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def _answers(store: Store) -> list[object]:
    feed = IndexFeed(store)
    feed.catch_up()
    queries = [np.eye(DIM, dtype=np.float32)[i] for i in range(DIM)]
    out: list[object] = []
    with store.read() as txn:
        scopes = [s for s, _ in store.scopes(txn)]
    for scope in scopes:
        for q in queries:
            out.append((scope, [(i, round(s, 5)) for i, s in feed.indexes.search(scope, q, 3)]))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(COMMANDS, min_size=1, max_size=25))
def test_apply_is_deterministic_and_idempotent(commands: list[c.Command]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Log(Path(tmp) / "a"), Log(Path(tmp) / "b")
        incremental = IndexFeed(a.store)
        for log in (a, b):
            log.apply(c.TenantUpsert(tenant="t1"))
        for command in commands:
            ra, rb = a.apply(command), b.apply(command)
            assert ra == rb
            incremental.catch_up()
        assert a.store.digest() == b.store.digest()
        # Replaying the whole log (as after a restart) changes nothing.
        digest = a.store.digest()
        for index, data in a.entries:
            a.fsm.apply(index, data)
        assert a.store.digest() == digest
        # Same index answers on both stores, and incremental == rebuilt from LMDB.
        answers = _answers(a.store)
        assert answers == _answers(b.store)
        queries = [np.eye(DIM, dtype=np.float32)[i] for i in range(DIM)]
        with a.store.read() as txn:
            scopes = [s for s, _ in a.store.scopes(txn)]
        incremental_answers = [
            (s, [(i, round(x, 5)) for i, x in incremental.indexes.search(s, q, 3)])
            for s in scopes
            for q in queries
        ]
        assert incremental_answers == answers
        # Batch apply (one transaction) == one by one.
        batched = Log(Path(tmp) / "c")
        batched.fsm.apply_batch(a.entries)
        assert batched.store.digest() == digest


def test_reader_follows_a_snapshot_install(tmp_path: Path) -> None:
    from llmcache.cluster import snapshot
    from llmcache.node.store import REOPEN_CHECK_S

    store_dir = tmp_path / "store"
    writer = Log(store_dir)
    writer.apply(c.TenantUpsert(tenant="t1"))
    # raft-core closes its own store before an install (and py-lmdb opens a path once per
    # process); the readers in worker processes keep theirs open.
    writer.store.close()
    reader = Store(store_dir, readonly=True)
    assert reader.applied_index() == 1
    # A snapshot from the leader: another store, further ahead, installed over the directory.
    ahead = Log(snapshot.staging_dir(store_dir))
    for tenant in ("t1", "t2", "t3"):
        ahead.apply(c.TenantUpsert(tenant=tenant))
    ahead.store.close()
    with reader.read() as txn:  # a read in flight during the install finishes normally
        snapshot.install(snapshot.staging_dir(store_dir), store_dir)
        assert reader.applied_index(txn) == 1
    time.sleep(REOPEN_CHECK_S + 0.1)
    assert reader.applied_index() == 3
    with reader.read() as txn:
        assert [name for name, _ in reader.tenants(txn)] == ["t1", "t2", "t3"]
    reader.close()
