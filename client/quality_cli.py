"""``llmcache-cli eval`` and ``llmcache-cli tune``: answer quality from labelled pairs.

Both replay the pairs through the real engine with the default embedder (``client/quality.py``),
locally: no node is needed and nothing is sent anywhere. Exit codes: 0 done; 1 ``tune`` found no
threshold reaching the target for some namespace; 2 bad input (unreadable file, bad row, bad
option), with the file and line named on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np

from llmcache.client import quality as q
from llmcache.node import cross_encoder, guards
from llmcache.node import verifier as learned
from llmcache.node.cross_encoder import CrossEncoder
from llmcache.node.embed import Embedder, ModelIntegrityError, bge, default_embedder
from llmcache.node.errors import CacheError

GRID = [round(0.70 + 0.02 * i, 2) for i in range(14)]  # 0.70 .. 0.96
EXIT_OK, EXIT_MISSED, EXIT_USAGE = 0, 1, 2


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _say(as_json: bool) -> Callable[[str], None]:
    """Human output: to stdout, or to stderr when stdout carries the one JSON document."""
    return lambda text: click.echo(text, err=as_json)


def _guard_names(value: str) -> str:
    try:
        guards.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


data_option = click.option(
    "--data",
    "data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Labelled pairs: JSON lines {text_a, text_b, label 0/1[, namespace]}, .gz allowed.",
)
guards_option = click.option(
    "--guards",
    "guard_names",
    default=guards.DEFAULT_GUARDS,
    show_default=True,
    callback=lambda _ctx, _param, value: _guard_names(value),
    help="Verification guards on during the replay: names, 'none' or 'all'.",
)
vectors_option = click.option(
    "--vectors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Embedding cache (.npz): read when it exists, else written after embedding.",
)
limit_option = click.option("--limit", type=click.IntRange(min=1), help="Only the first N pairs.")
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


def _prepare(
    data: Path, limit: int | None, vectors_path: Path | None, say: Callable[[str], None]
) -> tuple[list[q.Pair], Embedder, dict[str, np.ndarray]]:
    try:
        pairs, skipped = q.load_pairs(data, limit)
    except q.DataError as exc:
        _fail(str(exc))
    positives = sum(p.label for p in pairs)
    say(f"{data.name}: {len(pairs):,} pairs, {positives:,} should hit; {skipped} skipped (blank)")
    embedder = default_embedder()
    return pairs, embedder, _embed_pairs(embedder, pairs, vectors_path, "vector cache", say)


def _embed_pairs(
    embedder: Embedder,
    pairs: list[q.Pair],
    path: Path | None,
    what: str,
    say: Callable[[str], None],
) -> dict[str, np.ndarray]:
    """Every text of ``pairs`` embedded, reading and extending the vector cache ``path``."""
    known: dict[str, np.ndarray] = {}
    if path is not None and path.exists():
        try:
            known = q.load_vectors(path, embedder.identity)
        except (q.DataError, OSError, ValueError, KeyError) as exc:
            _fail(f"{what} {path}: {exc}")
        say(f"{what} {path}: {len(known):,} texts")
    texts = [t for p in pairs for t in (p.text_a, p.text_b)]
    vectors = q.embed_all(embedder, texts, known)
    if path is not None and len(vectors) > len(known):
        q.save_vectors(path, vectors, embedder.identity)
        say(f"wrote the {what} {path}")
    return vectors


def _table(rows: list[q.Row], say: Callable[[str], None]) -> None:
    say(
        f"{'threshold':>9} {'precision':>9} {'recall':>7} {'F1':>6} {'hit rate':>8} "
        f"{'wrong-hit rate':>14} {'hits':>7} {'wrong':>7}"
    )
    for r in rows:
        say(
            f"{r.threshold:>9.2f} {r.precision:>9.3f} {r.recall:>7.3f} {r.f1:>6.3f} "
            f"{r.hit_rate:>8.3f} {r.wrong_hit_rate:>14.3f} {r.hits:>7,} {r.wrong_hits:>7,}"
        )


def _plot(curves: dict[str, tuple[q.Floats, q.Floats]], path: Path) -> str:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'llmcache[plot]')"
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall of semantic hits by threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"precision-recall plot: {path}"


RECALLS = (0.3, 0.5, 0.7)
DEFAULT_GATE = 0.70
"""The embedder threshold under re-ranking and the verifier in ``eval``: candidates below it
never reach the second stage (the lowest threshold of the grid)."""


def _reranker(
    pairs: list[q.Pair], path: Path | None, say: Callable[[str], None]
) -> q.TableEmbedder:
    """The re-ranking model with every text of ``pairs`` embedded up front (or read from the
    vector cache ``path``)."""
    try:
        model = bge.BgeSmallEmbedder()
    except (bge.RerankModelMissing, ModelIntegrityError) as exc:
        _fail(f"--rerank: {exc}")
    return q.TableEmbedder(model, _embed_pairs(model, pairs, path, "re-rank vector cache", say))


def _latency(
    pairs: list[q.Pair],
    embedder: Embedder,
    guard_names: str,
    gate: float,
    rerank: bool,
    cross_dir: Path | None,
    say: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """Milliseconds per lookup (embedding included) without and with the second stage."""
    configs: dict[str, tuple[dict[str, Any], Embedder | None]] = {
        "guards": ({"guards": guard_names}, None)
    }
    if rerank:
        # Threshold = the gate, so every candidate above it is re-ranked: the cost of the stage.
        settings = {"guards": guard_names, "threshold": gate, "rerank": True}
        configs["guards +rerank"] = (settings, bge.BgeSmallEmbedder())
    with tempfile.TemporaryDirectory(prefix="llmcache-models-") as models:
        if cross_dir is not None:
            # A verifier on the cross-encoder's score alone: every candidate past the gate
            # and the guards is scored, which is the stage's cost whatever the weights.
            found = cross_encoder.digest(cross_dir)
            (Path(models) / found.removeprefix("sha256:")).symlink_to(cross_dir.resolve())
            verifier = learned.Verifier((("cross_encoder", 1.0),), 0.0, 0.5, found)
            settings = {"guards": guard_names, "threshold": gate, "verifier": verifier.dumps()}
            configs["guards +cross +verifier"] = (settings, None)
        return _time_configs(pairs, embedder, configs, Path(models), say)


def _time_configs(
    pairs: list[q.Pair],
    embedder: Embedder,
    configs: dict[str, tuple[dict[str, Any], Embedder | None]],
    models: Path,
    say: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    out = {}
    for name, (settings, reranker) in configs.items():
        ms = q.lookup_latency(pairs, embedder, settings, reranker, models)
        out[name] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()),
        }
        say(
            f"latency {name}: p50 {out[name]['p50_ms']:.1f} ms, p95 {out[name]['p95_ms']:.1f} ms,"
            f" mean {out[name]['mean_ms']:.1f} ms per lookup ({len(pairs)} lookups)"
        )
    return out


@click.command("eval")
@data_option
@guards_option
@vectors_option
@limit_option
@json_option
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="PR curve PNG.")
@click.option(
    "--each-guard",
    is_flag=True,
    help="Also measure every guard alone: precision at recall 0.3/0.5/0.7 against no guard.",
)
@click.option(
    "--adaptive-delta",
    type=click.FloatRange(0.0, 0.5, min_open=True),
    help="Also stream the pairs through an adaptive namespace with this bound δ.",
)
@click.option(
    "--rerank",
    is_flag=True,
    help="Also replay with re-ranking (needs llmcache[rerank]): curve 'guards +rerank'.",
)
@click.option(
    "--rerank-vectors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Re-ranking model's embedding cache (.npz): read when it exists, else written.",
)
@click.option(
    "--verifier",
    "with_verifier",
    is_flag=True,
    help="Also cross-validate the learned verifier (k folds; with --rerank, with and without "
    "its features): curves 'guards +verifier', 'guards +rerank +verifier'.",
)
@click.option("--folds", type=click.IntRange(2, 20), default=5, show_default=True)
@click.option(
    "--gate",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_GATE,
    show_default=True,
    help="Embedder threshold below which candidates never reach re-ranking or the verifier.",
)
@click.option(
    "--cross-encoder",
    "cross_dirs",
    multiple=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="With --verifier: a cross-encoder model directory (node/cross_encoder.py) whose score "
    "is a verifier feature: curve 'guards +cross +verifier'. Once: it scores every pair (it must "
    "not have been trained on them); --folds times: the i-th scores fold i, and the verifier is "
    "cross-validated inside each fold (nested).",
)
@click.option(
    "--latency",
    type=click.IntRange(min=0),
    default=0,
    help="Also time N lookups (embedding included) per configuration.",
)
@click.option(
    "--adaptive-start",
    type=click.FloatRange(0.0, 1.0),
    default=0.95,
    show_default=True,
    help="The adaptive namespace's configured threshold (used until labels back another).",
)
@click.option(
    "--adaptive-bound",
    type=click.Choice(["should_miss", "hits"]),
    default="should_miss",
    show_default=True,
    help="What δ bounds: the wrong-hit rate of lookups that should miss, or the wrong share "
    "of hits (setting adaptive_bound).",
)
@click.option(
    "--adaptive-verifier",
    is_flag=True,
    help="Stream each of --folds folds through an adaptive namespace with a verifier trained on "
    "the other folds: it learns the verifier's probability cut behind the --gate threshold.",
)
@click.option(
    "--adaptive-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the adaptive stream's random order of the pairs.",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Rounds of the 95 % bootstrap interval of precision at recall 0.5 (pairs sharing a "
    "text are drawn together); 0: none.",
)
def eval_command(
    data: Path,
    guard_names: str,
    vectors: Path | None,
    limit: int | None,
    as_json: bool,
    plot: Path | None,
    each_guard: bool,
    adaptive_delta: float | None,
    rerank: bool,
    rerank_vectors: Path | None,
    with_verifier: bool,
    folds: int,
    gate: float,
    cross_dirs: tuple[Path, ...],
    latency: int,
    adaptive_start: float,
    adaptive_bound: str,
    adaptive_verifier: bool,
    adaptive_seed: int,
    bootstrap: int,
) -> None:
    """Replay labelled pairs through the real engine (store text_a, look up text_b) and report
    precision, recall, F1, hit rate and wrong-hit rate per threshold, with and without guards."""
    say = _say(as_json)
    load = os.getloadavg()
    say(f"cpus: {os.cpu_count()}, load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    pairs, embedder, vecs = _prepare(data, limit, vectors, say)
    labels = np.array([p.label for p in pairs], bool)
    run = q.replay(pairs, vecs, embedder, guard_names)
    say(f"engine: stored {len(pairs):,} in {run.store_s:.1f} s, looked up in {run.lookup_s:.1f} s")
    vetoed = np.array([v is not None for v in run.vetoes], bool)
    guarded = q.effective(run.scores, vetoed)
    result: dict[str, Any] = {
        "data": str(data),
        "pairs": len(pairs),
        "should_hit": int(labels.sum()),
        "embedder": embedder.identity,
        "guards": guard_names,
        "roc_auc_no_guards": q.roc_auc(run.scores, labels),
    }
    variants: dict[str, q.Floats] = {"no guards": run.scores, f"guards {guard_names}": guarded}
    if each_guard:
        for name, guard in guards.GUARDS.items():
            veto = np.array([guard(p.text_b, p.text_a) for p in pairs], bool)
            variants[f"only {name}"] = q.effective(run.scores, veto)
    if cross_dirs and not with_verifier:
        _fail("--cross-encoder needs --verifier")
    if len(cross_dirs) not in (0, 1, folds):
        _fail(f"--cross-encoder: give one model directory or --folds ({folds})")
    second = _second_stage(
        pairs,
        vecs,
        embedder,
        labels,
        run,
        vetoed,
        StagePlan(rerank, rerank_vectors, with_verifier, folds, gate, cross_dirs),
        say,
    )
    variants.update(second.pop("curves"))
    variants.update(second.pop("cross_curves", {}))
    result.update(second)
    result["at_recall"] = {
        name: {str(r): q.precision_at_recall(s, labels, r)[0] for r in RECALLS}
        for name, s in variants.items()
    }
    result["threshold_at_recall_0.5"] = {
        name: q.precision_at_recall(s, labels, 0.5)[1] for name, s in variants.items()
    }
    if bootstrap:
        groups = q.groups_of(pairs)
        result["interval95_at_recall_0.5"] = {
            name: q.precision_at_recall_interval(s, labels, groups, 0.5, rounds=bootstrap)
            for name, s in variants.items()
        }
    for name in ("no guards", f"guards {guard_names}"):
        rows = [q.at_threshold(variants[name], labels, t) for t in GRID]
        result.setdefault("thresholds", {})[name] = [asdict(r) for r in rows]
        say(f"\n{name}:")
        _table(rows, say)
    if latency:
        result["latency"] = _latency(
            pairs[:latency],
            embedder,
            guard_names,
            gate,
            rerank,
            cross_dirs[0] if cross_dirs else None,
            say,
        )
    say("\nprecision at recall " + " / ".join(map(str, RECALLS)) + ":")
    intervals = result.get("interval95_at_recall_0.5", {})
    for name, at in result["at_recall"].items():
        interval = (
            f"  (0.5: 95 % {intervals[name][0]:.3f}–{intervals[name][1]:.3f})" if intervals else ""
        )
        say(f"  {name:<34} " + "  ".join(f"{at[str(r)]:.3f}" for r in RECALLS) + interval)
    if adaptive_delta is not None:
        plan = AdaptivePlan(
            adaptive_delta,
            adaptive_bound,
            gate if adaptive_verifier else adaptive_start,
            adaptive_seed,
            folds if adaptive_verifier else 0,
        )
        result["adaptive"] = _adaptive(
            pairs, vecs, embedder, labels, run.scores, guarded, guard_names, plan, say
        )
    if plot is not None:
        curves = {}
        for name, s in variants.items():
            _, precision, recall = q.curve(s, labels)
            curves[name] = (recall, precision)
        say(_plot(curves, plot))
    if as_json:
        click.echo(json.dumps(result, indent=1))


@dataclass(frozen=True)
class StagePlan:
    """What ``eval`` measures after the guards: re-ranking, the verifier (k folds), behind the
    gate, with cross-encoders' scores as a feature."""

    rerank: bool
    rerank_vectors: Path | None
    with_verifier: bool
    folds: int
    gate: float
    cross_dirs: tuple[Path, ...] = ()


def _second_stage(
    pairs: list[q.Pair],
    vecs: dict[str, np.ndarray],
    embedder: Embedder,
    labels: q.Bools,
    run: q.Replay,
    vetoed: q.Bools,
    plan: StagePlan,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Curves of re-ranking and of the cross-validated verifier, behind the guards and the
    gate: a pair the guards veto or whose embedder cosine is below ``gate`` misses."""
    rerank, rerank_vectors, folds, gate = plan.rerank, plan.rerank_vectors, plan.folds, plan.gate
    with_verifier = plan.with_verifier
    out: dict[str, Any] = {"curves": {}, "gate": gate}
    eligible = ~vetoed & (run.scores >= gate)
    rerank_scores = None
    if rerank:
        reranker = _reranker(pairs, rerank_vectors, say)
        rr = q.replay(pairs, vecs, embedder, "none", reranker)
        say(f"engine, re-ranking: looked up {len(pairs):,} in {rr.lookup_s:.1f} s")
        assert rr.rerank is not None
        rerank_scores = rr.rerank
        out["rerank_model"] = reranker.identity
        out["roc_auc_rerank"] = q.roc_auc(rerank_scores, labels)
        out["curves"]["guards +rerank"] = np.where(eligible, rerank_scores, -1.0)
    if with_verifier:
        rows = q.feature_rows(pairs, run.scores, rerank_scores)
        options = [False, True] if rerank else [False]
        out["verifier"] = {
            "folds": folds,
            "protocol": "train on k-1 folds, score the held-out; pairs sharing a text share a fold",
        }
        for use_rerank in options:
            names = q.feature_names(use_rerank)
            cv = q.cross_validate(rows, labels, names, q.folds_of(pairs, folds), eligible)
            name = "guards +rerank +verifier" if use_rerank else "guards +verifier"
            out["curves"][name] = cv.probabilities
            per_fold = [
                q.precision_at_recall(cv.probabilities[cv.folds == f], labels[cv.folds == f], 0.5)[
                    0
                ]
                for f in range(folds)
            ]
            out["verifier"][name] = {
                "precision_at_recall_0.5_per_fold": per_fold,
                "weights_fold_0": dict(cv.models[0].weights),
            }
            say(
                f"{name}: precision at recall 0.5 per held-out fold "
                + " ".join(f"{v:.3f}" for v in per_fold)
            )
        if plan.cross_dirs:
            out.update(_cross_stage(pairs, labels, rows, eligible, plan, say))
    return out


def _cross_stage(
    pairs: list[q.Pair],
    labels: q.Bools,
    rows: learned.Matrix,
    eligible: q.Bools,
    plan: StagePlan,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The verifier with the cross-encoders' score as a feature (nested cross-validation when
    there is a model per fold), and the cross-encoder's score alone behind the guards."""
    models = [_cross_encoder(d) for d in plan.cross_dirs]
    folds = q.folds_of(pairs, plan.folds)
    t0 = time.perf_counter()
    cross = q.cross_scores(pairs, models, folds if len(models) > 1 else None, eligible)
    scored = int(eligible.sum())
    say(
        f"cross-encoder: scored {scored:,} pairs in {time.perf_counter() - t0:.1f} s "
        f"(both orders, one thread)"
    )
    rows = rows.copy()
    rows[:, learned.FEATURES.index("cross_encoder")] = cross
    out: dict[str, Any] = {
        "models": [m.digest for m in models],
        "protocol": "nested: a model per fold scores it, the verifier is cross-validated "
        "inside each fold; cross-fitted: the verifier of fold i is trained on the other folds' "
        "scores, each from its own fold's model (stacking)"
        if len(models) > 1
        else "one model scores every pair; the verifier is cross-validated over the folds",
    }
    # The curve reads negative scores as "never a hit": logits become probabilities.
    curves = {"guards +cross": np.where(eligible, 1.0 / (1.0 + np.exp(-cross)), -1.0)}
    for use_rerank in [False, True] if plan.rerank else [False]:
        names = q.feature_names(use_rerank, cross=True)
        base = "guards +rerank +cross +verifier" if use_rerank else "guards +cross +verifier"
        runs = {base: q.cross_validate(rows, labels, names, folds, eligible)}
        if len(models) > 1:
            # The strict protocol keeps its plain name; the stacking one says what it is.
            runs = {
                base: q.cross_validate_nested(rows, labels, names, pairs, folds, eligible),
                base + ", cross-fitted": runs[base],
            }
        for name, cv in runs.items():
            curves[name] = cv.probabilities
            per_fold = [
                q.precision_at_recall(cv.probabilities[folds == f], labels[folds == f], 0.5)[0]
                for f in range(plan.folds)
            ]
            out[name] = {"precision_at_recall_0.5_per_fold": per_fold}
            say(
                f"{name}: precision at recall 0.5 per fold "
                + " ".join(f"{v:.3f}" for v in per_fold)
            )
    return {"cross_encoder": out, "cross_curves": curves}


@dataclass(frozen=True)
class AdaptivePlan:
    """An adaptive stream of ``eval``: δ, what it bounds, the configured threshold it starts
    from (the gate with a verifier), the seed of the order, and with ``verifier_folds`` > 0 a
    verifier per fold (``quality.adaptive_stream_verified``)."""

    delta: float
    bound: str
    start: float
    seed: int
    verifier_folds: int = 0


def _adaptive(
    pairs: list[q.Pair],
    vecs: dict[str, np.ndarray],
    embedder: Embedder,
    labels: q.Bools,
    scores: q.Floats,
    guarded: q.Floats,
    guard_names: str,
    plan: AdaptivePlan,
    say: Callable[[str], None],
) -> dict[str, Any]:
    delta, bound, start, seed = plan.delta, plan.bound, plan.start, plan.seed
    cuts: list[float] = []
    if plan.verifier_folds:
        eligible = guarded >= start  # past the guards and the gate, as the engine decides
        run, cuts = q.adaptive_stream_verified(
            pairs,
            vecs,
            embedder,
            q.feature_rows(pairs, scores, None),
            eligible,
            q.folds_of(pairs, plan.verifier_folds),
            delta=delta,
            gate=start,
            guards=guard_names,
            bound=bound,
            seed=seed,
        )
    else:
        run = q.adaptive_stream(
            pairs,
            vecs,
            embedder,
            delta=delta,
            start_threshold=start,
            guards=guard_names,
            bound=bound,
            seed=seed,
        )
    lookups2, hits2, wrong2 = run.second_half
    out: dict[str, Any] = asdict(run)
    out["delta"], out["bound"], out["seed"] = delta, bound, seed
    if cuts:
        out["verifier_folds"], out["final_cuts"] = plan.verifier_folds, cuts
    out["precision"] = run.precision
    out["wrong_hit_rate"] = run.wrong_hits / max(1, int((~labels).sum()))
    out["wrong_hits_per_lookup"] = run.wrong_hits / run.lookups
    out["wrong_share_of_hits"] = 1 - run.precision
    out["hit_rate"] = run.hits / run.lookups
    out["second_half_wrong_share"] = wrong2 / hits2 if hits2 else 0.0
    out["second_half_hit_rate"] = hits2 / lookups2 if lookups2 else 0.0
    # The fixed threshold (guards alike) with the precision adaptive reached: its hit rate.
    fixed = q.lowest_threshold(guarded, labels, run.precision)
    out["fixed_equal_precision"] = (
        None
        if fixed is None
        else {
            "threshold": fixed[0],
            "precision": fixed[1],
            "hit_rate": float(np.mean(guarded >= fixed[0])),
        }
    )
    say(
        f"\nadaptive δ={delta} ({bound}): {run.hits:,} hits of {run.lookups:,} lookups "
        f"(hit rate {out['hit_rate']:.3f}), wrong share of hits {1 - run.precision:.3f}, "
        f"wrong-hit rate {out['wrong_hit_rate']:.3f} "
        f"(second half {out['second_half_wrong_share']:.3f}, hit rate "
        f"{out['second_half_hit_rate']:.3f}); {run.labels:,} labels, {run.probes:,} probes; "
        + (
            "final verifier cuts " + " ".join(f"{c:.2f}" for c in cuts)
            if cuts
            else f"final threshold {run.final_threshold:.2f}"
        )
    )
    if fixed is not None:
        say(
            f"fixed threshold of equal precision ({fixed[1]:.3f}): {fixed[0]:.3f}, hit rate "
            f"{out['fixed_equal_precision']['hit_rate']:.3f}"
        )
    return out


@click.command("tune")
@data_option
@click.option(
    "--target-precision",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.95,
    show_default=True,
    help="Share of hits that must be correct.",
)
@guards_option
@vectors_option
@limit_option
@json_option
@click.option(
    "--train-verifier",
    is_flag=True,
    help="Train a learned verifier per namespace on these pairs instead of picking a threshold: "
    "its probability cut is the lowest whose held-out hits (k-fold) reach the target.",
)
@click.option("--rerank", is_flag=True, help="With --train-verifier: use re-ranking features.")
@click.option(
    "--cross-encoder",
    "cross_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="With --train-verifier: a cross-encoder model directory whose score becomes a feature "
    "(train it on other labelled pairs than these); install it on every node with "
    "'llmcache-cli models install'.",
)
@click.option(
    "--gate",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_GATE,
    show_default=True,
    help="With --train-verifier: the namespace threshold (candidates below it always miss).",
)
@click.option("--folds", type=click.IntRange(2, 20), default=5, show_default=True)
@click.option(
    "--apply",
    is_flag=True,
    help="Write each namespace's recommended settings to the cluster (ConfigSet through "
    "--url, --token, --tenant).",
)
@click.option("--url", "urls", multiple=True, help="With --apply: a node (repeatable).")
@click.option("--token", envvar="LLMCACHE_TOKEN", help="With --apply: token.")
@click.option("--tenant", envvar="LLMCACHE_TENANT", help="With --apply: the tenant to configure.")
def tune_command(
    data: Path,
    target_precision: float,
    guard_names: str,
    vectors: Path | None,
    limit: int | None,
    as_json: bool,
    train_verifier: bool,
    rerank: bool,
    cross_dir: Path | None,
    gate: float,
    folds: int,
    apply: bool,
    urls: tuple[str, ...],
    token: str | None,
    tenant: str | None,
) -> None:
    """Recommend settings per namespace from your own labelled pairs: the lowest threshold whose
    hits reach --target-precision on them (with the given guards on), or with
    --train-verifier a learned verifier. Exits 1 when a namespace cannot reach the target."""
    say = _say(as_json)
    if rerank and not train_verifier:
        _fail("--rerank needs --train-verifier")
    if cross_dir and not train_verifier:
        _fail("--cross-encoder needs --train-verifier")
    if apply and not tenant:
        _fail("--apply needs --tenant")
    pairs, embedder, vecs = _prepare(data, limit, vectors, say)
    run = q.replay(pairs, vecs, embedder, guard_names)
    vetoed = np.array([v is not None for v in run.vetoes], bool)
    scores = q.effective(run.scores, vetoed)
    rerank_scores = None
    if rerank:
        rr = q.replay(pairs, vecs, embedder, "none", _reranker(pairs, None, say))
        rerank_scores = rr.rerank
    cross = None
    if cross_dir:
        model = _cross_encoder(cross_dir)
        cross = CrossScores(
            model.digest,
            q.cross_scores(pairs, [model], eligible=~vetoed & (run.scores >= gate)),
        )
        say(
            f"the verifiers name cross-encoder {model.digest}: install it on every node first "
            f"(llmcache-cli models install {cross_dir} --models-dir <the node's models_dir>); "
            "until then their lookups answer 503 cross_encoder_missing"
        )
    by_namespace: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_namespace.setdefault(p.namespace, []).append(i)
    out: dict[str, Any] = {}
    missed = False
    for namespace, rows in sorted(by_namespace.items()):
        idx = np.array(rows)
        labels = np.array([pairs[i].label for i in rows], bool)
        if train_verifier:
            found_settings = _tune_verifier(
                [pairs[i] for i in rows],
                run.scores[idx],
                None if rerank_scores is None else rerank_scores[idx],
                None if cross is None else CrossScores(cross.digest, cross.scores[idx]),
                ~vetoed[idx] & (run.scores[idx] >= gate),
                labels,
                target_precision,
                gate,
                folds,
                rerank,
            )
            if found_settings is None:
                missed = True
                out[namespace] = {"pairs": len(rows), "settings": None}
                say(f"{namespace}: no verifier reaches precision {target_precision} held out")
                continue
            settings, row = found_settings
            out[namespace] = {"pairs": len(rows), "settings": settings, "held_out": asdict(row)}
            say(
                f"{namespace}: verifier (cut {row.threshold:.3f}) -> held-out precision "
                f"{row.precision:.3f}, recall {row.recall:.3f}, hit rate {row.hit_rate:.3f} "
                f"({len(rows)} pairs, {folds} folds)"
            )
            continue
        found = q.lowest_threshold(scores[idx], labels, target_precision)
        if found is None or not labels.any():
            missed = True
            out[namespace] = {"pairs": len(rows), "threshold": None}
            say(
                f"{namespace}: no threshold reaches precision {target_precision} "
                f"({len(rows)} pairs)"
            )
            continue
        threshold = found[0]
        # Round up to the 0.005 grid the settings are usually written in, never down.
        threshold = min(1.0, math.ceil(threshold * 200 - 1e-9) / 200)
        row = q.at_threshold(scores[idx], labels, threshold)
        out[namespace] = {"pairs": len(rows), "settings": {"threshold": threshold}, **asdict(row)}
        say(
            f"{namespace}: threshold {threshold:.3f} -> precision {row.precision:.3f}, recall "
            f"{row.recall:.3f}, hit rate {row.hit_rate:.3f} ({len(rows)} pairs)"
        )
    if apply:
        assert tenant is not None
        _apply(out, urls, token, tenant, say)
    if as_json:
        click.echo(json.dumps({"target_precision": target_precision, "namespaces": out}, indent=1))
    sys.exit(EXIT_MISSED if missed else EXIT_OK)


@dataclass(frozen=True)
class CrossScores:
    """A cross-encoder's digest and its score of each pair."""

    digest: str
    scores: q.Floats


def _tune_verifier(
    pairs: list[q.Pair],
    scores: q.Floats,
    rerank_scores: q.Floats | None,
    cross: CrossScores | None,
    eligible: q.Bools,
    labels: q.Bools,
    target_precision: float,
    gate: float,
    folds: int,
    rerank: bool,
) -> tuple[dict[str, Any], q.Row] | None:
    if labels.all() or not labels.any() or eligible.sum() < 2 * folds:
        return None
    rows = q.feature_rows(pairs, scores, rerank_scores, None if cross is None else cross.scores)
    try:
        trained = q.train_verifier(
            rows,
            labels,
            q.feature_names(rerank, cross is not None),
            target_precision,
            q.folds_of(pairs, folds),
            eligible,
        )
    except (ValueError, np.linalg.LinAlgError):
        return None  # a fold without both labels, or a singular fit: too few pairs
    if trained is None:
        return None
    verifier, row = trained
    if cross is not None:
        verifier = dataclasses.replace(verifier, cross_encoder=cross.digest)
    settings = {"threshold": gate, "verifier": verifier.dumps(), "rerank": rerank}
    return settings, row


def _apply(
    out: dict[str, Any],
    urls: tuple[str, ...],
    token: str | None,
    tenant: str,
    say: Callable[[str], None],
) -> None:
    """Write every namespace's recommended settings (ConfigSet, replicated to every node)."""
    from llmcache.client.commands import opened

    with opened(urls, token, tenant) as client:
        for namespace, found in out.items():
            if found.get("settings"):
                client.set_settings(tenant, found["settings"], namespace=namespace)
                found["applied"] = True
                say(f"{namespace}: settings written to tenant {tenant!r}")


def _cross_encoder(model_dir: Path) -> CrossEncoder:
    """The model in ``model_dir``, checked by scoring one pair; exits with the reason if not."""
    try:
        model = CrossEncoder(model_dir)
        model.score("How do I reset my password?", "password reset steps?")
    except CacheError as exc:
        _fail(exc.message)
    except Exception as exc:  # onnxruntime and tokenizers raise their own types
        _fail(f"{model_dir} is not a usable cross-encoder: {exc}")
    return model


@click.group("models")
def models_group() -> None:
    """Tenant cross-encoders (node/cross_encoder.py): a directory with model.onnx and
    tokenizer.json, named by its digest in the verifier that uses it."""


@models_group.command("digest")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def digest_command(model_dir: Path) -> None:
    """Print the digest a verifier names this model directory by."""
    try:
        click.echo(cross_encoder.digest(model_dir))
    except CacheError as exc:
        _fail(exc.message)


@models_group.command("install")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The node's models_dir (default there: <data_dir>/models). Run once per node.",
)
def install_command(model_dir: Path, models_dir: Path) -> None:
    """Copy a model directory into a node's models_dir under its digest, after checking that
    onnxruntime loads it and scores a pair; prints the digest."""
    _cross_encoder(model_dir)
    try:
        click.echo(cross_encoder.install(model_dir, models_dir))
    except (CacheError, OSError) as exc:
        _fail(str(exc))


def register(group: click.Group) -> None:
    """Add ``eval``, ``tune`` and ``models`` to ``llmcache-cli``."""
    group.add_command(eval_command)
    group.add_command(tune_command)
    group.add_command(models_group)
