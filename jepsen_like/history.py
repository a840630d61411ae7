"""The history of a run: every client operation as an ``invoke`` event and its completion
(``ok``, ``fail``, or ``info`` when the outcome is unknown), plus nemesis events, with
monotonic times in seconds since the run began. Saved as JSON lines, one event a line.

``fail`` means the operation certainly did not happen (refused before it was sent, or
rejected as invalid); ``info`` means it may or may not have happened (a timeout, a reset
connection, a 5xx after the request was sent). Checkers must treat ``info`` writes as
possibly applied at any time after their invocation, or never.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Op:
    """A client operation paired from its two events. ``ret`` is ``math.inf`` for ``info``."""

    process: int
    f: str
    key: str | None
    value: Any
    call: float
    ret: float
    type: str
    node: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class History:
    """Thread-safe event log of one run."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _add(self, event: dict[str, Any], at: float | None = None) -> dict[str, Any]:
        with self._lock:
            event["time"] = self.now() if at is None else at
            event["seq"] = len(self.events)
            self.events.append(event)
        return event

    def invoke(self, process: int, f: str, key: str | None, value: Any, node: str) -> int:
        """Record an invocation; its ``seq``, to pass to :meth:`complete`."""
        event = {"type": "invoke", "process": process, "f": f, "key": key, "value": value}
        return int(self._add(event | {"node": node})["seq"])

    def complete(self, seq: int, type_: str, value: Any = None, **extra: Any) -> None:
        invoke = self.events[seq]
        self._add(
            {
                "type": type_,
                "process": invoke["process"],
                "f": invoke["f"],
                "key": invoke["key"],
                "value": value,
                "invoke": seq,
                **extra,
            }
        )

    def nemesis(self, phase: str, name: str, detail: str = "", at: float | None = None) -> None:
        """A fault starting or being healed ``at`` (run time; default now)."""
        self._add({"type": "nemesis", "phase": phase, "name": name, "detail": detail}, at)

    def save(self, path: Path) -> None:
        with path.open("w") as out:
            for event in self.events:
                out.write(json.dumps(event, default=str) + "\n")


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pair(events: list[dict[str, Any]]) -> list[Op]:
    """Client operations from events; an invocation never completed counts as ``info``."""
    done = {e["invoke"]: e for e in events if e["type"] in ("ok", "fail", "info")}
    ops: list[Op] = []
    for event in events:
        if event["type"] != "invoke":
            continue
        end = done.get(event["seq"])
        kind = end["type"] if end else "info"
        extra = {k: v for k, v in (end or {}).items() if k not in _BASE}
        ops.append(
            Op(
                process=event["process"],
                f=event["f"],
                key=event["key"],
                value=end["value"]
                if end and kind == "ok" and event["f"] != "write"
                else event["value"],
                call=event["time"],
                ret=end["time"] if end and kind != "info" else math.inf,
                type=kind,
                node=event.get("node", ""),
                extra=extra,
            )
        )
    return ops


_BASE = {"type", "process", "f", "key", "value", "invoke", "time", "seq"}


def windows(events: list[dict[str, Any]], end: float) -> list[tuple[float, float, str]]:
    """Fault windows ``(start, stop, name)``; one never stopped lasts until ``end``."""
    open_: dict[str, float] = {}
    out: list[tuple[float, float, str]] = []
    for event in events:
        if event["type"] != "nemesis":
            continue
        if event["phase"] == "start":
            open_[event["name"]] = event["time"]
        elif event["name"] in open_:
            out.append((open_.pop(event["name"]), event["time"], event["name"]))
    out += [(start, end, name) for name, start in open_.items()]
    return sorted(out)
