"""Tenants spread over several Raft groups by consistent hashing.

:class:`TenantRing` maps a tenant name to a group name with ``uhashring``'s ketama ring
(libmemcached-compatible, 160 points per group, md5): the same names give the same map in every
process and every client version that keeps ketama, and adding a group moves only the tenants
whose points it takes (about 1/N of them; measured in tests/test_client_sharded.py). Groups are
keyed by *name*, not URL, so replacing a group's nodes moves no tenant.

A moved tenant's entries stay on its old group: they start cold on the new one, or are moved
with ``llmcache-cli export`` / ``import``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Unpack

from uhashring import HashRing

from llmcache.client.aio import AsyncCacheClient
from llmcache.client.calls import LookupOptions, StoreOptions
from llmcache.client.models import LookupResult, StoreResult
from llmcache.client.sync import CacheClient


class TenantRing:
    """Tenant → group name (ketama consistent hashing)."""

    def __init__(self, groups: Iterable[str]) -> None:
        names = list(dict.fromkeys(groups))
        if not names:
            raise ValueError("a ring needs at least one group")
        self._ring = HashRing(nodes=names, hash_fn="ketama")

    @property
    def groups(self) -> list[str]:
        return sorted(self._ring.get_nodes())

    def group_of(self, tenant: str) -> str:
        return str(self._ring.get_node(tenant))

    def add(self, group: str) -> None:
        self._ring.add_node(group)

    def remove(self, group: str) -> None:
        self._ring.remove_node(group)


def _tenant(options: Mapping[str, Any]) -> str:
    tenant = options.get("tenant")
    if not tenant:
        raise ValueError("a sharded client's calls name their tenant (tenant=...)")
    return str(tenant)


def _urls(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class ShardedClient:
    """Blocking client of several groups: ``groups`` maps a group name to its node URL(s);
    ``options`` are :class:`CacheClient`'s (token, timeout, retry, msgpack...). Every call
    names its tenant and goes to that tenant's group, with that client's retries and
    failover. :meth:`for_tenant` gives the group's client for anything else."""

    def __init__(self, groups: Mapping[str, str | Sequence[str]], **options: Any) -> None:
        self._options = options
        self.clients = {name: CacheClient(_urls(urls), **options) for name, urls in groups.items()}
        self.ring = TenantRing(self.clients)

    def add_group(self, name: str, urls: str | Sequence[str]) -> None:
        """Add a group: the tenants the ring now maps to it go there from the next call."""
        self.clients[name] = CacheClient(_urls(urls), **self._options)
        self.ring.add(name)

    def for_tenant(self, tenant: str) -> CacheClient:
        return self.clients[self.ring.group_of(tenant)]

    def lookup(self, text: str | None = None, **options: Unpack[LookupOptions]) -> LookupResult:
        """:meth:`CacheClient.lookup` on the group of ``tenant=`` (required)."""
        return self.for_tenant(_tenant(options)).lookup(text, **options)

    def store(
        self, text: str | None = None, response: Any = None, **options: Unpack[StoreOptions]
    ) -> StoreResult:
        """:meth:`CacheClient.store` on the group of ``tenant=`` (required)."""
        return self.for_tenant(_tenant(options)).store(text, response, **options)

    def create_tenant(self, name: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create the tenant on the group the ring maps it to."""
        return self.for_tenant(name).create_tenant(name, config)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncShardedClient:
    """The asyncio twin of :class:`ShardedClient` over :class:`AsyncCacheClient`."""

    def __init__(self, groups: Mapping[str, str | Sequence[str]], **options: Any) -> None:
        self._options = options
        self.clients = {
            name: AsyncCacheClient(_urls(urls), **options) for name, urls in groups.items()
        }
        self.ring = TenantRing(self.clients)

    def add_group(self, name: str, urls: str | Sequence[str]) -> None:
        self.clients[name] = AsyncCacheClient(_urls(urls), **self._options)
        self.ring.add(name)

    def for_tenant(self, tenant: str) -> AsyncCacheClient:
        return self.clients[self.ring.group_of(tenant)]

    async def lookup(
        self, text: str | None = None, **options: Unpack[LookupOptions]
    ) -> LookupResult:
        return await self.for_tenant(_tenant(options)).lookup(text, **options)

    async def store(
        self, text: str | None = None, response: Any = None, **options: Unpack[StoreOptions]
    ) -> StoreResult:
        return await self.for_tenant(_tenant(options)).store(text, response, **options)

    async def create_tenant(
        self, name: str, config: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self.for_tenant(name).create_tenant(name, config)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()

    async def __aenter__(self) -> AsyncShardedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
