"""Answer quality of the real engine on the labelled QQP dev pairs (semantic-cache hit decisions).

    python tests/bench/bench_quality.py [--data FILE] [--vectors CACHE.npz] [--limit N]
                                        [--json out.json] [--plot pr.png]
                                        [--adaptive-delta 0.05 | --no-adaptive]
                                        [--rerank-vectors CACHE.npz] [--no-rerank]
                                        [--latency 200]

``llmcache-cli eval`` (``client/quality_cli.py``) on ``shared/eval-data/qqp_dev.jsonl.gz`` with
every measurement on: each ``text_a`` stored in a scope of its own, its ``text_b`` looked up
there through the real engine (LMDB store, state machine, indexes) with the real default
embedder; precision, recall, F1, hit rate and wrong-hit rate (share of the lookups that should
miss that hit) per threshold without guards and with the default guards; precision at recall
0.3 / 0.5 / 0.7 for each guard alone; and an adaptive namespace (δ = 0.05, starting at 0.95)
fed the pairs' labels as replicated ``Feedback`` on every hit and probe, against the fixed
threshold of equal precision. With the re-ranking model installed (``llmcache[rerank]``), also
the replay with re-ranking on (curve ``guards +rerank``) and the learned verifier, 5-fold
cross-validated on these pairs only (train on four folds, score the fifth; curves ``guards
+verifier`` and ``guards +rerank +verifier``), and the time of 200 lookups with and without
re-ranking. Not collected by pytest.

Embedding the 73k distinct texts takes ~8 min on 2 loaded cores; ``--vectors`` keeps them in a
file (outside the repository) for the next run. By default everything is computed from scratch.
The data is not part of the repository: see ``shared/eval-data/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmcache.client.quality_cli import eval_command
from llmcache.node.embed import bge

EVAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "eval-data"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=EVAL_DATA / "qqp_dev.jsonl.gz")
    parser.add_argument("--vectors", type=Path, help="embedding cache (.npz), read or written")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, default=Path("/tmp/llmcache-qqp-pr.png"))
    parser.add_argument("--adaptive-delta", default="0.05", help="δ of the adaptive stream")
    parser.add_argument("--no-adaptive", action="store_true")
    parser.add_argument("--rerank-vectors", type=Path, help="re-rank embedding cache (.npz)")
    parser.add_argument("--no-rerank", action="store_true", help="skip re-ranking")
    parser.add_argument("--latency", type=int, default=200, help="lookups to time")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"no evaluation data at {args.data} (see --data)")
    argv = ["--data", str(args.data), "--each-guard", "--plot", str(args.plot)]
    if args.vectors:
        argv += ["--vectors", str(args.vectors)]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if not args.no_adaptive:
        argv += ["--adaptive-delta", args.adaptive_delta]
    argv += ["--verifier", "--latency", str(args.latency)]
    if not args.no_rerank and bge.available():
        argv += ["--rerank"]
        if args.rerank_vectors:
            argv += ["--rerank-vectors", str(args.rerank_vectors)]
    if args.json:
        argv += ["--json"]
        with args.json.open("w") as out:
            sys.stdout = out
            eval_command.main(argv, standalone_mode=False)
        return
    eval_command.main(argv, standalone_mode=False)


if __name__ == "__main__":
    main()
