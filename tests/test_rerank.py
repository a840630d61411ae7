"""Re-ranking with bge-small-en-v1.5 (the ``rerank`` extra, installed with ``test``): the model
loader and its checks, and re-ranking in the real engine (LocalCache: LMDB, state machine,
indexes). The namespace's own vectors are caller-supplied, so the k-NN order is set by the test
and the re-ranking model alone decides what changes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmcache.node import keys
from llmcache.node.embed import ModelIntegrityError, bge
from llmcache.node.errors import UnknownEmbedder
from llmcache.node.local import LocalCache
from tests.conftest import unit_vector
from tests.test_quality_engine import at_similarity, put

pytestmark = pytest.mark.skipif(not bge.available(), reason="pip install -e '.[rerank]'")


@pytest.fixture(scope="module")
def model() -> bge.BgeSmallEmbedder:
    return bge.BgeSmallEmbedder(threads=1)


def test_vectors_are_unit_and_put_paraphrases_closer(model: bge.BgeSmallEmbedder) -> None:
    result = model.embed(
        [
            "How tall is Mount Everest?",
            "What is the height of Mount Everest?",
            "Best pizza in Rome?",
        ]
    )
    v = result.vectors
    assert v.shape == (3, bge.DIM) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    assert (
        result.truncated == [False] * 3 and result.token_counts[0] == 8
    )  # [CLS] how tall is mount everest ? [SEP]
    # Each text runs alone, so its batch-mates do not change its vector (int8 scales are per call).
    alone = model.embed(["Best pizza in Rome?"]).vectors[0]
    assert np.array_equal(alone, v[2])


def test_long_text_keeps_head_and_tail(model: bge.BgeSmallEmbedder) -> None:
    result = model.embed(["word " * 600])
    assert result.truncated == [True] and result.token_counts == [602]


def test_model_files_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = bge.model_dir()
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(source / name, tmp_path / name)
    monkeypatch.setenv(bge.ENV_DIR, str(tmp_path))
    assert bge.model_dir() == tmp_path
    with (tmp_path / "tokenizer.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        bge.BgeSmallEmbedder()
    (tmp_path / "model.onnx").unlink()
    assert not bge.available()
    with pytest.raises(bge.RerankModelMissing):
        bge.BgeSmallEmbedder()


@pytest.fixture
def cache(tmp_path: Path, model: bge.BgeSmallEmbedder) -> Iterator[LocalCache]:
    """Supplied vectors for the namespace, the real re-ranking model as ``rerank``."""
    with LocalCache(tmp_path / "cache", embedders={"rerank": model}, durable=False) as local:
        local.propose(local.engine.prepare_config({"embedder": "supplied"}))
        local.propose(local.engine.prepare_tenant("t1"))
        yield local


def test_rerank_reorders_candidates_by_the_stronger_model(
    cache: LocalCache, model: bge.BgeSmallEmbedder
) -> None:
    engine = cache.engine
    cache.propose(
        engine.prepare_config(
            {
                "threshold": 0.8,
                "top_k": 2,
                "rerank": True,
                "rerank_threshold": 0.8,
                "guards": "none",
            },
            "t1",
            "ns",
        )
    )
    q = unit_vector("q")
    wrong = put(cache, "What is the capital of France?", np.asarray(at_similarity(q, 0.95, "a")))
    right = put(cache, "How tall is Mount Everest?", np.asarray(at_similarity(q, 0.90, "b")))
    asked = "What is the height of Mount Everest?"
    found = engine.lookup(keys.text_key("t1", "ns", asked), vector=q.tolist())
    assert [h.entry.id for h in found.candidates] == [wrong, right]  # the k-NN order
    assert found.status == "semantic_hit" and found.hit is not None
    assert found.hit.entry.id == right
    v = model.embed([asked, "How tall is Mount Everest?"]).vectors
    assert found.hit.rerank == pytest.approx(float(v[0] @ v[1]), abs=1e-5)
    assert found.hit.similarity == pytest.approx(0.90, abs=1e-4)  # the embedder's, as before
    assert found.rejected == ((wrong, "rerank"),)
    # Without re-ranking the k-NN's best is served.
    plain = engine.lookup(keys.text_key("t1", "other", asked), vector=q.tolist())
    assert plain.status == "miss"  # nothing stored in that namespace
    cache.propose(engine.prepare_config({"rerank": False}, "t1", "ns"))
    off = engine.lookup(keys.text_key("t1", "ns", asked), vector=q.tolist())
    assert off.hit is not None and off.hit.entry.id == wrong and off.hit.rerank is None


def test_rerank_threshold_vetoes_a_look_alike(cache: LocalCache) -> None:
    engine = cache.engine
    settings = {"threshold": 0.8, "rerank": True, "guards": "none"}
    cache.propose(engine.prepare_config(settings, "t1", "ns"))
    q = unit_vector("q2")
    entry = put(cache, "how do i learn java", np.asarray(at_similarity(q, 0.93, "c")))
    found = engine.lookup(keys.text_key("t1", "ns", "how do i learn python"), vector=q.tolist())
    # bge scores this pair ~0.76, below the default re-ranking threshold.
    assert found.status == "miss" and found.rejected == ((entry, "rerank"),)
    same = engine.lookup(keys.text_key("t1", "ns", "how can i learn java"), vector=q.tolist())
    assert same.status == "semantic_hit" and same.hit is not None and same.hit.rerank is not None


def test_a_node_without_the_model_refuses_rerank_naming_the_setting(tmp_path: Path) -> None:
    with LocalCache(tmp_path / "c", embedders={}, durable=False) as cache:
        engine = cache.engine
        cache.propose(engine.prepare_config({"embedder": "supplied"}))
        cache.propose(engine.prepare_tenant("t1"))
        cache.propose(engine.prepare_config({"threshold": 0.5, "rerank": True}, "t1", "ns"))
        q = unit_vector("q3")
        put(cache, "stored", q)
        with pytest.raises(UnknownEmbedder) as info:
            engine.lookup(keys.text_key("t1", "ns", "asked"), vector=q.tolist())
        assert info.value.field == "rerank"
