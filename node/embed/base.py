"""The embedder interface shared by the engine and every embedder implementation.

An :class:`Embedder` turns texts into unit-length float32 vectors. Implementations must be safe
to call from several threads at once and must validate their input with :func:`check_texts`, so
every embedder rejects the same inputs with the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from llmcache.node import limits
from llmcache.node.errors import EmptyPrompt, InvalidVector, OversizeInput


@dataclass(frozen=True)
class EmbedResult:
    """The embeddings of a batch of texts, in input order.

    ``vectors`` is float32 with shape ``(n, dim)``; every row has unit L2 norm.
    ``token_counts[i]`` is the number of word pieces of text ``i`` before any cut, counting the
    model's special tokens (0 when unknown, e.g. for a remote embedder).
    ``truncated[i]`` is True when text ``i`` exceeded the model window and only part of it
    (see the embedder's long-text policy) was embedded.
    """

    vectors: np.ndarray
    token_counts: list[int]
    truncated: list[bool]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors.

    ``identity`` is a stable id that changes whenever the vectors would change (other model,
    other weights, other endpoint); namespaces record it so vectors of different embedders are
    never mixed. ``embed`` is thread-safe, raises :class:`EmptyPrompt` for an empty or
    whitespace-only text and :class:`OversizeInput` for a text longer than
    ``limits.MAX_EMBED_TEXT_CHARS`` characters or a batch of more than ``limits.MAX_BATCH`` texts.
    """

    identity: str
    dim: int

    def embed(self, texts: Sequence[str]) -> EmbedResult: ...


def check_texts(texts: Sequence[str]) -> None:
    """Validate a batch before embedding; the common input contract of all embedders."""
    # A bare str is a Sequence[str] of characters: almost certainly a caller bug.
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of texts, not a single str")
    if len(texts) > limits.MAX_BATCH:
        raise OversizeInput(
            f"a batch holds at most {limits.MAX_BATCH} texts, got {len(texts)}", field="texts"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is {type(text).__name__}, not str")
        if len(text) > limits.MAX_EMBED_TEXT_CHARS:
            raise OversizeInput(
                f"text {i} has {len(text)} characters; at most {limits.MAX_EMBED_TEXT_CHARS} "
                "are embedded"
            )
        if not text.strip():
            raise EmptyPrompt(f"text {i} is empty or whitespace only")


def utf8_safe(text: str) -> str:
    """Return ``text`` with lone surrogates (valid in a Python str and in JSON ``\\ud800``
    escapes, but not encodable as UTF-8) replaced by ``?``; other text is returned unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def normalize_rows(v: np.ndarray) -> np.ndarray:
    """Return the rows of the 2-D array ``v`` scaled to unit L2 norm, as a new float32 array.

    Raises :class:`InvalidVector` when ``v`` is not 2-D or a row is all zeros or holds NaN/inf.
    Works in float64 and divides by each row's largest magnitude first, so huge (1e300) and tiny
    (subnormal) finite rows normalise without overflow or underflow.
    """
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 2:
        raise InvalidVector(f"expected a 2-D array of vectors, got {a.ndim} dimension(s)")
    if a.shape[0] == 0:
        return a.astype(np.float32)
    if a.shape[1] == 0:
        raise InvalidVector("vectors have no components")
    if not np.isfinite(a).all():
        raise InvalidVector("vector holds NaN or infinite values")
    scale = np.abs(a).max(axis=1, keepdims=True)
    if (scale == 0).any():
        raise InvalidVector("zero vector has no direction")
    unit: np.ndarray = a / scale
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    return unit.astype(np.float32)
