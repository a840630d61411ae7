"""``python -m llmcache.node``: the embedded cache with its defaults, from the command line.

Until the node server (``llmcache-node``) lands, this is how to see the cache work on a fresh
machine: it opens (or creates) a cache under ``--data-dir`` with the default offline embedder,
stores the prompt/answer pairs given with ``--store``, then looks up each ``--lookup`` prompt and
prints HIT / SEMANTIC_HIT / MISS with the similarity. No network is used.
"""

from __future__ import annotations

import argparse
import json

from llmcache.node import keys
from llmcache.node.errors import CacheError
from llmcache.node.local import LocalCache

DEMO_STORE = [
    ("How do I reset my password?", "Open Settings → Security → Reset password."),
    ("What is your refund policy?", "Refunds within 30 days of purchase."),
]
DEMO_LOOKUP = ["password reset steps?", "How do I reset my password?", "Do you ship to Canada?"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcache.node", description=__doc__)
    parser.add_argument("--data-dir", default="./llmcache-data")
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--store", nargs=2, action="append", metavar=("PROMPT", "ANSWER"))
    parser.add_argument("--lookup", action="append", metavar="PROMPT")
    parser.add_argument("--threshold", type=float, default=None)
    args = parser.parse_args(argv)
    stores = args.store or ([] if args.lookup else DEMO_STORE)
    lookups = args.lookup or DEMO_LOOKUP
    try:
        with LocalCache(args.data_dir) as cache:
            engine = cache.engine
            with cache.store.read() as txn:
                known = cache.store.tenant(txn, args.tenant) is not None
            if not known:
                cache.propose(engine.prepare_tenant(args.tenant))
            for prompt, answer in stores:
                key = keys.text_key(args.tenant, args.namespace, prompt)
                result = cache.propose(
                    engine.prepare_put(key, answer.encode(), content_type="text/plain")
                )
                print(json.dumps({"stored": prompt, "id": result.value.get("id")}))
            for prompt in lookups:
                key = keys.text_key(args.tenant, args.namespace, prompt)
                found = engine.lookup(key, threshold=args.threshold)
                best = found.hit or (found.candidates[0] if found.candidates else None)
                print(
                    json.dumps(
                        {
                            "lookup": prompt,
                            "status": found.status.upper(),
                            "similarity": round(best.similarity, 4) if best else None,
                            "answer": found.hit.entry.response.decode() if found.hit else None,
                            "threshold": found.threshold,
                        },
                        ensure_ascii=False,
                    )
                )
    except CacheError as exc:
        parser.exit(2, f"error: {exc.to_dict()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
