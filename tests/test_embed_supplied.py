"""validate_vector: caller-supplied vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmcache.node import limits
from llmcache.node.embed import validate_vector
from llmcache.node.errors import DimensionMismatch, InvalidVector, OversizeInput

finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(finite, st.integers(min_value=-(10**300), max_value=10**300))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


@given(st.lists(numbers, min_size=1, max_size=64).filter(lambda v: any(x != 0 for x in v)))
def test_any_finite_nonzero_list_becomes_a_unit_vector(v: list[float]) -> None:
    out = validate_vector(v, len(v))
    assert out.dtype == np.float32 and out.shape == (len(v),)
    assert np.isfinite(out).all()
    assert abs(float(np.linalg.norm(out.astype(np.float64))) - 1.0) < 1e-5
    # Same direction as the input: the largest component keeps its sign and place.
    i = int(np.argmax(np.abs(np.asarray(v, dtype=np.float64))))
    assert np.sign(out[i]) == np.sign(v[i]) != 0


@given(
    st.lists(finite, min_size=1, max_size=64),
    non_finite,
    st.integers(min_value=0, max_value=64),
)
def test_nan_or_inf_anywhere_is_rejected(v: list[float], bad: float, pos: int) -> None:
    v.insert(pos % (len(v) + 1), bad)
    with pytest.raises(InvalidVector, match="NaN or infinite") as e:
        validate_vector(v, None, field="embedding")
    assert e.value.field == "embedding"
    with pytest.raises(InvalidVector):
        validate_vector(np.asarray(v, dtype=np.float64), None)


def test_numpy_arrays_accepted() -> None:
    for dtype in (np.float16, np.float32, np.float64, np.int32, np.uint8):
        out = validate_vector(np.array([3, 4], dtype=dtype), 2)
        np.testing.assert_allclose(out, [0.6, 0.8], atol=1e-6)
    src = np.array([3.0, 4.0])
    validate_vector(src, 2)
    assert src.tolist() == [3.0, 4.0]  # the input is not modified


def test_dimension_checks() -> None:
    with pytest.raises(DimensionMismatch, match="has 3 components, expected 4") as e:
        validate_vector([1, 2, 3], 4, field="vector")
    assert e.value.field == "vector"
    with pytest.raises(OversizeInput):
        validate_vector([1.0] * (limits.MAX_VECTOR_DIM + 1), None)
    assert validate_vector([1.0] * limits.MAX_VECTOR_DIM, None).shape == (limits.MAX_VECTOR_DIM,)


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [0, 0.0, -0.0],
        [1, "2"],
        [True, 1.0],
        [1, None],
        [[1, 2]],
        "1,2,3",
        {"a": 1},
        None,
        3.0,
        np.zeros(3),
        np.ones((2, 2)),
        np.array([True, False]),
        np.array(["1"]),
        [10**400],
    ],
)
def test_invalid_vectors(bad: object) -> None:
    with pytest.raises(InvalidVector):
        validate_vector(bad, None)
