"""The OpenAI-compatible proxy: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``.

A request goes one of three ways, and says which in ``X-LLMCache-Status``:

- **HIT / SEMANTIC_HIT**: the cached upstream answer in the caller's format: the stored JSON
  body as it was, or for ``stream: true`` the stored chunks replayed as server-sent events
  ending with ``data: [DONE]`` (a usage-only chunk is left out unless the caller asked for
  ``stream_options.include_usage``). Also ``X-LLMCache-Similarity``, ``X-LLMCache-Entry`` and
  ``Age``. Hits count the tokens and dollars saved (the original call's usage and the
  ``prices`` of the request's model).
- **MISS**: forwarded upstream and streamed to the caller as it arrives. Concurrent identical
  misses make one upstream call (single flight on the exact key, the upstream URL and the
  caller's upstream credentials): the first caller gets the live answer, the others (headers
  ``X-LLMCache-Status: MISS`` and ``X-LLMCache-Singleflight: joined``) get the same answer
  once it is complete: the same status and body, or the same 502/504 if the call failed or
  the stream was cut (a 502 too if the answer exceeded :data:`SHARE_LIMIT`). A cut upstream
  stream cuts the first caller's connection too. A request arriving after the call ended but
  before its answer is applied misses again.
  The answer is stored in a background task, never delaying anyone, and only after a clean
  finish: HTTP 200 and, as JSON, a non-empty ``choices`` (or embeddings' ``data``) with every
  ``finish_reason`` set and none ``content_filter``; as a stream, the same plus
  ``data: [DONE]``. Errors, timeouts, cut streams and answers over
  ``limits.MAX_RESPONSE_BYTES`` are never stored, nor are misses of ``reader`` tokens.
  Storing failures are logged and counted (``llmcache_stores_total{result="failed"}``).
- **BYPASS**: forwarded untouched, nothing looked up or stored, ``X-LLMCache-Reason`` says
  why: the kill switch (``ServerSettings.cache_enabled``; the control headers below are then
  ignored too), ``Cache-Control: no-store``, the namespace's ``enabled`` setting, a request
  policy refuses (``policy.not_cacheable_reason``: hot temperature, ``n > 1``) or one no
  cache key can be made of (the upstream judges it). When the cache itself fails (store,
  index, embedder; an unknown tenant) the request is passed through the same way with
  ``X-LLMCache-Degraded: <error code>``.

Request controls: ``X-LLMCache-Namespace`` (default ``default``), ``-Threshold``, ``-TTL``,
``-Tags`` (comma-separated), ``Cache-Control: no-store | no-cache`` (no lookup, but the fresh
answer is stored) ``| max-age=N`` (only entries younger than N seconds may answer). An
invalid value is a 400 in LLM-Cache's error shape, before anything goes upstream.

Upstream: the tenant's configured ``upstream_base_url``, else ``ServerSettings.upstream_base_url``.
The caller's ``Authorization`` is forwarded as is (unless it is an LLM-Cache ``lc_`` token),
else ``Bearer ServerSettings.upstream_api_key`` when set; it is never stored or logged. Only
``Authorization``, ``OpenAI-Organization`` and ``OpenAI-Project`` are forwarded, and only
``Content-Type`` and ``Retry-After`` come back. The body goes upstream byte for byte. The
timeout (``upstream_timeout_s``) bounds connecting and each wait for data, so a stream that
keeps flowing is never cut. Connection failures answer 502, timeouts 504, with OpenAI's error
shape; upstream error statuses are relayed as they are.

Judge: in namespaces with adaptive thresholds and a ``judge_model``, a share ``judge_rate`` of
semantic hits and of probes (misses with a candidate) is labelled in the background by that
model of the same upstream (``node/judge.py``); a judged hit's request goes upstream once more
for the fresh answer to compare. The verdict is proposed as feedback; failures are counted
(``llmcache_judge_total{verdict="failed"}``) and never reach the caller.

Embeddings are exact-only: a kv entry under ``embeddings:<sha256 of the canonical body without
"user">``, kept until invalidated (unless ``X-LLMCache-TTL`` says otherwise).

Wiring: ``app.add_routes(routes)`` and :func:`setup` (the shared upstream session; pending
stores are awaited at shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import lmdb
from aiohttp import web

from llmcache.cluster.commands import Command
from llmcache.node import judge, metrics, policy
from llmcache.node.auth import ROLES, TOKEN_PREFIX
from llmcache.node.engine import Hit, check_tags
from llmcache.node.errors import CacheError, InvalidRequest, NotFound
from llmcache.node.keys import CacheKey, canonical_json, chat_key, check_names, completion_key
from llmcache.node.limits import MAX_RESPONSE_BYTES as MAX_STORED
from llmcache.node.services import PRINCIPAL, SERVICES, Principal, Services
from llmcache.node.singleflight import SingleFlight

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
T = TypeVar("T")

SSE = "text/event-stream"
JSON = "application/json"
FORWARDED = ("Authorization", "OpenAI-Organization", "OpenAI-Project")
HIT_STATUS = {"exact": "HIT", "semantic": "SEMANTIC_HIT"}
FLUSH_HANDLERS_S = 60.0
"""How long :func:`flush` waits for requests still being handled (a stream may take long)."""
SHARE_LIMIT = 64 << 20
"""Bytes of a miss's answer kept for single-flight followers (stored only up to
``limits.MAX_RESPONSE_BYTES``); a larger answer reaches its followers as a 502."""


@dataclass(frozen=True)
class Exchange:
    """One upstream call as seen by the caller that made it (see :func:`_forward`)."""

    status: int
    content_type: str
    body: bytes | None
    """The whole body as received; ``None`` if not captured, cut, failed or too large."""
    error: str | None = None
    """``unreachable``, ``timeout`` or ``cut``: the call failed after or without a status."""


@dataclass
class _State:
    session: aiohttp.ClientSession
    flights: SingleFlight[tuple[object, ...], Exchange]
    stores: set[asyncio.Task[None]]  # background stores and judge calls, awaited at shutdown
    handling: int = 0  # requests whose handler has not returned (it may still start a task)


STATE = web.AppKey("llmcache.proxy", _State)


def setup(app: web.Application) -> None:
    """Give ``app`` (built by ``make_app``, before it starts) what :data:`routes` need: one
    upstream ``aiohttp.ClientSession``, opened at startup and closed at cleanup after the
    pending background stores have finished."""
    app.cleanup_ctx.append(_lifecycle)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    timeout_s = app[SERVICES].settings.upstream_timeout_s
    session = aiohttp.ClientSession(
        # No pool limit: the worker's own concurrency bounds upstream calls, and a hidden
        # limit would queue streams behind each other.
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s),
        trust_env=False,
    )
    app[STATE] = _State(session, SingleFlight(), set())
    try:
        yield
    finally:
        await flush(app)
        await session.close()


async def flush(app: web.Application) -> None:
    """Wait until the requests being handled have returned and every background task (stores,
    judge calls) they started has finished (shutdown, tests). A caller holds its whole answer
    a moment before its handler starts the tasks that follow it, hence the first wait."""
    state = app[STATE]
    deadline = time.monotonic() + FLUSH_HANDLERS_S
    while state.handling or state.stores:
        while state.handling and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.gather(*list(state.stores), return_exceptions=True)
        if time.monotonic() >= deadline:
            return


@dataclass(frozen=True)
class Controls:
    """The caching controls of one request (see the module docstring)."""

    namespace: str
    no_store: bool
    no_cache: bool
    max_age_s: int | None
    threshold: float | None
    ttl_s: int | None
    tags: tuple[str, ...]

    @classmethod
    def parse(cls, headers: Mapping[str, str], tenant: str) -> Controls:
        """Raises :class:`InvalidRequest` (HTTP 400) naming the faulty header."""
        namespace = headers.get("X-LLMCache-Namespace", "default")
        check_names(tenant, namespace)
        directives = {d.strip().lower() for d in headers.get("Cache-Control", "").split(",")}
        ages = [d.removeprefix("max-age=") for d in directives if d.startswith("max-age=")]
        values = policy.validate(
            {
                "threshold": _header(headers, "X-LLMCache-Threshold", float),
                "ttl_s": _header(headers, "X-LLMCache-TTL", int),
            }
        )
        tags = [t.strip() for t in headers.get("X-LLMCache-Tags", "").split(",") if t.strip()]
        return cls(
            namespace=namespace,
            no_store="no-store" in directives,
            no_cache="no-cache" in directives,
            max_age_s=_parse("Cache-Control", ages[0], _age) if ages else None,
            threshold=values["threshold"],
            ttl_s=values["ttl_s"],
            tags=check_tags(tags),
        )


PASS_THROUGH = Controls("default", True, True, None, None, None, ())


def _age(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _parse(name: str, text: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(text)
    except ValueError:
        raise InvalidRequest(f"header {name} has an invalid value", field=name) from None


def _header(headers: Mapping[str, str], name: str, parse: Callable[[str], T]) -> T | None:
    text = headers.get(name)
    return None if text is None else _parse(name, text, parse)


@dataclass(frozen=True)
class _Call:
    request: web.Request
    services: Services
    state: _State
    endpoint: str  # the path under the upstream base URL
    body: dict[str, Any]
    raw: bytes
    principal: Principal
    controls: Controls

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def upstream(self) -> tuple[str, dict[str, str]]:
        """The upstream URL of this call and the headers to send it (module docstring)."""
        base, headers = self.upstream_base
        return f"{base}/{self.endpoint}", headers

    @functools.cached_property
    def upstream_base(self) -> tuple[str, dict[str, str]]:
        """The upstream base URL of this tenant (no trailing slash) and the headers to send."""
        settings = self.services.settings
        base = settings.upstream_base_url
        store = self.services.engine.store
        try:
            with store.read() as txn:
                configured = (store.tenant(txn, self.tenant) or {}).get("upstream_base_url")
            base = configured if isinstance(configured, str) and configured else base
        except lmdb.Error:
            pass  # the store is down: the server's upstream still answers (the call degrades)
        headers = {k: self.request.headers[k] for k in FORWARDED if k in self.request.headers}
        headers["Content-Type"] = JSON
        authorization = headers.get("Authorization", "")
        if not authorization or authorization.partition(" ")[2].startswith(TOKEN_PREFIX):
            headers.pop("Authorization", None)
            if settings.upstream_api_key:
                headers["Authorization"] = f"Bearer {settings.upstream_api_key}"
        return base.rstrip("/"), headers


@dataclass(frozen=True)
class _Route:
    """What differs between the endpoints: the key, the lookup, the answer check, the store."""

    key: Callable[[_Call, policy.Settings], Any]
    find: Callable[[_Call, Any], tuple[Hit | None, Hit | None]]
    """(the hit, or None; the probe of a miss to label, or None: ``LookupResult.probe``)"""
    answer: Callable[[_Call, bytes], tuple[bytes, dict[str, int]] | None]
    """The bytes to store and the usage, or ``None`` when the answer must not be cached."""
    prepare: Callable[[_Call, Any, bytes, dict[str, int]], Command]


async def _handle(request: web.Request, endpoint: str, route: _Route) -> web.StreamResponse:
    state = request.app[STATE]
    state.handling += 1
    try:
        return await _handle_call(request, endpoint, route)
    finally:
        state.handling -= 1


async def _handle_call(request: web.Request, endpoint: str, route: _Route) -> web.StreamResponse:
    raw = await request.read()
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", field="body")
    principal: Principal = request[PRINCIPAL]
    services = request.app[SERVICES]
    # Under the kill switch even the caching headers are ignored: a pure pass-through.
    enabled = services.settings.cache_enabled
    controls = Controls.parse(request.headers, principal.tenant) if enabled else PASS_THROUGH
    call = _Call(request, services, request.app[STATE], endpoint, body, raw, principal, controls)
    engine = services.engine
    if not enabled:
        return await _pass(call, "BYPASS", {"X-LLMCache-Reason": "kill switch"})
    if call.controls.no_store:
        return await _pass(call, "BYPASS", {"X-LLMCache-Reason": "no-store"})
    try:
        settings = engine.settings(call.tenant, call.controls.namespace)
    except Exception as exc:
        return await _degrade(call, exc)
    reason = policy.not_cacheable_reason(body, settings)
    if reason is not None:
        return await _pass(call, "BYPASS", {"X-LLMCache-Reason": reason})
    try:
        key = route.key(call, settings)
    except CacheError as exc:
        return await _pass(call, "BYPASS", {"X-LLMCache-Reason": exc.code})
    hit = probe = None
    if not call.controls.no_cache:
        started = time.monotonic()
        try:
            hit, probe = await _run(route.find, call, key)
        except Exception as exc:
            return await _degrade(call, exc)
        metrics.STAGE_SECONDS.labels("total").observe(time.monotonic() - started)
    now = engine.now_ms()
    max_age = call.controls.max_age_s
    if hit is not None and max_age is not None and now - hit.entry.created_at_ms >= max_age * 1000:
        hit = None
    judged = hit or probe
    if not (judged and judged.kind == "semantic" and _judge_sampled(settings)):
        judged = None
    if hit is None:
        metrics.LOOKUPS.labels(call.tenant, "none", "miss").inc()
        return await _miss(call, route, key, (settings.judge_model, judged))
    _count_hit(call, hit)
    if judged is not None:
        _judge_later(call, settings.judge_model, key, judged, None)
    headers = {
        "X-LLMCache-Status": HIT_STATUS[hit.kind],
        "X-LLMCache-Similarity": f"{hit.similarity:.4f}",
        "X-LLMCache-Entry": str(hit.entry.id),
        "Age": str(max(0, now - hit.entry.created_at_ms) // 1000),
    }
    return _replay(call, 200, hit.entry.content_type, hit.entry.response, headers)


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn`` in the default executor: lookups embed and stores fsync; the loop must not wait."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


def _count_hit(call: _Call, hit: Hit) -> None:
    metrics.LOOKUPS.labels(call.tenant, hit.kind, "hit").inc()
    if hit.kind == "semantic":
        metrics.HIT_SIMILARITY.labels(call.tenant).observe(hit.similarity)
    usage = hit.entry.usage or {k: int(v) for k, v in hit.entry.meta.items() if v.isdigit()}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    metrics.TOKENS_SAVED.labels(call.tenant, "prompt").inc(prompt)
    metrics.TOKENS_SAVED.labels(call.tenant, "completion").inc(completion)
    price = call.services.settings.prices.get(str(call.body.get("model")))
    if price is not None:
        cost = (prompt * price.prompt + completion * price.completion) / 1e6
        metrics.COST_SAVED.labels(call.tenant).inc(cost)


async def _degrade(call: _Call, exc: Exception) -> web.StreamResponse:
    if isinstance(exc, CacheError):
        reason = exc.code
    elif isinstance(exc, lmdb.Error):
        reason = "store_unavailable"
    else:
        reason = "internal"
    log.warning("proxy: cache unavailable (%s), passing through: %s", reason, exc)
    metrics.DEGRADED.labels(reason).inc()
    return await _pass(call, "BYPASS", {"X-LLMCache-Degraded": reason})


async def _pass(call: _Call, status: str, headers: dict[str, str]) -> web.StreamResponse:
    if status == "BYPASS":
        metrics.LOOKUPS.labels(call.tenant, "none", "bypass").inc()
    response, _ = await _forward(call, {"X-LLMCache-Status": status, **headers}, capture=False)
    return response


async def _miss(
    call: _Call, route: _Route, key: Any, judging: tuple[str, Hit | None]
) -> web.StreamResponse:
    """``judging``: the namespace's judge model and the probe it is to label, if sampled."""
    url, upstream_headers = call.upstream
    credentials = hashlib.sha256(upstream_headers.get("Authorization", "").encode()).digest()
    leader: list[web.StreamResponse] = []

    async def fly() -> Exchange:
        response, exchange = await _forward(call, {"X-LLMCache-Status": "MISS"}, capture=True)
        leader.append(response)
        may_store = ROLES[call.principal.role] >= ROLES["writer"]
        answer = None
        body = exchange.body
        if may_store and exchange.status == 200 and body and len(body) <= MAX_STORED:
            answer = route.answer(call, body)
        if answer is not None:
            _store_later(call, functools.partial(route.prepare, call, key, *answer))
        model, probe = judging
        if probe is not None and exchange.status == 200 and body:
            _judge_later(call, model, key, probe, (body, exchange.content_type))
        return exchange

    exact = key.exact_key if isinstance(key, CacheKey) else key
    flight = (call.endpoint, call.tenant, call.controls.namespace, exact, url, credentials)
    if flight in call.state.flights:
        metrics.SINGLEFLIGHT_JOINS.inc()
    exchange, joined = await call.state.flights.do(flight, fly)
    if not joined:
        return leader[0]
    headers = {"X-LLMCache-Status": "MISS", "X-LLMCache-Singleflight": "joined"}
    if exchange.error is not None or exchange.body is None:
        return _upstream_error(exchange.error or "too_large", headers)
    return _replay(call, exchange.status, exchange.content_type, exchange.body, headers)


def _store_later(call: _Call, prepare: Callable[[], Command]) -> None:
    async def store() -> None:
        try:
            command = await _run(prepare)
            await call.services.proposer.propose(command, wait="committed")
        except Exception as exc:
            # The caller has its answer already; a lost store only costs a later miss.
            log.warning("proxy: storing an answer of tenant %s failed: %r", call.tenant, exc)
            metrics.STORES.labels(call.tenant, "failed").inc()
        else:
            metrics.STORES.labels(call.tenant, "stored").inc()

    task = asyncio.get_running_loop().create_task(store())
    call.state.stores.add(task)
    task.add_done_callback(call.state.stores.discard)


def _judge_sampled(settings: policy.Settings) -> bool:
    """Whether the judge labels this lookup: adaptive namespaces with a judge, at its rate."""
    return bool(
        settings.adaptive_delta > 0
        and settings.judge_model
        and random.random() < settings.judge_rate
    )


def _judge_later(
    call: _Call, model: str, key: CacheKey, candidate: Hit, fresh: tuple[bytes, str] | None
) -> None:
    """In the background: get a fresh answer unless ``fresh`` has it (a semantic hit's request
    goes upstream once more, not streamed), ask ``model`` whether ``candidate``'s answer would
    do, and send its verdict as feedback at the candidate's similarity (``node/judge.py``)."""

    async def run() -> None:
        verdict = "failed"
        try:
            answer = fresh or await _fresh_answer(call)
            if answer is None:
                return
            body = judge.request_body(
                model,
                key.text,
                candidate.entry.text,
                judge.answer_text(candidate.entry.response, candidate.entry.content_type),
                judge.answer_text(*answer),
            )
            base, headers = call.upstream_base
            async with call.state.session.post(
                f"{base}/chat/completions", json=body, headers=headers
            ) as up:
                raw = await up.read() if up.status == 200 else b""
            label = judge.verdict(raw) if raw else None
            verdict = "unclear" if raw and label is None else verdict
            if label is not None:
                command = await _run(
                    call.services.engine.prepare_feedback,
                    call.tenant,
                    candidate.entry.id,
                    label,
                    similarity=candidate.label_at,
                    query=key.text,
                )
                await call.services.proposer.propose(command, wait="committed")
                verdict = label
        except Exception as exc:
            log.warning("proxy: the judge of tenant %s failed: %r", call.tenant, exc)
        finally:
            metrics.JUDGE.labels(call.tenant, verdict).inc()

    task = asyncio.get_running_loop().create_task(run())
    call.state.stores.add(task)
    task.add_done_callback(call.state.stores.discard)


async def _fresh_answer(call: _Call) -> tuple[bytes, str] | None:
    """The upstream's answer to the caller's request, not streamed; None if it failed."""
    url, headers = call.upstream
    request = {k: v for k, v in call.body.items() if k not in ("stream", "stream_options")}
    async with call.state.session.post(url, json=request, headers=headers) as up:
        metrics.UPSTREAM_CALLS.labels(call.endpoint, f"{up.status // 100}xx").inc()
        if up.status != 200:
            return None
        return await up.read(), up.headers.get("Content-Type", JSON)


async def _forward(
    call: _Call, headers: dict[str, str], *, capture: bool
) -> tuple[web.StreamResponse, Exchange]:
    """Send the call upstream and stream the answer to the caller as it arrives.

    A caller that goes away does not stop the call: the answer is still read (for the
    followers and the cache). A cut upstream stream cuts the caller's connection too, so it
    cannot mistake the truncated answer for a complete one."""
    url, upstream_headers = call.upstream
    started = time.monotonic()
    try:
        async with call.state.session.post(url, data=call.raw, headers=upstream_headers) as up:
            metrics.UPSTREAM_CALLS.labels(call.endpoint, f"{up.status // 100}xx").inc()
            if up.status >= 500:
                metrics.UPSTREAM_ERRORS.labels(call.endpoint, f"http_{up.status}").inc()
            content_type = up.headers.get("Content-Type", JSON)
            relayed = {"Content-Type": content_type, **headers}
            if "Retry-After" in up.headers:
                relayed["Retry-After"] = up.headers["Retry-After"]
            response = web.StreamResponse(status=up.status, headers=relayed)
            await _quietly(response.prepare(call.request))
            kept: bytearray | None = bytearray() if capture else None
            try:
                async for data in up.content.iter_any():
                    await _quietly(response.write(data))
                    if kept is not None:
                        kept += data
                        kept = kept if len(kept) <= SHARE_LIMIT else None
            except (TimeoutError, aiohttp.ClientError):
                metrics.UPSTREAM_ERRORS.labels(call.endpoint, "cut").inc()
                call.request.protocol.force_close()
                return response, Exchange(up.status, content_type, None, "cut")
            await _quietly(response.write_eof())
            body = bytes(kept) if kept is not None else None
            return response, Exchange(up.status, content_type, body)
    except TimeoutError:
        error = "timeout"
    except aiohttp.ClientError as exc:
        log.warning("proxy: upstream %s unreachable: %r", url, exc)
        error = "unreachable"
    finally:
        metrics.STAGE_SECONDS.labels("upstream").observe(time.monotonic() - started)
    metrics.UPSTREAM_ERRORS.labels(call.endpoint, error).inc()
    return _upstream_error(error, headers), Exchange(502, JSON, None, error)


async def _quietly(step: Any) -> None:
    """Write to the caller, ignoring that it went away (the upstream answer is still read)."""
    with contextlib.suppress(ConnectionError):
        await step


UPSTREAM_ERRORS = {
    "unreachable": (502, "upstream_unreachable", "the upstream LLM could not be reached"),
    "timeout": (504, "upstream_timeout", "the upstream LLM did not answer in time"),
    "cut": (502, "upstream_cut", "the upstream LLM closed the stream before its end"),
    "too_large": (502, "upstream_too_large", "the upstream answer was too large to share"),
}


def _upstream_error(error: str, headers: dict[str, str]) -> web.Response:
    """An error of ours about the upstream, in OpenAI's shape (which OpenAI clients parse)."""
    status, code, message = UPSTREAM_ERRORS[error]
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _replay(
    call: _Call, status: int, content_type: str, body: bytes, headers: dict[str, str]
) -> web.Response:
    """An answer replayed to ``call`` in its format (see the module docstring for streams)."""
    if content_type.startswith(SSE):
        events = _sse_events(body)
        options = call.body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            events = [e for e in events if not _usage_only(e)]
        body = _render(events)
    return web.Response(status=status, body=body, headers={"Content-Type": content_type, **headers})


def _sse_events(raw: bytes) -> list[str]:
    """The ``data`` of each server-sent event (other fields and comments are dropped)."""
    events = []
    for block in raw.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].removeprefix(" ") for line in block.split("\n") if line[:5] == "data:"]
        if lines:
            events.append("\n".join(lines))
    return events


def _render(events: list[str]) -> bytes:
    return "".join("data: " + e.replace("\n", "\ndata: ") + "\n\n" for e in events).encode()


def _usage_only(event: str) -> bool:
    try:
        chunk = json.loads(event)
    except ValueError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and bool(chunk.get("usage"))


def _token_counts(usage: object) -> dict[str, int]:
    if not isinstance(usage, dict):
        return {}
    counts = {k: v for k, v in usage.items() if type(v) is int and 0 <= v < 2**53}
    return dict(list(counts.items())[:16])


def _finished(choices: object) -> bool:
    """Every choice ended, and not by the content filter (refusals are not replayed)."""
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(
            isinstance(c, dict) and c.get("finish_reason") not in (None, "content_filter")
            for c in choices
        )
    )


def _generation_answer(call: _Call, raw: bytes) -> tuple[bytes, dict[str, int]] | None:
    if not call.stream:
        answer = _json_object(raw)
        if answer is None or not _finished(answer.get("choices")):
            return None
        return raw, _token_counts(answer.get("usage"))
    events = _sse_events(raw)
    if not events or events[-1] != "[DONE]":
        return None
    chunks = [_json_object(e.encode()) for e in events[:-1]]
    if any(chunk is None or "error" in chunk for chunk in chunks):
        return None
    last: dict[str, dict[str, Any]] = {}  # the finishing chunk of each choice index
    usage: dict[str, int] = {}
    for chunk in chunks:
        assert chunk is not None
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                last[repr(choice.get("index"))] = choice
        usage = _token_counts(chunk.get("usage")) or usage
    return (_render(events), usage) if _finished(list(last.values())) else None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _generation_key(call: _Call, settings: policy.Settings) -> CacheKey:
    ns = call.controls.namespace
    if call.endpoint == "completions":
        return completion_key(call.tenant, ns, call.body)
    return chat_key(call.tenant, ns, call.body, window=settings.context_window)


def _generation_find(call: _Call, key: CacheKey) -> tuple[Hit | None, Hit | None]:
    result = call.services.engine.lookup(key, threshold=call.controls.threshold)
    return result.hit, result.probe


def _generation_prepare(
    call: _Call, key: CacheKey, answer: bytes, usage: dict[str, int]
) -> Command:
    return call.services.engine.prepare_put(
        key,
        answer,
        content_type=SSE if call.stream else JSON,
        ttl_s=call.controls.ttl_s,
        tags=call.controls.tags,
        usage=usage,
    )


GENERATION = _Route(_generation_key, _generation_find, _generation_answer, _generation_prepare)


def _embeddings_key(call: _Call, settings: policy.Settings) -> str:
    request = {k: v for k, v in call.body.items() if k != "user"}
    return "embeddings:" + hashlib.sha256(canonical_json(request).encode()).hexdigest()


def _embeddings_find(call: _Call, key: str) -> tuple[Hit | None, Hit | None]:
    try:
        entry = call.services.engine.get_kv(call.tenant, call.controls.namespace, key)
    except NotFound:
        return None, None
    return Hit(entry, 1.0, "exact"), None


def _embeddings_answer(call: _Call, raw: bytes) -> tuple[bytes, dict[str, int]] | None:
    answer = _json_object(raw)
    if answer is None or not isinstance(answer.get("data"), list) or not answer["data"]:
        return None
    return raw, _token_counts(answer.get("usage"))


def _embeddings_prepare(call: _Call, key: str, answer: bytes, usage: dict[str, int]) -> Command:
    # Exact-only entries carry no usage field: the token counts travel in ``meta``.
    return call.services.engine.prepare_kv_put(
        call.tenant,
        call.controls.namespace,
        key,
        answer,
        content_type=JSON,
        ttl_s=0 if call.controls.ttl_s is None else call.controls.ttl_s,
        tags=call.controls.tags,
        meta={"prompt_tokens": str(usage.get("prompt_tokens", 0))},
    )


EMBEDDINGS = _Route(_embeddings_key, _embeddings_find, _embeddings_answer, _embeddings_prepare)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "chat/completions", GENERATION)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "completions", GENERATION)


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "embeddings", EMBEDDINGS)


def openapi_paths() -> dict[str, Any]:
    """OpenAPI 3.1 path items of the three proxy routes (merged into ``/openapi.json``)."""
    ours = {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}
    upstream_error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {"message": {"type": "string"}, "code": {"type": "string"}},
            }
        },
    }
    theirs = {JSON: {"schema": upstream_error}}
    controls = [
        ("X-LLMCache-Namespace", {"type": "string"}, "namespace of the tenant (default)"),
        ("X-LLMCache-Threshold", {"type": "number", "minimum": 0, "maximum": 1}, "similarity"),
        ("X-LLMCache-TTL", {"type": "integer", "minimum": 0}, "seconds to keep the answer"),
        ("X-LLMCache-Tags", {"type": "string"}, "comma-separated tags of the stored answer"),
        ("Cache-Control", {"type": "string"}, "no-store, no-cache or max-age=N"),
    ]
    parameters = [
        {"name": n, "in": "header", "required": False, "schema": s, "description": d}
        for n, s, d in controls
    ]
    string = {"schema": {"type": "string"}}
    answer_headers = {
        "X-LLMCache-Status": {
            "schema": {"type": "string", "enum": ["HIT", "SEMANTIC_HIT", "MISS", "BYPASS"]}
        },
        "X-LLMCache-Similarity": {**string, "description": "hits: cosine similarity, 0..1"},
        "X-LLMCache-Entry": {**string, "description": "hits: the entry's id"},
        "Age": {**string, "description": "hits: the entry's age in seconds"},
        "X-LLMCache-Reason": {**string, "description": "BYPASS: why the cache was skipped"},
        "X-LLMCache-Degraded": {**string, "description": "BYPASS: the cache failed (code)"},
        "X-LLMCache-Singleflight": {**string, "description": "'joined': a shared upstream call"},
    }

    def operation(summary: str, required: list[str], streams: bool) -> dict[str, Any]:
        content: dict[str, Any] = {JSON: {"schema": {"type": "object"}}}
        if streams:
            content[SSE] = {"schema": {"type": "string"}}
        request = {"type": "object", "required": required}
        return {
            "summary": summary,
            "description": "OpenAI-compatible. Authorization carries the upstream's key; the "
            "LLM-Cache token goes in X-LLMCache-Token (or is an lc_ bearer).",
            "tags": ["proxy"],
            "security": [{"token": []}, {}],
            "parameters": parameters,
            "requestBody": {"required": True, "content": {JSON: {"schema": request}}},
            "responses": {
                "200": {"description": "the answer", "headers": answer_headers, "content": content},
                "400": {"description": "invalid JSON body or control header", "content": ours},
                "401": {"description": "unknown LLM-Cache token", "content": ours},
                "502": {"description": "upstream unreachable or stream cut", "content": theirs},
                "504": {"description": "upstream timed out", "content": theirs},
                "default": {"description": "the upstream's own answer, relayed as it is"},
            },
        }

    return {
        "/v1/chat/completions": {
            "post": operation("Chat completions through the cache", ["model", "messages"], True)
        },
        "/v1/completions": {
            "post": operation("Completions through the cache", ["model", "prompt"], True)
        },
        "/v1/embeddings": {
            "post": operation("Embeddings, cached exactly", ["model", "input"], False)
        },
    }
