"""Put the cache in front of an ``openai.OpenAI`` client without changing the calling code.

    llm = cached(openai.OpenAI(), CacheClient("http://127.0.0.1:8080"), namespace="support")
    reply = llm.chat.completions.create(model="gpt-4o-mini", temperature=0, messages=[...])

``llm.chat.completions.create`` looks the request up (exact, then semantic, inside the
request's scope: model, sampling parameters, system prompt, earlier turns) and returns the
cached ``ChatCompletion`` on a hit; on a miss it calls OpenAI and stores the answer.
``llm.embeddings.create`` is cached exactly (a kv entry under a hash of the whole request).
Everything else is the wrapped client's own. Not cached: ``stream=True`` calls (use the
node's proxy for streamed hits), requests the server deems not cacheable (hot temperature,
``n > 1``). The cache fails open: if it cannot be reached, the call goes to OpenAI as if it
were not there. ``llm.last_status`` says what the last call did (``HIT``, ``SEMANTIC_HIT``,
``MISS``, ``BYPASS``).

The other way needs no code here: point the client's ``base_url`` at a node
(``openai.OpenAI(base_url="http://127.0.0.1:8080/v1")``), which proxies and caches, streamed
answers included (see README.md).

``cached_async(openai.AsyncOpenAI(), AsyncCacheClient(...))`` is the same for asyncio.

``openai`` is not a dependency of ``llmcache``: this module imports it when used.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llmcache.client.aio import AsyncCacheClient
from llmcache.client.errors import ConnectionFailed, NotCacheable, Unavailable
from llmcache.client.models import LookupResult
from llmcache.client.sync import CacheClient

FAIL_OPEN = (ConnectionFailed, Unavailable)


def embeddings_key(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "openai:embeddings:" + hashlib.sha256(canonical.encode()).hexdigest()


CLIENT_ONLY = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})
"""Arguments of the openai client itself, not of the request: never part of a key."""


def _request(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in CLIENT_ONLY}


def _usage(reply: Any) -> dict[str, int]:
    usage = reply.usage.model_dump(exclude_none=True) if reply.usage else {}
    return {k: v for k, v in usage.items() if isinstance(v, int)}


class _Completions:
    def __init__(self, owner: CachedOpenAI) -> None:
        self._owner = owner

    def create(self, **body: Any) -> Any:
        from openai.types.chat import ChatCompletion

        owner = self._owner
        real = owner.client.chat.completions
        if body.get("stream"):
            owner.last_status = "BYPASS"
            return real.create(**body)
        request = _request(body)
        found = owner.lookup(request=request)
        if found is not None:
            return ChatCompletion.model_validate_json(found)
        reply = real.create(**body)
        owner.store(reply.model_dump_json(), request=request, usage=_usage(reply))
        return reply


class _Chat:
    def __init__(self, owner: CachedOpenAI) -> None:
        self.completions = _Completions(owner)


class _Embeddings:
    def __init__(self, owner: CachedOpenAI) -> None:
        self._owner = owner

    def create(self, **body: Any) -> Any:
        from openai.types import CreateEmbeddingResponse

        owner = self._owner
        key = embeddings_key(_request(body))
        found = owner.lookup(key=key)
        if found is not None:
            return CreateEmbeddingResponse.model_validate_json(found)
        reply = owner.client.embeddings.create(**body)
        owner.store(reply.model_dump_json(), key=key)
        return reply


class _Wrapper:
    """What both wrappers share: the wrapped client, the cache scope, ``last_status``."""

    def __init__(self, client: Any, threshold: float | None, scope: dict[str, Any]) -> None:
        self.client = client
        self.scope = {k: v for k, v in scope.items() if v is not None}
        self.lookup_options: dict[str, Any] = {} if threshold is None else {"threshold": threshold}
        self.last_status = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def seen(self, found: LookupResult | None) -> bytes | None:
        self.last_status = "BYPASS" if found is None else found.status
        return found.entry.response if found and found.entry else None


class CachedOpenAI(_Wrapper):
    """The wrapper :func:`cached` returns (see the module docstring)."""

    def __init__(
        self, client: Any, cache: CacheClient, *, threshold: float | None = None, **scope: Any
    ) -> None:
        super().__init__(client, threshold, scope)
        self.cache = cache
        self.chat = _Chat(self)
        self.embeddings = _Embeddings(self)

    def lookup(self, **selector: Any) -> bytes | None:
        try:
            found = self.cache.lookup(**selector, **self.scope, **self.lookup_options)
        except (*FAIL_OPEN, NotCacheable):
            found = None
        return self.seen(found)

    def store(self, response: str, **selector: Any) -> None:
        try:
            self.cache.store(
                None, response, content_type="application/json", **selector, **self.scope
            )
        except (*FAIL_OPEN, NotCacheable):
            pass  # fail open; a not-cacheable request is simply not stored


def cached(
    client: Any,
    cache: CacheClient,
    *,
    namespace: str | None = None,
    tenant: str | None = None,
    threshold: float | None = None,
) -> CachedOpenAI:
    """``client`` (an ``openai.OpenAI``) with its chat and embedding calls cached in
    ``cache`` under ``namespace`` (and ``tenant``, for admin tokens of all tenants)."""
    return CachedOpenAI(client, cache, threshold=threshold, namespace=namespace, tenant=tenant)


# -- asyncio ---------------------------------------------------------------------------------------


class _AsyncCompletions:
    def __init__(self, owner: AsyncCachedOpenAI) -> None:
        self._owner = owner

    async def create(self, **body: Any) -> Any:
        from openai.types.chat import ChatCompletion

        owner = self._owner
        real = owner.client.chat.completions
        if body.get("stream"):
            owner.last_status = "BYPASS"
            return await real.create(**body)
        request = _request(body)
        found = await owner.lookup(request=request)
        if found is not None:
            return ChatCompletion.model_validate_json(found)
        reply = await real.create(**body)
        await owner.store(reply.model_dump_json(), request=request, usage=_usage(reply))
        return reply


class _AsyncChat:
    def __init__(self, owner: AsyncCachedOpenAI) -> None:
        self.completions = _AsyncCompletions(owner)


class _AsyncEmbeddings:
    def __init__(self, owner: AsyncCachedOpenAI) -> None:
        self._owner = owner

    async def create(self, **body: Any) -> Any:
        from openai.types import CreateEmbeddingResponse

        owner = self._owner
        key = embeddings_key(_request(body))
        found = await owner.lookup(key=key)
        if found is not None:
            return CreateEmbeddingResponse.model_validate_json(found)
        reply = await owner.client.embeddings.create(**body)
        await owner.store(reply.model_dump_json(), key=key)
        return reply


class AsyncCachedOpenAI(_Wrapper):
    """:class:`CachedOpenAI` for ``openai.AsyncOpenAI`` and :class:`AsyncCacheClient`."""

    def __init__(
        self, client: Any, cache: AsyncCacheClient, *, threshold: float | None = None, **scope: Any
    ) -> None:
        super().__init__(client, threshold, scope)
        self.cache = cache
        self.chat = _AsyncChat(self)
        self.embeddings = _AsyncEmbeddings(self)

    async def lookup(self, **selector: Any) -> bytes | None:
        try:
            found = await self.cache.lookup(**selector, **self.scope, **self.lookup_options)
        except (*FAIL_OPEN, NotCacheable):
            found = None
        return self.seen(found)

    async def store(self, response: str, **selector: Any) -> None:
        try:
            await self.cache.store(
                None, response, content_type="application/json", **selector, **self.scope
            )
        except (*FAIL_OPEN, NotCacheable):
            pass


def cached_async(
    client: Any,
    cache: AsyncCacheClient,
    *,
    namespace: str | None = None,
    tenant: str | None = None,
    threshold: float | None = None,
) -> AsyncCachedOpenAI:
    """:func:`cached` for an ``openai.AsyncOpenAI`` and an :class:`AsyncCacheClient`."""
    return AsyncCachedOpenAI(client, cache, threshold=threshold, namespace=namespace, tenant=tenant)
