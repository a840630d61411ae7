"""``llmcache-cli bench``: load a node like redis-benchmark and report throughput and latency.

A run first stores ``keys`` entries (not timed) in a fresh namespace, then ``concurrency``
asyncio workers issue operations for ``duration_s`` seconds, each drawn from ``mix``:

- ``exact``: the text of a stored entry, word for word (an exact hit, no embedding);
- ``semantic``: a paraphrase of a stored entry (the node embeds it, or, with ``vector_dim``,
  the caller sends a vector near the stored one), a semantic hit when similar enough;
- ``store``: a new entry (a replicated write, ``wait=applied``).

With ``vector_dim`` the namespace takes supplied vectors (set through the admin API), so the
run measures the cache rather than the embedder. Latency is per operation, from the call to
its parsed answer, including retries; errors are counted, not timed.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmcache.client.aio import AsyncCacheClient
from llmcache.client.errors import LLMCacheError
from llmcache.client.protocol import RetryPolicy

OPS = ("exact", "semantic", "store")


@dataclass(frozen=True)
class BenchConfig:
    urls: Sequence[str]
    token: str | None = None
    tenant: str | None = None
    duration_s: float = 10.0
    concurrency: int = 16
    mix: dict[str, float] = field(
        default_factory=lambda: {"exact": 60, "semantic": 20, "store": 20}
    )
    keys: int = 200
    vector_dim: int | None = None
    seed: int = 1


def parse_mix(text: str) -> dict[str, float]:
    """``"exact=60,semantic=20,store=20"`` → weights; :class:`ValueError` when malformed."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.strip().partition("=")
        if not sep or name not in OPS:
            raise ValueError(f"{part.strip()!r}: give op=weight with op one of {', '.join(OPS)}")
        value = float(weight)
        if not value >= 0:
            raise ValueError(f"{part.strip()!r}: weights are numbers >= 0")
        mix[name] = value
    if sum(mix.values()) <= 0:
        raise ValueError("at least one weight must be positive")
    return mix


def _question(i: int) -> str:
    return f"How do I configure feature number {i} of product {i % 97} for my team?"


def _paraphrase(i: int) -> str:
    return f"how can I set up feature {i} of product {i % 97} for my team"


class _Load:
    def __init__(self, config: BenchConfig, namespace: str) -> None:
        self.config = config
        self.namespace = namespace
        self.rng = np.random.default_rng(config.seed)
        self.vectors: list[np.ndarray] = []
        self.latencies: dict[str, list[float]] = {op: [] for op in OPS}
        self.errors: dict[str, int] = dict.fromkeys(OPS, 0)
        self.hits: dict[str, int] = dict.fromkeys(OPS, 0)
        self.samples: dict[str, str] = {}
        self.next_key = config.keys

    def vector(self) -> np.ndarray:
        v = self.rng.standard_normal(self.config.vector_dim or 1).astype(np.float32)
        return v / np.linalg.norm(v)

    def near(self, i: int) -> list[float]:
        v = self.vectors[i] + 0.05 * self.vector()
        near: list[float] = (v / np.linalg.norm(v)).tolist()
        return near

    def store_args(self, i: int) -> dict[str, Any]:
        args: dict[str, Any] = {"namespace": self.namespace, "ttl_s": 3600}
        if self.config.vector_dim:
            if i >= len(self.vectors):
                self.vectors.append(self.vector())
            args["vector"] = self.vectors[i].tolist()
        return args

    async def op(self, client: AsyncCacheClient, name: str, picker: random.Random) -> None:
        i = picker.randrange(self.config.keys)
        started = time.perf_counter()
        try:
            if name == "exact":
                found = await client.lookup(_question(i), namespace=self.namespace)
                hit = found.status == "HIT"
            elif name == "semantic":
                extra: dict[str, Any] = {}
                if self.config.vector_dim:
                    extra["vector"] = self.near(i)
                found = await client.lookup(_paraphrase(i), namespace=self.namespace, **extra)
                hit = found.hit
            else:
                j, self.next_key = self.next_key, self.next_key + 1
                await client.store(_question(j), f"answer {j}", **self.store_args(j))
                hit = True
        except LLMCacheError as exc:
            self.errors[name] += 1
            self.samples.setdefault(name, f"{type(exc).__name__}: {exc}")
            return
        self.latencies[name].append(time.perf_counter() - started)
        self.hits[name] += hit


async def _prepare(client: AsyncCacheClient, load: _Load) -> None:
    config = load.config
    if config.vector_dim:
        tenant = config.tenant or "default"
        await client.set_settings(tenant, {"embedder": "supplied"}, namespace=load.namespace)
    semaphore = asyncio.Semaphore(config.concurrency)

    async def put(i: int) -> None:
        async with semaphore:
            await client.store(_question(i), f"answer {i}", **load.store_args(i))

    for i in range(config.keys):  # vectors drawn in order, so a seed gives the same data
        load.store_args(i)
    await asyncio.gather(*(put(i) for i in range(config.keys)))


def _summary(latencies: list[float], elapsed: float) -> dict[str, Any]:
    if not latencies:
        return {"count": 0, "throughput": 0.0}
    ms = np.asarray(latencies) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "count": len(latencies),
        "throughput": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(ms.max()), 3),
    }


async def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark of the module docstring; the report (a JSON-able dict)."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    load = _Load(config, namespace)
    retry = RetryPolicy(attempts=3, base_s=0.05, cap_s=0.5)
    async with AsyncCacheClient(
        list(config.urls),
        token=config.token,
        tenant=config.tenant,
        retry=retry,
        max_connections=config.concurrency,
    ) as client:
        await _prepare(client, load)
        names = [op for op in OPS if config.mix.get(op, 0) > 0]
        weights = [config.mix[op] for op in names]
        deadline = time.perf_counter() + config.duration_s

        async def worker(seed: int) -> None:
            picker = random.Random(seed)
            while time.perf_counter() < deadline:
                await load.op(client, picker.choices(names, weights)[0], picker)

        started = time.perf_counter()
        await asyncio.gather(*(worker(config.seed * 1000 + w) for w in range(config.concurrency)))
        elapsed = time.perf_counter() - started
    ops = {}
    for op in names:
        ops[op] = _summary(load.latencies[op], elapsed)
        ops[op]["errors"] = load.errors[op]
        if op != "store" and load.latencies[op]:
            ops[op]["hit_rate"] = round(load.hits[op] / len(load.latencies[op]), 4)
    every = [x for op in names for x in load.latencies[op]]
    return {
        "target": list(config.urls),
        "namespace": namespace,
        "duration_s": round(elapsed, 3),
        "concurrency": config.concurrency,
        "mix": {op: config.mix[op] for op in names},
        "keys": config.keys,
        "vector_dim": config.vector_dim,
        "total": {**_summary(every, elapsed), "errors": sum(load.errors.values())},
        "ops": ops,
        "error_samples": load.samples,
    }


def render(report: dict[str, Any]) -> str:
    """A redis-benchmark-like text summary of :func:`run`'s report."""
    lines = [
        f"target {', '.join(report['target'])}  concurrency {report['concurrency']}  "
        f"duration {report['duration_s']} s  keys {report['keys']}"
        + (f"  vectors {report['vector_dim']}-d" if report["vector_dim"] else ""),
        f"{'op':<10}{'ops/s':>10}{'count':>9}{'errors':>8}{'p50 ms':>9}{'p90 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'hits':>8}",
    ]
    for name, s in [*report["ops"].items(), ("total", report["total"])]:
        hits = f"{s['hit_rate']:.0%}" if "hit_rate" in s else "-"
        lines.append(
            f"{name:<10}{s['throughput']:>10}{s['count']:>9}{s['errors']:>8}"
            f"{s.get('p50_ms', '-'):>9}{s.get('p90_ms', '-'):>9}{s.get('p99_ms', '-'):>9}"
            f"{s.get('max_ms', '-'):>9}{hits:>8}"
        )
    for name, sample in report["error_samples"].items():
        lines.append(f"first {name} error: {sample}")
    return "\n".join(lines)
