"""Grouping, folds and the bootstrap interval of ``llmcache.client.quality``: the statistics
behind README "Quality" (pure functions over arrays; no engine needed)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcache.client import quality as q


def pair(a: str, b: str, label: bool = True) -> q.Pair:
    return q.Pair(a, b, label, "default")


def test_pairs_sharing_a_text_through_others_are_one_group_and_one_fold() -> None:
    pairs = [pair("a", "b"), pair("c", "d"), pair("b", "e"), pair("e", "f"), pair("x", "a")]
    groups = q.groups_of(pairs)
    assert groups.tolist() == [0, 1, 0, 0, 0]
    for k in (2, 3, 5):
        folds = q.folds_of(pairs, k)
        assert len({folds[i] for i in (0, 2, 3, 4)}) == 1


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=60))
def test_folds_never_split_a_group_and_are_stable(edges: list[tuple[int, int]]) -> None:
    pairs = [pair(f"t{a}", f"t{b}") for a, b in edges]
    groups, folds = q.groups_of(pairs), q.folds_of(pairs, 4)
    for g in set(groups.tolist()):
        assert len(set(folds[groups == g].tolist())) == 1
    assert q.folds_of(pairs, 4).tolist() == folds.tolist()
    assert ((folds >= 0) & (folds < 4)).all()


def test_a_salt_gives_other_folds() -> None:
    pairs = [pair(f"a{i}", f"b{i}") for i in range(200)]
    assert q.folds_of(pairs, 5).tolist() != q.folds_of(pairs, 5, salt="x").tolist()


def noisy(n: int, seed: int) -> tuple[q.Floats, q.Bools]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = np.clip(0.5 + 0.2 * labels + rng.normal(0, 0.2, n), 0, 1)
    return scores, labels


def test_the_interval_holds_the_estimate_and_narrows_with_more_data() -> None:
    widths = []
    for n in (500, 8000):
        scores, labels = noisy(n, seed=n)
        point, _ = q.precision_at_recall(scores, labels, 0.5)
        lo, hi = q.precision_at_recall_interval(scores, labels, np.arange(n), 0.5, rounds=400)
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(16) of it in theory


def test_pairs_of_one_group_are_drawn_together() -> None:
    scores, labels = noisy(400, seed=1)
    point, _ = q.precision_at_recall(scores, labels, 0.5)
    # One group: every replicate is the whole data set, so there is nothing to vary.
    lo, hi = q.precision_at_recall_interval(scores, labels, np.zeros(400, np.int64), 0.5)
    assert lo == hi == point
    # Two groups of the same pairs duplicated: wider than treating the copies as independent.
    doubled_s, doubled_y = np.r_[scores, scores], np.r_[labels, labels]
    independent = q.precision_at_recall_interval(doubled_s, doubled_y, np.arange(800), 0.5)
    together = q.precision_at_recall_interval(
        doubled_s, doubled_y, np.r_[np.arange(400), np.arange(400)], 0.5
    )
    assert together[1] - together[0] > independent[1] - independent[0]


def test_a_perfect_ranking_has_no_doubt_and_the_seed_decides() -> None:
    labels = np.array([True] * 50 + [False] * 50)
    scores = np.where(labels, 0.9, 0.1)
    assert q.precision_at_recall_interval(scores, labels, np.arange(100), 0.5) == (1.0, 1.0)
    s, y = noisy(300, seed=2)
    groups = np.arange(300)
    assert q.precision_at_recall_interval(s, y, groups, 0.5, seed=3) == (
        q.precision_at_recall_interval(s, y, groups, 0.5, seed=3)
    )


@settings(max_examples=50)
@given(
    st.lists(st.tuples(st.floats(-1, 1), st.booleans(), st.integers(0, 5)), min_size=1, max_size=80)
)
def test_the_interval_is_ordered_and_a_precision(rows: list[tuple[float, bool, int]]) -> None:
    scores = np.array([r[0] for r in rows])
    labels = np.array([r[1] for r in rows])
    groups = np.array([r[2] for r in rows], np.int64)
    lo, hi = q.precision_at_recall_interval(scores, labels, groups, 0.5, rounds=50)
    if np.isnan(lo) or np.isnan(hi):  # no replicate served half of its positives
        assert np.isnan(lo) and np.isnan(hi)
    else:
        assert 0.0 <= lo <= hi <= 1.0
    if not ((scores >= 0) & labels).any():
        assert np.isnan(lo)
