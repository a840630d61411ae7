"""The learned verifier: a tenant-trained logistic model over pair features that decides a hit.

A cosine threshold looks at one number. Many wrong hits are visible in others: the two texts
share few words, one asks "how" and the other "why", a rare word of one is missing from the
other, a stronger model (re-ranking, ``node/rerank.py``) scores them lower. :func:`features`
turns (query text, candidate text, cosine, re-rank cosine) into a fixed vector of such numbers,
and a :class:`Verifier` — weights, bias and a probability cut — turns that vector into a yes/no.

Weights are learned from the tenant's **own** labelled pairs (``llmcache-cli tune --data ...
--train-verifier``, :func:`fit`) and stored as the namespace's ``verifier`` setting, a JSON
string written through ``ConfigSet``: replicated like every setting, so every node holds the
same weights at the same log index. No weights ship with the package (the only labelled data
here, QQP, is non-commercial).

Determinism: :func:`features` is a pure function of the two texts and the two cosines, and
:meth:`Verifier.probability` sums in a fixed order in Python floats (IEEE 754 doubles, no BLAS),
so nodes given the same inputs decide alike. The cosines themselves come from the embedders;
they are the same numbers the threshold is compared with.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from llmcache.node import guards

FORMAT = 1
"""Version of the feature set and of the stored form; a stored verifier of another is refused."""

FEATURES: tuple[str, ...] = (
    "cosine",
    "cosine_sq",
    "rerank_cosine",
    "rerank_cosine_sq",
    "cosine_x_rerank",
    "word_jaccard",
    "content_jaccard",
    "char3_jaccard",
    "only_one_count",
    "only_one_long",
    "length_ratio",
    "same_first_word",
    "same_question_type",
    "numbers",
    "negation",
    "entities",
    "question_type",
    "length_mismatch",
    "cross_encoder",
)
"""Every feature, in the order :func:`features` computes them. ``rerank_*`` are 0 when the
namespace does not re-rank (a verifier trained with re-ranking needs it on: see
:meth:`Verifier.needs_rerank`); ``cross_encoder`` is 0 unless the verifier names a
cross-encoder (``node/cross_encoder.py``), whose score it then is."""

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
"""How a verifier names its cross-encoder (``node/cross_encoder.py``, :func:`digest`)."""

RERANK_FEATURES = frozenset({"rerank_cosine", "rerank_cosine_sq", "cosine_x_rerank"})
CROSS_FEATURES = frozenset({"cross_encoder"})

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Function words: a difference in them rarely changes what is asked.
_STOP_WORDS = (
    "a an the i me my we our you your he she it its they them their is are was were be been "
    "being am do does did doing have has had having of in on at to for from by with about as "
    "into through over under and or but if so than then that this these those there here "
    "what which who whom whose how why when where can could should would will shall may "
    "might must some any all most more much many very just also not no yes get got one "
    "someone something anyone anything way ways best good thing things"
)
_STOP = frozenset(_STOP_WORDS.split())
LONG_WORD = 7
"""Content words this long or longer count as rare: long words are the less frequent ones
(Zipf), and a rare word present on one side only usually names a different topic."""


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _jaccard(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _char3(text: str) -> set[str]:
    s = " ".join(_words(text))
    return {s[i : i + 3] for i in range(max(0, len(s) - 2))}


def features(
    query: str,
    cached: str,
    cosine: float,
    rerank_cosine: float | None = None,
    cross_score: float | None = None,
) -> list[float]:
    """The feature vector of a (query, candidate) pair, in :data:`FEATURES` order.

    ``cosine`` is the namespace embedder's similarity, ``rerank_cosine`` the re-ranking model's
    (None without re-ranking: its features are 0), ``cross_score`` the cross-encoder's (None
    without one: 0). Pure: same inputs, same floats.
    """
    wa, wb = _words(query), _words(cached)
    sa, sb = set(wa), set(wb)
    ca, cb = sa - _STOP, sb - _STOP
    only = ca ^ cb
    r = 0.0 if rerank_cosine is None else float(rerank_cosine)
    cos = float(cosine)
    la, lb = max(1, len(wa)), max(1, len(wb))
    qa, qb = guards.question_type(query), guards.question_type(cached)
    return [
        cos,
        cos * cos,
        r,
        r * r,
        cos * r,
        _jaccard(sa, sb),
        _jaccard(ca, cb),
        _jaccard(_char3(query), _char3(cached)),
        float(len(only)),
        float(sum(1 for w in only if len(w) >= LONG_WORD)),
        abs(math.log(la / lb)),
        float(bool(wa) and bool(wb) and wa[0] == wb[0]),
        float(qa == qb),
        float(guards.number_mismatch(query, cached)),
        float(guards.negation_mismatch(query, cached)),
        float(guards.entity_mismatch(query, cached)),
        float(guards.question_type_mismatch(query, cached)),
        float(guards.length_mismatch(query, cached)),
        0.0 if cross_score is None else float(cross_score),
    ]


class VerifierError(ValueError):
    """A stored verifier that cannot be used (bad JSON, unknown feature, other format)."""


@dataclass(frozen=True)
class Verifier:
    """``probability = sigmoid(bias + Σ weights[f] · feature f)``; a hit needs ``>= cut``.

    Only the features named in ``weights`` are used; their order is :data:`FEATURES` order.
    ``cross_encoder`` is the digest of the cross-encoder whose score the feature of that name
    is (empty: none; a nonzero weight on it needs one).
    """

    weights: tuple[tuple[str, float], ...]
    bias: float
    cut: float = 0.5
    cross_encoder: str = ""

    @property
    def needs_rerank(self) -> bool:
        """True when a re-ranking feature has a nonzero weight: the namespace must re-rank."""
        return any(name in RERANK_FEATURES and w != 0.0 for name, w in self.weights)

    @property
    def needs_cross_encoder(self) -> bool:
        """True when the cross-encoder's score has a nonzero weight (it then names one)."""
        return any(name in CROSS_FEATURES and w != 0.0 for name, w in self.weights)

    def logit(self, values: Sequence[float]) -> float:
        """``bias + Σ w·x`` over the used features, summed in :data:`FEATURES` order."""
        total = self.bias
        by_name = dict(self.weights)
        for name, x in zip(FEATURES, values, strict=True):
            w = by_name.get(name)
            if w is not None:
                total += w * x
        return total

    def probability(self, values: Sequence[float]) -> float:
        z = self.logit(values)
        # Two branches so that exp never overflows.
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def dumps(self) -> str:
        """The stored form: compact JSON; floats round-trip exactly (``repr``)."""
        stored: dict[str, object] = {
            "format": FORMAT,
            "weights": dict(self.weights),
            "bias": self.bias,
            "cut": self.cut,
        }
        if self.cross_encoder:
            stored["cross_encoder"] = self.cross_encoder
        return json.dumps(stored, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> Verifier:
        """Parse a stored verifier; raises :class:`VerifierError` saying what is wrong."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VerifierError(f"verifier is not JSON: {exc.msg}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise VerifierError(f"verifier must be an object with format {FORMAT}")
        weights, bias, cut = raw.get("weights"), raw.get("bias"), raw.get("cut", 0.5)
        if not isinstance(weights, dict) or not weights:
            raise VerifierError("verifier weights must be a non-empty object")
        unknown = sorted(set(weights) - set(FEATURES))
        if unknown:
            raise VerifierError(f"unknown verifier feature(s) {unknown}")
        numbers = [bias, cut, *weights.values()]
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in numbers
        ):
            raise VerifierError("verifier weights, bias and cut must be finite numbers")
        if not 0.0 <= cut <= 1.0:
            raise VerifierError("verifier cut must be between 0 and 1")
        cross = raw.get("cross_encoder", "")
        if not isinstance(cross, str) or (cross and not DIGEST.fullmatch(cross)):
            raise VerifierError("verifier cross_encoder must be a digest sha256:<64 hex digits>")
        ordered = tuple((f, float(weights[f])) for f in FEATURES if f in weights)
        found = cls(ordered, float(bias), float(cut), cross)  # type: ignore[arg-type]  # checked
        if found.needs_cross_encoder and not cross:
            raise VerifierError("a verifier weighing cross_encoder must name its cross_encoder")
        return found


MAX_STORED_CHARS = 4096
"""A stored verifier longer than this is refused (every feature with a full-precision weight
takes ~1,100 characters)."""


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> Verifier:
    """:meth:`Verifier.loads` with a size limit, cached: a lookup parses a namespace's verifier
    once per process, not once per lookup."""
    if len(text) > MAX_STORED_CHARS:
        raise VerifierError(f"verifier is longer than {MAX_STORED_CHARS} characters")
    return Verifier.loads(text)


# -- training ---------------------------------------------------------------------------------

Matrix = npt.NDArray[np.float64]


def fit(
    x: Matrix,
    y: npt.NDArray[np.bool_],
    names: Sequence[str] = FEATURES,
    *,
    l2: float = 1.0,
    iterations: int = 50,
) -> Verifier:
    """L2-regularised logistic regression by Newton's method (IRLS) on ``x`` (rows: pairs,
    columns: ``names``, a subset of :data:`FEATURES` in that order), labels ``y``.

    Columns are standardised for the fit and the scaling is folded back into the weights, so the
    stored verifier applies to raw :func:`features`. Deterministic: no random start, no
    sampling. ``cut`` is 0.5; pick another with :func:`cut_for_precision`.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != len(names) or x.shape[0] != len(y):
        raise ValueError("x must have one row per label and one column per feature name")
    if len(set(y.tolist())) < 2:
        raise ValueError("training needs both correct and wrong pairs")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0  # a constant column gets weight ~0 from the penalty
    z = np.c_[np.ones(len(x)), (x - mean) / scale]
    target = y.astype(np.float64)
    beta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
        gradient = z.T @ (p - target) + penalty * beta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if float(np.max(np.abs(step))) < 1e-9:
            break
    weights = beta[1:] / scale
    bias = float(beta[0] - np.sum(weights * mean))
    return Verifier(tuple((n, float(w)) for n, w in zip(names, weights, strict=True)), bias)


def matrix(rows: Matrix | Sequence[Sequence[float]], names: Sequence[str] = FEATURES) -> Matrix:
    """Rows of full :func:`features` vectors → the columns ``names`` (a subset, in order)."""
    index = [FEATURES.index(n) for n in names]
    return np.asarray(rows, np.float64)[:, index]


def probabilities(verifier: Verifier, x: Matrix, names: Sequence[str]) -> Matrix:
    """The verifier's probability for every row of ``x`` (columns ``names``), vectorised; equal
    to :meth:`Verifier.probability` up to float rounding."""
    by_name = dict(verifier.weights)
    w = np.array([by_name.get(n, 0.0) for n in names])
    out: Matrix = 1.0 / (1.0 + np.exp(-np.clip(x @ w + verifier.bias, -700, 700)))
    return out
