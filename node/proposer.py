"""How a server worker gets a command into the log: the :class:`Proposer` interface.

A worker never applies anything itself: it proposes a command and, depending on ``wait``,
gets back when the command is in the leader's log (``none``), committed by a quorum
(``committed``), or applied to this node's LMDB (``applied``: read-your-writes on this node).

Outcomes:

- success: a :class:`Proposal` with the log index and term, and the state machine's
  :class:`~llmcache.cluster.fsm.Result` when ``wait="applied"``;
- :class:`NotLeader`: this node cannot take writes; ``leader`` names the one that can;
- :class:`UnknownOutcome`: a timeout or leader change after the command was sent: it may or may
  not be applied; retrying with the same ``request_id`` is safe (HTTP 503 + ``Retry-After``).

:class:`LocalProposer` is the in-process implementation over
:class:`~llmcache.node.local.LocalCache`
(embedded use and tests); the node server talks to raft-core over a Unix socket instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from llmcache.cluster.commands import Command
from llmcache.cluster.fsm import Result
from llmcache.node.errors import CacheError
from llmcache.node.local import LocalCache

Wait = Literal["none", "committed", "applied"]
WAITS: tuple[Wait, ...] = ("none", "committed", "applied")


@dataclass(frozen=True)
class Proposal:
    index: int
    term: int
    leader: str | None
    result: Result | None = None
    """The state machine's result; only with ``wait="applied"``."""


@dataclass(frozen=True)
class RaftStatus:
    """What a node knows of its Raft group (served by ``/v1/cluster/status`` and ``/readyz``)."""

    node_id: str
    role: str  # "leader" | "follower" | "candidate"
    term: int
    leader: str | None
    commit_index: int
    applied_index: int
    has_quorum: bool
    ready: bool
    peers: dict[str, Any] = field(default_factory=dict)
    leader_contact_ms: int | None = None
    """Milliseconds since this node last heard the leader's append entries (0 on the leader;
    None when it never heard one since it started)."""


class NotLeader(CacheError):
    code = "not_leader"
    http_status = 503

    def __init__(self, message: str, leader: str | None) -> None:
        super().__init__(message)
        self.leader = leader


class UnknownOutcome(CacheError):
    """The command may or may not have been applied: retry with the same request id."""

    code = "unknown_outcome"
    http_status = 503


class Proposer(Protocol):
    async def propose(
        self, command: Command, *, wait: Wait = "applied", timeout: float = 10.0
    ) -> Proposal: ...

    async def status(self) -> RaftStatus: ...


class LocalProposer:
    """Applies proposals straight to a :class:`LocalCache` (a group of one, always leader)."""

    def __init__(self, cache: LocalCache, node_id: str = "local") -> None:
        self.cache = cache
        self.node_id = node_id

    async def propose(
        self, command: Command, *, wait: Wait = "applied", timeout: float = 10.0
    ) -> Proposal:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, self.cache.propose, command)
        return Proposal(result.index, 1, self.node_id, result if wait == "applied" else None)

    async def status(self) -> RaftStatus:
        applied = self.cache.store.applied_index()
        return RaftStatus(self.node_id, "leader", 1, self.node_id, applied, applied, True, True)
