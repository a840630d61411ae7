"""Leader maintenance: access statistics into the log, TTL purge and eviction (DESIGN.md §4).

raft-core runs :func:`run` in its asyncio loop. Every period, on every node, the access
statistics its workers reported (:class:`AccessBuffer`) become :class:`~.commands.Touch`
commands, so every replica holds the same statistics. Then, **only on the leader** (re-checked
every period, so a new leader takes over within one period):

- expiry: ids whose ``expires_at_ms`` passed are proposed as ``Expire(ids, ts_ms=now)``, in
  batches of :data:`BATCH` while full batches come back (at most :data:`MAX_BATCHES`);
- eviction: for each tenant whose config sets ``max_entries`` and/or ``max_bytes`` and that is
  over either, victims are chosen by its ``eviction`` policy (:data:`POLICIES`) until it is
  within capacity (at most :data:`BATCH` per tenant and period) and proposed as ``Evict(ids)``.

Victims are chosen from replicated state only (entries and the ``access`` db in LMDB), so the
choice is reproducible, and after a barrier through the log, so a new leader that has not yet
applied its predecessor's evictions does not evict again. Replicas never evict on their own:
their ``Evict`` and ``Expire`` come from the log.

Touch delivery is best effort: a follower hands its ``Touch`` to pysyncobj, which forwards it to
the leader (callbacks of forwarded entries can be lost, so nothing waits for them); while no
leader is known pysyncobj refuses it and those statistics are dropped. Lost statistics only make
the next victim choice less informed; they never make replicas diverge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from llmcache.cluster import commands as c
from llmcache.node.clock import ClusterClock
from llmcache.node.proposer import Proposal, RaftStatus, Wait
from llmcache.node.store import Store, from_u64, join

log = logging.getLogger("llmcache.raft.maintenance")
BATCH = 256
"""Ids per ``Expire`` / ``Evict`` command."""
MAX_BATCHES = 16
"""``Expire`` commands per period: bounded work, the rest waits for the next period."""
MAX_BUFFERED_IDS = 100_000
"""Distinct ids a node buffers between two flushes; reports of further ids are dropped."""
PROPOSE_TIMEOUT_S = 10.0
CLOCK_AGREE_MS = 1000
"""The leader stamps the log (a `Noop`) at once when the group's clock (node/clock.py) is this
far from its own: a new leader after one whose clock differed."""
IDLE_STAMP_MS = 600_000
"""...and when no stamp came for this long, so that a process starting on a node with a skewed
clock finds a recent one. Rare, because any entry lets log compaction rewrite the snapshot."""


@dataclass(frozen=True)
class Candidate:
    """What an eviction policy knows of one entry (all of it replicated)."""

    id: int
    size: int
    created_at_ms: int
    expires_at_ms: int
    hits: int
    last_hit_ms: int

    @property
    def last_used_ms(self) -> int:
        """The last hit, or the creation of an entry never hit."""
        return self.last_hit_ms or self.created_at_ms


VictimOrder = Callable[[Candidate], tuple[int, ...]]
"""A policy: the sort key of candidates, first evicted first. It ends with the id, so the order
is total and the same on every node."""


def lru(e: Candidate) -> tuple[int, ...]:
    """Least recently used first."""
    return (e.last_used_ms, e.id)


def lfu(e: Candidate) -> tuple[int, ...]:
    """Fewest hits first, then least recently used."""
    return (e.hits, e.last_used_ms, e.id)


def ttl_first(e: Candidate) -> tuple[int, ...]:
    """Soonest to expire first; entries without a TTL last (among them, least recently used)."""
    return (e.expires_at_ms == 0, e.expires_at_ms, e.last_used_ms, e.id)


POLICIES: dict[str, VictimOrder] = {
    "lru": lru,
    "lfu": lfu,
    "ttl": ttl_first,
    "ttl-first": ttl_first,
}
"""Policies by the name a tenant's ``eviction`` setting uses; unknown or absent means LRU."""


def choose_victims(
    candidates: Iterable[Candidate],
    order: VictimOrder,
    *,
    entries: int,
    size: int,
    max_entries: int | None,
    max_bytes: int | None,
    limit: int = BATCH,
) -> list[int]:
    """Ids to evict, in ``order``, until ``entries``/``size`` are within the maxima (None: no
    limit), or ``limit`` ids are chosen."""
    victims: list[int] = []
    for cand in sorted(candidates, key=order):
        within = (max_entries is None or entries <= max_entries) and (
            max_bytes is None or size <= max_bytes
        )
        if within or len(victims) >= limit:
            break
        victims.append(cand.id)
        entries -= 1
        size -= cand.size
    return victims


def tenant_candidates(store: Store, txn: Any, tenant: str) -> list[Candidate]:
    """Every entry of ``tenant`` with its replicated access statistics."""
    out = []
    for member in store.prefix(txn, "members", join(tenant, b"")):
        entry = store.entry(txn, from_u64(member[-8:]))
        if entry is None or entry.tenant != tenant:
            continue
        hits, last = store.access(txn, entry.id)
        out.append(
            Candidate(entry.id, entry.size, entry.created_at_ms, entry.expires_at_ms, hits, last)
        )
    return out


def evictions(store: Store, limit: int = BATCH) -> dict[str, list[int]]:
    """``{tenant: victims}`` for every tenant over its capacity, read in one transaction."""
    out: dict[str, list[int]] = {}
    with store.read() as txn:
        for tenant, config in store.tenants(txn):
            max_entries, max_bytes = config.get("max_entries"), config.get("max_bytes")
            if max_entries is None and max_bytes is None:
                continue
            stats = store.stats(txn, tenant)
            if (max_entries is None or stats["entries"] <= max_entries) and (
                max_bytes is None or stats["bytes"] <= max_bytes
            ):
                continue
            order = POLICIES.get(config.get("eviction") or "lru", lru)
            victims = choose_victims(
                tenant_candidates(store, txn, tenant),
                order,
                entries=stats["entries"],
                size=stats["bytes"],
                max_entries=max_entries,
                max_bytes=max_bytes,
                limit=limit,
            )
            if victims:
                out[tenant] = victims
    return out


def expiring(store: Store, now_ms: int, limit: int = BATCH) -> list[int]:
    with store.read() as txn:
        return store.expiring(txn, now_ms, limit)


class AccessBuffer:
    """Access reports of a node's workers, summed until the next flush. Bounded: once
    :data:`MAX_BUFFERED_IDS` ids wait, reports of other ids are dropped (and counted)."""

    def __init__(self, max_ids: int = MAX_BUFFERED_IDS) -> None:
        self.max_ids = max_ids
        self.dropped = 0
        self._rows: dict[int, list[int]] = {}

    def add(self, ids: Iterable[int], hits: Iterable[int], last_hit_ms: Iterable[int]) -> int:
        """Merge one report; returns how many of its ids were kept."""
        kept = 0
        for entry_id, n, last in zip(ids, hits, last_hit_ms, strict=True):
            row = self._rows.get(entry_id)
            if row is None:
                if len(self._rows) >= self.max_ids:
                    self.dropped += 1
                    continue
                row = self._rows[entry_id] = [0, 0]
            row[0] += n
            row[1] = max(row[1], last)
            kept += 1
        return kept

    def take(self) -> list[c.Touch]:
        """Everything buffered as ``Touch`` commands of at most ``MAX_TOUCH_IDS`` ids; empties
        the buffer."""
        rows, self._rows = sorted(self._rows.items()), {}
        return [
            c.Touch(
                ids=tuple(i for i, _ in chunk),
                hits=tuple(r[0] for _, r in chunk),
                last_hit_ms=tuple(r[1] for _, r in chunk),
                ts_ms=int(time.time() * 1000),
            )
            for chunk in (
                rows[k : k + c.MAX_TOUCH_IDS] for k in range(0, len(rows), c.MAX_TOUCH_IDS)
            )
        ]


class MaintainedCore(Protocol):
    """What maintenance needs of raft-core (implemented by ``raft_core.RaftCore``)."""

    access: AccessBuffer

    def status(self) -> RaftStatus: ...

    def read_store(self, fn: Callable[[Store], Any]) -> Any: ...

    async def propose(self, data: bytes, wait: Wait, timeout: float) -> Proposal: ...

    async def barrier(self, timeout: float) -> Proposal: ...

    def propose_forwarded(self, data: bytes) -> None: ...


async def maintain_once(
    core: MaintainedCore, now_ms: int, group_ms: int | None = None
) -> dict[str, int]:
    """One period's work (see the module docstring); returns counts of what was proposed."""
    done = {"touch": 0, "expire": 0, "evict": 0, "stamp": 0}
    leader = core.status().role == "leader"
    for touch in core.access.take():
        if leader:  # applied before victims are chosen from it
            await core.propose(c.encode(touch), "applied", PROPOSE_TIMEOUT_S)
        else:
            core.propose_forwarded(c.encode(touch))
        done["touch"] += len(touch.ids)
    if not leader:
        return done
    for _ in range(MAX_BATCHES):
        ids: list[int] = core.read_store(lambda s: expiring(s, now_ms))
        if ids:
            expire = c.Expire(ids=tuple(ids), ts_ms=now_ms)
            await core.propose(c.encode(expire), "applied", PROPOSE_TIMEOUT_S)
            done["expire"] += len(ids)
        if len(ids) < BATCH:
            break
    if core.read_store(evictions):
        # Choose from a store that applied everything committed so far: a new leader may not
        # have applied its predecessor's Evict yet and would pick more victims than needed.
        await core.barrier(PROPOSE_TIMEOUT_S)
        chosen: dict[str, list[int]] = core.read_store(evictions)
        for victims in chosen.values():
            evict = c.Evict(ids=tuple(victims), ts_ms=now_ms)
            await core.propose(c.encode(evict), "applied", PROPOSE_TIMEOUT_S)
            done["evict"] += len(victims)
    last = core.read_store(lambda s: s.last_ts_ms())
    apart = group_ms is not None and abs(now_ms - group_ms) >= CLOCK_AGREE_MS
    if apart or now_ms - last >= IDLE_STAMP_MS:
        await core.propose(c.encode(c.Noop(ts_ms=now_ms)), "applied", PROPOSE_TIMEOUT_S)
        done["stamp"] = 1
    return done


async def run(
    core: MaintainedCore, period_s: float, clock: Callable[[], float] = time.time
) -> None:
    """:func:`maintain_once` every ``period_s`` until cancelled; a failed period (leadership
    lost, a timeout) is logged and the next period starts over from the store."""
    group = ClusterClock(lambda: core.read_store(lambda s: s.last_ts_ms()), wall=clock)
    while True:
        # A leader whose clock and the group's are apart (no stamp yet, or a new leader after
        # one whose clock differed) stamps soon, not a whole period later.
        apart = abs(clock() - group()) * 1000 >= CLOCK_AGREE_MS
        soon = core.status().role == "leader" and apart
        await asyncio.sleep(min(period_s, 0.5) if soon or not group.stamped else period_s)
        try:
            done = await maintain_once(core, int(clock() * 1000), int(group() * 1000))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("maintenance period failed: %s", exc)
            continue
        if done["expire"] or done["evict"]:
            log.info("maintenance: expired %d, evicted %d", done["expire"], done["evict"])
