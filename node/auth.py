"""Bearer-token authentication: tokens map to a tenant and a role, stored only as sha256.

Where tokens live: the admin token comes from the node configuration (``LLMCACHE_ADMIN_TOKEN``)
and is kept in memory as a hash; tenant tokens are created through the admin API and stored
hashed in the tenant's replicated configuration (``config["tokens"] = {sha256: {"role", "id"}}``),
so every node accepts them. A token is never logged or returned after creation.

Where the caller puts it: ``X-LLMCache-Token: <token>``, or ``Authorization: Bearer <token>``
when the bearer is an LLM-Cache token (they start with ``lc_``). On proxy routes any other
``Authorization`` belongs to the upstream provider and is passed through untouched.

Open access (no admin token configured, bound to loopback, like Redis's protected mode):
requests without a token act as an admin of tenant ``default``.

Two kinds of admin: the configured admin token (and open access) administer every tenant —
create and delete tenants, name any tenant in a request; a tenant token with the ``admin`` role
administers its own tenant only (its tokens, settings and entries), so no tenant token can ever
reach another tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Mapping

from llmcache.node.errors import Forbidden, Unauthorized
from llmcache.node.services import Principal
from llmcache.node.store import Store

TOKEN_PREFIX = "lc_"
ROLES = {"reader": 1, "writer": 2, "admin": 3}
DEFAULT_TENANT = "default"
CLUSTER_ADMIN_IDS = frozenset({"admin", "open-access"})
"""Token ids of the admins of all tenants (tenant token ids are 12 hex digits: never these)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh token and its short public id (the id may be shown and logged)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_token(token)[:12]


def token_from_headers(headers: Mapping[str, str], *, proxy_route: bool) -> str | None:
    """The LLM-Cache token of a request, if any (see the module docstring for the rules)."""
    explicit = headers.get("X-LLMCache-Token")
    if explicit:
        return explicit
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    is_ours = value.startswith(TOKEN_PREFIX) or not proxy_route
    return value if scheme.lower() == "bearer" and value and is_ours else None


class Authenticator:
    """Resolves tokens to principals. Thread-safe; the tenant token table is rebuilt from the
    store when its applied index moves (token changes travel through the log)."""

    def __init__(self, store: Store, admin_token: str | None, open_access: bool) -> None:
        self.store = store
        self._admin_hash = hash_token(admin_token) if admin_token else None
        self.open_access = open_access
        self._lock = threading.Lock()
        self._table: dict[str, Principal] = {}
        self._table_index = -1

    def authenticate(self, token: str | None) -> Principal:
        if token is None:
            if self.open_access:
                return Principal(DEFAULT_TENANT, "admin", "open-access")
            raise Unauthorized("a token is required (X-LLMCache-Token or Authorization: Bearer)")
        digest = hash_token(token)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return Principal(DEFAULT_TENANT, "admin", "admin")
        principal = self._tokens().get(digest)
        if principal is None:
            raise Unauthorized("unknown or revoked token")
        return principal

    def _tokens(self) -> dict[str, Principal]:
        with self._lock:
            with self.store.read() as txn:
                index = self.store.applied_index(txn)
                if index != self._table_index:
                    table: dict[str, Principal] = {}
                    for tenant, config in self.store.tenants(txn):
                        for digest, token in (config.get("tokens") or {}).items():
                            table[digest] = Principal(tenant, token["role"], token["id"])
                    self._table, self._table_index = table, index
            return self._table


def is_cluster_admin(principal: Principal) -> bool:
    """True for the admin of all tenants (the configured admin token, or open access)."""
    return principal.role == "admin" and principal.token_id in CLUSTER_ADMIN_IDS


def require_cluster_admin(principal: Principal) -> None:
    if not is_cluster_admin(principal):
        raise Forbidden("this needs the node's admin token (an admin of all tenants)")


def authorize(principal: Principal, role: str, tenant: str | None = None) -> str:
    """Check ``principal`` may act as ``role`` on ``tenant`` (default: its own); returns the
    tenant acted on. Admins of all tenants may name any tenant; tenant tokens only their own."""
    target = tenant or principal.tenant
    if target != principal.tenant and not is_cluster_admin(principal):
        raise Forbidden(f"this token belongs to tenant {principal.tenant!r}", field="tenant")
    if ROLES[principal.role] < ROLES[role]:
        raise Forbidden(f"this needs the {role} role; the token has {principal.role}")
    return target
