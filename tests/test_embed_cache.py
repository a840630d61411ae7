"""EmbeddingCache and CachedEmbedder, on a real LMDB in tmp_path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from llmcache.node.embed import (
    CachedEmbedder,
    Embedder,
    EmbeddingCache,
    EmbedResult,
    MiniLMEmbedder,
    RemoteEmbedder,
)
from llmcache.node.errors import EmptyPrompt, OversizeInput
from tests.fake_upstream import FakeUpstream


class Recording:
    """Passes calls through to a real embedder and remembers what it was asked to embed."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.dim = inner.dim
        self.batches: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        self.batches.append(list(texts))
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def model() -> MiniLMEmbedder:
    return MiniLMEmbedder(threads=2)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(dim=16) as up:
        yield up


def unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v)
    return out


def test_put_get_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = np.vstack([unit(rng, 384) for _ in range(3)])
    with EmbeddingCache(tmp_path / "c") as cache:
        assert cache.get_many("m:1", ["a", "b", "c"]) == [None, None, None]
        cache.put_many(
            "m:1", ["a", "b", "c"], vecs, token_counts=[3, 4, 300], truncated=[False, False, True]
        )
        got = cache.get_many("m:1", ["c", "zzz", "a"])
        assert got[1] is None
        assert got[0] is not None and got[2] is not None
        assert np.array_equal(got[0], vecs[2]) and got[0].dtype == np.float32
        assert np.array_equal(got[2], vecs[0])
        entry = cache.lookup("m:1", ["c"])[0]
        assert entry is not None and entry.token_count == 300 and entry.truncated is True
        # Another embedder identity never sees these vectors.
        assert cache.get_many("m:2", ["a"]) == [None]
        s = cache.stats()
        assert s["entries"] == 3 and s["hits"] == 3 and s["misses"] == 5


def test_persists_across_reopen(tmp_path: Path) -> None:
    v = np.full((1, 8), 1 / np.sqrt(8), dtype=np.float32)
    with EmbeddingCache(tmp_path / "c") as cache:
        cache.put_many("m", ["t"], v)
    with EmbeddingCache(tmp_path / "c") as cache:
        got = cache.get_many("m", ["t"])[0]
        assert got is not None and np.array_equal(got, v[0])


def test_cached_embedder_hits_are_identical(tmp_path: Path, model: MiniLMEmbedder) -> None:
    long_text = "the cache keeps long texts too " * 80
    texts = ["How do I reset my password?", long_text, "password reset steps?"]
    fresh = model.embed(texts)
    rec = Recording(model)
    with EmbeddingCache(tmp_path / "c") as cache:
        emb = CachedEmbedder(rec, cache)
        assert isinstance(emb, Embedder)
        assert emb.identity == model.identity and emb.dim == 384
        first = emb.embed(texts)
        second = emb.embed(texts)
        for r in (first, second):
            assert np.array_equal(r.vectors, fresh.vectors)
            assert r.token_counts == fresh.token_counts
            assert r.truncated == fresh.truncated == [False, True, False]
        assert rec.batches == [texts]  # the second call was all hits
        assert cache.stats()["hits"] == 3


def test_cached_embedder_embeds_only_misses_once(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.reset()
    remote = RemoteEmbedder(upstream.base_url, "fake", 16)
    with EmbeddingCache(tmp_path / "c") as cache:
        emb = CachedEmbedder(remote, cache)
        emb.embed(["a", "b"])
        res = emb.embed(["b", "c", "a", "c", "d"])
        assert upstream.call_count() == 2
        # Only the misses, each once, in one request.
        assert upstream.requests[1][1]["input"] == ["c", "d"]
        expected = np.vstack([FakeUpstream.vector_for(t, 16) for t in ["b", "c", "a", "c", "d"]])
        np.testing.assert_allclose(res.vectors, expected, atol=1e-6)
        emb.embed(["d", "a"])
        assert upstream.call_count() == 2


def test_cached_embedder_validates_before_lookup(tmp_path: Path, model: MiniLMEmbedder) -> None:
    with EmbeddingCache(tmp_path / "c") as cache:
        emb = CachedEmbedder(model, cache)
        emb.embed(["hello"])
        with pytest.raises(EmptyPrompt):
            emb.embed(["hello", ""])
        with pytest.raises(OversizeInput):
            emb.embed(["hello"] * 1000)


def test_threads_share_one_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vecs = np.vstack([unit(rng, 32) for _ in range(200)])
    texts = [f"t{i}" for i in range(200)]
    errors: list[BaseException] = []
    with EmbeddingCache(tmp_path / "c") as cache:

        def work(k: int) -> None:
            try:
                for i in range(k, 200, 4):
                    cache.put_many("m", [texts[i]], vecs[i : i + 1])
                    got = cache.get_many("m", [texts[i]])[0]
                    assert got is not None and np.array_equal(got, vecs[i])
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert cache.stats()["entries"] == 200


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from llmcache.node.embed import EmbeddingCache

    path, me = Path(sys.argv[1]), sys.argv[2]
    cache = EmbeddingCache(path)
    for i in range(300):
        v = np.zeros((1, 16), dtype=np.float32)
        v[0, i % 16] = 1.0 if me == "a" else -1.0
        cache.put_many("m", [f"{me}-{i}"], v, token_counts=[i])
    # Read the parent's entry, written before this process started.
    got = cache.get_many("m", ["parent"])[0]
    assert got is not None and got[0] == 1.0, got
    print("ok")
    """
)


def test_processes_share_one_path(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with EmbeddingCache(path) as cache:
        v = np.zeros((1, 16), dtype=np.float32)
        v[0, 0] = 1.0
        cache.put_many("m", ["parent"], v)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(path), me],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for me in ("a", "b")
        ]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.strip() == "ok"
        assert cache.stats()["entries"] == 601
        for me, sign in (("a", 1.0), ("b", -1.0)):
            entry = cache.lookup("m", [f"{me}-17"])[0]
            assert entry is not None and entry.token_count == 17
            assert entry.vector[1] == sign


def test_full_map_clears_itself(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with EmbeddingCache(tmp_path / "c", max_bytes=1024 * 1024) as cache:
        # ~1.5 KB per entry: 2000 entries are ~3 MB, three times the map.
        for start in range(0, 2000, 10):
            texts = [f"text {i}" for i in range(start, start + 10)]
            vecs = np.vstack([unit(rng, 384) for _ in texts])
            cache.put_many("m", texts, vecs)
            assert all(v is not None for v in cache.get_many("m", texts))  # just written
        s = cache.stats()
        assert s["clears"] >= 2
        assert 0 < s["entries"] < 2000
        assert s["used_bytes"] <= 1024 * 1024
        assert cache.get_many("m", ["text 0"]) == [None]  # evicted by a clear

        # A single write larger than the whole map is dropped, not an error.
        big = [f"big {i}" for i in range(1000)]
        cache.put_many("m", big, np.vstack([unit(rng, 384) for _ in big]))
        assert cache.stats()["dropped"] == 1000
        cache.put_many("m", ["after"], np.vstack([unit(rng, 384)]))
        assert cache.get_many("m", ["after"])[0] is not None


def test_put_many_checks_lengths(tmp_path: Path) -> None:
    with EmbeddingCache(tmp_path / "c") as cache, pytest.raises(ValueError):
        cache.put_many("m", ["a", "b"], np.zeros((1, 4), dtype=np.float32))
