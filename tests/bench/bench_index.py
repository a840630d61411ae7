"""Benchmark of llmcache.node.index: rebuild rate, search latency, recall and memory.

    python tests/bench/bench_index.py [--sizes 10000,100000,1000000] [--ef 64,128,256] [--rank 32]

For each N, random unit 384-d vectors in one scope, added in batches of 10,000 (as a rebuild from
LMDB would): inserts/s, k=5 search latency p50/p99 over 2,000 queries at each ef_search, recall@1
against brute force on 200 queries, and memory per entry beyond the 1,536 B vector payload, as
both ``memory_bytes()`` and the process RSS delta. Queries are either near duplicates of stored
vectors (cosine ~0.9 to their source, the cache's case) or uniformly random (hardest: in 384-d
nearly all points are about equally far). Isotropic random data is the worst case for HNSW;
real embeddings have far fewer effective dimensions, which ``--rank R`` imitates by putting the
stored vectors near a random R-d subspace. Then 10,000 scopes of 5 entries each, added one entry
at a time, for the per-scope memory of many small scopes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

from llmcache.node.index import IndexParams, IndexSet

DIM = 384
PAYLOAD = DIM * 4
BATCH = 10_000


def rss() -> int:
    """Resident bytes, after handing glibc's free heap back so that deltas are not hidden by it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def unit(rng: np.random.Generator, n: int, rank: int = 0) -> np.ndarray:
    """``n`` random unit vectors: isotropic, or (``rank`` > 0) near a random ``rank``-d subspace."""
    basis = rng.standard_normal((rank, DIM), dtype=np.float32) / np.sqrt(rank) if rank else None
    out: np.ndarray = np.empty((n, DIM), np.float32)
    for lo in range(0, n, 100_000):  # in chunks: no float64 copy of a million rows
        v = rng.standard_normal((min(100_000, n - lo), DIM), dtype=np.float32)
        if basis is not None:  # signal in the subspace plus 10% isotropic noise
            v = rng.standard_normal((len(v), rank), dtype=np.float32) @ basis + 0.1 * v
        out[lo : lo + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def near(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    noise = unit(rng, len(base))
    q: np.ndarray = base + 0.48 * noise  # cosine ~0.9 to the source vector
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def nearest(vecs: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Exact nearest row of ``vecs`` for each query, in chunks: no N x queries matrix."""
    best, top = np.zeros(len(qs), np.int64), np.full(len(qs), -np.inf, np.float32)
    for lo in range(0, len(vecs), 100_000):
        sims = vecs[lo : lo + 100_000] @ qs.T
        better = sims.max(axis=0) > top
        best = np.where(better, sims.argmax(axis=0) + lo, best)
        top = np.maximum(top, sims.max(axis=0))
    return best


def bench_one_scope(n: int, efs: list[int], rank: int) -> None:
    rng = np.random.default_rng(n)
    vecs = unit(rng, n, rank)
    ids = np.arange(n, dtype=np.uint64)
    scope = b"bench\0ns\0one"
    rss0 = rss()
    s = IndexSet(IndexParams())
    t0 = time.perf_counter()
    for lo in range(0, n, BATCH):
        s.add(scope, ids[lo : lo + BATCH], vecs[lo : lo + BATCH])
    build = time.perf_counter() - t0
    rss_delta = rss() - rss0
    est = s.memory_bytes()
    print(f"N={n:,}: build {build:.1f} s = {n / build:,.0f} inserts/s (batches of {BATCH:,})")
    print(
        f"  memory: memory_bytes() {est / n:,.0f} B/entry, RSS delta {rss_delta / n:,.0f} B/entry;"
        f" beyond the {PAYLOAD:,} B vector: {est / n - PAYLOAD:,.0f} B and"
        f" {rss_delta / n - PAYLOAD:,.0f} B"
    )
    queries = near(rng, vecs[rng.integers(0, n, 2000)])
    recall_sets = {"near-duplicate": queries[:200], "random": unit(rng, 200)}
    truth = {label: nearest(vecs, qs) for label, qs in recall_sets.items()}
    for ef in efs:
        s.params = replace(s.params, ef_search=ef)  # read at query time only
        lat = []
        for q in queries:
            t = time.perf_counter_ns()
            s.search(scope, q, 5)
            lat.append(time.perf_counter_ns() - t)
        p50, p99 = np.percentile(np.array(lat) / 1000, [50, 99])
        recall = []
        for label, qs in recall_sets.items():
            top1 = np.array([s.search(scope, q, 1)[0][0] for q in qs])
            recall.append(f"{label} {np.mean(top1 == truth[label]):.3f}")
        print(
            f"  ef_search {ef}: k=5 search p50 {p50:.0f} us, p99 {p99:.0f} us (2,000 queries);"
            f" recall@1 (200 queries): {', '.join(recall)}"
        )
    del s
    gc.collect()


def bench_many_small(scopes: int, per: int) -> None:
    rng = np.random.default_rng(0)
    vecs = unit(rng, scopes * per)
    rss0 = rss()
    s = IndexSet()
    t0 = time.perf_counter()
    for i in range(scopes * per):
        s.add(b"t\0ns\0%d" % (i // per), np.array([i], np.uint64), vecs[i : i + 1])
    took = time.perf_counter() - t0
    delta = rss() - rss0
    print(
        f"{scopes:,} scopes x {per} entries (one add each, {scopes * per / took:,.0f} adds/s):"
        f" memory_bytes() {s.memory_bytes() / scopes:,.0f} B/scope,"
        f" RSS delta {delta / scopes:,.0f} B/scope; vector payload {per * PAYLOAD:,} B/scope"
    )
    lat = []
    for i in rng.integers(0, scopes * per, 2000):
        t = time.perf_counter_ns()
        s.search(b"t\0ns\0%d" % (i // per), vecs[i], 5)
        lat.append(time.perf_counter_ns() - t)
    p50, p99 = np.percentile(np.array(lat) / 1000, [50, 99])
    print(f"  search k=5 in a 5-entry scope: p50 {p50:.0f} us, p99 {p99:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated scope sizes")
    parser.add_argument("--ef", default="64", help="comma-separated ef_search values to try")
    parser.add_argument(
        "--rank", type=int, default=0, help="stored vectors near a random subspace of this rank"
    )
    parser.add_argument("--skip-small", action="store_true", help="skip the many-scopes case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.case:
        if args.case == "small":
            bench_many_small(10_000, 5)
        else:
            bench_one_scope(int(args.case), [int(x) for x in args.ef.split(",")], args.rank)
        return
    print(f"params: {IndexParams()}", flush=True)
    cases = [c.strip() for c in args.sizes.split(",")] + ([] if args.skip_small else ["small"])
    for case in cases:  # each in a fresh process: RSS deltas must not reuse another's freed heap
        cmd = [sys.executable, __file__, "--case", case, "--ef", args.ef, "--rank", str(args.rank)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
