"""Prometheus metrics of a node (prometheus-client).

Multiprocess-safe: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts the
workers, prometheus-client then keeps every value in mmap files there, and :func:`render`
aggregates all workers' files. Without the variable (one process, tests) the default registry
is used. Gauges use ``livesum``/``liveall`` so a dead worker's values drop out.

Label cardinality is bounded: tenants and namespaces are operator-created, ``kind``, ``result``,
``stage`` and ``guard`` are fixed small sets.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

LOOKUPS = Counter(
    "llmcache_lookups_total",
    "Cache lookups by tenant, match kind (exact, semantic, none) and result (hit, miss, bypass).",
    ["tenant", "kind", "result"],
)
STAGE_SECONDS = Histogram(
    "llmcache_stage_seconds",
    "Latency of lookup stages: embed, search, total, upstream.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
HIT_SIMILARITY = Histogram(
    "llmcache_hit_similarity",
    "Cosine similarity of semantic hits.",
    ["tenant"],
    buckets=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95, 0.97, 0.99, 1.0),
)
STORES = Counter(
    "llmcache_stores_total", "Entries stored, by tenant and result.", ["tenant", "result"]
)
TOKENS_SAVED = Counter(
    "llmcache_tokens_saved_total", "Tokens not sent upstream thanks to hits.", ["tenant", "type"]
)
COST_SAVED = Counter(
    "llmcache_cost_saved_usd_total",
    "USD not spent upstream thanks to hits (price table).",
    ["tenant"],
)
UPSTREAM_CALLS = Counter(
    "llmcache_upstream_requests_total",
    "Requests forwarded upstream, by endpoint and status class.",
    ["endpoint", "status"],
)
UPSTREAM_ERRORS = Counter(
    "llmcache_upstream_errors_total",
    "Upstream failures (connection, timeout, cut stream, 5xx).",
    ["endpoint", "reason"],
)
SINGLEFLIGHT_JOINS = Counter(
    "llmcache_singleflight_joins_total",
    "Misses that waited for an identical in-flight upstream call.",
)
DEGRADED = Counter(
    "llmcache_degraded_total",
    "Proxy requests passed through because the cache was unavailable.",
    ["reason"],
)
HTTP_REQUESTS = Counter(
    "llmcache_http_requests_total", "HTTP requests by route and status.", ["route", "status"]
)
ENTRIES = Gauge(
    "llmcache_entries", "Live entries per tenant.", ["tenant"], multiprocess_mode="liveall"
)
ENTRY_BYTES = Gauge(
    "llmcache_entry_bytes", "Bytes of entries per tenant.", ["tenant"], multiprocess_mode="liveall"
)
EVICTIONS = Gauge(
    "llmcache_evictions",
    "Entries evicted per tenant since creation.",
    ["tenant"],
    multiprocess_mode="liveall",
)
EXPIRATIONS = Gauge(
    "llmcache_expirations",
    "Entries expired per tenant since creation.",
    ["tenant"],
    multiprocess_mode="liveall",
)
RAFT_TERM = Gauge("llmcache_raft_term", "Current Raft term.", multiprocess_mode="liveall")
RAFT_COMMIT_INDEX = Gauge(
    "llmcache_raft_commit_index", "Raft commit index.", multiprocess_mode="liveall"
)
RAFT_APPLIED_INDEX = Gauge(
    "llmcache_raft_applied_index", "Index applied to this node's LMDB.", multiprocess_mode="liveall"
)
RAFT_IS_LEADER = Gauge(
    "llmcache_raft_is_leader", "1 when this node is the Raft leader.", multiprocess_mode="liveall"
)
APPLY_LAG = Gauge(
    "llmcache_apply_lag", "Commit index minus applied index.", multiprocess_mode="liveall"
)
FEEDBACK = Counter("llmcache_feedback_total", "Feedback labels received.", ["tenant", "label"])
GUARD_REJECTIONS = Counter(
    "llmcache_guard_rejections_total",
    "Semantic hits vetoed by a verification guard (node/guards.py).",
    ["tenant", "guard"],
)
ESTIMATED_PRECISION = Gauge(
    "llmcache_estimated_precision",
    "Share of correct feedback labels at or above the namespace's current threshold "
    "(adaptive namespaces; as of the last lookup).",
    ["tenant", "namespace"],
    multiprocess_mode="mostrecent",
)
JUDGE = Counter(
    "llmcache_judge_total",
    "Lookups labelled by a namespace's judge model, by verdict (correct, wrong; unclear: the "
    "judge answered neither yes nor no; failed: an upstream or feedback error).",
    ["tenant", "verdict"],
)
PROBES = Counter(
    "llmcache_probes_total",
    "Misses of adaptive namespaces flagged as probes to label (adaptive exploration).",
    ["tenant"],
)


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
