"""Adaptive thresholds (node/adaptive.py): the learned threshold keeps wrong hits under δ, for
both things δ can bound (wrong-hit rate of lookups that should miss; wrong share of hits)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcache.node import adaptive


def labels_from(samples: list[tuple[float, str]]) -> adaptive.Labels:
    labels = adaptive.Labels()
    for similarity, label in samples:
        labels = labels.add(similarity, label)
    return labels


def test_no_threshold_without_enough_labels() -> None:
    labels = labels_from([(0.95, "correct")] * (adaptive.MIN_LABELS - 1))
    assert adaptive.learned_threshold(labels, 0.05, 0.9, bound="hits") == 0.9
    assert adaptive.learned_threshold(labels, 0.05, 0.9) == 0.9  # no wrong label at all


def test_threshold_sits_above_the_wrong_labels() -> None:
    # Below 0.9 half the labels are wrong, above it none: the bound holds only from 0.9 up.
    samples = [(0.9 + 0.001 * i, "correct") for i in range(100)]
    samples += [(0.8 + 0.001 * i, label) for i in range(100) for label in ("correct", "wrong")]
    assert adaptive.learned_threshold(labels_from(samples), 0.05, 0.99, bound="hits") == (
        pytest.approx(0.90)
    )


def test_a_looser_bound_allows_a_lower_threshold() -> None:
    rng = random.Random(7)
    samples = []
    for _ in range(5000):
        s = rng.uniform(0.6, 1.0)
        samples.append((s, "wrong" if rng.random() < (1.0 - s) * 1.5 else "correct"))
    labels = labels_from(samples)
    for bound in adaptive.BOUNDS:
        strict = adaptive.learned_threshold(labels, 0.05, 1.0, bound=bound)
        loose = adaptive.learned_threshold(labels, 0.2, 1.0, bound=bound)
        assert loose < strict <= 1.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 1.0), st.sampled_from(["correct", "wrong"])),
        min_size=0,
        max_size=400,
    ),
    st.floats(0.01, 0.5),
)
def test_learned_threshold_meets_its_bound_on_its_labels(
    samples: list[tuple[float, str]], delta: float
) -> None:
    labels = labels_from(samples)
    t = adaptive.learned_threshold(labels, delta, 2.0, bound="hits")  # 2.0: "none learned"
    if t < 1.0:
        served = [label for s, label in samples if adaptive.bucket(s) >= adaptive.bucket(t)]
        assert len(served) >= adaptive.MIN_LABELS
        # The bound is an upper bound, so the observed wrong share is below δ.
        assert served.count("wrong") / len(served) <= delta
    t = adaptive.learned_threshold(labels, delta, 2.0, bound="should_miss")
    if t < 1.0:
        wrong = [s for s, label in samples if label == "wrong"]
        assert len(wrong) >= adaptive.MIN_LABELS
        served_wrong = [s for s in wrong if adaptive.bucket(s) >= adaptive.bucket(t)]
        assert len(served_wrong) / len(wrong) <= delta


def test_labels_refuting_the_configured_threshold_stop_semantic_hits() -> None:
    # 20 % wrong everywhere: no threshold keeps 5 %, and 100 labels above 0.9 prove it.
    samples = [(0.9 + 0.0009 * i, "wrong" if i % 5 == 0 else "correct") for i in range(100)]
    labels = labels_from(samples)
    hits = "hits"
    assert adaptive.learned_threshold(labels, 0.05, 0.9, bound=hits) == adaptive.NO_SEMANTIC_HITS
    # The same labels fit a looser bound, and a handful of labels proves nothing yet.
    assert adaptive.learned_threshold(labels, 0.35, 0.95, bound=hits) == pytest.approx(0.90)
    assert adaptive.learned_threshold(labels_from(samples[:10]), 0.05, 0.9, bound=hits) == 0.9


def test_wrong_hit_rate_bound_counts_every_lookup_that_should_miss() -> None:
    # 200 wrong candidates, spread 0.50..0.95; 100 right ones above 0.9. Serving from t serves
    # the wrong ones at or above t: at most 5 % of 200 (upper bound) puts t in the top wrongs.
    wrong = [(0.5 + 0.00225 * i, "wrong") for i in range(200)]
    right = [(0.9 + 0.001 * i, "correct") for i in range(100)]
    labels = labels_from(wrong + right)
    t = adaptive.learned_threshold(labels, 0.05, 0.99)
    served = sum(1 for s, _ in wrong if adaptive.bucket(s) >= adaptive.bucket(t))
    assert 0.9 <= t < 0.99 and 0 < served / 200 <= 0.05
    # Many more wrong candidates far below (vetoed: similarity 0) dilute the rate: lower t.
    diluted = labels_from(wrong + right + [(0.0, "wrong")] * 2000)
    assert adaptive.learned_threshold(diluted, 0.05, 0.99) < t
    # The stricter bound on hits refuses what the wrong-hit rate allows.
    assert adaptive.learned_threshold(diluted, 0.05, 0.99, bound="hits") > t
    # Every wrong candidate at the configured threshold or above: exact hits only.
    refuting = labels_from([(0.95, "wrong")] * 100)
    assert adaptive.learned_threshold(refuting, 0.05, 0.9) == adaptive.NO_SEMANTIC_HITS
    with pytest.raises(ValueError, match="bound"):
        adaptive.learned_threshold(labels, 0.05, 0.9, bound="lookups")


def test_wilson_upper() -> None:
    assert adaptive.wilson_upper(0, 0) == 1.0
    assert 0 < adaptive.wilson_upper(0, 100) < 0.03
    assert adaptive.wilson_upper(5, 100) > 0.05
    assert adaptive.wilson_upper(100, 100) == pytest.approx(1.0)
    assert adaptive.wilson_lower(0, 0) == 0.0
    assert adaptive.wilson_lower(0, 100) == pytest.approx(0.0, abs=1e-12)
    assert adaptive.wilson_lower(50, 100) < 0.5 < adaptive.wilson_upper(50, 100)


def test_labels_round_trip_and_precision() -> None:
    labels = labels_from([(0.91, "correct"), (0.95, "wrong"), (1.0, "correct"), (0.5, "wrong")])
    assert adaptive.Labels.from_record(labels.record()) == labels
    assert labels.total == 4
    assert labels.precision_at(0.9) == pytest.approx(2 / 3)
    assert adaptive.Labels().precision_at(0.9) is None
    with pytest.raises(ValueError, match="label"):
        labels.add(0.5, "maybe")
