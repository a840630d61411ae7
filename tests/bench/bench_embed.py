"""Benchmark of the default embedder: ``python tests/bench/bench_embed.py``.

Prints: time from a fresh process to its first vector, single short query latency (p50/p99),
batch throughput at batch 32, and resident memory after load. Not collected by pytest.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import numpy as np

CHILD = (
    "from llmcache.node.embed import default_embedder; import time; "
    "default_embedder().embed(['How do I reset my password?']); print(time.time())"
)

_TEXT = (
    "how do i reset my password what is the capital of france explain caching to a child "
    "write a poem about the sea summarise this article in three sentences translate hello"
)
WORDS = _TEXT.split()


def vm_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cold_start_s(runs: int = 3) -> list[float]:
    """Wall time from spawning a Python process to its first vector."""
    out = []
    for _ in range(runs):
        t0 = time.time()
        done = subprocess.run(
            [sys.executable, "-c", CHILD], check=True, capture_output=True, text=True
        )
        out.append(float(done.stdout.strip()) - t0)
    return out


def sentences(rng: np.random.Generator, n: int, lo: int = 5, hi: int = 15) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def main() -> None:
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")
    starts = cold_start_s()
    print(
        "fresh process -> first vector: "
        + ", ".join(f"{s:.2f}" for s in starts)
        + f" s (median {statistics.median(starts):.2f} s)"
    )

    from llmcache.node.embed import MiniLMEmbedder

    rss0 = vm_rss_mb()
    t0 = time.perf_counter()
    emb = MiniLMEmbedder()
    emb.embed(["warm up"])
    print(f"in-process load + first vector: {time.perf_counter() - t0:.3f} s")
    print(f"resident memory after load: {vm_rss_mb():.0f} MB (before load {rss0:.0f} MB)")

    rng = np.random.default_rng(0)
    queries = sentences(rng, 1000)
    lat = []
    for q in queries:
        t = time.perf_counter()
        emb.embed([q])
        lat.append((time.perf_counter() - t) * 1000)
    p50, p99 = np.percentile(lat, [50, 99])
    print(f"single short query ({len(queries)} queries): p50 {p50:.2f} ms, p99 {p99:.2f} ms")

    for label, lo, hi in (("short (5-15 words)", 5, 15), ("long (>256 pieces)", 300, 400)):
        batches = [sentences(rng, 32, lo, hi) for _ in range(20 if lo < 100 else 4)]
        t = time.perf_counter()
        for b in batches:
            emb.embed(b)
        dt = time.perf_counter() - t
        n = sum(len(b) for b in batches)
        print(f"batch 32 throughput, {label}: {n / dt:.0f} sentences/s")
    print(f"resident memory after the benchmark: {vm_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
