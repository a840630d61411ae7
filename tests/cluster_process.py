"""A Raft group of real ``llmcache-node`` processes on 127.0.0.1 free ports, for tests."""

from __future__ import annotations

import secrets
import time
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
    def raft_address(node: NodeProcess) -> str:
        return f"127.0.0.1:{node.raft_port}"

    def status(self, node: NodeProcess) -> dict[str, Any]:
        code, _, body = node.request("GET", "/v1/cluster/status")
        assert code == 200, body
        result: dict[str, Any] = body
        return result

    def leader(self, deadline_s: float = STARTUP_DEADLINE_S) -> NodeProcess:
        """The node that leads, once every node agrees on it."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            believed = {self.status(node)["leader"] for node in self.nodes}
            for node in self.nodes:
                if believed == {self.raft_address(node)}:
                    return node
            time.sleep(0.2)
        raise AssertionError(f"no agreed leader within {deadline_s} s")

    def followers(self) -> list[NodeProcess]:
        leader = self.leader()
        return [node for node in self.nodes if node is not leader]
