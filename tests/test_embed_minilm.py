"""The default embedder, with the real model and tokenizer."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from llmcache.node import limits
from llmcache.node.embed import Embedder, MiniLMEmbedder, ModelIntegrityError, default_embedder
from llmcache.node.embed.minilm import (
    INNER_BATCH,
    INNER_BATCH_PIECES,
    MODEL_SHA256,
    _chunks,
    default_model_path,
)
from llmcache.node.errors import EmptyPrompt, OversizeInput

TOKENIZER = Path(__file__).parents[1] / "node" / "embed" / "data" / "tokenizer.json"

# Common English words that the tokenizer keeps whole (checked below), so a text made of them
# has exactly one piece per word and can be cut at word boundaries without re-tokenising issues.
_SENTENCE = (
    "the cat sat on a mat and the dog ran in the park while birds sang over green trees "
    "near an old house by the river where people walk every day after work"
)
WORDS = _SENTENCE.split()


@pytest.fixture(scope="module")
def emb() -> MiniLMEmbedder:
    return MiniLMEmbedder(threads=2)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_shape_dtype_unit_length_and_identity(emb: MiniLMEmbedder) -> None:
    res = emb.embed(["hello world", "How do I reset my password?"])
    assert isinstance(emb, Embedder)
    assert emb.dim == 384
    assert emb.identity == f"minilm-l6-v2-int8:{MODEL_SHA256[:8]}" == "minilm-l6-v2-int8:8199be6f"
    assert res.vectors.dtype == np.float32
    assert res.vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    assert res.truncated == [False, False]
    assert res.token_counts == [4, 9]  # [CLS] hello world [SEP]


def test_deterministic_across_calls_and_instances(emb: MiniLMEmbedder) -> None:
    texts = ["What is the capital of France?", "Écris un poème sur la mer 🌊"]
    a = emb.embed(texts).vectors
    b = emb.embed(texts).vectors
    c = MiniLMEmbedder(threads=1).embed(texts).vectors
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_paraphrase_scores_higher_than_unrelated(emb: MiniLMEmbedder) -> None:
    v = emb.embed(
        ["How do I reset my password?", "password reset steps?", "Best pizza toppings in Naples"]
    ).vectors
    para, unrelated = cos(v[0], v[1]), cos(v[0], v[2])
    assert para > 0.6
    assert para > unrelated + 0.3


def test_batch_equals_one_by_one(emb: MiniLMEmbedder) -> None:
    rng = np.random.default_rng(7)
    # 40 texts of very different lengths (two over the window): two inner batches of at most
    # 32, with padding within each.
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 60)))) for _ in range(38)]
    texts += [" ".join(rng.choice(WORDS, size=300)), "short"]
    batch = emb.embed(texts)
    singles = [emb.embed([t]) for t in texts]
    np.testing.assert_allclose(batch.vectors, np.vstack([s.vectors for s in singles]), atol=1e-5)
    assert batch.token_counts == [s.token_counts[0] for s in singles]
    assert batch.truncated == [s.truncated[0] for s in singles]


def test_concurrent_calls_agree(emb: MiniLMEmbedder) -> None:
    texts = [f"question number {i} about caching" for i in range(16)]
    expected = emb.embed(texts).vectors
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(emb.embed(texts).vectors)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)


def test_long_text_embeds_head_and_tail(emb: MiniLMEmbedder) -> None:
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    for w in WORDS:  # the premise of this test: one piece per word
        assert len(tok.encode(w, add_special_tokens=False).ids) == 1, w
    rng = np.random.default_rng(1)
    words = list(rng.choice(WORDS, size=400))
    long_text = " ".join(words)

    res = emb.embed([long_text])
    assert res.truncated == [True]
    assert res.token_counts == [402]  # 400 words + [CLS] + [SEP]

    # Independently: the first 127 and last 127 words fit the window exactly (254 + 2 = 256).
    head_tail = " ".join(words[:127] + words[-127:])
    ht = emb.embed([head_tail])
    assert ht.truncated == [False]
    assert ht.token_counts == [256]
    np.testing.assert_allclose(res.vectors[0], ht.vectors[0], atol=1e-5)

    # And it is not a plain head cut.
    head = emb.embed([" ".join(words[:254])]).vectors[0]
    assert not np.allclose(res.vectors[0], head, atol=1e-3)


def test_window_boundary(emb: MiniLMEmbedder) -> None:
    fits = " ".join(["cat"] * 254)  # 256 pieces with [CLS]/[SEP]: not truncated
    over = " ".join(["cat"] * 255)
    res = emb.embed([fits, over])
    assert res.token_counts == [256, 257]
    assert res.truncated == [False, True]


def test_empty_and_oversize_inputs(emb: MiniLMEmbedder) -> None:
    for bad in ["", "   ", "\n\t "]:
        with pytest.raises(EmptyPrompt):
            emb.embed(["fine", bad])
    with pytest.raises(OversizeInput):
        emb.embed(["x" * (limits.MAX_EMBED_TEXT_CHARS + 1)])
    with pytest.raises(OversizeInput):
        emb.embed(["hi"] * (limits.MAX_BATCH + 1))
    with pytest.raises(TypeError):
        emb.embed("a bare string")
    # The largest allowed text and batch are fine; no text makes the model see > 256 pieces.
    res = emb.embed(["word " * (limits.MAX_EMBED_TEXT_CHARS // 5)])
    assert res.truncated == [True]
    assert emb.embed([]).vectors.shape == (0, 384)


def test_odd_unicode_is_embedded(emb: MiniLMEmbedder) -> None:
    # A lone surrogate (legal in a Python str and a JSON escape) must not crash the tokenizer.
    res = emb.embed(["bad \ud800 surrogate", "\u0301", "日本語のテキスト"])
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)


def test_corrupt_model_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    shutil.copyfile(default_model_path(), bad)
    with bad.open("r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        MiniLMEmbedder(model_path=bad)
    with pytest.raises(ModelIntegrityError):
        MiniLMEmbedder(model_path=tmp_path / "missing.onnx")


def test_intact_copy_loads(tmp_path: Path) -> None:
    good = tmp_path / "model.onnx"
    shutil.copyfile(default_model_path(), good)
    assert MiniLMEmbedder(model_path=good).embed(["ok"]).vectors.shape == (1, 384)


def test_default_embedder_is_a_singleton() -> None:
    assert default_embedder() is default_embedder()


def test_inner_batches_are_bounded() -> None:
    rng = np.random.default_rng(2)
    lengths = [int(x) for x in rng.integers(2, 257, size=200)] + [256] * 10 + [3] * 50
    chunks = _chunks(lengths)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        assert len(c) <= INNER_BATCH
        assert len(c) * max(lengths[i] for i in c) <= INNER_BATCH_PIECES
