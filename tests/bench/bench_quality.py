"""Answer quality of the real engine on the labelled QQP dev pairs (semantic-cache hit decisions).

    python tests/bench/bench_quality.py [--data DIR_OR_FILE] [--limit N] [--json out.json]

Replays every pair of ``qqp_dev.jsonl.gz`` through the real engine (LMDB store, state machine,
indexes) with the real default embedder: ``text_a`` is stored in a scope of its own (the pair's
number is a scope parameter of :func:`keys.text_key`, so pairs never see each other), then
``text_b`` is looked up in that scope with threshold 0 and top_k 1, which reports the similarity
the engine would compare with a threshold. Texts are embedded up front in batches through the
embedder itself and handed to ``prepare_put`` / ``lookup`` as vectors (the namespace's embedder
stays ``default``): the same vectors the engine would make, just batched.

Label 1 (duplicates) is a pair that should hit, label 0 one that should miss. For thresholds
0.70, 0.72, ... 0.96 it prints precision, recall, F1, hit rate (share of all lookups that hit)
and the wrong-hit rate (share of label-0 lookups that hit); then ROC AUC, the best-F1 threshold,
the lowest thresholds reaching precision 0.85 and 0.80, and the precision at recall 0.5. It draws
a precision-recall plot when matplotlib is importable. Not collected by pytest.

The data is not part of the repository: see ``shared/eval-data/README.md`` beside it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmcache.node import keys
from llmcache.node.embed import Embedder, default_embedder
from llmcache.node.local import LocalCache

EVAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "eval-data"
DATA_FILE = "qqp_dev.jsonl.gz"
TENANT, NAMESPACE = "eval", "qqp"
EMBED_BATCH = 256  # limits.MAX_BATCH: the most one embed() call takes
PUT_BATCH = 256  # puts per state-machine transaction
GRID = [round(0.70 + 0.02 * i, 2) for i in range(14)]  # 0.70 .. 0.96
PRECISION_TARGETS = (0.85, 0.80)

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Row:
    """Decisions at one threshold."""

    threshold: float
    precision: float
    recall: float
    f1: float
    hit_rate: float
    wrong_hit_rate: float
    hits: int
    wrong_hits: int


# -- data -------------------------------------------------------------------------------------


def data_path(arg: str | None) -> Path:
    path = Path(arg) if arg else EVAL_DATA
    return path / DATA_FILE if path.is_dir() else path


def load_pairs(path: Path, limit: int | None) -> tuple[list[tuple[str, str, int]], int]:
    """Labelled pairs (text_a, text_b, label) and how many were skipped for a blank text
    (the engine refuses an empty prompt, so such a request is never cached)."""
    pairs: list[tuple[str, str, int]] = []
    skipped = 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(pairs) >= limit:
                break
            row = json.loads(line)
            a, b, label = row["text_a"], row["text_b"], int(row["label"])
            if not a.strip() or not b.strip():
                skipped += 1
                continue
            pairs.append((a, b, label))
    return pairs, skipped


def embed_all(embedder: Embedder, texts: list[str]) -> tuple[dict[str, np.ndarray], float]:
    """Every distinct text's vector, embedded in batches; and the seconds it took."""
    unique = sorted(set(texts), key=len)  # similar lengths together: less padding
    vectors: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    next_report = 10_000
    for lo in range(0, len(unique), EMBED_BATCH):
        batch = unique[lo : lo + EMBED_BATCH]
        result = embedder.embed(batch)
        for text, vector in zip(batch, result.vectors, strict=True):
            vectors[text] = vector
        if len(vectors) >= next_report:
            rate = len(vectors) / (time.perf_counter() - t0)
            print(f"  embedded {len(vectors):,}/{len(unique):,} ({rate:,.0f}/s)", flush=True)
            next_report += 10_000
    return vectors, time.perf_counter() - t0


# -- replay through the engine ----------------------------------------------------------------


def replay(
    pairs: list[tuple[str, str, int]], vectors: dict[str, np.ndarray], embedder: Embedder
) -> tuple[Floats, dict[str, Any]]:
    """Store each text_a in its own scope, look up its text_b there; the similarities found."""
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmcache-quality-") as tmp:
        cache = LocalCache(Path(tmp), embedders={"default": embedder}, durable=False)
        try:
            engine = cache.engine
            cache.propose(engine.prepare_tenant(TENANT))
            t0 = time.perf_counter()
            ids: list[int] = []
            for lo in range(0, len(pairs), PUT_BATCH):
                puts = [
                    engine.prepare_put(
                        keys.text_key(TENANT, NAMESPACE, a, {"pair": i}),
                        b'{"pair": %d}' % i,
                        vector=vectors[a],
                    )
                    for i, (a, _, _) in enumerate(pairs[lo : lo + PUT_BATCH], start=lo)
                ]
                for result in cache.propose_many(puts):
                    if not result.ok:
                        raise RuntimeError(f"put failed: {result}")
                    ids.append(result.value["id"])
            info["store_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            scores = np.empty(len(pairs), np.float64)
            exact = wrong_entry = disagree = 0
            for i, (a, b, _) in enumerate(pairs):
                key = keys.text_key(TENANT, NAMESPACE, b, {"pair": i})
                found = engine.lookup(key, vector=vectors[b], threshold=0.0, top_k=1)
                if found.hit is None:  # threshold 0: the scope's only entry always hits
                    raise RuntimeError(f"pair {i}: no candidate ({found.status})")
                scores[i] = found.hit.similarity
                exact += int(found.status == "hit")
                wrong_entry += int(found.hit.entry.id != ids[i])
                direct = 1.0 if a == b else float(np.dot(vectors[a], vectors[b]))
                disagree += int(abs(min(1.0, max(0.0, direct)) - float(scores[i])) > 1e-5)
            info["lookup_s"] = time.perf_counter() - t0
            info["exact_hits"] = exact
            info["wrong_entry"] = wrong_entry
            info["disagree_with_dot"] = disagree
        finally:
            cache.close(checkpoint=False)
    return scores, info


# -- metrics ----------------------------------------------------------------------------------


def at_threshold(scores: Floats, labels: Labels, t: float) -> Row:
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


def curve(scores: Floats, labels: Labels) -> tuple[Floats, Floats, Floats]:
    """(thresholds descending, precision, recall) at every distinct score."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # end of each tie group
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / max(1, int(labels.sum()))
    return s[last], precision.astype(np.float64), recall.astype(np.float64)


def roc_auc(scores: Floats, labels: Labels) -> float:
    """Mann-Whitney U / (P * N), ties counted half (average ranks)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first copy
    ranks = (starts + (counts + 1) / 2.0)[inverse]  # 1-based average rank
    p, n = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - p * (p + 1) / 2.0) / (p * n))


def summary(scores: Floats, labels: Labels) -> dict[str, Any]:
    thresholds, precision, recall = curve(scores, labels)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    out: dict[str, Any] = {
        "roc_auc": roc_auc(scores, labels),
        "best_f1": {
            "threshold": float(thresholds[best]),
            "f1": float(f1[best]),
            "precision": float(precision[best]),
            "recall": float(recall[best]),
        },
        "lowest_threshold_for_precision": {},
    }
    for target in PRECISION_TARGETS:
        ok = np.flatnonzero(precision >= target)
        if len(ok):
            i = int(ok[-1])  # thresholds descend: the last one is the lowest
            out["lowest_threshold_for_precision"][str(target)] = {
                "threshold": float(thresholds[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
            }
    half = int(np.flatnonzero(recall >= 0.5)[0])
    out["at_recall_0.5"] = {
        "threshold": float(thresholds[half]),
        "precision": float(precision[half]),
        "recall": float(recall[half]),
    }
    # About 200 points of the curve, for plotting elsewhere.
    step = max(1, len(thresholds) // 200)
    out["pr_curve"] = [
        [round(float(t), 5), round(float(p), 5), round(float(r), 5)]
        for t, p, r in zip(thresholds[::step], precision[::step], recall[::step], strict=True)
    ]
    return out


def plot(result: dict[str, Any], rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (--json keeps the curve's points)")
        return
    points = np.array(result["pr_curve"])
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot(points[:, 2], points[:, 1], label=f"ROC AUC {result['roc_auc']:.3f}")
    for row in rows[::2]:
        ax.annotate(f"{row.threshold:.2f}", (row.recall, row.precision), fontsize=7)
        ax.plot(row.recall, row.precision, "k.", markersize=3)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("QQP dev pairs, default embedder: precision-recall by threshold")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"precision-recall plot: {path}")


# -- main -------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    print(
        f"{'threshold':>9} {'precision':>9} {'recall':>7} {'F1':>6} {'hit rate':>8} "
        f"{'wrong-hit rate':>14} {'hits':>7} {'wrong':>7}"
    )
    for r in rows:
        print(
            f"{r.threshold:>9.2f} {r.precision:>9.3f} {r.recall:>7.3f} {r.f1:>6.3f} "
            f"{r.hit_rate:>8.3f} {r.wrong_hit_rate:>14.3f} {r.hits:>7,} {r.wrong_hits:>7,}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", help=f"{DATA_FILE} or its directory (default: {EVAL_DATA})")
    parser.add_argument("--limit", type=int, help="only the first N pairs (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path(tempfile.gettempdir()) / "llmcache-qqp-pr.png",
        help="precision-recall PNG (needs matplotlib; default: %(default)s)",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    path = data_path(args.data)
    if not path.exists():
        sys.exit(f"no evaluation data at {path} (see --data)")
    load = os.getloadavg()
    print(
        f"cpus: {os.cpu_count()}, load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    pairs, skipped = load_pairs(path, args.limit)
    labels: Labels = np.array([p[2] == 1 for p in pairs], bool)
    print(
        f"{path.name}: {len(pairs):,} pairs, {int(labels.sum()):,} duplicates "
        f"({labels.mean():.1%}); {skipped} skipped for a blank text"
    )

    embedder = default_embedder()
    print(f"embedder: {embedder.identity}", flush=True)
    vectors, embed_s = embed_all(embedder, [t for a, b, _ in pairs for t in (a, b)])
    print(f"embedded {len(vectors):,} distinct texts in {embed_s:.0f} s", flush=True)

    scores, info = replay(pairs, vectors, embedder)
    print(
        f"engine: stored {len(pairs):,} entries in {info['store_s']:.1f} s, looked up "
        f"{len(pairs):,} in {info['lookup_s']:.1f} s ({info['exact_hits']} exact hits on "
        f"identical texts); wrong entry returned: {info['wrong_entry']}, similarity differing "
        f"from dot(a, b): {info['disagree_with_dot']}"
    )

    rows = [at_threshold(scores, labels, t) for t in GRID]
    result = summary(scores, labels)
    print()
    print_table(rows)
    print()
    best = result["best_f1"]
    print(f"ROC AUC: {result['roc_auc']:.3f}")
    print(
        f"best F1: {best['f1']:.3f} at threshold {best['threshold']:.3f} "
        f"(precision {best['precision']:.3f}, recall {best['recall']:.3f})"
    )
    for target, at in result["lowest_threshold_for_precision"].items():
        print(
            f"lowest threshold with precision >= {target}: {at['threshold']:.3f} "
            f"(precision {at['precision']:.3f}, recall {at['recall']:.3f})"
        )
    half = result["at_recall_0.5"]
    print(f"at recall 0.5: precision {half['precision']:.3f}, threshold {half['threshold']:.3f}")
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    if not args.no_plot:
        plot(result, rows, args.plot)
    if args.json:
        out = {
            "data": str(path),
            "pairs": len(pairs),
            "duplicates": int(labels.sum()),
            "skipped_blank": skipped,
            "embedder": embedder.identity,
            "distinct_texts": len(vectors),
            "embed_s": embed_s,
            **info,
            "cpus": os.cpu_count(),
            "load_end": load,
            "thresholds": [asdict(r) for r in rows],
            **result,
        }
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
