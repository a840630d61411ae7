"""Cache policy: the settings that decide what is cached, for how long, and what counts as a hit.

Settings resolve in layers, each overriding the one before: the built-in defaults below, the
cluster's configuration, the tenant's, the namespace's (all set through ``ConfigSet`` log
commands, so every node sees the same), and finally the request's own overrides.

Thresholds are cosine similarities on the 0..1 scale used everywhere in LLM-Cache. The default
(:data:`DEFAULT_THRESHOLD`) belongs to the default embedder (all-MiniLM-L6-v2): it was chosen
from the quality benchmark over the QQP dev pairs (see README.md); another embedder needs its
own threshold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llmcache.node import adaptive, guards, limits, verifier
from llmcache.node.errors import InvalidRequest

DEFAULT_THRESHOLD = 0.88
"""On the QQP dev pairs with the default embedder: precision 0.761 at recall 0.509 (README).
Precision is worth more than recall in a cache (a wrong answer costs more than a miss), so the
default sits well above the best-F1 point (0.75)."""

DEFAULT_RERANK_THRESHOLD = 0.91
"""Re-ranking cosine (bge-small-en-v1.5) of a hit; see README "Quality" for how it was chosen."""


@dataclass(frozen=True)
class Settings:
    """The effective settings of one (tenant, namespace)."""

    threshold: float = DEFAULT_THRESHOLD
    """Minimum cosine similarity (0..1) of a semantic hit."""
    ttl_s: int = 7 * 24 * 3600
    """Time to live of new entries; 0 keeps them until invalidated or evicted."""
    ttl_jitter: float = 0.1
    """Each entry's TTL is drawn in ttl_s × (1 ± ttl_jitter) so entries do not expire together."""
    max_temperature: float = 0.3
    """Requests sampled hotter than this are not cached (their callers want variety)."""
    cache_multiple_choices: bool = False
    """Whether requests with ``n > 1`` are cached."""
    context_window: int = 0
    """0: embed the last user turn; N: embed the last N turns (see ``keys``)."""
    top_k: int = 1
    """How many candidates a lookup returns (the best one decides hit or miss)."""
    embedder: str = "default"
    """Name of the embedder of the namespace; ``supplied`` when callers send vectors."""
    enabled: bool = True
    """False turns the cache off: every lookup misses and nothing is stored."""
    guards: str = guards.DEFAULT_GUARDS
    """Comma-separated verification guards run on a semantic hit (``node/guards.py``);
    ``none`` runs none, ``all`` every one."""
    adaptive_delta: float = 0.0
    """0: the fixed ``threshold``. Above 0: the threshold is learned from feedback so that the
    wrong hits stay under this bound (``node/adaptive.py``); ``threshold`` applies until enough
    labels back a lower or higher one."""
    judge_model: str = ""
    """A model of the upstream that labels a sample of this namespace's semantic hits and probes
    for its adaptive threshold (proxy requests of adaptive namespaces; ``node/judge.py``);
    empty: no judge."""
    judge_rate: float = 0.05
    """Share of semantic hits, and the same share of probes, the judge labels. A judged hit
    costs one more upstream call (the fresh answer) plus the judge's."""
    adaptive_bound: str = "should_miss"
    """What ``adaptive_delta`` bounds: ``should_miss``, the share of lookups whose best candidate
    is wrong that are served it (the wrong-hit rate); ``hits``, the share of hits that are
    wrong."""

    rerank: bool = False
    """Re-rank the candidates at or above ``threshold`` that pass the guards by the re-ranking
    model (bge-small-en-v1.5, ``llmcache[rerank]``; ``node/embed/bge.py``): the best by its
    cosine is the hit if that cosine reaches ``rerank_threshold``. Costs one re-rank embedding
    of the query and of each such candidate (README "Quality")."""
    rerank_threshold: float = DEFAULT_RERANK_THRESHOLD
    """Minimum re-ranking cosine of a hit when ``rerank`` is on and no ``verifier`` is set."""
    verifier: str = ""
    """A learned verifier (``node/verifier.py``, JSON written by ``llmcache-cli tune
    --train-verifier``) deciding each candidate at or above ``threshold`` that passes the guards;
    it replaces ``rerank_threshold``. With ``adaptive_delta`` > 0 its probability cut is what is
    learned from feedback (``threshold`` stays the gate). Empty: none."""

    def merged(self, values: dict[str, Any]) -> Settings:
        return dataclasses.replace(self, **validate(values)) if values else self


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def validate(values: dict[str, Any]) -> dict[str, Any]:
    """Check setting names, types and ranges; raises :class:`InvalidRequest` naming the field.

    ``None`` values are kept (they remove a setting in ``ConfigSet``).
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in FIELDS:
            raise InvalidRequest(f"unknown setting {name!r}", field=name)
        if value is None:
            out[name] = None
            continue
        kind = FIELDS[name].type
        ok = {
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[str(kind)]
        if not ok:
            raise InvalidRequest(f"{name} must be a {kind}", field=name)
        if kind == "float":
            value = float(value)
            if not math.isfinite(value):
                raise InvalidRequest(f"{name} must be finite", field=name)
        out[name] = value
    _check_range(out, "threshold", 0.0, 1.0)
    _check_range(out, "ttl_s", 0, limits.MAX_TTL_S)
    _check_range(out, "ttl_jitter", 0.0, 0.5)
    _check_range(out, "max_temperature", 0.0, 2.0)
    _check_range(out, "context_window", 0, limits.MAX_MESSAGES)
    _check_range(out, "top_k", 1, limits.MAX_TOP_K)
    _check_range(out, "adaptive_delta", 0.0, 0.5)
    _check_range(out, "judge_rate", 0.0, 1.0)
    if len(out.get("judge_model") or "") > 200:
        raise InvalidRequest("judge_model is at most 200 characters", field="judge_model")
    _check_range(out, "rerank_threshold", 0.0, 1.0)
    if out.get("verifier"):
        try:
            verifier.parse(out["verifier"])
        except verifier.VerifierError as exc:
            raise InvalidRequest(str(exc), field="verifier") from None
    if out.get("adaptive_bound") is not None and out["adaptive_bound"] not in adaptive.BOUNDS:
        raise InvalidRequest(
            f"adaptive_bound must be one of {list(adaptive.BOUNDS)}", field="adaptive_bound"
        )
    if out.get("guards") is not None:
        try:
            guards.parse(out["guards"])
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="guards") from None
    return out


def _check_range(values: dict[str, Any], name: str, low: float, high: float) -> None:
    value = values.get(name)
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {value}", field=name)


def resolve(*layers: dict[str, Any]) -> Settings:
    """Defaults overridden by each layer in turn (cluster, tenant, namespace, request)."""
    settings = Settings()
    for layer in layers:
        settings = settings.merged({k: v for k, v in layer.items() if v is not None})
    return settings


def not_cacheable_reason(body: dict[str, Any], settings: Settings) -> str | None:
    """Why a request's answer must not be cached, or ``None`` when it may be.

    A request without ``temperature`` is cacheable: the caller did not ask for variety.
    """
    if not settings.enabled:
        return "cache disabled"
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and temperature > settings.max_temperature:
        return f"temperature {temperature} above {settings.max_temperature}"
    n = body.get("n")
    if isinstance(n, int) and n > 1 and not settings.cache_multiple_choices:
        return f"n={n} asks for several different answers"
    return None


def response_cacheable(status: int) -> bool:
    """Only successful answers are cached: errors and refusals would be replayed to everyone."""
    return 200 <= status < 300


@dataclass(frozen=True)
class Expiry:
    """Time to live → ``expires_at_ms``, decided once by the node that takes the write."""

    ttl_s: int
    jitter: float

    def expires_at(self, now_ms: int, unit_random: float) -> int:
        """``unit_random`` in [0, 1) is drawn by the caller; 0 ttl means never (returns 0)."""
        if self.ttl_s == 0:
            return 0
        factor = 1.0 + self.jitter * (2.0 * unit_random - 1.0)
        return now_ms + max(1, round(self.ttl_s * 1000 * factor))
