"""Single-flight: concurrent calls with the same key share one execution.

The first caller of :meth:`SingleFlight.do` for a key (the *leader*) starts ``fn()`` as a task;
callers arriving while it runs (*followers*) await the same task instead of starting their own.
Everyone gets the same result, or the same exception. The key is released as soon as the task
finishes, so a later call starts a new execution (nothing is cached here).

The task is shielded: a caller that is cancelled stops waiting, but the execution goes on for
the others (and for whatever ``fn`` does besides returning, such as storing its result).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Key → the one in-flight execution of that key. For one event loop; not thread-safe."""

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        """How many keys are in flight."""
        return len(self._flights)

    def __contains__(self, key: K) -> bool:
        """Whether ``key`` is in flight: a :meth:`do` now would join it."""
        return key in self._flights

    async def do(self, key: K, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``fn()``'s result and whether it was shared: ``False`` for the leader (``fn`` ran
        for this call), ``True`` for a follower (``fn`` is not called). Exceptions of ``fn``
        propagate to the leader and every follower."""
        flight = self._flights.get(key)
        if flight is not None:
            return await asyncio.shield(flight), True
        task = asyncio.ensure_future(fn())
        self._flights[key] = task
        task.add_done_callback(lambda done: self._land(key, done))
        return await asyncio.shield(task), False

    def _land(self, key: K, task: asyncio.Future[T]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            # Mark the exception retrieved: when every caller was cancelled nobody awaits it.
            task.exception()
