"""Tenants over several groups: the ketama ring's balance and movement (no servers), then
``ShardedClient`` and ``AsyncShardedClient`` round trips over two real single-node groups."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmcache.client import AsyncShardedClient, ShardedClient
from llmcache.client.sharded import TenantRing
from tests.node_process import NodeProcess

TENANTS = [f"tenant-{i}" for i in range(1000)]


def test_1000_tenants_spread_over_3_groups_within_15_percent() -> None:
    ring = TenantRing(["g1", "g2", "g3"])
    counts = Counter(ring.group_of(t) for t in TENANTS)
    assert set(counts) == {"g1", "g2", "g3"}
    for group, n in counts.items():
        assert abs(n - 1000 / 3) <= 0.15 * 1000 / 3, (group, counts)


def test_a_4th_group_moves_at_most_30_percent_and_only_to_itself() -> None:
    ring = TenantRing(["g1", "g2", "g3"])
    before = {t: ring.group_of(t) for t in TENANTS}
    ring.add("g4")
    after = {t: ring.group_of(t) for t in TENANTS}
    moved = [t for t in TENANTS if before[t] != after[t]]
    assert 0 < len(moved) <= 300
    assert all(after[t] == "g4" for t in moved)  # no tenant moves between the old groups
    ring.remove("g4")
    assert {t: ring.group_of(t) for t in TENANTS} == before


def test_the_ring_is_the_same_in_every_process_and_order() -> None:
    a, b = TenantRing(["g1", "g2", "g3"]), TenantRing(["g3", "g1", "g2"])
    assert all(a.group_of(t) == b.group_of(t) for t in TENANTS)
    # Pinned: a ring that changed between releases would send tenants to cold groups.
    assert [a.group_of(f"tenant-{i}") for i in range(6)] == PINNED


PINNED = ["g2", "g1", "g1", "g1", "g1", "g1"]


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = Path(tmp_path_factory.mktemp("sharded"))
    nodes = [NodeProcess(root / name, env={"LLMCACHE_EMBEDDER": "none"}) for name in "ab"]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()
        yield {"a": nodes[0].url, "b": nodes[1].url}
    finally:
        for node in nodes:
            node.kill()


def test_sharded_client_routes_each_tenant_to_its_group(groups: dict[str, str]) -> None:
    tenants = [f"shop-{i}" for i in range(12)]
    with ShardedClient(groups) as sharded:
        for t in tenants:
            sharded.create_tenant(t)
            sharded.store(key="greeting", response=f"hello {t}", tenant=t)
        for t in tenants:
            found = sharded.lookup(key="greeting", tenant=t)
            assert found.entry is not None and found.entry.response_text == f"hello {t}"
        homes = {t: sharded.ring.group_of(t) for t in tenants}
        assert set(homes.values()) == {"a", "b"}
        for t in tenants:  # each tenant exists on its own group only
            other = sharded.clients["b" if homes[t] == "a" else "a"]
            assert t not in {v["tenant"] for v in other.list_tenants()}
        with pytest.raises(ValueError, match="tenant"):
            sharded.lookup(key="greeting")


def test_async_sharded_client(groups: dict[str, str]) -> None:
    async def scenario() -> None:
        async with AsyncShardedClient(groups) as sharded:
            tenants = [f"async-{i}" for i in range(6)]
            await asyncio.gather(*(sharded.create_tenant(t) for t in tenants))
            await asyncio.gather(*(sharded.store(key="k", response=t, tenant=t) for t in tenants))
            found = await asyncio.gather(*(sharded.lookup(key="k", tenant=t) for t in tenants))
            assert [f.entry.response_text for f in found if f.entry] == tenants

    asyncio.run(scenario())
