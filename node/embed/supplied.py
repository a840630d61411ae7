"""Validation of vectors that callers supply instead of text (bring-your-own embeddings)."""

from __future__ import annotations

import numbers

import numpy as np

from llmcache.node import limits
from llmcache.node.embed.base import normalize_rows
from llmcache.node.errors import DimensionMismatch, InvalidVector, OversizeInput


def validate_vector(v: object, dim: int | None, *, field: str = "vector") -> np.ndarray:
    """Check a caller-supplied vector and return it as a float32 unit vector (a new array).

    ``v`` is a list/tuple of real numbers (as decoded from JSON) or a 1-D numeric numpy array.
    Raises, with ``field`` set on the error:

    - :class:`OversizeInput` if it has more than ``limits.MAX_VECTOR_DIM`` components;
    - :class:`DimensionMismatch` if ``dim`` is given and the length differs;
    - :class:`InvalidVector` if it is not 1-D, is empty, holds a non-number (bools and strings
      included), NaN or inf, or is all zeros.
    """
    if isinstance(v, np.ndarray):
        arr = v
        if arr.ndim != 1:
            raise InvalidVector(f"{field} must be 1-D, got shape {arr.shape}", field=field)
        # Not bool, complex, string or object arrays.
        if arr.dtype.kind not in "iuf":
            raise InvalidVector(f"{field} must be numeric, got dtype {arr.dtype}", field=field)
    elif isinstance(v, list | tuple):
        # Length first: never convert a huge payload.
        _check_len(len(v), dim, field)
        # The exact-type test is the fast path (JSON and msgpack decode to float/int); the
        # slower ABC test only runs to name the offending component.
        plain = all(type(x) is float or type(x) is int for x in v)
        for i, x in enumerate(() if plain else v):
            # bool is a numbers.Real subclass, but JSON true/false is not a component.
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise InvalidVector(
                    f"{field}[{i}] is {type(x).__name__}, expected a number", field=field
                )
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (OverflowError, ValueError) as e:  # e.g. an int beyond float64's range
            raise InvalidVector(f"{field} holds a number out of range: {e}", field=field) from e
    else:
        raise InvalidVector(
            f"{field} must be a list of numbers, got {type(v).__name__}", field=field
        )
    _check_len(arr.shape[0], dim, field)
    if not np.isfinite(arr).all():
        raise InvalidVector(f"{field} holds NaN or infinite values", field=field)
    if not arr.any():
        raise InvalidVector(f"{field} is all zeros and has no direction", field=field)
    unit: np.ndarray = normalize_rows(arr.reshape(1, -1))[0]
    return unit


def _check_len(n: int, dim: int | None, field: str) -> None:
    if n > limits.MAX_VECTOR_DIM:
        raise OversizeInput(
            f"{field} has {n} components; at most {limits.MAX_VECTOR_DIM} are allowed",
            field=field,
        )
    if n == 0:
        raise InvalidVector(f"{field} is empty", field=field)
    if dim is not None and n != dim:
        raise DimensionMismatch(f"{field} has {n} components, expected {dim}", field=field)
