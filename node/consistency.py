"""Read consistency levels of lookups: what a node must know before it answers from its store.

- ``stale`` (default): read this node's store as it is. With ``max_staleness_ms`` the read is
  refused (:class:`StaleRead`, 503) when this node's *staleness* exceeds it. Staleness, as
  measured by :meth:`Reads.staleness_ms` at the moment of the read: 0 when this node is caught
  up, i.e. it knows a leader (it is the leader with a quorum, or a follower connected to the
  leader) and its applied index has reached the commit index raft-core reports; otherwise the
  time since this worker last observed it caught up (infinite if never). The commit index a
  follower knows is the leader's as of its last append-entries, so "caught up" may lag the
  leader by one heartbeat; a worker observes only when a bounded read asks, so the measure
  errs toward larger staleness (more refusals), never smaller.
- ``leader``: answered only by a node that believes it leads; a follower forwards the lookup to
  the leader (or answers 307 with ``redirect=1``). Leadership may have moved a moment ago:
  this is "the leader's view", not a linearizable read.
- ``linearizable``: a :class:`~llmcache.cluster.commands.Noop` barrier through the leader's log,
  then a local read once this node applied the barrier: the read sees every write acknowledged
  before the lookup began. Concurrent readers share barriers (:class:`SharedBarrier`).
- ``min_index``: wait (bounded) until this node applied at least that log index, else 503:
  read-your-writes across nodes with the ``X-LLMCache-Index`` of a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from llmcache.cluster import commands
from llmcache.node.errors import CacheError
from llmcache.node.proposer import Proposal, Proposer, RaftStatus
from llmcache.node.store import Store

CONSISTENCY = ("stale", "leader", "linearizable")
READ_WAIT_S = 10.0
"""Bound on a read's wait for a barrier or for ``min_index`` to be applied here."""

APPLY_POLL_S = 0.005
HEDGE_S = 1.0
"""How long a barrier may be in flight before the next one starts beside it (a healthy
barrier takes milliseconds; one sent to a lost leader waits out its whole timeout)."""

BarrierFn = Callable[[float], Awaitable[Proposal]]


async def wait_applied(store: Store, index: int, timeout: float) -> bool:
    """Poll until this node's store has applied ``index``; False when ``timeout`` ran out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while store.applied_index() < index:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(APPLY_POLL_S)
    return True


class StaleRead(CacheError):
    """This node cannot answer at the requested consistency in time; retry (maybe elsewhere)."""

    code = "stale_read"
    http_status = 503


class SharedBarrier:
    """Barriers shared by concurrent readers.

    A reader that arrives while a barrier is in flight waits for the *next* one, because the
    current one may have been committed before the reader's write was acknowledged. All
    readers that arrive before the next one starts share it. The next one starts when the
    current one ends, or once the current one has been in flight ``hedge_s``, whichever is
    first: a barrier stuck on a leader that is gone (it waits out its whole timeout) must not
    hold back readers once a new leader answers. So rounds may overlap, at most about
    ``timeout / hedge_s`` at once, and each reader still gets a barrier that began after it
    arrived.
    """

    def __init__(
        self, barrier: BarrierFn, timeout: float = READ_WAIT_S, hedge_s: float = HEDGE_S
    ) -> None:
        self._barrier = barrier
        self._timeout = timeout
        self._hedge_s = hedge_s
        self._pending: asyncio.Future[int] | None = None
        """The round that arriving readers join; not started yet."""
        self._last: asyncio.Task[None] | None = None
        self._last_started = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.rounds = 0
        """Barriers proposed so far (observable sharing)."""

    async def index(self, timeout: float) -> int:
        """The log index of a barrier that started after this call; raises the barrier's
        error, or :class:`StaleRead` when ``timeout`` runs out first."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._round(self._pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        future = self._pending
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise StaleRead(f"no read barrier completed within {timeout:.1f} s") from None

    async def _round(self, future: asyncio.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        if self._last is not None and not self._last.done():
            delay = self._last_started + self._hedge_s - loop.time()
            if delay > 0:
                await asyncio.wait({self._last}, timeout=delay)
        self._pending = None  # readers arriving from now on need a later barrier
        self._last, self._last_started = asyncio.current_task(), loop.time()
        self.rounds += 1
        try:
            future.set_result((await self._barrier(self._timeout)).index)
        except Exception as exc:
            future.set_exception(exc)
            future.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a failed barrier's error as seen even when every waiter had given up."""
    with contextlib.suppress(asyncio.CancelledError):
        future.exception()


class Reads:
    """The consistency checks of one worker (see the module docstring for their guarantees)."""

    def __init__(self, proposer: Proposer, store: Store) -> None:
        self.proposer = proposer
        self.store = store
        barrier: BarrierFn | None = getattr(proposer, "barrier", None)
        self.barrier = SharedBarrier(barrier or self._noop)
        self._caught_up_at: float | None = None

    async def _noop(self, timeout: float) -> Proposal:
        return await self.proposer.propose(commands.Noop(), wait="applied", timeout=timeout)

    async def staleness_ms(self) -> tuple[float, RaftStatus]:
        status = await self.proposer.status()
        now = time.monotonic()
        leader_known = (status.role == "leader" and status.has_quorum) or (
            status.leader is not None
            and bool(status.peers.get(status.leader, {}).get("connected", False))
        )
        if leader_known and self.store.applied_index() >= status.commit_index:
            self._caught_up_at = now
        if self._caught_up_at is None:
            return float("inf"), status
        return (now - self._caught_up_at) * 1000, status

    async def bounded_staleness(self, max_ms: float) -> RaftStatus:
        staleness, status = await self.staleness_ms()
        if staleness > max_ms:
            raise StaleRead(
                f"this node's data may be {staleness:.0f} ms stale (max_staleness_ms {max_ms:g})",
                field="max_staleness_ms",
            )
        return status

    async def linearizable(self, timeout: float = READ_WAIT_S) -> int:
        """Return once this node applied a barrier that began after the call; its index."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = await self.barrier.index(timeout)
        await self.min_index(index, max(0.0, deadline - loop.time()))
        return index

    async def min_index(self, index: int, timeout: float = READ_WAIT_S) -> None:
        if not await wait_applied(self.store, index, timeout):
            raise StaleRead(
                f"this node has applied {self.store.applied_index()} < {index} after "
                f"{timeout:.1f} s",
                field="min_index",
            )
