"""Checkers: each takes the paired operations (and what the final reads found) and returns a
``dict`` with ``valid`` (True, False, or None for unknown) and the evidence.

- :func:`linearizable`: per key (registers compose), :mod:`jepsen_like.wgl`.
- :func:`stale_reads`: how far behind a read was: the time since the earliest acknowledged
  write of a newer value (newer = a higher entry id; ids come from a counter the state
  machine increments in log order) had returned when the read was called.
- :func:`set_checker`: lost acknowledged adds, duplicates from retries, unexpected entries.
- :func:`availability`: longest gap between acknowledged writes, and per fault the time from
  its start to the next acknowledged write (failover).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

from jepsen_like import wgl
from jepsen_like.history import Op


def linearizable(ops: list[Op], max_steps: int = 2_000_000) -> dict[str, Any]:
    by_key: dict[str, list[wgl.RegOp]] = defaultdict(list)
    for op in ops:
        if op.key is None or op.f not in ("write", "read") or op.type == "fail":
            continue
        if op.f == "read" and op.type != "ok":
            continue  # a read without a result tells nothing
        by_key[op.key].append(wgl.RegOp(op.f, op.value, op.call, op.ret))
    bad: list[str] = []
    unknown: list[str] = []
    for key, history in sorted(by_key.items()):
        verdict = wgl.check(history, None, max_steps)
        if verdict is False:
            bad.append(key)
        elif verdict is None:
            unknown.append(key)
    valid = False if bad else (None if unknown else True)
    return {"valid": valid, "keys": len(by_key), "non_linearizable_keys": bad, "unknown": unknown}


def stale_reads(ops: list[Op], bound_s: float | None) -> dict[str, Any]:
    """``valid`` when no read was staler than ``bound_s`` (always valid when None: report)."""
    acked: dict[str, list[tuple[int, float]]] = defaultdict(list)  # key -> (entry id, ret)
    for op in ops:
        if op.f == "write" and op.type == "ok" and op.extra.get("id") is not None:
            acked[str(op.key)].append((int(op.extra["id"]), op.ret))
    worst, stale, reads = 0.0, 0, 0
    example: dict[str, Any] | None = None
    for op in ops:
        if op.f != "read" or op.type != "ok":
            continue
        reads += 1
        seen = int(op.extra.get("id") or 0)
        newer = [ret for id_, ret in acked[str(op.key)] if id_ > seen and ret < op.call]
        if newer:
            lag = op.call - min(newer)
            stale += 1
            if lag > worst:
                worst = lag
                example = {"key": op.key, "node": op.node, "read_at": op.call, "value": op.value}
    valid = True if bound_s is None else worst <= bound_s
    return {
        "valid": valid,
        "reads": reads,
        "stale_reads": stale,
        "max_staleness_s": round(worst, 3),
        "bound_s": bound_s,
        "worst": example,
    }


def set_checker(ops: list[Op], final: dict[str, dict[str, int]]) -> dict[str, Any]:
    """``final``: node → {key: entry id} read on every node after healing."""
    added = {str(op.key): op for op in ops if op.f == "add"}
    acked = {k: op for k, op in added.items() if op.type == "ok"}
    lost: dict[str, list[str]] = {}
    duplicated: list[str] = []
    unexpected: dict[str, list[str]] = {}
    for node, entries in final.items():
        missing = sorted(k for k in acked if k not in entries)
        if missing:
            lost[node] = missing
        extra = sorted(k for k in entries if k not in added)
        if extra:
            unexpected[node] = extra
        for key, op in acked.items():
            # A retry applied a second time would have replaced the entry under a new id.
            if key in entries and entries[key] != op.extra.get("id"):
                duplicated.append(f"{node}:{key}")
    deduped = sum(1 for op in acked.values() if op.extra.get("duplicate_of") is not None)
    return {
        "valid": not lost and not duplicated and not unexpected,
        "attempted": len(added),
        "acknowledged": len(acked),
        "unknown_outcome": sum(1 for op in added.values() if op.type == "info"),
        "lost": {n: keys[:20] for n, keys in lost.items()},
        "lost_count": sum(len(v) for v in lost.values()),
        "duplicated": duplicated[:20],
        "unexpected": unexpected,
        "retries_deduplicated": deduped,
    }


def availability(
    ops: list[Op],
    faults: list[tuple[float, float, str]],
    end: float,
    max_gap_s: float | None = None,
) -> dict[str, Any]:
    """Longest stretch without an acknowledged write; ``valid`` when under ``max_gap_s``."""
    writes = [op for op in ops if op.f in ("write", "add", "put") and op.type == "ok"]
    times = sorted(op.ret for op in writes)
    start = min((op.call for op in ops), default=0.0)
    points = [start, *times, end]
    gap = max((b - a for a, b in itertools.pairwise(points)), default=0.0)
    failover = []
    for begin, _, name in faults:
        after = [t for t in times if t >= begin]
        failover.append(
            {
                "fault": name,
                "at": round(begin, 3),
                "next_ack_s": round(after[0] - begin, 3) if after else None,
            }
        )
    return {
        "valid": True if max_gap_s is None else gap < max_gap_s,
        "acknowledged_writes": len(times),
        "max_write_gap_s": round(gap, 3),
        "bound_s": max_gap_s,
        "failover": failover,
    }


def summarize(ops: list[Op]) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for op in ops:
        counts[op.f][op.type] += 1
    lat = sorted(op.ret - op.call for op in ops if op.type == "ok" and op.ret != math.inf)
    p = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) if lat else None
    return {
        "ops": {f: dict(c) for f, c in counts.items()},
        "latency_ms": {"p50": p(0.5), "p99": p(0.99), "max": p(1.0)} if p else None,
    }


def cache_checker(ops: list[Op], final: dict[str, Any]) -> dict[str, Any]:
    """``final``: node → {key: present} read once every short TTL had passed. Nodes must
    agree; a short-TTL entry must be gone; an acknowledged long-lived entry whose tag no
    invalidation (possibly) touched after it was stored must be present. ``final["ttl_probe"]``
    (node → lookup status of an entry read 1 s after it expired) must be all ``MISS``."""
    final = dict(final)
    probe = final.pop("ttl_probe", None)
    puts = {str(op.key): op for op in ops if op.f == "put"}
    invalidations = [op for op in ops if op.f == "invalidate" and op.type != "fail"]
    disagree: list[str] = []
    expired_seen: list[str] = []
    lost: list[str] = []
    for key, op in puts.items():
        answers = {node: seen.get(key) for node, seen in final.items()}
        if len(set(answers.values())) > 1:
            disagree.append(f"{key}: {answers}")
        present = any(answers.values())
        if op.value["ttl_s"] and present:
            expired_seen.append(key)
        touched = any(inv.value == op.value["tag"] and inv.ret > op.call for inv in invalidations)
        if op.type == "ok" and not op.value["ttl_s"] and not touched and not present:
            lost.append(key)
    probe_ok = probe is None or set(probe.values()) == {"MISS"}
    return {
        "valid": not disagree and not expired_seen and not lost and probe_ok,
        "ttl_probe": probe,
        "puts": len(puts),
        "nodes_disagree": disagree[:20],
        "expired_but_present": expired_seen[:20],
        "lost": lost[:20],
    }
