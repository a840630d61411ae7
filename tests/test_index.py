"""Tests of the derived vector indexes (llmcache.node.index) against real hnswlib."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcache.node.errors import CheckpointInvalid
from llmcache.node.index import IndexParams, IndexSet

A, B = b"tenant\0ns\0scope-a", b"tenant\0ns\0scope-b"
SMALL = IndexParams(small_scope_max=8, ef_construction=64)  # promotes after 8 live vectors


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def is_graph(s: IndexSet, scope: bytes) -> bool:
    return type(s._scopes[scope]).__name__ == "_Graph"


def check_exact(
    got: list[tuple[int, float]], ref: dict[int, np.ndarray], q: np.ndarray, k: int
) -> None:
    """``got`` is a correct exact top-k of ``ref`` for ``q``, up to float32 rounding."""
    sims = {i: float(np.dot(v.astype(np.float64), q)) for i, v in ref.items()}
    assert len(got) == min(k, len(ref))
    assert len({i for i, _ in got}) == len(got)
    for i, s in got:
        assert s == pytest.approx(min(1.0, max(0.0, sims[i])), abs=1e-5)
    got_sims = [sims[i] for i, _ in got]
    assert all(a >= b - 1e-5 for a, b in itertools.pairwise(got_sims))
    rest = [s for i, s in sims.items() if i not in {j for j, _ in got}]
    if got and rest:
        assert got_sims[-1] >= max(rest) - 1e-5


def test_small_scope_is_exact() -> None:
    s = IndexSet()
    v = unit(50)
    s.add(A, np.arange(50, dtype=np.uint64), v)
    assert not is_graph(s, A)
    for q in unit(10, seed=1):
        check_exact(s.search(A, q, 5), dict(enumerate(v)), q, 5)
    top_id, top_sim = s.search(A, v[7], 1)[0]
    assert top_id == 7 and top_sim == pytest.approx(1.0, abs=1e-6)
    assert len(s) == 50 and s.scope_count() == 1


def test_ties_broken_by_smaller_id_and_similarity_clipped() -> None:
    s = IndexSet()
    v = unit(1)[0]
    s.add(A, ids(9, 3, 5, 4), np.stack([v, v, v, -v]))
    assert [i for i, _ in s.search(A, v, 2)] == [3, 5]
    assert s.search(A, v, 10)[-1] == (4, 0.0)


def test_promotion_keeps_answers_and_removal_hides_ids() -> None:
    s = IndexSet(SMALL)
    v = unit(40)
    for i in range(40):  # one at a time: crosses the threshold, then grows the graph
        s.add(A, ids(i), v[i : i + 1])
    assert is_graph(s, A)
    assert all(s.search(A, v[i], 1)[0][0] == i for i in range(40))
    s.remove(A, [3, 4, 999])
    assert len(s) == 38
    assert {3, 4}.isdisjoint(i for i, _ in s.search(A, v[3], 38))
    assert len(s.search(A, v[3], 100)) == 38
    s.remove(A, range(40))
    assert s.search(A, v[0], 5) == [] and len(s) == 0 and s.scope_count() == 0


def test_removal_in_small_scope() -> None:
    s = IndexSet()
    v = unit(5)
    s.add(A, ids(1, 2, 3, 4, 5), v)
    s.remove(A, [2, 2, 77])
    assert [i for i, _ in s.search(A, v[1], 10)] != [] and 2 not in dict(s.search(A, v[1], 10))
    assert len(s) == 4


@pytest.mark.parametrize("params", [IndexParams(), SMALL], ids=["flat", "graph"])
def test_readd_replaces_and_revives(params: IndexParams) -> None:
    s = IndexSet(params)
    v = unit(30)
    s.add(A, np.arange(20, dtype=np.uint64), v[:20])
    s.add(A, ids(5), v[25:26])  # replace a live vector
    assert s.search(A, v[25], 1)[0][0] == 5
    assert dict(s.search(A, v[5], 20))[5] == pytest.approx(max(0.0, float(v[5] @ v[25])), abs=1e-5)
    s.remove(A, [6])
    s.add(A, ids(6), v[26:27])  # revive a removed id with a new vector
    assert s.search(A, v[26], 1)[0][0] == 6
    s.add(A, ids(100, 100), v[27:29])  # a batch naming an id twice keeps the last vector
    assert s.search(A, v[28], 1)[0][0] == 100
    assert len(s) == 21


def test_scope_isolation() -> None:
    s = IndexSet(SMALL)
    v = unit(20)
    s.add(A, np.arange(20, dtype=np.uint64), v)
    s.add(B, ids(1000), v[:1])
    assert [i for i, _ in s.search(B, v[3], 5)] == [1000]
    assert 1000 not in dict(s.search(A, v[0], 20))
    assert s.search(b"unknown", v[0], 5) == []
    s.drop_scope(A)
    assert s.search(A, v[0], 5) == [] and s.scope_count() == 1


def test_k_larger_than_size_and_zero() -> None:
    s = IndexSet(SMALL)
    v = unit(12)
    s.add(A, ids(1, 2, 3), v[:3])
    s.add(B, np.arange(12, dtype=np.uint64), v)
    assert len(s.search(A, v[0], 50)) == 3
    assert len(s.search(B, v[0], 50)) == 12
    assert s.search(A, v[0], 0) == []


def test_dimension_mismatch() -> None:
    s = IndexSet()
    s.add(A, ids(1), unit(1, dim=8))
    with pytest.raises(ValueError):
        s.add(A, ids(2), unit(1, dim=4))
    with pytest.raises(ValueError):
        s.search(A, unit(1, dim=4)[0], 1)
    with pytest.raises(ValueError):
        s.add(A, ids(2, 3), unit(1, dim=8))
    s.add(B, ids(1), unit(1, dim=4))  # another scope has its own dimension
    s.remove(A, [1])  # an emptied scope forgets its dimension
    s.add(A, ids(2), unit(1, dim=4))


def test_graph_resizes_past_capacity_and_reuses_deleted_slots() -> None:
    s = IndexSet(IndexParams(small_scope_max=4, ef_construction=32))
    v = unit(300, dim=8)
    for i in range(100):
        s.add(A, ids(i), v[i : i + 1])
    index = s._scopes[A].index  # type: ignore[union-attr]
    assert index.max_elements >= 100 > 2 * 5
    assert all(s.search(A, v[i], 1)[0][0] == i for i in range(100))
    cap = index.max_elements
    for i in range(100, 300):  # steady churn: remove one, add one
        s.remove(A, [i - 100])
        s.add(A, ids(i), v[i : i + 1])
    assert index.max_elements == cap and index.element_count == 100
    assert sorted(i for i, _ in s.search(A, v[250], 100)) == list(range(200, 300))


def test_memory_is_small_for_many_small_scopes() -> None:
    s = IndexSet()
    for n in range(200):
        s.add(b"s%d" % n, np.arange(5, dtype=np.uint64), unit(5, dim=384, seed=n))
    per_scope = s.memory_bytes() / 200
    assert 5 * 1536 < per_scope < 12_000


def test_concurrent_adds_and_searches() -> None:
    s = IndexSet(SMALL)
    v = unit(400)

    def work(t: int) -> None:
        for i in range(t, 400, 4):  # the scope is promoted and resized while others search
            s.add(A, ids(i), v[i : i + 1])
            assert s.search(A, v[i], 1)[0][0] == i

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert len(s) == 400


def populated(params: IndexParams) -> tuple[IndexSet, np.ndarray]:
    s = IndexSet(params)
    v = unit(60)
    s.add(A, np.arange(40, dtype=np.uint64), v[:40])  # graph
    s.add(B, np.arange(5, dtype=np.uint64), v[40:45])  # flat
    s.add(b"\xff\x00binary", ids(7), v[45:46])
    s.remove(A, [1, 2])
    s.remove(B, [0])
    s.applied_index = 1234
    return s, v


def test_save_load_round_trip(tmp_path: Path) -> None:
    s, v = populated(SMALL)
    d = tmp_path / "ckpt"
    s.save(d)
    s.save(d)  # replaces an existing checkpoint
    t = IndexSet.load(d, SMALL)
    assert t.applied_index == 1234 and len(t) == len(s) and t.scope_count() == 3
    for scope in (A, B, b"\xff\x00binary"):
        for q in v:
            assert t.search(scope, q, 7) == s.search(scope, q, 7)
    t.add(A, ids(1), v[1:2])  # the loaded graph still takes inserts and revivals
    assert t.search(A, v[1], 1)[0][0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["applied_index"] == 1234
    assert "flat.bin" in manifest["files"] and len(manifest["files"]) == 2
    # ef_search is a query-time setting: another value loads fine.
    IndexSet.load(d, IndexParams(small_scope_max=8, ef_construction=64, ef_search=10))


def test_empty_round_trip(tmp_path: Path) -> None:
    IndexSet().save(tmp_path / "c")
    assert len(IndexSet.load(tmp_path / "c", IndexParams())) == 0


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", ["flat", "graph", "manifest", "truncate", "missing", "no-manifest", "params"]
)
def test_bad_checkpoint_is_rejected(tmp_path: Path, damage: str) -> None:
    s, _ = populated(SMALL)
    d = tmp_path / "ckpt"
    s.save(d)
    graph_file = next(d.glob("hnsw-*.bin"))
    params = SMALL
    if damage == "flat":
        corrupt(d / "flat.bin")
    elif damage == "graph":
        corrupt(graph_file)
    elif damage == "manifest":
        corrupt(d / "manifest.json")
    elif damage == "truncate":
        graph_file.write_bytes(graph_file.read_bytes()[:-100])
    elif damage == "missing":
        graph_file.unlink()
    elif damage == "no-manifest":
        (d / "manifest.json").unlink()
    else:
        params = IndexParams(small_scope_max=8, ef_construction=64, m=8)
    with pytest.raises(CheckpointInvalid):
        IndexSet.load(d, params)


def test_every_byte_of_the_manifest_is_covered(tmp_path: Path) -> None:
    s, _ = populated(SMALL)
    s.save(tmp_path / "c")
    raw = (tmp_path / "c" / "manifest.json").read_bytes()
    for pos in range(0, len(raw), 7):
        (tmp_path / "c" / "manifest.json").write_bytes(
            raw[:pos] + bytes([raw[pos] ^ 1]) + raw[pos + 1 :]
        )
        with pytest.raises(CheckpointInvalid):
            IndexSet.load(tmp_path / "c", SMALL)


# Ops: ("add", scope, first id, count, vector seed) or ("remove", scope, ids).
_op = st.one_of(
    st.tuples(
        st.just("add"),
        st.sampled_from([A, B]),
        st.integers(0, 30),
        st.integers(1, 6),
        st.integers(0, 10**6),
    ),
    st.tuples(st.just("remove"), st.sampled_from([A, B]), st.lists(st.integers(0, 36), max_size=6)),
)


Ref = dict[bytes, dict[int, np.ndarray]]


def run(ops: list[tuple], *sets: IndexSet) -> Ref:  # type: ignore[type-arg]
    """Apply ``ops`` to every set in ``sets``; return the live vectors they should hold."""
    ref: Ref = {A: {}, B: {}}
    for op in ops:
        if op[0] == "add":
            _, scope, first, count, seed = op
            batch = np.arange(first, first + count, dtype=np.uint64), unit(count, 6, seed)
            for s in sets:
                s.add(scope, *batch)
            ref[scope].update(zip(range(first, first + count), batch[1], strict=True))
        else:
            for s in sets:
                s.remove(op[1], op[2])
            for i in op[2]:
                ref[op[1]].pop(i, None)
    return ref


@settings(max_examples=40, deadline=None)
@given(st.lists(_op, max_size=40), st.integers(0, 1000))
def test_same_ops_give_same_answers(ops: list[tuple], qseed: int) -> None:  # type: ignore[type-arg]
    params = IndexParams(small_scope_max=4, ef_construction=16, m=4)
    a, b = IndexSet(params), IndexSet(params)
    ref = run(ops, a, b)
    assert len(a) == len(b) == sum(len(r) for r in ref.values())
    for q in unit(4, 6, qseed):
        for scope in (A, B):
            got = a.search(scope, q, 5)
            assert got == b.search(scope, q, 5)
            # Graph answers are approximate, but only ever live ids with their current vectors.
            assert len(got) == min(5, len(ref[scope]))
            for i, sim in got:
                assert sim == pytest.approx(max(0.0, float(ref[scope][i] @ q)), abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(_op, max_size=40), st.integers(0, 1000))
def test_flat_scopes_agree_with_numpy(ops: list[tuple], qseed: int) -> None:  # type: ignore[type-arg]
    s = IndexSet()  # nothing here outgrows a flat scope
    ref = run(ops, s)
    assert len(s) == sum(len(r) for r in ref.values())
    for q in unit(3, 6, qseed):
        for scope in (A, B):
            for k in (1, 3, 50):
                check_exact(s.search(scope, q, k), ref[scope], q.astype(np.float64), k)
