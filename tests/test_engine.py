"""The engine over a real store, state machine and indexes (caller-supplied vectors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmcache.cluster import commands as c
from llmcache.node import keys
from llmcache.node.errors import (
    DimensionMismatch,
    InvalidRequest,
    InvalidVector,
    NotFound,
    OversizeInput,
    UnknownTenant,
)
from llmcache.node.local import LocalCache
from tests.conftest import near, unit_vector


def store(cache: LocalCache, key: keys.CacheKey, vector: np.ndarray, **kw: object) -> int:
    put = cache.engine.prepare_put(key, b'{"answer": 1}', vector=vector.tolist(), **kw)  # type: ignore[arg-type]
    result = cache.propose(put)
    assert result.ok, result
    entry_id: int = result.value["id"]
    return entry_id


def test_exact_then_semantic_within_scope(cache: LocalCache) -> None:
    k = keys.text_key("t1", "ns", "how do I reset my password?")
    v = unit_vector("pw")
    entry_id = store(cache, k, v)
    exact = cache.engine.lookup(k, vector=v.tolist())
    assert exact.status == "hit" and exact.hit and exact.hit.entry.id == entry_id
    assert exact.hit.similarity == 1.0
    paraphrase = keys.text_key("t1", "ns", "password reset steps?")
    semantic = cache.engine.lookup(paraphrase, vector=near(v, 0.05).tolist(), threshold=0.9)
    assert semantic.status == "semantic_hit" and semantic.hit
    assert semantic.hit.entry.id == entry_id and 0.9 <= semantic.hit.similarity < 1.0
    unrelated = cache.engine.lookup(paraphrase, vector=unit_vector("other").tolist())
    assert unrelated.status == "miss" and unrelated.candidates  # reported, below threshold
    # Same text, other sampling parameters: another scope, no match at all.
    hot = keys.text_key("t1", "ns", "password reset steps?", {"model": "other"})
    assert cache.engine.lookup(hot, vector=v.tolist()).candidates == []


def test_threshold_layers(cache: LocalCache) -> None:
    k = keys.text_key("t1", "ns", "q")
    v = unit_vector("q")
    store(cache, k, v)
    q = keys.text_key("t1", "ns", "q2")
    query = near(v, 0.3, seed=1)
    similarity = float(np.dot(v, query))
    assert 0.5 < similarity < 0.95
    assert cache.engine.lookup(q, vector=query.tolist()).status == "miss"  # default 0.88
    cache.propose(cache.engine.prepare_config({"threshold": similarity - 0.01}, "t1"))
    assert cache.engine.lookup(q, vector=query.tolist()).status == "semantic_hit"
    cache.propose(cache.engine.prepare_config({"threshold": 0.99}, "t1", "ns"))
    assert cache.engine.lookup(q, vector=query.tolist()).status == "miss"  # namespace wins
    result = cache.engine.lookup(q, vector=query.tolist(), threshold=0.1)
    assert result.status == "semantic_hit" and result.threshold == 0.1  # request wins
    with pytest.raises(InvalidRequest) as exc:
        cache.engine.lookup(q, vector=query.tolist(), threshold=1.5)
    assert exc.value.field == "threshold"


def test_tenant_isolation(cache: LocalCache) -> None:
    v = unit_vector("shared")
    store(cache, keys.text_key("t1", "ns", "identical prompt"), v)
    other = keys.text_key("t2", "ns", "identical prompt")
    result = cache.engine.lookup(other, vector=v.tolist(), threshold=0.0)
    assert result.status == "miss" and result.candidates == []
    with pytest.raises(UnknownTenant):
        cache.engine.lookup(keys.text_key("nobody", "ns", "identical prompt"), vector=v.tolist())
    entry_id = store(cache, keys.text_key("t1", "ns", "x"), unit_vector("x"))
    with pytest.raises(NotFound):
        cache.engine.entry("t2", entry_id)


def test_ttl_and_jitter(tmp_path: Path) -> None:
    now = [1_000.0]
    with LocalCache(tmp_path, embedders={}, clock=lambda: now[0], rng=lambda: 0.0) as cache:
        cache.propose(cache.engine.prepare_config({"embedder": "supplied"}))
        cache.propose(cache.engine.prepare_tenant("t1"))
        k = keys.text_key("t1", "ns", "q")
        v = unit_vector("q")
        put = cache.engine.prepare_put(k, b"a", vector=v.tolist(), ttl_s=100)
        # rng 0.0 → the low end of ±10 % jitter: 90 s.
        assert put.expires_at_ms - put.created_at_ms == 90_000
        entry_id = cache.propose(put).value["id"]
        assert cache.engine.lookup(k, vector=v.tolist()).status == "hit"
        now[0] += 91
        # Past expiry it is absent at once, exactly and semantically, before any purge.
        assert cache.engine.lookup(k, vector=v.tolist(), threshold=0.0).status == "miss"
        assert cache.engine.expired_ids() == [entry_id]
        cache.propose(c.Expire(ids=(entry_id,), ts_ms=cache.engine.now_ms()))
        assert cache.engine.expired_ids() == []


def test_kv_entries(cache: LocalCache) -> None:
    e = cache.engine
    cache.propose(e.prepare_kv_put("t1", "wf", "step/1", b"result", tags=["run-7"]))
    entry = e.get_kv("t1", "wf", "step/1")
    assert entry.response == b"result" and entry.kind == "kv" and entry.tags == ("run-7",)
    with pytest.raises(NotFound):
        e.get_kv("t2", "wf", "step/1")
    cache.propose(e.prepare_kv_put("t1", "wf", "step/1", b"newer"))
    assert e.get_kv("t1", "wf", "step/1").response == b"newer"
    cache.propose(e.prepare_invalidate("t1", key_prefix="step/"))
    with pytest.raises(NotFound):
        e.get_kv("t1", "wf", "step/1")


def test_invalidate_by_tag_hides_from_lookup(cache: LocalCache) -> None:
    v = unit_vector("a")
    k = keys.text_key("t1", "ns", "a")
    store(cache, k, v, tags=["docs-v1"])
    assert cache.propose(cache.engine.prepare_invalidate("t1", tags=["docs-v1"])).value == {
        "deleted": 1
    }
    assert cache.engine.lookup(k, vector=v.tolist(), threshold=0.0).status == "miss"
    with pytest.raises(InvalidRequest) as exc:
        cache.engine.prepare_invalidate("t1")
    assert exc.value.field == "filter"


def test_bad_vectors_and_dimensions(cache: LocalCache) -> None:
    k = keys.text_key("t1", "ns", "q")
    store(cache, k, unit_vector("q", 16))
    with pytest.raises(InvalidVector):
        cache.engine.lookup(k, vector=[float("nan")] * 16)
    with pytest.raises(InvalidVector):
        cache.engine.lookup(k, vector=[0.0] * 16)
    with pytest.raises((InvalidVector, DimensionMismatch)):
        cache.engine.lookup(k, vector=[1.0] * 8)
    with pytest.raises((InvalidVector, DimensionMismatch)):
        cache.engine.prepare_put(keys.text_key("t1", "ns", "z"), b"a", vector=[1.0] * 8)
    with pytest.raises(InvalidRequest) as exc:
        cache.engine.lookup(keys.text_key("t1", "ns", "no vector"))
    assert exc.value.field == "vector"


def test_write_validation(cache: LocalCache) -> None:
    k = keys.text_key("t1", "ns", "q")
    v = unit_vector("q").tolist()
    cases: list[tuple[dict[str, object], str]] = [
        ({"tags": ["x"] * 1 + [str(i) for i in range(40)]}, "tags"),
        ({"tags": [""]}, "tags"),
        ({"usage": {"total_tokens": -1}}, "usage"),
        ({"ttl_s": -5}, "ttl_s"),
        ({"request_id": "r" * 500}, "request_id"),
    ]
    for kw, field in cases:
        with pytest.raises(InvalidRequest) as exc:
            cache.engine.prepare_put(k, b"a", vector=v, **kw)  # type: ignore[arg-type]
        assert exc.value.field == field, kw
    with pytest.raises(OversizeInput):
        cache.engine.prepare_put(k, b"a" * (4 * 1024 * 1024 + 1), vector=v)
    with pytest.raises(InvalidRequest) as exc:
        cache.engine.prepare_config({"threshold": "high"})
    assert exc.value.field == "threshold"
    with pytest.raises(InvalidRequest) as exc:
        cache.engine.prepare_config({"no_such_setting": 1})
    assert exc.value.field == "no_such_setting"


def test_disabled_namespace_misses(cache: LocalCache) -> None:
    k = keys.text_key("t1", "ns", "q")
    v = unit_vector("q")
    store(cache, k, v)
    cache.propose(cache.engine.prepare_config({"enabled": False}, "t1", "ns"))
    assert cache.engine.lookup(k, vector=v.tolist()).status == "miss"


def test_restart_keeps_entries_and_reuses_index_checkpoint(tmp_path: Path) -> None:
    vectors = {f"q{i}": unit_vector(i) for i in range(50)}
    with LocalCache(tmp_path, embedders={}) as cache:
        cache.propose(cache.engine.prepare_config({"embedder": "supplied"}))
        cache.propose(cache.engine.prepare_tenant("t1"))
        for text, v in vectors.items():
            store(cache, keys.text_key("t1", "ns", text), v)
    with LocalCache(tmp_path, embedders={}) as cache:
        assert cache.feed.rebuilds == 0  # loaded from the checkpoint
        for text, v in vectors.items():
            result = cache.engine.lookup(
                keys.text_key("t1", "ns", text + "?"), vector=near(v, 0.01).tolist()
            )
            assert result.status == "semantic_hit" and result.hit
            assert result.hit.entry.text == text
    # A corrupt checkpoint is detected and rebuilt from LMDB, with the same answers.
    for f in (tmp_path / "index").iterdir():
        if f.name != "manifest.json":
            f.write_bytes(b"garbage" + f.read_bytes()[7:])
    with LocalCache(tmp_path, embedders={}) as cache:
        assert cache.feed.rebuilds == 1
        result = cache.engine.lookup(keys.text_key("t1", "ns", "x"), vector=vectors["q7"].tolist())
        assert result.hit and result.hit.entry.text == "q7"


def test_index_catch_up_equals_rebuild(cache: LocalCache) -> None:
    for i in range(600):  # past the small-scope limit, so hnswlib serves this scope
        store(cache, keys.text_key("t1", "big", f"q{i}"), unit_vector(i))
    for i in range(0, 600, 7):
        cache.propose(cache.engine.prepare_invalidate("t1", ids=[i + 3]))
    queries = [near(unit_vector(i), 0.02, seed=i) for i in range(0, 600, 13)]
    scope = keys.text_key("t1", "big", "q0").scope_key
    cache.feed.catch_up()
    incremental = [cache.feed.indexes.search(scope, q, 3)[0][0] for q in queries]
    cache.feed.rebuild()
    rebuilt = [cache.feed.indexes.search(scope, q, 3)[0][0] for q in queries]
    assert incremental == rebuilt
