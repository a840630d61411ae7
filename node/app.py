"""The aiohttp application factory of a server worker.

Middlewares, outermost first: request metrics (``HTTP_REQUESTS`` by route template and status),
errors (every failure becomes ``{"error": {code, message, field}}`` with the right status, JSON
or msgpack as the caller accepts; never a traceback to the caller), then authentication (sets
``request[PRINCIPAL]``; health, metrics and the OpenAPI document are public). Every answer
carries ``X-LLMCache-Node``. Routes come from ``node/api.py`` (the cache API) and whatever
``extra_routes`` the caller adds (the proxy), documented by ``extra_paths`` in ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from llmcache.node import metrics, wire
from llmcache.node.auth import Authenticator, token_from_headers
from llmcache.node.errors import CacheError
from llmcache.node.proposer import NotLeader
from llmcache.node.services import PRINCIPAL, SERVICES, Services

log = logging.getLogger(__name__)
AUTH = web.AppKey("auth", Authenticator)
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/openapi.json", "/v1/internal/propose"})
"""``/v1/internal/propose`` authenticates peers itself (HMAC, see ``node/forwarding.py``)."""
PROXY_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(code: str, message: str, field: str | None = None) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response(error_body(code, message, field), status=status, headers=headers)


def _error(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    extra = {"Retry-After": "1"} if status == 503 else {}
    return wire.respond(
        request, error_body(code, message, field), status, {**extra, **(headers or {})}
    )


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects: the error middleware answered all else
        metrics.HTTP_REQUESTS.labels(route, str(exc.status)).inc()
        raise
    metrics.HTTP_REQUESTS.labels(route, str(response.status)).inc()
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NotLeader as exc:
        leader = {"X-LLMCache-Leader": exc.leader or ""}
        return _error(request, exc.http_status, exc.code, exc.message, exc.field, leader)
    except CacheError as exc:
        return _error(request, exc.http_status, exc.code, exc.message, exc.field)
    except json.JSONDecodeError as exc:
        return _error(request, 400, "invalid_json", f"the body is not valid JSON: {exc}", "body")
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(request, 413, "too_large", exc.text or "request body too large", "body")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error(request, exc.status, code, exc.text or exc.reason, None, allow)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(request, 500, "internal", "internal error; see the node's log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS:
        proxy_route = request.path.startswith(PROXY_PREFIXES)
        token = token_from_headers(request.headers, proxy_route=proxy_route)
        request[PRINCIPAL] = request.app[AUTH].authenticate(token)
    return await handler(request)


def make_app(
    services: Services,
    *,
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    extra_paths: Mapping[str, Any] | None = None,
) -> web.Application:
    """A worker's application: ``services`` shared as ``app[SERVICES]``; ``extra_paths`` are
    the OpenAPI path items of ``extra_routes``."""
    settings = services.settings
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
    )
    app[SERVICES] = services
    app[AUTH] = Authenticator(services.engine.store, settings.admin_token, settings.open_access)
    from llmcache.node import api, cluster_api  # the cache API routes

    app[api.ADMIN_LOCK] = asyncio.Lock()
    app[api.OPENAPI_PATHS] = dict(extra_paths or {})
    app.add_routes(api.routes)
    app.add_routes(cluster_api.cluster_routes)
    app.add_routes(list(extra_routes))

    async def stamp_node(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-LLMCache-Node"] = settings.node_id

    app.on_response_prepare.append(stamp_node)
    return app
