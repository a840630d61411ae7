"""The cache HTTP API: thin aiohttp handlers over the engine (reads, write preparation) and the
proposer (writes). ``routes`` is added to the application by :func:`llmcache.node.app.make_app`;
``openapi.py`` documents every route here.

Guarantees:

- Every rejected request (malformed body, wrong types, missing or unknown fields, oversize
  input, bad vector, unknown tenant, a token of another tenant, a reader token on a write) is a
  4xx ``{"error": {code, message, field}}`` raised before anything is proposed, so it changes
  nothing.
- Writes answer with the :class:`~llmcache.node.proposer.Proposal`'s ``X-LLMCache-Leader``,
  ``-Term`` and ``-Index``; with ``wait="applied"`` (the default) the entry is visible to this
  node's next lookup. A write the state machine refused at apply is answered with its error.
- Writes work on every node: a follower's proposer forwards the prepared command to the leader
  (:mod:`llmcache.node.forwarding`); with ``?redirect=1`` a follower answers 307 to the leader
  instead. Lookups take ``consistency`` (``stale``, ``leader``, ``linearizable``; or the
  ``X-LLMCache-Consistency`` header), ``max_staleness_ms`` and ``min_index``
  (:mod:`llmcache.node.consistency`) and answer the applied index they read at as
  ``X-LLMCache-Index``.
- Lookups and stores run the engine (which may embed text: CPU-bound) in the loop's default
  executor, so the event loop keeps serving.
- A lookup selects what it is about with exactly one of ``text`` (raw text; ``params`` are the
  model and sampling parameters that form its scope), ``request`` (an OpenAI chat body with
  ``messages`` or completion body with ``prompt``, sampling parameters included) or ``key`` (the
  caller's key of an exact-only entry). A store takes the same selectors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
from aiohttp import web

from llmcache.cluster import commands as c
from llmcache.node import auth, forwarding, keys, limits, metrics, openapi, policy, wire
from llmcache.node.consistency import CONSISTENCY, READ_WAIT_S
from llmcache.node.embed import validate_vector
from llmcache.node.engine import Engine, Hit, LookupResult, check_meta, check_tags, check_usage
from llmcache.node.errors import (
    CacheError,
    Conflict,
    InvalidRequest,
    NotCacheable,
    NotFound,
    NotReady,
    OversizeInput,
    UnknownTenant,
)
from llmcache.node.proposer import WAITS, NotLeader, Proposal, RaftStatus, Wait
from llmcache.node.services import PRINCIPAL, SERVICES, Principal, Services
from llmcache.node.store import Entry, Store, from_u64, join, u64

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
T = TypeVar("T")

DEFAULT_NAMESPACE = "default"
SELECTORS = ("text", "request", "key")
KEY_FIELDS = ("tenant", "namespace", *SELECTORS, "params", "window", "vector")
LOOKUP_FIELDS = (
    *KEY_FIELDS,
    "threshold",
    "top_k",
    "consistency",
    "exact_only",
    "max_staleness_ms",
    "min_index",
)
STORE_FIELDS = (
    *KEY_FIELDS,
    "response",
    "response_base64",
    "content_type",
    "ttl_s",
    "tags",
    "usage",
    "meta",
    "request_id",
    "wait",
)
LIST_SCAN_ROWS = 10_000
"""Entries examined per page of ``GET /v1/cache/entries`` (other tenants' rows included), so a
page costs bounded work; a short page with a ``next_cursor`` means "keep going"."""
READY_WAIT_S = 2.0
TENANT_CONFIG: dict[str, type[Any]] = {
    "max_entries": int,
    "max_bytes": int,
    "upstream_base_url": str,
    "eviction": str,
    "description": str,
}
EVICTION_POLICIES = ("lru", "lfu", "ttl")
ADMIN_LOCK = web.AppKey("admin_lock", asyncio.Lock)
"""Serialises this worker's read-modify-write of a tenant's token table."""
OPENAPI_PATHS = web.AppKey("openapi_paths", dict)
"""Extra OpenAPI path items (the proxy's) that ``/openapi.json`` documents beside the API's."""


class Unsupported(InvalidRequest):
    code = "not_supported"


# -- plumbing ----------------------------------------------------------------------------------


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _principal(request: web.Request) -> Principal:
    principal: Principal = request[PRINCIPAL]
    return principal


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run CPU-bound or blocking engine work off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


async def _tenant(request: web.Request, role: str, named: str | None) -> str:
    """The tenant acted on (``named`` needs an admin of all tenants unless it is the caller's
    own); it must exist. A follower that does not know the tenant yet may simply not have
    applied its creation: it catches up through a barrier once before answering 404."""
    if named is not None:
        wire.name(named, "tenant")
    tenant = auth.authorize(_principal(request), role, named)
    services = _services(request)
    try:
        services.engine.settings(tenant, DEFAULT_NAMESPACE)
    except UnknownTenant:
        if (await services.proposer.status()).role == "leader":
            raise
        await services.reads.linearizable()
        services.engine.settings(tenant, DEFAULT_NAMESPACE)
    return tenant


@contextmanager
def _prefixed(prefix: str) -> Iterator[None]:
    """Errors raised inside name their field relative to ``prefix`` (``request.messages``)."""
    try:
        yield
    except CacheError as exc:
        exc.field = f"{prefix}.{exc.field}" if exc.field else prefix
        raise


def _wait(data: dict[str, Any]) -> Wait:
    wait = wire.choice(wire.get(data, "wait", str, "applied"), "wait", WAITS)
    return wait  # type: ignore[return-value]  # checked against WAITS just above


def _proposal_headers(proposal: Proposal) -> dict[str, str]:
    return {
        "X-LLMCache-Leader": proposal.leader or "",
        "X-LLMCache-Term": str(proposal.term),
        "X-LLMCache-Index": str(proposal.index),
    }


_STATUS_OF_CODE: dict[str, int] = {}


def _status_of(code: str) -> int:
    if not _STATUS_OF_CODE:
        pending: list[type[CacheError]] = [CacheError]
        while pending:
            cls = pending.pop()
            _STATUS_OF_CODE.setdefault(cls.code, cls.http_status)
            pending.extend(cls.__subclasses__())
    return _STATUS_OF_CODE.get(code, 409)


def _status_headers(status: RaftStatus) -> dict[str, str]:
    return {
        "X-LLMCache-Leader": status.leader or "",
        "X-LLMCache-Term": str(status.term),
        "X-LLMCache-Index": str(status.applied_index),
    }


def _to_leader(request: web.Request, status: RaftStatus) -> str:
    """The leader's HTTP URL; :class:`NotLeader` (503) when no leader's URL is known."""
    services = _services(request)
    url = forwarding.peer_url(services.settings.peers_http, services.engine.store, status.leader)
    if url is None:
        raise NotLeader(f"{status.node_id} is not the leader and knows no leader URL", None)
    return url


async def _redirect_if_follower(request: web.Request) -> None:
    """With ``?redirect=1``, a node that does not lead answers 307 to the same path and query
    on the leader (the caller re-sends its request there); the leader carries on."""
    if request.query.get("redirect") not in ("1", "true"):
        return
    status = await _services(request).proposer.status()
    if status.role != "leader":
        location = _to_leader(request, status) + request.rel_url.path_qs
        raise web.HTTPTemporaryRedirect(location, headers=_status_headers(status))


async def _propose(request: web.Request, command: c.Command, wait: Wait) -> Proposal:
    """Propose ``command``; a refusal at apply is raised as its error (nothing changed).
    On a follower the command is forwarded to the leader, or 307 with ``?redirect=1``."""
    await _redirect_if_follower(request)
    proposal = await _services(request).proposer.propose(command, wait=wait)
    result = proposal.result
    if result is not None and not result.ok:
        error = CacheError(result.message or result.error or "rejected")
        error.code = result.error or "rejected"
        error.http_status = _status_of(error.code)
        raise error
    return proposal


def _applied(proposal: Proposal) -> dict[str, Any]:
    return dict(proposal.result.value) if proposal.result else {}


def _request_id(data: dict[str, Any]) -> str:
    return wire.get(data, "request_id", str, None) or uuid.uuid4().hex


# -- keys --------------------------------------------------------------------------------------


def _target(
    engine: Engine, tenant: str, namespace: str, data: dict[str, Any]
) -> tuple[keys.CacheKey | str, policy.Settings, dict[str, Any] | None, str]:
    """The prompt key (or the caller's kv key) a lookup or store is about, the namespace's
    settings, and the body whose sampling parameters decide cacheability (with its field)."""
    chosen = [s for s in SELECTORS if data.get(s) is not None]
    if len(chosen) != 1:
        raise InvalidRequest(
            "give exactly one of text, request or key", field=chosen[1] if chosen else "text"
        )
    allowed = {
        "text": ("params", "vector"),
        "request": ("window", "vector"),
        "key": (),
    }[chosen[0]]
    for extra in ("params", "window", "vector"):
        if extra not in allowed and data.get(extra) is not None:
            raise InvalidRequest(f"{extra} does not apply to a {chosen[0]} entry", field=extra)
    settings = engine.settings(tenant, namespace)
    if chosen[0] == "key":
        return wire.require(data, "key", str), settings, None, ""
    if chosen[0] == "text":
        params = wire.get(data, "params", dict, {})
        return keys.text_key(tenant, namespace, data["text"], params), settings, params, "params"
    body = wire.require(data, "request", dict)
    window = wire.get(data, "window", int, None)
    with _prefixed("request"):
        if "messages" in body:
            key = keys.chat_key(
                tenant,
                namespace,
                body,
                window=settings.context_window if window is None else window,
            )
        elif "prompt" in body:
            if window is not None:
                raise InvalidRequest("window applies to chat requests only", field="window")
            key = keys.completion_key(tenant, namespace, body)
        else:
            raise InvalidRequest("give messages (chat) or prompt (completion)", field="messages")
    return key, settings, body, "request"


def _namespace(data: dict[str, Any], header: str | None) -> str:
    return wire.name(wire.get(data, "namespace", str, header or DEFAULT_NAMESPACE), "namespace")


# -- views -------------------------------------------------------------------------------------


def entry_view(
    entry: Entry, now_ms: int, *, full: bool = False, vector: np.ndarray | None = None
) -> dict[str, Any]:
    """An entry as the API shows it: ``response`` when it is UTF-8 text, else
    ``response_base64``. ``full`` (``full=1`` listings, for export) adds what
    :func:`import_entries` needs to rebuild it: ``scope``, ``prompt``, ``embedder`` and, for a
    prompt entry, ``vector_base64`` (its ``vector``: little-endian float32, as stored)."""
    view: dict[str, Any] = {
        "id": entry.id,
        "namespace": entry.namespace,
        "kind": entry.kind,
        "key": entry.key,
        "text": entry.text,
        "content_type": entry.content_type,
        "created_at_ms": entry.created_at_ms,
        "expires_at_ms": entry.expires_at_ms,
        "age_s": round(max(0, now_ms - entry.created_at_ms) / 1000, 3),
        "tags": list(entry.tags),
        "usage": dict(entry.usage),
        "meta": dict(entry.meta),
    }
    try:
        view["response"] = entry.response.decode("utf-8")
    except UnicodeDecodeError:
        view["response_base64"] = base64.b64encode(entry.response).decode()
    if full:
        view.update(scope=entry.scope, prompt=entry.prompt, embedder=entry.embedder)
        if vector is not None:
            view["vector_base64"] = base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return view


# -- lookup ------------------------------------------------------------------------------------


def _lookup(
    engine: Engine,
    tenant: str,
    namespace: str,
    data: dict[str, Any],
    *,
    threshold: float | None,
    bypass: bool,
) -> LookupResult:
    target, _, _, _ = _target(engine, tenant, namespace, data)
    top_k = wire.get(data, "top_k", int, None)
    exact_only = wire.get(data, "exact_only", bool, False)
    # Overrides are checked even when the cache is bypassed: bad input is always a 4xx.
    resolved = engine.settings(tenant, namespace, {"threshold": threshold, "top_k": top_k})
    if bypass:
        return LookupResult("miss", None, resolved.threshold)
    if isinstance(target, str):
        try:
            entry = engine.get_kv(tenant, namespace, target)
        except NotFound:
            return LookupResult("miss", None, resolved.threshold)
        hit = Hit(entry, 1.0, "exact")
        return LookupResult("hit", hit, resolved.threshold, [hit])
    return engine.lookup(
        target,
        vector=data.get("vector"),
        threshold=threshold,
        top_k=top_k,
        exact_only=exact_only,
    )


async def _consistent_read(
    request: web.Request, data: dict[str, Any], consistency: str
) -> dict[str, str] | web.Response:
    """Wait until this node may answer at ``consistency`` (and ``min_index``,
    ``max_staleness_ms``); the headers describing the read (``X-LLMCache-Index`` is the applied
    index it reads at least), or the leader's own answer when a follower forwarded a ``leader``
    read. See :mod:`llmcache.node.consistency` for the guarantees."""
    services = _services(request)
    reads = services.reads
    headers: dict[str, str] = {}
    min_index = wire.get(data, "min_index", int, None)
    max_staleness = wire.get(data, "max_staleness_ms", float, None)
    if min_index is not None:
        if not 0 <= min_index < 2**63:
            raise InvalidRequest("min_index is from 0 to 2**63-1", field="min_index")
        await reads.min_index(min_index)
    if max_staleness is not None:
        if not 0 <= max_staleness <= 2**53:
            raise InvalidRequest("max_staleness_ms must be >= 0", field="max_staleness_ms")
        headers.update(_status_headers(await reads.bounded_staleness(max_staleness)))
    if consistency == "linearizable":
        await reads.linearizable()
    elif consistency == "leader":
        status = await services.proposer.status()
        headers.update(_status_headers(status))
        if status.role != "leader":
            return await _read_on_leader(request, status)
    headers["X-LLMCache-Index"] = str(services.engine.store.applied_index())
    return headers


async def _read_on_leader(request: web.Request, status: RaftStatus) -> web.Response:
    """A follower's ``consistency=leader`` lookup: 307 with ``?redirect=1``, else the same
    request forwarded once to the leader (a forwarded request is never forwarded again)."""
    url = _to_leader(request, status)
    if request.query.get("redirect") in ("1", "true"):
        location = url + request.rel_url.path_qs
        raise web.HTTPTemporaryRedirect(location, headers=_status_headers(status))
    proposer = _services(request).proposer
    if request.headers.get(forwarding.FORWARDED_HEADER) or not isinstance(
        proposer, forwarding.ForwardingProposer
    ):
        raise NotLeader(f"{status.node_id} is not the leader", status.leader)
    return await forwarding.forward_request(proposer.session(), request, url, READ_WAIT_S)


@routes.post("/v1/cache/lookup")
async def lookup(request: web.Request) -> web.Response:
    started = time.perf_counter()
    engine = _services(request).engine
    data = await wire.read_body(request)
    wire.known(data, LOOKUP_FIELDS)
    over = wire.overrides(request.headers)
    tenant = await _tenant(request, "reader", wire.get(data, "tenant", str, None))
    namespace = _namespace(data, over.namespace)
    consistency = wire.get(data, "consistency", str, over.consistency or "stale")
    if consistency not in CONSISTENCY:
        raise Unsupported(
            f"consistency {consistency!r} is not one of {', '.join(CONSISTENCY)}",
            field="consistency",
        )
    threshold = wire.get(data, "threshold", float, over.threshold)
    read = await _consistent_read(request, data, consistency)
    if isinstance(read, web.Response):
        return read
    lookup = functools.partial(
        _lookup, engine, tenant, namespace, threshold=threshold, bypass=over.no_cache
    )
    # Only embedding is slow enough to leave the event loop (a thread hop costs more than an
    # exact hit): exact and key lookups, and searches with the caller's vector, run inline; a
    # text lookup first tries its exact key inline and embeds in the executor on a miss.
    if ("text" not in data and "request" not in data) or "vector" in data:
        result = lookup(data)
    else:
        result = lookup({**data, "exact_only": True})
        if result.status != "hit" and not over.no_cache and not data.get("exact_only"):
            result = await _run(lookup, data)
    now = engine.now_ms()
    hit = result.hit
    if hit and over.max_age_s is not None and now - hit.entry.created_at_ms > over.max_age_s * 1000:
        result = dataclasses.replace(result, status="miss", hit=None)
        hit = None
    best = hit or (result.candidates[0] if result.candidates else None)
    status = result.status.upper()
    body = {
        "status": status,
        "similarity": best.similarity if best else None,
        "entry": entry_view(hit.entry, now) if hit else None,
        "candidates": [{"id": h.entry.id, "similarity": h.similarity} for h in result.candidates],
        "threshold": result.threshold,
        "tokens": result.tokens,
        "truncated": result.truncated,
        "rejected": [{"id": i, "guard": guard} for i, guard in result.rejected],
        "probe": {"id": p.entry.id, "similarity": p.label_at} if (p := result.probe) else None,
        "feedback_similarity": hit.label_at if hit else None,
    }
    headers = {**read, "X-LLMCache-Status": status}
    if hit:
        headers["X-LLMCache-Similarity"] = f"{hit.similarity:.4f}"
        headers["X-LLMCache-Entry"] = str(hit.entry.id)
        headers["Age"] = str(max(0, now - hit.entry.created_at_ms) // 1000)
        if hit.kind == "semantic":
            metrics.HIT_SIMILARITY.labels(tenant).observe(hit.similarity)
    outcome = "bypass" if over.no_cache else ("hit" if hit else "miss")
    metrics.LOOKUPS.labels(tenant, hit.kind if hit else "none", outcome).inc()
    metrics.STAGE_SECONDS.labels("total").observe(time.perf_counter() - started)
    return wire.respond(request, body, headers=headers)


# -- store -------------------------------------------------------------------------------------


def _response_bytes(data: dict[str, Any]) -> tuple[bytes, str]:
    """The response to store and its content type (see the store schema in openapi.py)."""
    content_type = wire.get(data, "content_type", str, None)
    if content_type is not None and not (
        0 < len(content_type) <= 255 and content_type.isascii() and content_type.isprintable()
    ):
        raise InvalidRequest(
            "content_type is 1-255 printable ASCII characters", field="content_type"
        )
    if "response_base64" in data and "response" in data:
        raise InvalidRequest("give response or response_base64, not both", field="response_base64")
    if "response_base64" in data:
        encoded = wire.require(data, "response_base64", str)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("response_base64 is not base64", field="response_base64") from None
        return raw, content_type or "application/octet-stream"
    if "response" not in data:
        raise InvalidRequest("response is required", field="response")
    value = data["response"]
    if isinstance(value, bytes):
        return value, content_type or "application/octet-stream"
    if isinstance(value, str):
        return value.encode(), content_type or "text/plain; charset=utf-8"
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode(), content_type or "application/json"


def _prepare_store(
    engine: Engine, tenant: str, namespace: str, data: dict[str, Any], over: wire.Overrides
) -> c.Put:
    target, settings, body, where = _target(engine, tenant, namespace, data)
    response, content_type = _response_bytes(data)
    ttl_s = wire.get(data, "ttl_s", int, over.ttl_s if over.ttl_s is not None else over.max_age_s)
    tags = wire.str_list(data, "tags")
    tags = over.tags if tags is None else tags
    meta = wire.get(data, "meta", dict, {})
    usage = wire.get(data, "usage", dict, None)
    request_id = wire.get(data, "request_id", str, "")
    if not settings.enabled:
        raise NotCacheable(f"the cache is disabled for namespace {namespace!r}", field="namespace")
    if isinstance(target, str):
        if usage is not None:
            raise InvalidRequest("usage does not apply to a key entry", field="usage")
        return engine.prepare_kv_put(
            tenant,
            namespace,
            target,
            response,
            content_type=content_type,
            ttl_s=ttl_s,
            tags=tags or (),
            meta=meta,
            request_id=request_id,
        )
    reason = policy.not_cacheable_reason(body or {}, settings)
    if reason is not None:
        param = next((p for p in ("temperature", "n") if reason.startswith(p)), None)
        raise NotCacheable(f"not cacheable: {reason}", field=f"{where}.{param}")
    return engine.prepare_put(
        target,
        response,
        content_type=content_type,
        vector=data.get("vector"),
        ttl_s=ttl_s,
        tags=tags or (),
        usage=usage,
        meta=meta,
        request_id=request_id,
    )


@routes.post("/v1/cache/store")
async def store(request: web.Request) -> web.Response:
    engine = _services(request).engine
    data = await wire.read_body(request)
    wire.known(data, STORE_FIELDS)
    over = wire.overrides(request.headers)
    tenant = await _tenant(request, "writer", wire.get(data, "tenant", str, None))
    namespace = _namespace(data, over.namespace)
    wait = _wait(data)
    data["request_id"] = _request_id(data)
    # As for lookups: only embedding leaves the event loop (thread hops cost more, and CPU
    # work in pool threads starves the loop's many short GIL-releasing calls).
    if "vector" in data or "key" in data:
        put = _prepare_store(engine, tenant, namespace, data, over)
    else:
        put = await _run(_prepare_store, engine, tenant, namespace, data, over)
    proposal = await _propose(request, put, wait)
    value = _applied(proposal)
    metrics.STORES.labels(tenant, "duplicate" if "duplicate_of" in value else "stored").inc()
    body = {
        "id": value.get("id"),
        "index": proposal.index,
        "request_id": put.request_id,
        "replaced": value.get("replaced"),
    }
    if "duplicate_of" in value:
        body["duplicate_of"] = value["duplicate_of"]
    return wire.respond(request, body, 201, _proposal_headers(proposal))


# -- invalidate, entries, feedback -------------------------------------------------------------


@routes.post("/v1/cache/invalidate")
async def invalidate(request: web.Request) -> web.Response:
    engine = _services(request).engine
    data = await wire.read_body(request)
    wire.known(data, ("tenant", "namespace", "tags", "key_prefix", "ids", "wait", "request_id"))
    tenant = await _tenant(request, "writer", wire.get(data, "tenant", str, None))
    namespace = wire.get(data, "namespace", str, "")
    if namespace:
        wire.name(namespace, "namespace")
    ids = wire.get(data, "ids", list, [])
    key_prefix = wire.get(data, "key_prefix", str, "")
    if len(key_prefix) > limits.MAX_KEY_LEN:
        raise InvalidRequest(
            f"key_prefix is at most {limits.MAX_KEY_LEN} characters", field="key_prefix"
        )
    wait = _wait(data)
    command = engine.prepare_invalidate(
        tenant,
        namespace=namespace,
        tags=wire.str_list(data, "tags") or (),
        key_prefix=key_prefix,
        ids=ids,
        request_id=_request_id(data),
    )
    proposal = await _propose(request, command, wait)
    body = {
        "deleted": _applied(proposal).get("deleted"),
        "index": proposal.index,
        "request_id": command.request_id,
    }
    return wire.respond(request, body, headers=_proposal_headers(proposal))


def _list_entries(
    engine: Engine,
    tenant: str,
    *,
    namespace: str | None,
    tag: str | None,
    kind: str | None,
    limit: int,
    cursor: int,
    full: bool = False,
) -> tuple[list[dict[str, Any]], int | None]:
    store = engine.store
    now = engine.now_ms()
    found: list[dict[str, Any]] = []
    last = cursor
    with store.read() as txn:
        rows = txn.cursor(db=store.dbs["entries"])
        if not rows.set_range(u64(cursor + 1)):
            return found, None
        for scanned, raw_id in enumerate(rows.iternext(keys=True, values=False)):
            if scanned == LIST_SCAN_ROWS:
                return found, last
            last = from_u64(bytes(raw_id))
            entry = store.entry(txn, last)
            if (
                entry is None
                or entry.tenant != tenant
                or entry.expired(now)
                or (namespace is not None and entry.namespace != namespace)
                or (tag is not None and tag not in entry.tags)
                or (kind is not None and entry.kind != kind)
            ):
                continue
            vector = store.vector(txn, last) if full and entry.kind == "prompt" else None
            found.append(entry_view(entry, now, full=full, vector=vector))
            if len(found) == limit:
                return found, last
    return found, None


@routes.get("/v1/cache/entries")
async def list_entries(request: web.Request) -> web.Response:
    query = request.query
    tenant = await _tenant(request, "reader", query.get("tenant"))
    namespace = query.get("namespace") or None
    if namespace is not None:
        wire.name(namespace, "namespace")
    kind = query.get("kind") or None
    if kind is not None:
        wire.choice(kind, "kind", ("prompt", "kv"))
    entries, next_cursor = await _run(
        _list_entries,
        _services(request).engine,
        tenant,
        namespace=namespace,
        tag=query.get("tag") or None,
        kind=kind,
        limit=wire.query_int(request, "limit", 100, 1, 1000),
        cursor=wire.query_int(request, "cursor", 0, 0, 2**63 - 1),
        full=wire.query_int(request, "full", 0, 0, 1) == 1,
    )
    return wire.respond(request, {"entries": entries, "next_cursor": next_cursor})


IMPORT_FIELDS = (
    "namespace", "kind", "key", "text", "prompt", "scope", "embedder", "vector_base64",
    "response", "response_base64", "content_type", "created_at_ms", "expires_at_ms", "tags",
    "usage", "meta",
)  # fmt: skip


def _imported_put(tenant: str, record: dict[str, Any], now_ms: int) -> c.Put | None:
    """The ``Put`` that recreates an exported entry (a ``full=1`` view) in ``tenant`` with its
    own timestamps, vector and response; ``None`` when it has expired since. The exact key is
    recomputed (never trusted), and the request id is derived from what identifies the entry,
    so importing the same entry twice within the log's dedup window applies once, and later
    replaces it with itself."""
    wire.known(record, IMPORT_FIELDS)
    namespace = wire.name(wire.require(record, "namespace", str), "namespace")
    kind = wire.choice(wire.require(record, "kind", str), "kind", ("prompt", "kv"))
    created = wire.require(record, "created_at_ms", int)
    expires = wire.get(record, "expires_at_ms", int, 0)
    if not (0 <= created < 2**63 and 0 <= expires < 2**63):
        raise InvalidRequest("timestamps are from 0 to 2**63-1", field="created_at_ms")
    if expires and expires <= now_ms:
        return None
    response, content_type = _response_bytes(record)
    if len(response) > limits.MAX_RESPONSE_BYTES:
        raise InvalidRequest("the response is too large", field="response")
    fields: dict[str, Any] = {"kind": kind}
    if kind == "kv":
        key = wire.require(record, "key", str)
        if not 0 < len(key) <= limits.MAX_KEY_LEN:
            raise InvalidRequest(f"key is 1-{limits.MAX_KEY_LEN} characters", field="key")
        fields.update(key=key, scope="kv", exact_key=keys.kv_key(tenant, namespace, key))
    else:
        scope = wire.require(record, "scope", str)
        prompt = wire.require(record, "prompt", str)
        if len(scope) > 128 or len(prompt) > limits.MAX_PROMPT_CHARS:
            raise InvalidRequest("scope or prompt is too long", field="prompt")
        try:
            raw = base64.b64decode(wire.require(record, "vector_base64", str), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("vector_base64 is not base64", field="vector_base64") from None
        if not raw or len(raw) % 4:
            raise InvalidRequest("vector_base64 is not float32", field="vector_base64")
        vector = np.frombuffer(raw, dtype="<f4")
        # Checked (finite, not empty, dimension) but kept bit for bit: a renormalised copy could
        # move similarities in their last digits, and an import must answer like the original.
        validate_vector(vector, None, field="vector_base64")
        if abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
            raise InvalidRequest("vector_base64 is not a unit vector", field="vector_base64")
        fields.update(
            scope=scope,
            prompt=prompt,
            text=wire.get(record, "text", str, ""),
            exact_key=keys.exact_key(tenant, namespace, scope, prompt),
            vector=raw,
            embedder=wire.require(record, "embedder", str),
            dim=len(vector),
        )
    identity = keys.canonical_json([tenant, namespace, fields["exact_key"].hex(), created])
    return c.Put(
        tenant=tenant,
        namespace=namespace,
        response=response,
        content_type=content_type,
        created_at_ms=created,
        expires_at_ms=expires,
        tags=check_tags(wire.str_list(record, "tags") or ()),
        usage=check_usage(wire.get(record, "usage", dict, {})),
        meta=check_meta(wire.get(record, "meta", dict, {})),
        request_id="import:" + hashlib.sha256(identity.encode()).hexdigest()[:40],
        ts_ms=now_ms,
        **fields,
    )


@routes.post("/v1/cache/import")
async def import_entries(request: web.Request) -> web.Response:
    """Recreate exported entries (``GET /v1/cache/entries?full=1`` views) in a tenant, keeping
    their timestamps, vectors and responses (ids are the target's own). Idempotent: see
    :func:`_imported_put`. Admin role of the tenant; at most ``limits.MAX_BATCH`` entries."""
    engine = _services(request).engine
    data = await wire.read_body(request)
    wire.known(data, ("tenant", "entries", "wait"))
    tenant = await _tenant(request, "admin", wire.get(data, "tenant", str, None))
    records = wire.require(data, "entries", list)
    if len(records) > limits.MAX_BATCH:
        raise OversizeInput(f"at most {limits.MAX_BATCH} entries per call", field="entries")
    wait = _wait(data)
    now = engine.now_ms()
    puts: list[c.Put] = []
    for i, record in enumerate(records):
        with _prefixed(f"entries[{i}]"):
            if not isinstance(record, dict):
                raise InvalidRequest("an entry is an object", field=None)
            put = _imported_put(tenant, record, now)
        if put is not None:
            puts.append(put)
    await _redirect_if_follower(request)
    proposals = await asyncio.gather(*(_propose(request, put, wait) for put in puts))
    duplicates = sum("duplicate_of" in _applied(p) for p in proposals)
    body = {
        "imported": len(puts) - duplicates,
        "duplicates": duplicates,
        "expired": len(records) - len(puts),
        "index": max((p.index for p in proposals), default=0),
    }
    headers = _proposal_headers(proposals[-1]) if proposals else None
    return wire.respond(request, body, headers=headers)


def _entry_id(request: web.Request) -> int:
    return wire.int_in(request.match_info["id"], "id", 1, 2**63 - 1)


@routes.get("/v1/cache/entries/{id}")
async def get_entry(request: web.Request) -> web.Response:
    engine = _services(request).engine
    tenant = await _tenant(request, "reader", request.query.get("tenant"))
    entry = engine.entry(tenant, _entry_id(request))
    return wire.respond(request, entry_view(entry, engine.now_ms()))


@routes.delete("/v1/cache/entries/{id}")
async def delete_entry(request: web.Request) -> web.Response:
    engine = _services(request).engine
    tenant = await _tenant(request, "writer", request.query.get("tenant"))
    entry_id = _entry_id(request)
    wait = _wait({"wait": request.query.get("wait") or None})
    engine.entry(tenant, entry_id)  # 404 for a missing entry or another tenant's
    command = engine.prepare_delete(tenant, [entry_id], uuid.uuid4().hex)
    proposal = await _propose(request, command, wait)
    body = {"deleted": _applied(proposal).get("deleted"), "index": proposal.index}
    return wire.respond(request, body, headers=_proposal_headers(proposal))


@routes.post("/v1/cache/feedback")
async def feedback(request: web.Request) -> web.Response:
    engine = _services(request).engine
    data = await wire.read_body(request)
    wire.known(data, ("tenant", "entry_id", "label", "similarity", "query", "request_id", "wait"))
    tenant = await _tenant(request, "writer", wire.get(data, "tenant", str, None))
    label = wire.choice(wire.require(data, "label", str), "label", ("correct", "wrong"))
    wait = _wait(data)
    entry_id = wire.require(data, "entry_id", int)
    if not 0 < entry_id < 2**63:
        raise InvalidRequest("entry_id is a positive integer", field="entry_id")
    command = engine.prepare_feedback(
        tenant,
        entry_id,
        label,
        similarity=wire.get(data, "similarity", float, None),
        query=wire.get(data, "query", str, ""),
        request_id=_request_id(data),
    )
    proposal = await _propose(request, command, wait)
    metrics.FEEDBACK.labels(tenant, label).inc()
    return wire.respond(request, {"index": proposal.index}, 202, _proposal_headers(proposal))


# -- tenants (admin) ---------------------------------------------------------------------------


def _tenant_view(store: Store, txn: Any, tenant: str, config: dict[str, Any]) -> dict[str, Any]:
    """A tenant as the admin API shows it: token ids and roles, never their hashes."""
    prefix = join(tenant, b"")
    namespaces = [key[len(prefix) :].decode() for key in store.prefix(txn, "config", prefix)]
    tokens = [{"id": t["id"], "role": t["role"]} for t in (config.get("tokens") or {}).values()]
    return {
        "tenant": tenant,
        "config": {k: v for k, v in config.items() if k != "tokens"},
        "settings": store.config(txn, tenant),
        "namespaces": {ns: store.config(txn, tenant, ns) for ns in namespaces},
        "stats": store.stats(txn, tenant),
        "tokens": sorted(tokens, key=lambda t: str(t["id"])),
    }


def _tenant_config(value: dict[str, Any]) -> dict[str, Any]:
    wire.known(value, TENANT_CONFIG, "config.")
    out: dict[str, Any] = {}
    for key, kind in TENANT_CONFIG.items():
        field = f"config.{key}"
        if value.get(key) is None:
            continue
        item: Any = wire.check(value[key], field, kind)
        if kind is int and not 0 <= item < 2**63:
            raise InvalidRequest(f"{field} must be from 0 to 2**63-1", field=field)
        if key == "upstream_base_url" and (
            not item.startswith(("http://", "https://")) or len(item) > 2048
        ):
            raise InvalidRequest(f"{field} must be an http(s) URL", field=field)
        if key == "eviction":
            wire.choice(item, field, EVICTION_POLICIES)
        if key == "description" and len(item) > 1024:
            raise InvalidRequest(f"{field} is at most 1024 characters", field=field)
        out[key] = item
    return out


def _admin_tenant(request: web.Request) -> str:
    """The path's tenant, for a tenant admin of it or an admin of all tenants; it must exist."""
    tenant = wire.name(request.match_info["tenant"], "tenant")
    auth.authorize(_principal(request), "admin", tenant)
    _services(request).engine.settings(tenant, DEFAULT_NAMESPACE)
    return tenant


@routes.get("/v1/tenants")
async def list_tenants(request: web.Request) -> web.Response:
    auth.require_cluster_admin(_principal(request))
    store = _services(request).engine.store
    with store.read() as txn:
        views = [_tenant_view(store, txn, name, config) for name, config in store.tenants(txn)]
    return wire.respond(request, {"tenants": views})


@routes.post("/v1/tenants")
async def upsert_tenant(request: web.Request) -> web.Response:
    auth.require_cluster_admin(_principal(request))
    engine = _services(request).engine
    data = await wire.read_body(request)
    wire.known(data, ("tenant", "config", "request_id"))
    tenant = wire.name(wire.require(data, "tenant", str), "tenant")
    config = _tenant_config(wire.get(data, "config", dict, {}))
    async with request.app[ADMIN_LOCK]:
        with engine.store.read() as txn:
            current = engine.store.tenant(txn, tenant)
        if current and current.get("tokens"):
            config["tokens"] = current["tokens"]  # tokens change only through their routes
        command = engine.prepare_tenant(tenant, config, _request_id(data))
        proposal = await _propose(request, command, "applied")
    body = {"tenant": tenant, "created": current is None, "index": proposal.index}
    return wire.respond(request, body, 201 if current is None else 200, _proposal_headers(proposal))


@routes.get("/v1/tenants/{tenant}")
async def get_tenant(request: web.Request) -> web.Response:
    tenant = _admin_tenant(request)
    store = _services(request).engine.store
    with store.read() as txn:
        config = store.tenant(txn, tenant)
        if config is None:
            raise UnknownTenant(f"no tenant {tenant!r}", field="tenant")
        view = _tenant_view(store, txn, tenant, config)
    return wire.respond(request, view)


@routes.delete("/v1/tenants/{tenant}")
async def delete_tenant(request: web.Request) -> web.Response:
    auth.require_cluster_admin(_principal(request))
    tenant = _admin_tenant(request)
    engine = _services(request).engine
    command = c.TenantDelete(tenant=tenant, request_id=uuid.uuid4().hex, ts_ms=engine.now_ms())
    proposal = await _propose(request, command, "applied")
    body = {"deleted": _applied(proposal).get("deleted"), "index": proposal.index}
    return wire.respond(request, body, headers=_proposal_headers(proposal))


async def _change_tokens(
    request: web.Request, tenant: str, change: Callable[[dict[str, Any]], None]
) -> Proposal:
    """Apply ``change`` to the tenant's token table through the log; raises :class:`Conflict`
    when a concurrent change elsewhere overwrote it (then nothing the caller sees is true)."""
    engine = _services(request).engine
    async with request.app[ADMIN_LOCK]:
        with engine.store.read() as txn:
            config = engine.store.tenant(txn, tenant) or {}
        tokens = dict(config.get("tokens") or {})
        change(tokens)
        command = engine.prepare_tenant(tenant, {**config, "tokens": tokens}, uuid.uuid4().hex)
        proposal = await _propose(request, command, "applied")
        with engine.store.read() as txn:
            now = (engine.store.tenant(txn, tenant) or {}).get("tokens") or {}
        if now != tokens:
            raise Conflict("the tenant's tokens changed concurrently; retry", field="tenant")
    return proposal


@routes.post("/v1/tenants/{tenant}/tokens")
async def create_token(request: web.Request) -> web.Response:
    tenant = _admin_tenant(request)
    data = await wire.read_body(request)
    wire.known(data, ("role",))
    role = wire.choice(wire.require(data, "role", str), "role", auth.ROLES)
    token, token_id = auth.new_token()
    entry = {"role": role, "id": token_id}

    def add(tokens: dict[str, Any]) -> None:
        tokens[auth.hash_token(token)] = entry

    proposal = await _change_tokens(request, tenant, add)
    body = {"token": token, "id": token_id, "role": role, "tenant": tenant}
    return wire.respond(request, body, 201, _proposal_headers(proposal))


@routes.delete("/v1/tenants/{tenant}/tokens/{id}")
async def revoke_token(request: web.Request) -> web.Response:
    tenant = _admin_tenant(request)
    token_id = request.match_info["id"]

    def revoke(tokens: dict[str, Any]) -> None:
        digests = [d for d, t in tokens.items() if t.get("id") == token_id]
        if not digests:
            raise NotFound(f"no token {token_id!r} in tenant {tenant!r}", field="id")
        for digest in digests:
            del tokens[digest]

    proposal = await _change_tokens(request, tenant, revoke)
    body = {"revoked": token_id, "index": proposal.index}
    return wire.respond(request, body, headers=_proposal_headers(proposal))


@routes.put("/v1/tenants/{tenant}/settings")
async def put_settings(request: web.Request) -> web.Response:
    tenant = _admin_tenant(request)
    engine = _services(request).engine
    data = await wire.read_body(request)
    wire.known(data, ("namespace", "values", "request_id"))
    namespace = wire.get(data, "namespace", str, "")
    if namespace:
        wire.name(namespace, "namespace")
    values = wire.require(data, "values", dict)
    with _prefixed("values"):
        command = engine.prepare_config(values, tenant, namespace, _request_id(data))
    proposal = await _propose(request, command, "applied")
    body = {"config": _applied(proposal).get("config", {}), "index": proposal.index}
    return wire.respond(request, body, headers=_proposal_headers(proposal))


# -- cluster and operations --------------------------------------------------------------------


@routes.get("/v1/cluster/status")
async def cluster_status(request: web.Request) -> web.Response:
    status = await _services(request).proposer.status()
    return wire.respond(request, dataclasses.asdict(status))


@routes.get("/livez")
async def livez(request: web.Request) -> web.Response:
    return wire.respond(request, {"status": "ok"})


READY_MAX_LAG = 100


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 only when all of these hold, else 503 ``not_ready`` saying which did not:

    - raft-core answers and has loaded its state (snapshot, journal) and the group's default
      tenant exists;
    - a leader is known: this node leads with a quorum, or it is connected to the leader it
      believes in;
    - this node has applied up to the leader's last known commit index minus at most
      ``READY_MAX_LAG`` (100) entries; a wiped or new node is therefore not ready until its
      snapshot is installed and its log tail is applied;
    - this worker's indexes have caught up with what raft-core had applied when asked.
    """
    services = _services(request)
    try:
        status = await services.proposer.status()
    except Exception as exc:
        log.warning("readyz: the proposer's status failed: %r", exc)
        raise NotReady("raft-core does not answer") from None
    if not status.ready:
        raise NotReady(f"raft is not ready (role {status.role}, leader {status.leader})")
    leader_known = (status.role == "leader" and status.has_quorum) or (
        status.leader is not None
        and bool(status.peers.get(status.leader, {}).get("connected", False))
    )
    if not leader_known:
        raise NotReady(f"no reachable leader (role {status.role}, leader {status.leader})")
    lag = status.commit_index - status.applied_index
    if lag > READY_MAX_LAG:
        raise NotReady(f"this node lags the leader's commit by {lag} entries")
    try:
        index = await asyncio.wait_for(_run(services.engine.feed.catch_up), READY_WAIT_S)
    except TimeoutError:
        raise NotReady("this worker's indexes are catching up") from None
    if index < status.applied_index:
        raise NotReady(f"this worker has applied {index} of {status.applied_index}")
    body = {
        "status": "ready",
        "leader": status.leader,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "worker_index": index,
    }
    return wire.respond(request, body)


@routes.get("/metrics")
async def prometheus(request: web.Request) -> web.Response:
    data, content_type = metrics.render()
    return web.Response(body=data, headers={"Content-Type": content_type})


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(request.app.get(OPENAPI_PATHS)))
