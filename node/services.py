"""What a server worker's aiohttp application shares between handlers (``app[SERVICES]``).

Handlers stay thin: they parse and validate HTTP, call the engine or the proposer, and render.
Who the caller is comes from the auth middleware as ``request[PRINCIPAL]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from llmcache.node.consistency import Reads
from llmcache.node.engine import Engine
from llmcache.node.proposer import Proposer


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a tenant and a role (``admin`` > ``writer`` > ``reader``).

    An admin principal may act on any tenant (it names one per request); others only on theirs.
    """

    tenant: str
    role: str
    token_id: str = ""  # a short, non-secret id of the token (for logs), never the token


@dataclass(frozen=True)
class PriceEntry:
    """USD per million tokens of one model, for the cost-saved metric."""

    prompt: float
    completion: float


@dataclass(frozen=True)
class ServerSettings:
    """The HTTP-facing options of a worker (derived from the node configuration)."""

    node_id: str = "local"
    max_body_bytes: int = 8 << 20
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_timeout_s: float = 120.0
    upstream_api_key: str | None = None
    """Used only when the caller sends no Authorization of its own."""
    cache_enabled: bool = True
    """The kill switch (LLMCACHE_ENABLED=false): the proxy becomes a pure pass-through."""
    admin_token: str | None = None
    open_access: bool = False
    """No tokens configured and bound to loopback: token-less requests act as tenant default."""
    prices: dict[str, PriceEntry] = field(default_factory=dict)
    peers_http: dict[str, str] = field(default_factory=dict)
    """Raft address → HTTP base URL of every other member (where writes and reads forward)."""
    peer_key: bytes | None = field(default=None, repr=False)
    """HMAC key of peer requests (``forwarding.peer_key`` of the Raft password); None: no peer
    may call this node's internal routes."""


@dataclass
class Services:
    engine: Engine
    proposer: Proposer
    settings: ServerSettings
    reads: Reads = field(init=False)
    """The worker's read-consistency state (shared barriers, staleness)."""

    def __post_init__(self) -> None:
        self.reads = Reads(self.proposer, self.engine.store)


SERVICES = web.AppKey("services", Services)
PRINCIPAL = web.RequestKey("principal", Principal)
"""``request[PRINCIPAL]`` is the :class:`Principal` set by the auth middleware."""
