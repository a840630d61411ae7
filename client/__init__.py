"""The LLM-Cache Python client: :class:`CacheClient` (blocking) and :class:`AsyncCacheClient`
for one Raft group, :class:`ShardedClient` / :class:`AsyncShardedClient` for tenants spread
over several groups, and :func:`~llmcache.client.openai_wrap.cached` for openai clients."""

from llmcache.client.aio import AsyncCacheClient
from llmcache.client.errors import LLMCacheError
from llmcache.client.models import Entry, LookupResult, StoreResult
from llmcache.client.protocol import RetryPolicy
from llmcache.client.sharded import AsyncShardedClient, ShardedClient
from llmcache.client.sync import CacheClient

__all__ = [
    "AsyncCacheClient",
    "AsyncShardedClient",
    "CacheClient",
    "Entry",
    "LLMCacheError",
    "LookupResult",
    "RetryPolicy",
    "ShardedClient",
    "StoreResult",
]
