"""Snapshot files over real LMDB stores: round trip, corruption and truncation, directory swap."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pysyncobj.node import TCPNode

from llmcache.cluster import commands as c
from llmcache.cluster import snapshot
from llmcache.cluster.fsm import StateMachine
from llmcache.node.store import Store

RAFT_STATE = (
    (b"\x00entry", 41, 3),
    (b"\x01", 40, 3),
    {TCPNode("127.0.0.1:7001"), TCPNode("127.0.0.1:7002")},
)


def filled_store(path: Path, n: int = 40) -> Store:
    store = Store(path, durable=False)
    fsm = StateMachine(store)
    fsm.apply(2, c.encode(c.TenantUpsert(tenant="t1")))
    for i in range(n):
        put = c.Put(
            tenant="t1",
            namespace="ns",
            scope="s",
            exact_key=hashlib.sha256(str(i).encode()).digest(),
            kind="kv",
            key=f"k{i}",
            response=b"v" * 200,
        )
        fsm.apply(3 + i, c.encode(put))
    return store


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Store]:
    store = filled_store(tmp_path / "src")
    yield store
    store.close()


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_round_trip_into_an_empty_node(source: Store, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    manifest = snapshot.save(snap, source, RAFT_STATE)
    assert manifest.applied_index == source.applied_index() == 42
    assert [m.name for m in manifest.members] == ["raft", "data.mdb"]
    assert not (tmp_path / "snap.d").exists()  # the scratch copy is gone

    store_dir = tmp_path / "node" / "store"
    staging = snapshot.staging_dir(store_dir)
    loaded = snapshot.load(snap, staging, local_applied=0)
    assert loaded.raft_state == RAFT_STATE
    assert loaded.store_dir == staging and (staging / "data.mdb").exists()
    snapshot.install(staging, store_dir)
    assert not staging.exists()
    with Store(store_dir) as copy:
        assert copy.digest() == source.digest()
        assert copy.applied_index() == 42


def test_the_copy_is_the_state_of_the_pinned_transaction(source: Store, tmp_path: Path) -> None:
    digest = source.digest()
    with source.read() as txn:
        StateMachine(source).apply(100, c.encode(c.TenantUpsert(tenant="later")))
        manifest = snapshot.save(tmp_path / "snap", source, RAFT_STATE, txn)
    assert manifest.applied_index == 42 and source.applied_index() == 100
    loaded = snapshot.load(tmp_path / "snap", tmp_path / "staging", local_applied=0)
    assert loaded.store_dir is not None
    with Store(loaded.store_dir) as copy:
        assert copy.digest() == digest


def test_a_store_at_or_after_the_snapshot_is_kept(source: Store, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snapshot.save(snap, source, RAFT_STATE)
    staging = tmp_path / "staging"
    for local in (42, 50):
        loaded = snapshot.load(snap, staging, local_applied=local)
        assert loaded.store_dir is None and not staging.exists()
        assert loaded.raft_state == RAFT_STATE


def corrupt_offsets(size: int) -> list[int]:
    """A byte in the raft member, the store copy, the manifest and the trailer."""
    return [5, size // 2, size - 60, size - 40, size - 1]


@pytest.mark.parametrize("where", range(5))
def test_a_flipped_byte_is_rejected_and_the_store_left_untouched(
    source: Store, tmp_path: Path, where: int
) -> None:
    snap = tmp_path / "snap"
    snapshot.save(snap, source, RAFT_STATE)
    data = bytearray(snap.read_bytes())
    offset = corrupt_offsets(len(data))[where]
    data[offset] ^= 0x01
    snap.write_bytes(bytes(data))

    local_dir = tmp_path / "node" / "store"
    with Store(local_dir) as local:
        StateMachine(local).apply(2, c.encode(c.TenantUpsert(tenant="mine")))
    before = tree(local_dir)
    staging = snapshot.staging_dir(local_dir)
    with pytest.raises(snapshot.SnapshotInvalid):
        snapshot.load(snap, staging, local_applied=2)
    assert not staging.exists()  # nothing unverified is left for lmdb.open
    assert tree(local_dir) == before


@pytest.mark.parametrize("keep", [0, 10, 30, 0.5, -44, -1])
def test_a_truncated_file_is_rejected(source: Store, tmp_path: Path, keep: float) -> None:
    snap = tmp_path / "snap"
    snapshot.save(snap, source, RAFT_STATE)
    data = snap.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    snap.write_bytes(data[:cut])
    staging = tmp_path / "staging"
    with pytest.raises(snapshot.SnapshotInvalid):
        snapshot.load(snap, staging, local_applied=0)
    assert not staging.exists()


def test_trailing_garbage_is_rejected(source: Store, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snapshot.save(snap, source, RAFT_STATE)
    with open(snap, "ab") as f:
        f.write(b"junk")
    with pytest.raises(snapshot.SnapshotInvalid):
        snapshot.load(snap, tmp_path / "staging", local_applied=0)


def test_install_replaces_an_existing_store(source: Store, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snapshot.save(snap, source, RAFT_STATE)
    store_dir = tmp_path / "node" / "store"
    Store(store_dir).close()
    loaded = snapshot.load(snap, snapshot.staging_dir(store_dir), local_applied=0)
    assert loaded.store_dir is not None
    snapshot.install(loaded.store_dir, store_dir)
    assert sorted(os.listdir(store_dir.parent)) == ["store"]
    with Store(store_dir) as copy:
        assert copy.digest() == source.digest()


def test_recover_finishes_an_install_interrupted_between_the_renames(
    source: Store, tmp_path: Path
) -> None:
    snap = tmp_path / "snap"
    snapshot.save(snap, source, RAFT_STATE)
    store_dir = tmp_path / "node" / "store"
    Store(store_dir).close()
    staging = snapshot.staging_dir(store_dir)
    snapshot.load(snap, staging, local_applied=0)
    os.rename(store_dir, store_dir.with_name("store.old"))  # the crash came here
    snapshot.recover(store_dir)
    assert sorted(os.listdir(store_dir.parent)) == ["store"]
    with Store(store_dir) as copy:
        assert copy.digest() == source.digest()


def test_recover_drops_a_partial_staging_copy(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        StateMachine(store).apply(2, c.encode(c.TenantUpsert(tenant="mine")))
        digest = store.digest()
    staging = snapshot.staging_dir(store_dir)
    staging.mkdir()
    (staging / "data.mdb").write_bytes(b"half")
    snapshot.recover(store_dir)
    assert sorted(os.listdir(tmp_path)) == ["store"]
    with Store(store_dir) as store:
        assert store.digest() == digest
