"""The cache engine: lookups and write preparation over the store, indexes and embedders.

No HTTP and no Raft here. A lookup is a local read: exact match in LMDB first, then (for prompt
entries) embed the text — or take the caller's vector — and search the scope's index; expired
and deleted candidates are dropped and the best one at or above the threshold is a hit. Writes
are *prepared* here (validated, embedded once, timestamped, TTL and jitter decided) into log
commands; whoever owns the log proposes them and the state machine applies them.

Thread-safe: lookups may run concurrently in many threads (LMDB readers, locked indexes,
thread-safe embedders).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmcache.cluster import commands as c
from llmcache.node import adaptive, guards, limits, metrics, policy
from llmcache.node import verifier as learned
from llmcache.node.cross_encoder import CrossEncoders
from llmcache.node.embed import Embedder, validate_vector
from llmcache.node.errors import (
    DimensionMismatch,
    InvalidRequest,
    NotFound,
    OversizeInput,
    UnknownEmbedder,
    UnknownTenant,
)
from llmcache.node.index_feed import IndexFeed
from llmcache.node.keys import CacheKey, check_names, kv_key
from llmcache.node.store import Entry, Store, join, unpack

SUPPLIED = "supplied"
"""Embedder name of namespaces whose callers always send their own vectors."""
RERANK = "rerank"
"""Name of the re-ranking model among the engine's embedders (setting ``rerank``)."""
MAX_REQUEST_ID_LEN = 128
SETTINGS_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Hit:
    entry: Entry
    similarity: float
    kind: str  # "exact" | "semantic"
    rerank: float | None = None
    """The re-ranking model's cosine, in namespaces that re-rank (or whose verifier uses it)."""
    score: float | None = None
    """The learned verifier's probability, in namespaces with a verifier."""

    @property
    def label_at(self) -> float:
        """The value a label on this candidate is filed under (``Feedback.similarity``): what an
        adaptive namespace learns its threshold on, the verifier's probability when it has
        one, else the similarity."""
        return self.similarity if self.score is None else self.score


@dataclass(frozen=True)
class LookupResult:
    """``status`` is ``hit`` (exact), ``semantic_hit`` or ``miss``; ``candidates`` are the
    live semantic neighbours (best first), hit or not, with their similarities."""

    status: str
    hit: Hit | None
    threshold: float
    candidates: list[Hit] = field(default_factory=list)
    tokens: int = 0
    truncated: bool = False
    """True when the text exceeded the embedder's window and only head and tail were embedded."""
    rejected: tuple[tuple[int, str], ...] = ()
    """Candidates at or above the threshold vetoed by a guard: (entry id, guard name); the
    re-ranker's and the verifier's vetoes are named ``rerank`` and ``verifier``."""
    probe: Hit | None = None
    """On a miss of an adaptive namespace: the best candidate, with the similarity to send with
    its label (0 when a guard or the verifier vetoed it: no threshold would serve it). Label it
    (compare the fresh answer with its response) and send the label to feedback: that is how
    the threshold learns where it may go (``node/adaptive.py``)."""


class AccessStats:
    """Per-entry hit counts and last-hit times of this process since the last drain.

    The worker drains them periodically to raft-core, which proposes them as ``Touch`` commands:
    the replicated totals are what the leader's eviction (LRU/LFU) reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[int, list[int]] = {}

    def record(self, entry_id: int, now_ms: int) -> None:
        with self._lock:
            row = self._stats.setdefault(entry_id, [0, 0])
            row[0] += 1
            row[1] = now_ms

    def drain(self) -> dict[int, tuple[int, int]]:
        """``{id: (hits, last_hit_ms)}`` since the last drain."""
        with self._lock:
            out, self._stats = self._stats, {}
        return {k: (v[0], v[1]) for k, v in out.items()}


class Engine:
    """Lookups and write preparation for one node (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        feed: IndexFeed,
        embedders: Mapping[str, Embedder],
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        cross_encoders: CrossEncoders | None = None,
    ) -> None:
        self.store = store
        self.feed = feed
        self.embedders = dict(embedders)
        self.cross_encoders = cross_encoders or CrossEncoders(None)
        self.clock = clock
        self.rng = rng
        self.access = AccessStats()
        # (tenant, namespace) -> (config_index, settings): settings change only through
        # TenantUpsert/TenantDelete/ConfigSet, which move the store's config_index.
        self._settings: dict[tuple[str, str], tuple[int, policy.Settings]] = {}
        # (tenant, namespace, δ, bound, fallback) -> (histogram bytes, learned value, precision):
        # the learned value is recomputed only when the histogram changed.
        self._learned_cache: dict[
            tuple[str, str, float, str, float], tuple[bytes, float, float | None]
        ] = {}

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- settings -----------------------------------------------------------------------------

    def settings(
        self, tenant: str, namespace: str, overrides: dict[str, Any] | None = None
    ) -> policy.Settings:
        """Effective settings of (tenant, namespace); raises :class:`UnknownTenant`."""
        check_names(tenant, namespace)
        request = {k: v for k, v in policy.validate(overrides or {}).items() if v is not None}
        with self.store.read() as txn:
            version = self.store.config_index(txn)
            cached = self._settings.get((tenant, namespace))
            if cached is None or cached[0] != version:
                if self.store.tenant(txn, tenant) is None:
                    raise UnknownTenant(f"no tenant {tenant!r}", field="tenant")
                layers = [
                    self.store.config(txn),
                    self.store.config(txn, tenant),
                    self.store.config(txn, tenant, namespace),
                ]
                if len(self._settings) > SETTINGS_CACHE_SIZE:
                    self._settings.clear()
                cached = self._settings[(tenant, namespace)] = (version, policy.resolve(*layers))
        return cached[1].merged(request)

    def _embedder(self, settings: policy.Settings) -> Embedder | None:
        if settings.embedder == SUPPLIED:
            return None
        embedder = self.embedders.get(settings.embedder)
        if embedder is None:
            raise UnknownEmbedder(
                f"embedder {settings.embedder!r} is not configured on this node "
                f"(known: {sorted(self.embedders)})",
                field="embedder",
            )
        return embedder

    def _identity(self, settings: policy.Settings, dim: int) -> str:
        embedder = self._embedder(settings)
        return embedder.identity if embedder else f"{SUPPLIED}:{dim}"

    # -- reads --------------------------------------------------------------------------------

    def lookup(
        self,
        key: CacheKey,
        *,
        vector: object | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        exact_only: bool = False,
    ) -> LookupResult:
        """Exact, then semantic lookup of ``key`` in its scope.

        ``vector`` is the caller's own embedding of ``key.text`` (checked against the
        namespace's dimension); without it the namespace's embedder embeds the text.
        """
        overrides: dict[str, Any] = {"threshold": threshold, "top_k": top_k}
        settings = self.settings(key.tenant, key.namespace, overrides)
        now = self.now_ms()
        if not settings.enabled:
            return LookupResult("miss", None, settings.threshold)
        with self.store.read() as txn:
            entry_id = self.store.exact_id(txn, key.tenant, key.exact_key)
            entry = self.store.entry(txn, entry_id) if entry_id is not None else None
            nsmeta = self.store.nsmeta(txn, key.tenant, key.namespace)
        # A caller's vector is checked even when the exact match makes it unnecessary.
        supplied = self._query_vector(settings, nsmeta, key, vector) if vector is not None else None
        if entry is not None and entry.tenant == key.tenant and not entry.expired(now):
            self.access.record(entry.id, now)
            hit = Hit(entry, 1.0, "exact")
            return LookupResult("hit", hit, settings.threshold, [hit])
        if exact_only or nsmeta is None:
            return LookupResult("miss", None, settings.threshold)
        query, tokens, truncated = supplied or self._query_vector(settings, nsmeta, key, None)
        candidates = self._search(key.scope_key, query, settings.top_k, now)
        threshold = self.threshold(key.tenant, key.namespace, settings, request_threshold=threshold)
        scored: list[Hit] = []  # the candidates the verifier saw, with its probability
        rejected: list[tuple[int, str]] = []
        names = guards.parse(settings.guards)
        passed: list[Hit] = []
        for candidate in candidates:  # best first
            if candidate.similarity < threshold:
                break
            veto = guards.verify(key.text, candidate.entry.text, names)
            if veto is None:
                passed.append(candidate)
                if not (settings.rerank or settings.verifier):
                    break  # the best candidate passing the guards is the hit
                continue
            rejected.append((candidate.entry.id, veto))
            metrics.GUARD_REJECTIONS.labels(key.tenant, veto).inc()
        for candidate in self._second_stage(key, settings, passed, rejected, scored):
            self.access.record(candidate.entry.id, now)
            return LookupResult(
                "semantic_hit",
                candidate,
                threshold,
                candidates,
                tokens,
                truncated,
                tuple(rejected),
            )
        probe = None
        if settings.adaptive_delta > 0 and candidates:
            best = candidates[0]
            if settings.verifier:
                # Learning on the verifier's probability: a candidate it never saw (below the
                # threshold or vetoed by a guard) would not be served at any cut.
                seen = [h for h in scored if h.entry.id == best.entry.id]
                probe = seen[0] if seen else dataclasses.replace(best, similarity=0.0)
            else:
                vetoed = any(entry_id == best.entry.id for entry_id, _ in rejected) or (
                    best.similarity < threshold
                    and guards.verify(key.text, best.entry.text, names) is not None
                )
                probe = dataclasses.replace(best, similarity=0.0) if vetoed else best
            metrics.PROBES.labels(key.tenant).inc()
        return LookupResult(
            "miss", None, threshold, candidates, tokens, truncated, tuple(rejected), probe
        )

    def _second_stage(
        self,
        key: CacheKey,
        settings: policy.Settings,
        passed: list[Hit],
        rejected: list[tuple[int, str]],
        scored: list[Hit],
    ) -> list[Hit]:
        """The candidates that passed the threshold and the guards, re-ranked and verified when
        the namespace says so: the accepted ones, best first (the first is the hit). Vetoed ones
        are appended to ``rejected`` as ``rerank`` or ``verifier``; every candidate the verifier
        decided, accepted or not, to ``scored`` with its probability. An adaptive namespace with
        a verifier learns the probability cut (``node/adaptive.py``), else the verifier's own
        cut applies."""
        check = learned.parse(settings.verifier) if settings.verifier else None
        if not passed or (check is None and not settings.rerank):
            return passed
        ranked: list[Hit] = passed
        if settings.rerank or (check is not None and check.needs_rerank):
            reranker = self.embedders.get(RERANK)
            if reranker is None:
                raise UnknownEmbedder(
                    "this namespace re-ranks, but this node has no re-ranking model "
                    "(pip install 'llmcache[rerank]')",
                    field="rerank",
                )
            texts = [key.text, *(h.entry.text for h in passed)]
            vectors = reranker.embed(texts).vectors
            scores = vectors[1:] @ vectors[0]
            ranked = [
                dataclasses.replace(h, rerank=float(min(1.0, max(-1.0, s))))
                for h, s in zip(passed, scores.tolist(), strict=True)
            ]
            # Stable sort: equal re-rank scores keep the k-NN order, so every node agrees.
            ranked.sort(key=lambda h: -(h.rerank or 0.0))
        cut, cross = 0.0, None
        if check is not None:
            cut = check.cut
            if check.needs_cross_encoder:
                cross = self.cross_encoders.get(check.cross_encoder)
            if settings.adaptive_delta > 0:
                cut = self.learned(key.tenant, key.namespace, settings, check.cut)
        accepted: list[Hit] = []
        for h in ranked:
            if check is not None:
                values = learned.features(
                    key.text,
                    h.entry.text,
                    h.similarity,
                    h.rerank,
                    None if cross is None else cross.score(key.text, h.entry.text),
                )
                h = dataclasses.replace(h, score=check.probability(values))
                scored.append(h)
                ok, name = h.label_at >= cut, "verifier"
            else:
                ok, name = (h.rerank or 0.0) >= settings.rerank_threshold, "rerank"
            if ok:
                accepted.append(h)
            else:
                rejected.append((h.entry.id, name))
                metrics.GUARD_REJECTIONS.labels(key.tenant, name).inc()
        return accepted

    def threshold(
        self,
        tenant: str,
        namespace: str,
        settings: policy.Settings,
        *,
        request_threshold: float | None = None,
    ) -> float:
        """The similarity a semantic hit needs: the caller's own threshold when given, else the
        learned one of an adaptive namespace without a verifier once its labels back one (with
        a verifier the probability cut is learned instead), else the setting."""
        if request_threshold is not None or settings.adaptive_delta <= 0 or settings.verifier:
            return settings.threshold
        return self.learned(tenant, namespace, settings, settings.threshold)

    def learned(
        self, tenant: str, namespace: str, settings: policy.Settings, fallback: float
    ) -> float:
        """The value an adaptive namespace's labels back (``adaptive.learned_threshold``), or
        ``fallback`` while they back none."""
        with self.store.read() as txn:
            raw = bytes(txn.get(join(tenant, namespace), db=self.store.dbs["quality"]) or b"")
        key = (tenant, namespace, settings.adaptive_delta, settings.adaptive_bound, fallback)
        cached = self._learned_cache.get(key)
        if cached is None or cached[0] != raw:
            labels = adaptive.Labels.from_record(unpack(raw)) if raw else adaptive.Labels()
            value = adaptive.learned_threshold(
                labels, settings.adaptive_delta, fallback, bound=settings.adaptive_bound
            )
            if len(self._learned_cache) > SETTINGS_CACHE_SIZE:
                self._learned_cache.clear()
            cached = self._learned_cache[key] = (raw, value, labels.precision_at(value))
        if cached[2] is not None:
            metrics.ESTIMATED_PRECISION.labels(tenant, namespace).set(cached[2])
        return cached[1]

    def labels(self, tenant: str, namespace: str) -> adaptive.Labels:
        """The replicated feedback histogram of (tenant, namespace) (empty without labels)."""
        with self.store.read() as txn:
            raw = txn.get(join(tenant, namespace), db=self.store.dbs["quality"])
        return adaptive.Labels.from_record(unpack(raw)) if raw else adaptive.Labels()

    def _query_vector(
        self,
        settings: policy.Settings,
        nsmeta: dict[str, Any] | None,
        key: CacheKey,
        vector: object | None,
    ) -> tuple[np.ndarray, int, bool]:
        embedder = self._embedder(settings)
        dim = nsmeta["dim"] if nsmeta else (embedder.dim if embedder else None)
        if vector is not None:
            return validate_vector(vector, dim), 0, False
        if embedder is None:
            raise InvalidRequest(
                f"namespace {key.namespace!r} takes caller-supplied vectors: send a vector",
                field="vector",
            )
        if nsmeta is not None and nsmeta["embedder"] != embedder.identity:
            raise DimensionMismatch(
                f"namespace {key.namespace!r} was built with embedder {nsmeta['embedder']!r}, "
                f"this node embeds with {embedder.identity!r}",
                field="embedder",
            )
        return self.embed(embedder, key.text)

    @staticmethod
    def embed(embedder: Embedder, text: str) -> tuple[np.ndarray, int, bool]:
        result = embedder.embed([text])
        return result.vectors[0], result.token_counts[0], result.truncated[0]

    def _search(self, scope: bytes, query: np.ndarray, top_k: int, now: int) -> list[Hit]:
        self.feed.catch_up()
        # A few extra neighbours so that expired entries (not yet purged) do not hide live ones.
        found = self.feed.indexes.search(scope, query, top_k + 4)
        hits: list[Hit] = []
        with self.store.read() as txn:
            for entry_id, similarity in found:
                entry = self.store.entry(txn, entry_id)
                if entry is None or entry.expired(now) or entry.scope_key != scope:
                    continue
                hits.append(Hit(entry, similarity, "semantic"))
                if len(hits) == top_k:
                    break
        return hits

    def get_kv(self, tenant: str, namespace: str, key: str) -> Entry:
        """The live exact-only entry stored under ``key``; raises :class:`NotFound`."""
        self.settings(tenant, namespace)
        kv_key(tenant, namespace, key)
        now = self.now_ms()
        with self.store.read() as txn:
            entry_id = self.store.key_id(txn, tenant, namespace, key)
            entry = self.store.entry(txn, entry_id) if entry_id is not None else None
        if entry is None or entry.expired(now):
            raise NotFound(f"no entry under key {key!r}", field="key")
        self.access.record(entry.id, now)
        return entry

    def entry(self, tenant: str, entry_id: int) -> Entry:
        """One live entry of ``tenant`` by id; another tenant's id is :class:`NotFound`."""
        with self.store.read() as txn:
            entry = self.store.entry(txn, entry_id)
        if entry is None or entry.tenant != tenant or entry.expired(self.now_ms()):
            raise NotFound(f"no entry {entry_id}", field="id")
        return entry

    # -- write preparation --------------------------------------------------------------------

    def prepare_put(
        self,
        key: CacheKey,
        response: bytes,
        *,
        content_type: str = "application/json",
        vector: object | None = None,
        ttl_s: int | None = None,
        tags: Iterable[str] = (),
        usage: Mapping[str, int] | None = None,
        meta: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> c.Put:
        """Validate and embed once (here, on the node that took the request) into a ``Put``."""
        settings = self.settings(key.tenant, key.namespace, {"ttl_s": ttl_s})
        with self.store.read() as txn:
            nsmeta = self.store.nsmeta(txn, key.tenant, key.namespace)
        query, _, _ = self._query_vector(settings, nsmeta, key, vector)
        identity = nsmeta["embedder"] if nsmeta else self._identity(settings, len(query))
        return self._put(
            key.tenant,
            key.namespace,
            settings,
            kind="prompt",
            scope=key.scope,
            exact_key=key.exact_key,
            text=key.text,
            prompt=key.prompt,
            vector=query.astype("<f4").tobytes(),
            embedder=identity,
            dim=len(query),
            response=response,
            content_type=content_type,
            tags=tags,
            usage=usage,
            meta=meta,
            request_id=request_id,
        )

    def prepare_kv_put(
        self,
        tenant: str,
        namespace: str,
        key: str,
        value: bytes,
        *,
        content_type: str = "application/octet-stream",
        ttl_s: int | None = None,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> c.Put:
        """A ``Put`` of an exact-only value under a caller's ``key`` (found by key only)."""
        exact = kv_key(tenant, namespace, key)
        settings = self.settings(tenant, namespace, {"ttl_s": ttl_s})
        return self._put(
            tenant,
            namespace,
            settings,
            kind="kv",
            scope="kv",
            exact_key=exact,
            key=key,
            response=value,
            content_type=content_type,
            tags=tags,
            meta=meta,
            request_id=request_id,
        )

    def _put(
        self,
        tenant: str,
        namespace: str,
        settings: policy.Settings,
        *,
        response: bytes,
        tags: Iterable[str],
        usage: Mapping[str, int] | None = None,
        meta: Mapping[str, str] | None = None,
        request_id: str,
        **fields: Any,
    ) -> c.Put:
        if not isinstance(response, bytes):
            raise InvalidRequest("response must be bytes", field="response")
        if len(response) > limits.MAX_RESPONSE_BYTES:
            raise OversizeInput(
                f"the response has {len(response)} bytes; the limit is {limits.MAX_RESPONSE_BYTES}",
                field="response",
            )
        now = self.now_ms()
        expiry = policy.Expiry(settings.ttl_s, settings.ttl_jitter)
        return c.Put(
            tenant=tenant,
            namespace=namespace,
            response=response,
            tags=check_tags(tags),
            usage=check_usage(usage or {}),
            meta=check_meta(meta or {}),
            created_at_ms=now,
            expires_at_ms=expiry.expires_at(now, self.rng()),
            request_id=check_request_id(request_id),
            ts_ms=now,
            **fields,
        )

    def prepare_invalidate(
        self,
        tenant: str,
        *,
        namespace: str = "",
        tags: Iterable[str] = (),
        key_prefix: str = "",
        ids: Iterable[int] = (),
        request_id: str = "",
    ) -> c.Invalidate:
        check_names(tenant, namespace or "default")
        command = c.Invalidate(
            tenant=tenant,
            namespace=namespace,
            tags=check_tags(tags),
            key_prefix=key_prefix,
            ids=check_ids(ids),
            request_id=check_request_id(request_id),
            ts_ms=self.now_ms(),
        )
        if command.is_empty():
            raise InvalidRequest(
                "give at least one filter: namespace, tags, key_prefix or ids", field="filter"
            )
        return command

    def prepare_delete(self, tenant: str, ids: Iterable[int], request_id: str = "") -> c.Delete:
        check_names(tenant, "default")
        return c.Delete(
            tenant=tenant,
            ids=check_ids(ids),
            request_id=check_request_id(request_id),
            ts_ms=self.now_ms(),
        )

    def prepare_config(
        self, values: dict[str, Any], tenant: str = "", namespace: str = "", request_id: str = ""
    ) -> c.ConfigSet:
        if tenant:
            check_names(tenant, namespace or "default")
        elif namespace:
            raise InvalidRequest("a namespace setting needs its tenant", field="tenant")
        if "embedder" in values and values["embedder"] not in (*self.embedders, SUPPLIED, None):
            raise UnknownEmbedder(f"unknown embedder {values['embedder']!r}", field="embedder")
        return c.ConfigSet(
            tenant=tenant,
            namespace=namespace,
            values=policy.validate(values),
            request_id=check_request_id(request_id),
            ts_ms=self.now_ms(),
        )

    def prepare_tenant(
        self, tenant: str, config: dict[str, Any] | None = None, request_id: str = ""
    ) -> c.TenantUpsert:
        check_names(tenant, "default")
        return c.TenantUpsert(
            tenant=tenant,
            config=dict(config or {}),
            request_id=check_request_id(request_id),
            ts_ms=self.now_ms(),
        )

    def prepare_feedback(
        self,
        tenant: str,
        entry_id: int,
        label: str,
        *,
        similarity: float | None = None,
        query: str = "",
        request_id: str = "",
    ) -> c.Feedback:
        """A label (``correct`` / ``wrong``) on a hit that was served from entry ``entry_id``
        (or on a probe). The entry's namespace, when it still exists, travels in the command so
        the label counts in that namespace's histogram even if the entry is gone at apply."""
        self.settings(tenant, "default")
        if label not in ("correct", "wrong"):
            raise InvalidRequest("label must be 'correct' or 'wrong'", field="label")
        check_ids([entry_id])
        if similarity is not None and not 0.0 <= similarity <= 1.0:
            raise InvalidRequest("similarity must be between 0 and 1", field="similarity")
        if len(query) > limits.MAX_PROMPT_CHARS:
            raise OversizeInput("query too long", field="query")
        with self.store.read() as txn:
            entry = self.store.entry(txn, entry_id)
        return c.Feedback(
            tenant=tenant,
            namespace=entry.namespace if entry is not None and entry.tenant == tenant else "",
            entry_id=entry_id,
            label=label,
            similarity=-1.0 if similarity is None else float(similarity),
            query=query,
            request_id=check_request_id(request_id),
            ts_ms=self.now_ms(),
        )

    def expired_ids(self, limit: int = limits.MAX_BATCH) -> list[int]:
        """Entries past their expiry now (for the leader's ``Expire`` proposals)."""
        with self.store.read() as txn:
            return self.store.expiring(txn, self.now_ms(), limit)


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    out = tuple(sorted(set(tags)))
    if len(out) > limits.MAX_TAGS:
        raise OversizeInput(f"at most {limits.MAX_TAGS} tags", field="tags")
    for tag in out:
        if not isinstance(tag, str) or not tag or "\0" in tag or len(tag) > limits.MAX_TAG_LEN:
            raise InvalidRequest(
                f"a tag is a non-empty string of at most {limits.MAX_TAG_LEN} characters",
                field="tags",
            )
    return out


def check_ids(ids: Iterable[int]) -> tuple[int, ...]:
    out = tuple(ids)
    if len(out) > limits.MAX_BATCH:
        raise OversizeInput(f"at most {limits.MAX_BATCH} ids", field="ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in out):
        raise InvalidRequest("ids are positive integers", field="ids")
    return out


def check_usage(usage: Mapping[str, int]) -> dict[str, int]:
    if (
        not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53
            for k, v in usage.items()
        )
        or len(usage) > 16
    ):
        raise InvalidRequest("usage maps up to 16 names to token counts", field="usage")
    return dict(usage)


def check_meta(meta: Mapping[str, str]) -> dict[str, str]:
    if (
        len(meta) > 32
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        or sum(len(k) + len(v) for k, v in meta.items()) > 8192
    ):
        raise InvalidRequest("meta maps up to 32 strings to strings (8 KiB)", field="meta")
    return dict(meta)


def check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest(
            f"request_id is a string of at most {MAX_REQUEST_ID_LEN} characters",
            field="request_id",
        )
    return request_id
