"""Reproductions of cluster bugs the fault harness found (each fixed in node/ or cluster/)."""

from __future__ import annotations

import asyncio

from llmcache.node.consistency import SharedBarrier
from llmcache.node.proposer import Proposal


def test_a_barrier_stuck_on_a_lost_leader_does_not_hold_back_later_readers() -> None:
    """Found by suite item 3 (isolated leader, linearizable reads): a barrier forwarded to the
    old leader hung until its 10 s timeout, and every reader arriving meanwhile waited for the
    *next* barrier, which only started after it, so linearizable reads stalled for 10-15 s
    after a new leader was elected. A later reader must get a barrier of its own."""

    async def scenario() -> None:
        lost_leader = asyncio.Event()  # never set: the first barrier never returns
        calls = 0

        async def barrier(timeout: float) -> Proposal:
            nonlocal calls
            calls += 1
            if calls == 1:
                await lost_leader.wait()
            return Proposal(index=100 + calls, term=2, leader="new")

        shared = SharedBarrier(barrier, timeout=600.0, hedge_s=0.05)
        stuck = asyncio.create_task(shared.index(600.0))
        await asyncio.sleep(0)  # the first barrier is in flight, towards the lost leader
        later = await asyncio.wait_for(shared.index(600.0), 60.0)
        assert later == 102 and not stuck.done()
        stuck.cancel()

    asyncio.run(scenario())
