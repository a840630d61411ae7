"""Linearizability of one register: the Wing & Gong search with Lowe's memoisation (WGL), as
in Knossos and Porcupine. No maintained Python checker exists on PyPI, hence this one.

A history is a list of :class:`RegOp`: ``write(v)`` or ``read() -> v`` (``None`` = absent),
each with its call and return times. An ``info`` write (unknown outcome) has ``ret =
math.inf``: it may take effect at any point after its call, or never. Failed operations and
reads without a result must be left out by the caller (they did not happen / tell nothing).

:func:`check` answers True when some total order of the operations respects real time (an
operation that returned before another was called comes first), explains every read by the
latest write before it, and contains every completed operation (``info`` ones optionally);
False when none does; None when the search exceeded ``max_steps`` (unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RegOp:
    f: str  # "write" or "read"
    value: Any
    call: float
    ret: float


class _Entry:
    """A call or return event in the doubly linked list the search lifts entries out of."""

    __slots__ = ("id", "is_call", "match", "next", "op", "prev")

    def __init__(self, op: RegOp | None, id_: int, is_call: bool) -> None:
        self.op = op
        self.id = id_
        self.is_call = is_call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _lift(entry: _Entry) -> None:
    assert entry.prev is not None and entry.match is not None and entry.match.prev is not None
    entry.prev.next = entry.next
    if entry.next is not None:
        entry.next.prev = entry.prev
    match = entry.match
    match.prev.next = match.next  # type: ignore[union-attr]
    if match.next is not None:
        match.next.prev = match.prev


def _unlift(entry: _Entry) -> None:
    match = entry.match
    assert match is not None and match.prev is not None and entry.prev is not None
    match.prev.next = match
    if match.next is not None:
        match.next.prev = match
    entry.prev.next = entry
    if entry.next is not None:
        entry.next.prev = entry


def prune(ops: list[RegOp]) -> list[RegOp]:
    """Drop ``info`` writes whose value no read returned: leaving such a write out never turns
    a linearizable history into one that is not (no read depends on it), and each dropped
    write halves the search space."""
    seen = {op.value for op in ops if op.f == "read"}
    return [
        op for op in ops if not (op.f == "write" and op.ret == math.inf and op.value not in seen)
    ]


def check(ops: list[RegOp], initial: Any = None, max_steps: int = 2_000_000) -> bool | None:
    """Is this register history linearizable? See the module docstring."""
    ops = prune(ops)
    events: list[tuple[float, int, int, bool]] = []
    for i, given in enumerate(ops):
        if given.ret < given.call:
            raise ValueError(f"operation {i} returns before it is called")
        events.append((given.call, 0, i, True))  # calls before returns at equal times
        events.append((given.ret, 1, i, False))
    events.sort()
    head = _Entry(None, -1, False)
    calls: dict[int, _Entry] = {}
    last = head
    for _, _, i, is_call in events:
        made = _Entry(ops[i], i, is_call)
        if is_call:
            calls[i] = made
        else:
            made.match = calls[i]
            calls[i].match = made
        made.prev, last.next = last, made
        last = made

    state, linearized = initial, 0
    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[_Entry, Any]] = []
    entry: _Entry | None = head.next
    for _ in range(max_steps):
        if entry is None or (
            not entry.is_call and entry.op is not None and entry.op.ret == math.inf
        ):
            return True  # only info operations remain: they may never have happened
        op = entry.op
        assert op is not None
        if entry.is_call:
            new_state = op.value if op.f == "write" else state
            legal = op.f == "write" or op.value == state
            key = (linearized | (1 << entry.id), new_state)
            if legal and key not in cache:
                cache.add(key)
                stack.append((entry, state))
                state, linearized = new_state, key[0]
                _lift(entry)
                entry = head.next
            else:
                entry = entry.next
        else:  # an operation returned before we could place it: undo the last choice
            if not stack:
                return False
            undone, state = stack.pop()
            linearized &= ~(1 << undone.id)
            _unlift(undone)
            entry = undone.next
    return None
