"""Workloads: what the client processes do, what they read at the end, and how it is judged.

- ``register``: kv entries as registers (``k0``..``kN``): ``write`` stores a unique value,
  ``read`` looks the key up at the run's consistency level. Judged by linearizability (WGL)
  and stale-read bounds.
- ``set``: each add stores a unique key once, retried with the same ``request_id`` on the next
  node until acknowledged (a few tries, then ``info``). At the end every node lists its
  entries. Judged by lost acknowledged adds, duplicates from retries, unexpected entries.
- ``cache``: stores with a short TTL or none, and invalidations by tag. At the end, once the
  short TTL has passed everywhere, every node answers every key: nodes must agree, short-TTL
  entries must be gone, long ones present unless invalidated.

Client process ``p`` talks to node ``p mod n`` (as in Jepsen), so a partitioned node keeps its
clients and what it answers them is recorded.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import urllib.error
import uuid
from typing import Any

from jepsen_like.history import History
from jepsen_like.nodes import Cluster, Node

OP_TIMEOUT_S = 5.0
CONSISTENCY = ("stale", "leader", "linearizable")


def classify_error(exc: BaseException) -> str:
    """``fail`` when the request was certainly never received (connection refused), else
    ``info``: a timeout or a reset may come after the node took the request."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return "fail" if isinstance(reason, ConnectionRefusedError) else "info"


class Workload:
    name = "abstract"

    def __init__(self, cluster: Cluster, history: History, seed: int, consistency: str) -> None:
        self.cluster = cluster
        self.history = history
        self.rng = random.Random(seed)
        self.consistency = consistency
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        self.final: dict[str, Any] = {}

    def node_for(self, process: int) -> Node:
        members = self.cluster.members
        return members[process % len(members)]

    def step(self, process: int, rng: random.Random) -> None:
        raise NotImplementedError

    def final_reads(self) -> None:
        """After healing: read what the checkers need from every node into ``final``."""

    def store(self, node: Node, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """One store: ``(ok|fail|info, answer)``."""
        try:
            code, _, answer = node.request("POST", "/v1/cache/store", body, OP_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            return classify_error(exc), {"error": type(exc).__name__}
        if code == 201:
            return "ok", answer
        error = answer.get("error") if isinstance(answer, dict) else str(code)
        return ("fail" if 400 <= code < 500 else "info"), {"error": error, "status": code}

    def lookup(self, node: Node, key: str, consistency: str) -> tuple[str, dict[str, Any]]:
        body = {"key": key, "consistency": consistency}
        try:
            code, _, answer = node.request("POST", "/v1/cache/lookup", body, OP_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            return "fail", {"error": type(exc).__name__}
        if code != 200:
            error = answer.get("error", {}).get("code") if isinstance(answer, dict) else code
            return "fail", {"error": error, "status": code}
        entry = answer.get("entry")
        if entry is None:
            return "ok", {"value": None, "id": None}
        return "ok", {"value": entry["response"], "id": entry["id"]}


class Register(Workload):
    name = "register"
    keys = 5

    def step(self, process: int, rng: random.Random) -> None:
        node = self.node_for(process)
        key = f"r{rng.randrange(self.keys)}"
        if rng.random() < 0.5:
            value = f"{process}-{next(self.counter)}"
            seq = self.history.invoke(process, "write", key, value, node.name)
            body = {"key": key, "response": value, "ttl_s": 0, "request_id": uuid.uuid4().hex}
            kind, answer = self.store(node, body)
            self.history.complete(seq, kind, value, id=answer.get("id"), error=answer.get("error"))
        else:
            seq = self.history.invoke(process, "read", key, None, node.name)
            kind, answer = self.lookup(node, key, self.consistency)
            self.history.complete(
                seq, kind, answer.get("value"), id=answer.get("id"), error=answer.get("error")
            )


class SetWorkload(Workload):
    name = "set"
    tries = 4

    def step(self, process: int, rng: random.Random) -> None:
        key = f"s{next(self.counter)}"
        seq = self.history.invoke(process, "add", key, key, self.node_for(process).name)
        body = {"key": key, "response": key, "ttl_s": 0, "request_id": uuid.uuid4().hex}
        kind, uncertain = "fail", False
        answer: dict[str, Any] = {}
        members = self.cluster.members
        for attempt in range(self.tries):
            node = members[(process + attempt) % len(members)]
            kind, answer = self.store(node, body)
            if kind == "ok" or (kind == "fail" and "status" in answer):
                break  # acknowledged, or refused as invalid (a 4xx)
            uncertain = uncertain or kind == "info"
            time.sleep(0.2)
        if kind != "ok" and uncertain:
            kind = "info"  # an earlier try may have landed
        self.history.complete(
            seq, kind, key, id=answer.get("id"), duplicate_of=answer.get("duplicate_of")
        )

    def final_reads(self) -> None:
        for node in self.cluster.members:
            entries: dict[str, int] = {}
            cursor = 0
            for _ in range(1000):  # pages of 1000; bounded
                path = f"/v1/cache/entries?kind=kv&limit=1000&cursor={cursor}"
                code, _, body = node.request("GET", path, timeout=30)
                if code != 200:
                    raise RuntimeError(f"listing entries on {node.name}: {code} {body}")
                entries.update({e["key"]: e["id"] for e in body["entries"]})
                if not body.get("next_cursor"):
                    break
                cursor = body["next_cursor"]
            self.final[node.name] = entries


class CacheWorkload(Workload):
    """Short-TTL and long-lived entries, tags, invalidations."""

    name = "cache"
    short_ttl_s = 3

    def step(self, process: int, rng: random.Random) -> None:
        node = self.node_for(process)
        n = next(self.counter)
        if rng.random() < 0.1 and n > 10:
            tag = f"t{rng.randrange(5)}"
            seq = self.history.invoke(process, "invalidate", None, tag, node.name)
            filter_ = {"tags": [tag], "request_id": uuid.uuid4().hex}
            try:
                code, _, body = node.request("POST", "/v1/cache/invalidate", filter_, OP_TIMEOUT_S)
                kind = "ok" if code == 200 else ("fail" if 400 <= code < 500 else "info")
                error = (
                    None
                    if code == 200
                    else (body.get("error", {}) if isinstance(body, dict) else code)
                )
            except (OSError, ValueError) as exc:
                kind, error = classify_error(exc), type(exc).__name__
            self.history.complete(seq, kind, tag, error=error)
            return
        ttl = self.short_ttl_s if rng.random() < 0.5 else 0
        key, tag = f"c{n}", f"t{rng.randrange(5)}"
        seq = self.history.invoke(process, "put", key, {"ttl_s": ttl, "tag": tag}, node.name)
        put: dict[str, Any] = {"key": key, "response": key, "ttl_s": ttl, "tags": [tag]}
        kind, answer = self.store(node, put | {"request_id": uuid.uuid4().hex})
        self.history.complete(
            seq, kind, {"ttl_s": ttl, "tag": tag}, id=answer.get("id"), error=answer.get("error")
        )

    def final_reads(self) -> None:
        self.final["ttl_probe"] = self.ttl_probe()
        time.sleep(self.short_ttl_s * 1.2 + 1)  # every short TTL has passed, jitter included
        keys = sorted({str(e["key"]) for e in self.history.events if e.get("f") == "put"})
        for node in self.cluster.members:
            seen: dict[str, bool] = {}
            for key in keys:
                kind, answer = self.lookup(node, key, "stale")
                if kind != "ok":
                    raise RuntimeError(f"final read of {key} on {node.name}: {answer}")
                seen[key] = answer["value"] is not None
            self.final[node.name] = seen

    def ttl_probe(self) -> dict[str, Any]:
        """An entry with a 2 s TTL stored on the leader, read on every node 3 s later (after
        each applied it): expired for every client, whatever the reading node's clock."""
        leader = self.cluster.leader()
        if leader is None:
            return {"error": "no leader"}
        body = {"key": "ttl-probe", "response": "p", "ttl_s": 2}
        code, _, answer = leader.request("POST", "/v1/cache/store", body, OP_TIMEOUT_S)
        if code != 201:
            return {"error": f"probe store: {code} {answer}"}
        time.sleep(3.0)
        seen: dict[str, Any] = {}
        for node in self.cluster.members:
            read = {"key": "ttl-probe", "min_index": answer["index"]}
            code, _, found = node.request("POST", "/v1/cache/lookup", read, OP_TIMEOUT_S)
            seen[node.name] = found.get("status") if code == 200 else code
        return seen


WORKLOADS: dict[str, type[Workload]] = {
    "register": Register,
    "set": SetWorkload,
    "cache": CacheWorkload,
}


def client_loop(
    workload: Workload, process: int, stop: threading.Event, seed: int, pace_s: float
) -> None:
    """One client process: operations until ``stop``, ``pace_s`` apart."""
    rng = random.Random(seed * 1000 + process)
    while not stop.is_set():
        workload.step(process, rng)  # records its own outcome; an invocation left open is info
        stop.wait(pace_s)
