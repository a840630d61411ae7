"""Adaptive thresholds: a namespace learns the lowest threshold whose wrong hits stay under δ.

The learned state of a (tenant, namespace) is a histogram of feedback labels by similarity:
``BUCKETS`` buckets of width 0.01, each counting ``correct`` and ``wrong`` labels. It is
replicated: ``Feedback`` commands carry the similarity and the label, and the state machine adds
them up (integer counts, so every node holds the same histogram at the same log index).

What δ bounds (setting ``adaptive_bound``):

- ``should_miss`` (default): the **wrong-hit rate**, the share of lookups whose best candidate
  is wrong (lookups that should miss) that are served that candidate anyway. It also bounds
  the share of *all* lookups answered wrongly (vCache's error rate), which is never larger.
- ``hits``: the share of served hits that are wrong (precision ≥ 1 − δ), the stricter promise.

"Similarity" is the cosine, or in a namespace with a learned verifier its probability
(``Hit.label_at`` in ``node/engine.py``): there the learned value is the verifier's cut.

From the histogram, :func:`learned_threshold` picks the lowest grid threshold ``t`` at which a
one-sided upper confidence bound (Wilson score, ``z`` = 1.645, i.e. 95 %) on that share is at
most δ, with at least ``min_labels`` labels behind it (wrong labels for ``should_miss``, labels
at or above ``t`` for ``hits``). With too few labels there is no such ``t`` and the namespace's
configured threshold applies: the cache starts conservative. When the labels show that even the
configured threshold breaks the bound and no threshold keeps it, the namespace serves exact hits
only (:data:`NO_SEMANTIC_HITS`).

Exploration: every miss of an adaptive namespace that had a candidate is flagged as a *probe*
(with the candidate's similarity, or 0 when a guard or the verifier vetoed it: it would not be
served at any threshold). The caller was going to call the model anyway, so a judge (or a
person) comparing the fresh answer with the candidate's costs no wrong answer, and its label
(sent to ``/v1/cache/feedback`` with the similarity) tells where the threshold may go. Labels
below the threshold never serve anything; the threshold moves down only where labels back it.

Assumption behind the bound: labels are a uniform sample of the lookups (every hit and every
probe labelled, or each with the same probability). Feedback only on complaints (wrong hits)
makes the estimate pessimistic; feedback on probes and not on hits makes it optimistic.
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
BOUNDS = ("should_miss", "hits")
"""What δ bounds: the wrong-hit rate of lookups that should miss, or the wrong share of hits."""


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


NO_SEMANTIC_HITS = 1.05
"""The threshold of a namespace whose labels refute every threshold: above any similarity, so
only exact hits are served, while probes keep labelling in case it recovers."""


def learned_threshold(
    labels: Labels,
    delta: float,
    fallback: float,
    *,
    bound: str = "should_miss",
    min_labels: int = MIN_LABELS,
    z: float = Z_95,
) -> float:
    """The threshold a namespace with bound ``delta`` uses now.

    - The lowest threshold on the 0.01 grid at which the upper bound on the share ``bound``
      names is at most ``delta`` (see the module docstring); it is always the bucket of some
      label, never below the lowest similarity labelled so far.
    - Else, when the labels show with 95 % confidence that the configured threshold
      ``fallback`` breaks the bound: :data:`NO_SEMANTIC_HITS`.
    - Else ``fallback``: too few labels to decide either way.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, not {bound!r}")
    all_wrong = sum(labels.wrong)
    best: float | None = None
    right = wrong = 0
    for b in range(BUCKETS - 1, -1, -1):
        right += labels.correct[b]
        wrong += labels.wrong[b]
        # Only a bucket with labels of its own: no evidence, no lower threshold.
        if labels.correct[b] + labels.wrong[b] == 0:
            continue
        failures, n = (wrong, all_wrong) if bound == "should_miss" else (wrong, right + wrong)
        if n >= min_labels and wilson_upper(failures, n, z) <= delta:
            best = b / BUCKETS
    if best is not None:
        return best
    start = bucket(fallback)
    right, wrong = sum(labels.correct[start:]), sum(labels.wrong[start:])
    failures, n = (wrong, all_wrong) if bound == "should_miss" else (wrong, right + wrong)
    if n >= min_labels and wilson_lower(failures, n, z) > delta:
        return NO_SEMANTIC_HITS
    return fallback
