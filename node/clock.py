"""The group's clock, as every node of a Raft group reads it.

Time decides which entries have expired. The design has it decided once, by the leader, and
carried in the log: raft-core on the leader restamps every proposal with its own wall clock
(:func:`llmcache.cluster.commands.rebase`), the state machine keeps the latest stamp applied
(``Store.last_ts_ms``; after a change of leader the new leader's clock takes over), and the
leader appends a stamped ``Noop`` when its clock and this estimate are a second apart (a new
leader after one whose clock differed) or no stamp came for ten minutes
(``maintenance.IDLE_STAMP_MS``).
:class:`ClusterClock` reads that stamp plus the monotonic time since this process saw it
change, so a node whose own clock is an hour off still agrees with the group on what has
expired. That estimate runs behind the leader's clock by the time between an apply and this
process noticing it (``follow`` polls every 0.1 s), so a local clock that agrees with it within
``AGREE_S`` (1 s) is used as it is; before any stamp exists it is the local wall clock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

FOLLOW_PERIOD_S = 0.1
AGREE_S = 1.0
"""A local clock within this of the group's is used as it is: it has no lag."""


class ClusterClock:
    """``clock()`` → seconds since the epoch on the group's clock (like ``time.time``).

    ``last_stamp_ms`` reads the log's latest leader stamp (``Store.last_ts_ms``: one key in a
    read transaction per call). Thread-safe.
    """

    def __init__(
        self,
        last_stamp_ms: Callable[[], int],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.last_stamp_ms = last_stamp_ms
        self.monotonic = monotonic
        self.wall = wall
        self._lock = threading.Lock()
        self._stamp_ms = 0
        self._seen = 0.0

    @property
    def stamped(self) -> bool:
        """Whether the log held a leader stamp at the last call."""
        return self._stamp_ms != 0

    def __call__(self) -> float:
        stamp_ms = self.last_stamp_ms()
        now = self.monotonic()
        with self._lock:
            if stamp_ms != self._stamp_ms:
                self._stamp_ms, self._seen = stamp_ms, now
            seen = self._seen
        wall = self.wall()
        if not stamp_ms:
            return wall
        anchored = stamp_ms / 1000 + (now - seen)
        return wall if abs(wall - anchored) <= AGREE_S else anchored

    async def follow(self) -> None:
        """Notice new stamps promptly (the clock is behind by the time one goes unnoticed);
        runs until cancelled."""
        while True:
            self()
            await asyncio.sleep(FOLLOW_PERIOD_S)
