"""A Raft group of real ``llmcache-node`` processes on 127.0.0.1 free ports, for tests."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.node_process import STARTUP_DEADLINE_S, NodeProcess


class ClusterProcess:
    """``size`` nodes that list each other as peers (``LLMCACHE_PEERS``) and share a fresh
    Raft password. :meth:`stop` kills every node this object started, by PID."""

    def __init__(self, root: Path, size: int = 3, env: dict[str, str] | None = None) -> None:
        self.password = secrets.token_urlsafe(16)
        self.nodes = [NodeProcess(root / f"n{i}") for i in range(size)]
        for node in self.nodes:
            peers = ",".join(
                f"127.0.0.1:{p.raft_port}|{p.url}" for p in self.nodes if p is not node
            )
            node.env = {
                "LLMCACHE_PEERS": peers,
                "LLMCACHE_RAFT_PASSWORD": self.password,
                "LLMCACHE_EMBEDDER": "none",
                **(env or {}),
            }

    def start(self) -> ClusterProcess:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_ready()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    @staticmethod
    def pids(node: NodeProcess) -> list[int]:
        """The node's supervisor and the processes it started (raft-core, workers and
        multiprocessing helpers), read from ``/proc``: children first."""
        if node.proc is None or node.proc.poll() is not None:
            return []
        found: list[int] = []
        for task in Path(f"/proc/{node.proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):  # the thread ended while we listed
                found += [int(p) for p in (task / "children").read_text().split()]
        return [*found, node.proc.pid]

    def crash(self, node: NodeProcess) -> None:
        """SIGKILL the whole node at once (children before the supervisor, so none of them
        outlives it to stop gracefully), then reap the supervisor."""
        for pid in self.pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.kill()

    @staticmethod
    def store_state(node: NodeProcess) -> tuple[int, str]:
        """``(applied index, Store.digest())`` of the node's LMDB, opened read-only in a
        subprocess; the index is read before and after the digest, and a change retried."""
        script = (
            "import json, sys\n"
            "from llmcache.node.store import Store\n"
            "s = Store(sys.argv[1], readonly=True)\n"
            "for _ in range(50):\n"
            "    a = s.applied_index(); d = s.digest()\n"
            "    if s.applied_index() == a: break\n"
            "print(json.dumps([a, d]))\n"
        )
        path = str(node.data_dir / "store")
        out = subprocess.run(
            [sys.executable, "-c", script, path], capture_output=True, timeout=60, check=True
        )
        applied, digest = json.loads(out.stdout)
        return int(applied), str(digest)

    @staticmethod
    def raft_address(node: NodeProcess) -> str:
        return f"127.0.0.1:{node.raft_port}"

    def status(self, node: NodeProcess) -> dict[str, Any]:
        code, _, body = node.request("GET", "/v1/cluster/status")
        assert code == 200, body
        result: dict[str, Any] = body
        return result

    def leader(
        self, deadline_s: float = STARTUP_DEADLINE_S, among: list[NodeProcess] | None = None
    ) -> NodeProcess:
        """The node that leads, once every node (or every node of ``among``) agrees on it."""
        nodes = self.nodes if among is None else among
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            believed = {self.status(node)["leader"] for node in nodes}
            for node in nodes:
                if believed == {self.raft_address(node)}:
                    return node
            time.sleep(0.2)
        raise AssertionError(f"no agreed leader within {deadline_s} s")

    def followers(self) -> list[NodeProcess]:
        leader = self.leader()
        return [node for node in self.nodes if node is not leader]


@contextlib.contextmanager
def running_cluster(
    root: Path, size: int = 3, env: dict[str, str] | None = None
) -> Iterator[ClusterProcess]:
    """A started group whose nodes agree on a leader; every node is killed on exit."""
    group = ClusterProcess(root, size, env)
    try:
        group.start()
        group.leader()
        yield group
    finally:
        group.stop()
