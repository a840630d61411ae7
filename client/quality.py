"""Answer quality: replay labelled pairs through the real engine and measure its hit decisions.

Used by ``llmcache-cli eval`` / ``tune`` and ``tests/bench/bench_quality.py``. A labelled pair is
``{"text_a", "text_b", "label"}`` (label 1 or true: the two texts want the same answer, so a hit
is correct; 0 or false: a hit would be wrong) with an optional ``"namespace"``. Files are JSON
lines, gzip'd when they end in ``.gz``.

:func:`replay` stores every ``text_a`` in a scope of its own (the pair's number is a scope
parameter, so pairs never see each other) in a throw-away :class:`LocalCache` — real LMDB store,
state machine and indexes — then looks up its ``text_b`` there with threshold 0, which reports
the similarity the engine compares with a threshold and whether a verification guard vetoed the
candidate. Texts are embedded up front in batches by the embedder itself and handed to the engine
as vectors: the same vectors the engine would make, just batched. A hit at threshold ``t`` is
then ``similarity >= t`` and no veto, exactly the engine's decision at ``t``.

With a re-ranking model (``rerank_vectors``), a second replay runs the namespace with ``rerank``
on and ``rerank_threshold`` 0 and no guards, and records each pair's re-ranking cosine as the
engine computed it. :func:`cross_validate` trains the learned verifier (``node/verifier.py``) on
k - 1 folds of the pairs and scores the held-out fold, so every reported number is measured on
pairs its model never saw.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmcache.node import keys
from llmcache.node import verifier as learned
from llmcache.node.cross_encoder import CrossEncoder
from llmcache.node.embed import Embedder, EmbedResult
from llmcache.node.errors import CacheError
from llmcache.node.local import LocalCache

TENANT = "eval"
EMBED_BATCH = 256  # limits.MAX_BATCH: the most one embed() call takes
PUT_BATCH = 256  # puts per state-machine transaction

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


class DataError(ValueError):
    """A labelled-pairs file that cannot be read: names the file and line."""


@dataclass(frozen=True)
class Pair:
    text_a: str
    text_b: str
    label: bool
    namespace: str = "default"


def load_pairs(path: Path, limit: int | None = None) -> tuple[list[Pair], int]:
    """The labelled pairs of ``path`` and how many were skipped for a blank text (the engine
    refuses an empty prompt, so such a request is never cached). Raises :class:`DataError`."""
    pairs: list[Pair] = []
    skipped = 0
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if limit is not None and len(pairs) >= limit:
                    break
                if not line.strip():
                    continue
                pair = _pair(path, number, line)
                if pair is None:
                    skipped += 1
                else:
                    pairs.append(pair)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: {exc}") from None
    if not pairs:
        raise DataError(f"{path}: no labelled pairs")
    return pairs, skipped


def _pair(path: Path, number: int, line: str) -> Pair | None:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with text_a, text_b and label")
    a, b, label = row.get("text_a"), row.get("text_b"), row.get("label")
    namespace = row.get("namespace", "default")
    if not isinstance(a, str) or not isinstance(b, str):
        raise DataError(f"{where}: text_a and text_b must be strings")
    if label not in (0, 1) or isinstance(label, float):
        raise DataError(f"{where}: label must be 0/1 or false/true, not {label!r}")
    if not isinstance(namespace, str):
        raise DataError(f"{where}: namespace must be a string")
    try:
        keys.check_names(TENANT, namespace)
    except CacheError as exc:
        raise DataError(f"{where}: {exc}") from None
    if not a.strip() or not b.strip():
        return None
    return Pair(a, b, bool(label), namespace)


# -- embedding --------------------------------------------------------------------------------


def load_vectors(path: Path, identity: str) -> dict[str, np.ndarray]:
    """A vector cache written by :func:`save_vectors` (refused if another embedder made it)."""
    with np.load(path, allow_pickle=True) as data:
        if str(data["identity"]) != identity:
            raise DataError(f"{path} holds vectors of {data['identity']}, not {identity}")
        return dict(zip((str(t) for t in data["texts"]), data["vectors"], strict=True))


def save_vectors(path: Path, vectors: dict[str, np.ndarray], identity: str) -> None:
    texts = list(vectors)
    np.savez(
        path,
        texts=np.array(texts, dtype=object),
        vectors=np.stack([vectors[t] for t in texts]).astype(np.float32),
        identity=np.array(identity),
    )


def embed_all(
    embedder: Embedder,
    texts: Iterable[str],
    known: dict[str, np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every distinct text's vector: from ``known``, else embedded in batches."""
    vectors = dict(known or {})
    todo = sorted({t for t in texts if t not in vectors}, key=len)  # similar lengths: less padding
    for lo in range(0, len(todo), EMBED_BATCH):
        batch = todo[lo : lo + EMBED_BATCH]
        for text, vector in zip(batch, embedder.embed(batch).vectors, strict=True):
            vectors[text] = vector
        if progress is not None:
            progress(min(lo + EMBED_BATCH, len(todo)), len(todo))
    return vectors


class TableEmbedder:
    """An embedder answering from vectors embedded beforehand (in batches, by ``inner``): the
    same vectors ``inner`` makes, without embedding each text again at every lookup. Texts not
    in the table go to ``inner``."""

    def __init__(self, inner: Embedder, table: dict[str, np.ndarray]) -> None:
        self.inner = inner
        self.table = table
        self.identity = inner.identity
        self.dim = inner.dim

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        missing = [t for t in texts if t not in self.table]
        if missing:
            for text, vector in zip(missing, self.inner.embed(missing).vectors, strict=True):
                self.table[text] = vector
        vectors = np.stack([self.table[t] for t in texts]).astype(np.float32)
        return EmbedResult(vectors, [0] * len(texts), [False] * len(texts))


# -- replay through the engine ----------------------------------------------------------------


@dataclass
class Replay:
    """Per pair: the best candidate's similarity and the guard that vetoed it (or None)."""

    scores: Floats
    vetoes: list[str | None]
    store_s: float
    lookup_s: float
    rerank: Floats | None = None
    """Per pair the re-ranking cosine the engine computed (replays with a re-ranking model)."""


def _open_cache(
    tmp: str,
    embedder: Embedder,
    settings: dict[str, Any],
    reranker: Embedder | None = None,
    models_dir: Path | None = None,
) -> LocalCache:
    embedders = {"default": embedder}
    if reranker is not None:
        embedders["rerank"] = reranker
    cache = LocalCache(Path(tmp), embedders=embedders, durable=False, models_dir=models_dir)
    cache.propose(cache.engine.prepare_tenant(TENANT))
    if settings:
        cache.propose(cache.engine.prepare_config(settings, TENANT))
    return cache


def _store(cache: LocalCache, pairs: list[Pair], vectors: dict[str, np.ndarray]) -> list[int]:
    engine, ids = cache.engine, []
    for lo in range(0, len(pairs), PUT_BATCH):
        puts = [
            engine.prepare_put(
                keys.text_key(TENANT, p.namespace, p.text_a, {"pair": i}),
                b'{"pair": %d}' % i,
                vector=vectors[p.text_a],
            )
            for i, p in enumerate(pairs[lo : lo + PUT_BATCH], start=lo)
        ]
        for result in cache.propose_many(puts):
            if not result.ok:
                raise RuntimeError(f"put failed: {result}")
            ids.append(int(result.value["id"]))
    return ids


def replay(
    pairs: list[Pair],
    vectors: dict[str, np.ndarray],
    embedder: Embedder,
    guards: str,
    reranker: Embedder | None = None,
) -> Replay:
    """Store each text_a in its own scope, look up its text_b there with ``guards`` on; with a
    ``reranker``, re-ranking on (threshold 0) and the hit's re-ranking cosine recorded."""
    settings: dict[str, Any] = {"guards": guards}
    if reranker is not None:
        settings.update(rerank=True, rerank_threshold=0.0)
    with tempfile.TemporaryDirectory(prefix="llmcache-quality-") as tmp:
        cache = _open_cache(tmp, embedder, settings, reranker)
        try:
            t0 = time.perf_counter()
            ids = _store(cache, pairs, vectors)
            store_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = np.empty(len(pairs), np.float64)
            rerank = np.full(len(pairs), -1.0)
            vetoes: list[str | None] = []
            for i, p in enumerate(pairs):
                key = keys.text_key(TENANT, p.namespace, p.text_b, {"pair": i})
                found = cache.engine.lookup(key, vector=vectors[p.text_b], threshold=0.0, top_k=1)
                best = found.hit or (found.candidates[0] if found.candidates else None)
                if best is None or best.entry.id != ids[i]:
                    raise RuntimeError(f"pair {i}: the engine did not return the pair's entry")
                scores[i] = best.similarity
                if found.hit is not None and found.hit.rerank is not None:
                    rerank[i] = found.hit.rerank
                vetoes.append(found.rejected[0][1] if found.rejected else None)
            lookup_s = time.perf_counter() - t0
            return Replay(
                scores, vetoes, store_s, lookup_s, rerank if reranker is not None else None
            )
        finally:
            cache.close(checkpoint=False)


# -- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """Decisions at one threshold."""

    threshold: float
    precision: float
    recall: float
    f1: float
    hit_rate: float
    """Share of all lookups that hit."""
    wrong_hit_rate: float
    """Share of the lookups that should miss (label 0) that hit."""
    hits: int
    wrong_hits: int


def effective(scores: Floats, vetoed: Bools) -> Floats:
    """Scores with vetoed pairs below any threshold: hit at t <=> effective >= t."""
    return np.where(vetoed, -1.0, scores)


def at_threshold(scores: Floats, labels: Bools, t: float) -> Row:
    hit = scores >= t
    tp = int(np.count_nonzero(hit & labels))
    fp = int(np.count_nonzero(hit & ~labels))
    positives, negatives = int(labels.sum()), int((~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Row(
        threshold=t,
        precision=precision,
        recall=recall,
        f1=f1,
        hit_rate=(tp + fp) / len(scores),
        wrong_hit_rate=fp / negatives if negatives else 0.0,
        hits=tp + fp,
        wrong_hits=fp,
    )


def curve(scores: Floats, labels: Bools) -> tuple[Floats, Floats, Floats]:
    """(thresholds descending, precision, recall) at every distinct score >= 0."""
    keep = scores >= 0
    s_all, y_all = scores[keep], labels[keep]
    order = np.argsort(-s_all, kind="mergesort")
    s, y = s_all[order], y_all[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # end of each tie group
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / max(1, int(labels.sum()))
    return s[last], precision.astype(np.float64), recall.astype(np.float64)


def precision_at_recall(scores: Floats, labels: Bools, recall: float) -> tuple[float, float]:
    """(precision, threshold) at the highest threshold reaching ``recall`` ((nan, nan) if none)."""
    thresholds, precision, rec = curve(scores, labels)
    reached = np.flatnonzero(rec >= recall)
    if not len(reached):
        return math.nan, math.nan
    i = int(reached[0])
    return float(precision[i]), float(thresholds[i])


def lowest_threshold(
    scores: Floats, labels: Bools, target_precision: float
) -> tuple[float, float, float] | None:
    """(threshold, precision, recall) of the lowest threshold whose hits have at least
    ``target_precision``; None when no threshold reaches it."""
    thresholds, precision, recall = curve(scores, labels)
    ok = np.flatnonzero(precision >= target_precision)
    if not len(ok):
        return None
    i = int(ok[-1])  # thresholds descend: the last one is the lowest
    return float(thresholds[i]), float(precision[i]), float(recall[i])


def roc_auc(scores: Floats, labels: Bools) -> float:
    """Mann-Whitney U / (P * N), ties counted half (average ranks)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    ranks = (starts + (counts + 1) / 2.0)[inverse]
    p, n = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - p * (p + 1) / 2.0) / (p * n)) if p and n else math.nan


# -- the learned verifier, cross-validated -----------------------------------------------------


def feature_rows(
    pairs: list[Pair], scores: Floats, rerank: Floats | None, cross: Floats | None = None
) -> learned.Matrix:
    """Every pair's :func:`learned.features` (query ``text_b``, cached ``text_a``), as the
    engine computes them from its own cosines (and cross-encoder scores)."""
    return np.array(
        [
            learned.features(
                p.text_b,
                p.text_a,
                float(scores[i]),
                None if rerank is None else float(rerank[i]),
                None if cross is None else float(cross[i]),
            )
            for i, p in enumerate(pairs)
        ],
        np.float64,
    )


def feature_names(rerank: bool, cross: bool = False) -> list[str]:
    """The features a verifier uses: all, less the re-ranking ones without ``rerank`` and the
    cross-encoder's without ``cross``."""
    return [
        f
        for f in learned.FEATURES
        if (rerank or f not in learned.RERANK_FEATURES)
        and (cross or f not in learned.CROSS_FEATURES)
    ]


def cross_scores(
    pairs: Sequence[Pair],
    models: Sequence[CrossEncoder],
    folds: npt.NDArray[np.int64] | None = None,
    eligible: Bools | None = None,
) -> Floats:
    """Each pair's cross-encoder score (query ``text_b``, cached ``text_a``, as the engine
    scores them). With one model it scores every pair; with k models and ``folds`` (k folds),
    model i scores fold i: model i must not have been trained on fold i's pairs. Pairs not
    ``eligible`` (the verifier never sees them) get 0 and cost nothing."""
    if len(models) > 1 and (folds is None or int(folds.max()) + 1 != len(models)):
        raise ValueError(f"{len(models)} cross-encoders need {len(models)} folds")
    out = np.zeros(len(pairs))
    for i, p in enumerate(pairs):
        if eligible is None or eligible[i]:
            model = models[0] if len(models) == 1 else models[int(folds[i])]  # type: ignore[index]
            out[i] = model.score(p.text_b, p.text_a)
    return out


def cross_validate_nested(
    rows: learned.Matrix,
    labels: Bools,
    names: list[str],
    pairs: Sequence[Pair],
    folds: npt.NDArray[np.int64],
    eligible: Bools | None = None,
) -> CrossValidation:
    """:func:`cross_validate` inside each fold separately (inner folds :func:`folds_of` the
    fold's pairs): for a feature made by a model per fold (:func:`cross_scores` with k models),
    no verifier is trained on a score from a model that saw the pairs it is tested on."""
    out = np.full(len(labels), -1.0)
    models: list[learned.Verifier] = []
    k = int(folds.max()) + 1 if len(folds) else 0
    for fold in range(k):
        idx = np.flatnonzero(folds == fold)
        inner = folds_of([pairs[int(i)] for i in idx], k, salt=f"inner {fold} ")
        cv = cross_validate(
            rows[idx], labels[idx], names, inner, None if eligible is None else eligible[idx]
        )
        out[idx] = cv.probabilities
        models.append(cv.models[0])
    return CrossValidation(out, folds, models)


def _components(pairs: Sequence[Pair]) -> list[str]:
    """Each pair's component, named by a text in it: pairs that share a text, directly or
    through other pairs, are one component (a quarter of QQP's pairs share a text)."""
    parent: dict[str, str] = {}

    def root(text: str) -> str:
        while parent.setdefault(text, text) != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    for p in pairs:
        parent[root(p.text_a)] = root(p.text_b)
    return [root(p.text_a) for p in pairs]


def groups_of(pairs: Sequence[Pair]) -> npt.NDArray[np.int64]:
    """Group number of each pair (its component, numbered in order of first appearance)."""
    numbers: dict[str, int] = {}
    return np.array([numbers.setdefault(c, len(numbers)) for c in _components(pairs)], np.int64)


def folds_of(pairs: Sequence[Pair], k: int, salt: str = "") -> npt.NDArray[np.int64]:
    """Fold number of each pair: a component is never split, so no held-out text was seen in
    training. The fold of a component is a hash of ``salt`` and its name: the same data gives
    the same folds; another salt, independent ones."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256((salt + c).encode()).digest()[:8], "big") % k
            for c in _components(pairs)
        ],
        np.int64,
    )


def precision_at_recall_interval(
    scores: Floats,
    labels: Bools,
    groups: npt.NDArray[np.int64],
    recall: float,
    *,
    rounds: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A bootstrap interval for :func:`precision_at_recall`: groups of pairs (``groups_of``)
    are drawn with replacement, since pairs sharing a text are not independent, and the
    ``level`` percentile interval of the ``rounds`` replicates is returned. The scores stay
    fixed (a model's uncertainty from its own training is not in it). Deterministic per seed."""
    keep = scores >= 0
    if not keep.any():
        return math.nan, math.nan
    order = np.argsort(-scores[keep], kind="mergesort")
    s, y = scores[keep][order], labels[keep][order]
    _, groups = np.unique(groups, return_inverse=True)
    kept_groups = groups[keep][order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # end of each tie group
    n_groups = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    out = np.full(rounds, np.nan)
    for r in range(rounds):
        weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        positives = float(np.sum(weight[groups] * labels))
        w = weight[kept_groups].astype(np.float64)
        tp = np.cumsum(w * y)[last]
        served = np.cumsum(w)[last]
        reached = np.flatnonzero(tp >= recall * positives)
        if positives and len(reached):
            i = int(reached[0])
            out[r] = tp[i] / served[i]
    if np.isnan(out).all():
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(out, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class CrossValidation:
    probabilities: Floats
    """Out-of-fold: each eligible pair's probability from the model trained without its fold;
    -1 for pairs that are not eligible (the verifier never sees them: below the threshold or
    vetoed by a guard)."""
    folds: npt.NDArray[np.int64]
    models: list[learned.Verifier]


def cross_validate(
    rows: learned.Matrix,
    labels: Bools,
    names: list[str],
    folds: npt.NDArray[np.int64],
    eligible: Bools | None = None,
) -> CrossValidation:
    """For each fold (:func:`folds_of`): train (:func:`learned.fit`) on the eligible pairs of
    the other folds, score the eligible pairs of this one."""
    x = learned.matrix(rows, names)
    ok = np.ones(len(labels), bool) if eligible is None else eligible
    k = int(folds.max()) + 1 if len(folds) else 0
    out = np.full(len(labels), -1.0)
    models = []
    for fold in range(k):
        train, test = (folds != fold) & ok, (folds == fold) & ok
        model = learned.fit(x[train], labels[train], names)
        out[test] = learned.probabilities(model, x[test], names)
        models.append(model)
    return CrossValidation(out, folds, models)


def train_verifier(
    rows: learned.Matrix,
    labels: Bools,
    names: list[str],
    target_precision: float,
    folds: npt.NDArray[np.int64],
    eligible: Bools | None = None,
) -> tuple[learned.Verifier, Row] | None:
    """A verifier for a tenant's own pairs: the lowest probability cut whose **held-out** hits
    reach ``target_precision`` (cross-validated over ``folds``), then the model refit on all
    eligible pairs with that cut; with the cross-validated row at that cut (over all pairs:
    ineligible ones miss). None when no cut reaches the target."""
    cv = cross_validate(rows, labels, names, folds, eligible)
    found = lowest_threshold(cv.probabilities, labels, target_precision)
    if found is None:
        return None
    cut = found[0]
    ok = np.ones(len(labels), bool) if eligible is None else eligible
    model = learned.fit(learned.matrix(rows, names)[ok], labels[ok], names)
    verifier = learned.Verifier(model.weights, model.bias, cut)
    return verifier, at_threshold(cv.probabilities, labels, cut)


# -- adaptive thresholds, simulated on a labelled stream --------------------------------------


@dataclass(frozen=True)
class AdaptiveRun:
    lookups: int
    hits: int
    wrong_hits: int
    probes: int
    labels: int
    final_threshold: float
    second_half: tuple[int, int, int]
    """(lookups, hits, wrong hits) of the second half of the stream, once labels have come in."""

    @property
    def precision(self) -> float:
        return 1 - self.wrong_hits / self.hits if self.hits else 1.0


def adaptive_stream(
    pairs: list[Pair],
    vectors: dict[str, np.ndarray],
    embedder: Embedder,
    *,
    delta: float,
    start_threshold: float,
    guards: str,
    bound: str = "should_miss",
    seed: int = 0,
    verifier: str = "",
) -> AdaptiveRun:
    """Replay ``pairs`` in a seeded random order as a live stream through one adaptive
    namespace: each lookup is decided with the threshold learned so far; every hit and every
    probe gets its pair's label as ``Feedback`` (a judge that is always right), applied by the
    state machine like any replicated command."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    with tempfile.TemporaryDirectory(prefix="llmcache-adaptive-") as tmp:
        settings = {
            "guards": guards,
            "adaptive_delta": delta,
            "adaptive_bound": bound,
            "threshold": start_threshold,
            "verifier": verifier,
        }
        cache = _open_cache(tmp, embedder, settings)
        try:
            ids = _store(cache, pairs, vectors)
            engine = cache.engine
            hits = wrong = probes = labelled = 0
            half = [0, 0, 0]
            for step, i in enumerate(order):
                p = pairs[int(i)]
                key = keys.text_key(TENANT, p.namespace, p.text_b, {"pair": int(i)})
                found = engine.lookup(key, vector=vectors[p.text_b])
                judged = found.hit or found.probe
                if found.hit is not None:
                    hits += 1
                    wrong += int(not p.label)
                    if step >= len(order) // 2:
                        half[1] += 1
                        half[2] += int(not p.label)
                probes += int(found.probe is not None)
                half[0] += int(step >= len(order) // 2)
                if judged is not None and judged.entry.id == ids[int(i)]:
                    label = "correct" if p.label else "wrong"
                    command = engine.prepare_feedback(
                        TENANT, judged.entry.id, label, similarity=judged.label_at
                    )
                    cache.propose(command)
                    labelled += 1
            ns = pairs[0].namespace
            now = engine.settings(TENANT, ns)
            final = (
                engine.learned(TENANT, ns, now, learned.parse(verifier).cut)
                if verifier
                else engine.threshold(TENANT, ns, now)
            )
            return AdaptiveRun(
                len(pairs), hits, wrong, probes, labelled, final, (half[0], half[1], half[2])
            )
        finally:
            cache.close(checkpoint=False)


def adaptive_stream_verified(
    pairs: list[Pair],
    vectors: dict[str, np.ndarray],
    embedder: Embedder,
    rows: learned.Matrix,
    eligible: Bools,
    folds: npt.NDArray[np.int64],
    *,
    delta: float,
    gate: float,
    guards: str,
    bound: str = "should_miss",
    seed: int = 0,
) -> tuple[AdaptiveRun, list[float]]:
    """:func:`adaptive_stream` of each fold through a namespace whose verifier was trained on
    the other folds' eligible pairs (as ``tune --train-verifier`` would, on earlier labels):
    the namespace learns the verifier's probability cut, from the verifier's own 0.5, behind
    the threshold ``gate``. Returns the runs added up, and each fold's final cut."""
    names = feature_names(False)
    x = learned.matrix(rows, names)
    labels = np.array([p.label for p in pairs], bool)
    runs: list[AdaptiveRun] = []
    for fold in range(int(folds.max()) + 1):
        train = (folds != fold) & eligible
        model = learned.fit(x[train], labels[train], names)
        check = learned.Verifier(model.weights, model.bias, 0.5)
        part = [pairs[i] for i in np.flatnonzero(folds == fold)]
        runs.append(
            adaptive_stream(
                part,
                vectors,
                embedder,
                delta=delta,
                start_threshold=gate,
                guards=guards,
                bound=bound,
                seed=seed,
                verifier=check.dumps(),
            )
        )
    total = AdaptiveRun(
        sum(r.lookups for r in runs),
        sum(r.hits for r in runs),
        sum(r.wrong_hits for r in runs),
        sum(r.probes for r in runs),
        sum(r.labels for r in runs),
        float(np.mean([r.final_threshold for r in runs])),
        (
            sum(r.second_half[0] for r in runs),
            sum(r.second_half[1] for r in runs),
            sum(r.second_half[2] for r in runs),
        ),
    )
    return total, [r.final_threshold for r in runs]


# -- latency of a lookup ----------------------------------------------------------------------


def lookup_latency(
    pairs: list[Pair],
    embedder: Embedder,
    settings: dict[str, Any],
    reranker: Embedder | None = None,
    models_dir: Path | None = None,
) -> Floats:
    """Milliseconds of each ``text_b`` lookup (embedding included, nothing precomputed) in a
    cache holding the ``text_a`` of ``pairs``, one scope per pair, with ``settings`` (and
    cross-encoders from ``models_dir``); timing numbers for notes and benchmarks, never for
    asserts."""
    with tempfile.TemporaryDirectory(prefix="llmcache-latency-") as tmp:
        cache = _open_cache(tmp, embedder, settings, reranker, models_dir)
        try:
            vectors = embed_all(embedder, [p.text_a for p in pairs])
            _store(cache, pairs, vectors)
            out = np.empty(len(pairs), np.float64)
            for i, p in enumerate(pairs):
                key = keys.text_key(TENANT, p.namespace, p.text_b, {"pair": i})
                t0 = time.perf_counter()
                cache.engine.lookup(key)
                out[i] = (time.perf_counter() - t0) * 1000
            return out
        finally:
            cache.close(checkpoint=False)
