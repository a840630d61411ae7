"""Adaptive thresholds: a namespace learns the lowest threshold whose wrong-hit share stays under δ.

The learned state of a (tenant, namespace) is a histogram of feedback labels by similarity:
``BUCKETS`` buckets of width 0.01, each counting ``correct`` and ``wrong`` labels. It is
replicated: ``Feedback`` commands carry the similarity and the label, and the state machine adds
them up (integer counts, so every node holds the same histogram at the same log index).

From the histogram, :func:`learned_threshold` picks the lowest grid threshold ``t`` such that,
among labelled lookups whose best candidate scored ``>= t``, a one-sided upper confidence bound
(Wilson score, ``z`` = 1.645, i.e. 95 %) on the share of wrong ones is at most δ, and at least
``min_labels`` labels back it. With too few labels there is no such ``t`` and the namespace's
configured threshold applies: the cache starts conservative. When the labels show that even the
configured threshold breaks the bound and no threshold keeps it, the namespace serves exact hits
only (:data:`NO_SEMANTIC_HITS`).

Exploration: labels above the current threshold come from served hits. To learn whether a lower
threshold would do, a miss whose best candidate lies within :data:`EXPLORE_BAND` below the
current threshold is flagged as a *probe*: the caller was going to call the model anyway, so a
judge (or a person) comparing the fresh answer with the candidate's costs no wrong answer, and
its label (sent to ``/v1/cache/feedback`` with the similarity) extends the histogram downwards.
The threshold therefore descends at most one band below the lowest labels it has: careful when
labels are few, and never served blind.

Assumption behind the bound: labels are a uniform sample of the lookups above the lowest
labelled similarity (every hit and every probe labelled, or each with the same probability).
Feedback only on complaints (wrong hits) makes the estimate pessimistic; feedback only on
probes and not on hits makes it optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUCKETS = 100
"""Similarity buckets of width 0.01: bucket ``b`` holds similarities in [b/100, (b+1)/100)."""
Z_95 = 1.645
"""One-sided 95 % normal quantile of the Wilson bound."""
MIN_LABELS = 30
"""No threshold is learned from fewer labels at or above it."""
EXPLORE_BAND = 0.05
"""How far below the current threshold a miss's best candidate is flagged as a probe."""


def bucket(similarity: float) -> int:
    """The histogram bucket of a similarity in [0, 1] (1.0 falls in the top bucket)."""
    return min(BUCKETS - 1, max(0, math.floor(similarity * BUCKETS)))


@dataclass(frozen=True)
class Labels:
    """Feedback counts of one namespace, per similarity bucket."""

    correct: tuple[int, ...] = (0,) * BUCKETS
    wrong: tuple[int, ...] = (0,) * BUCKETS

    def add(self, similarity: float, label: str) -> Labels:
        """A copy with one more ``correct`` or ``wrong`` label at ``similarity``."""
        b = bucket(similarity)
        if label == "correct":
            return Labels(_inc(self.correct, b), self.wrong)
        if label == "wrong":
            return Labels(self.correct, _inc(self.wrong, b))
        raise ValueError(f"label must be 'correct' or 'wrong', not {label!r}")

    @property
    def total(self) -> int:
        return sum(self.correct) + sum(self.wrong)

    def record(self) -> dict[str, list[int]]:
        return {"correct": list(self.correct), "wrong": list(self.wrong)}

    @classmethod
    def from_record(cls, record: dict[str, list[int]]) -> Labels:
        return cls(tuple(record["correct"]), tuple(record["wrong"]))

    def precision_at(self, threshold: float) -> float | None:
        """Share of correct labels among those at or above ``threshold`` (None without any)."""
        b = bucket(threshold)
        right, wrong = sum(self.correct[b:]), sum(self.wrong[b:])
        return right / (right + wrong) if right + wrong else None


def _inc(counts: tuple[int, ...], b: int) -> tuple[int, ...]:
    return (*counts[:b], counts[b] + 1, *counts[b + 1 :])


def wilson_upper(failures: int, n: int, z: float = Z_95) -> float:
    """Upper Wilson score bound on a failure rate observed as ``failures`` out of ``n``."""
    if n == 0:
        return 1.0
    p = failures / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + margin) / (1 + z * z / n))


def wilson_lower(failures: int, n: int, z: float = Z_95) -> float:
    """Lower Wilson score bound on a failure rate observed as ``failures`` out of ``n``."""
    return 1.0 - wilson_upper(n - failures, n, z) if n else 0.0


NO_SEMANTIC_HITS = 1.0 + EXPLORE_BAND
"""The threshold of a namespace whose labels refute every threshold: above any similarity, so
only exact hits are served, while probes keep labelling the top band in case it recovers."""


def learned_threshold(
    labels: Labels,
    delta: float,
    fallback: float,
    *,
    min_labels: int = MIN_LABELS,
    z: float = Z_95,
) -> float:
    """The threshold a namespace with bound ``delta`` uses now.

    - The lowest threshold on the 0.01 grid whose labelled hits have an upper bound on their
      wrong share of at most ``delta`` (see the module docstring); it is always the bucket of
      some label, never below the lowest similarity labelled so far.
    - Else, when the labels at or above ``fallback`` (the configured threshold) show with 95 %
      confidence that its wrong share exceeds ``delta``: :data:`NO_SEMANTIC_HITS`.
    - Else ``fallback``: too few labels to decide either way.
    """
    best: float | None = None
    right = wrong = 0
    for b in range(BUCKETS - 1, -1, -1):
        right += labels.correct[b]
        wrong += labels.wrong[b]
        n = right + wrong
        # Only a bucket with labels of its own: no evidence, no lower threshold.
        has_labels = labels.correct[b] + labels.wrong[b] > 0
        if has_labels and n >= min_labels and wilson_upper(wrong, n, z) <= delta:
            best = b / BUCKETS
    if best is not None:
        return best
    start = bucket(fallback)
    right, wrong = sum(labels.correct[start:]), sum(labels.wrong[start:])
    if right + wrong >= min_labels and wilson_lower(wrong, right + wrong, z) > delta:
        return NO_SEMANTIC_HITS
    return fallback
