"""Writes on any node: a follower forwards its proposals to the leader over HTTP.

A worker prepares a command (embedding, timestamps, request id) on the node that received the
request; :class:`ForwardingProposer` proposes it on this node's raft-core and, when that answers
:class:`~llmcache.node.proposer.NotLeader` naming a leader, POSTs the *already-encoded* bytes to
the leader's ``POST /v1/internal/propose`` (:data:`INTERNAL_PROPOSE`), which proposes them on the
leader's raft-core unchanged: a forwarded command is never re-embedded nor re-stamped.

Peer authentication: the body is msgpack ``{data, wait, timeout, ts_ms}`` and the header
:data:`AUTH_HEADER` carries the hex HMAC-SHA256 of the exact body bytes under a key derived
from the Raft password (:func:`peer_key`). The route answers 401 without a valid MAC and 403
when ``ts_ms`` is more than :data:`MAX_SKEW_MS` from the leader's clock (a bound on replaying a
captured request; a replayed write is also deduplicated by its request id). Senders stamp with
the group's clock (node/clock.py), so a node whose own clock is off still gets through. The
route is not in the public OpenAPI document.

Outcomes of :meth:`ForwardingProposer.propose`: a :class:`Proposal`; :class:`NotLeader` when no
leader is known (or its HTTP URL is not configured) or the leader cannot be reached, so nothing
was sent; :class:`UnknownOutcome` when the request was sent and no answer came in time: a retry
with the same request id is safe because the state machine deduplicates request ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from llmcache.cluster import commands
from llmcache.cluster.fsm import Result
from llmcache.cluster.ipc import IpcProposer
from llmcache.node.consistency import wait_applied
from llmcache.node.errors import (
    CacheError,
    Forbidden,
    InvalidRequest,
    RaftUnavailable,
    Unauthorized,
)
from llmcache.node.proposer import WAITS, NotLeader, Proposal, RaftStatus, UnknownOutcome, Wait
from llmcache.node.services import SERVICES
from llmcache.node.store import Store

INTERNAL_PROPOSE = "/v1/internal/propose"
AUTH_HEADER = "X-LLMCache-Peer-Auth"
FORWARDED_HEADER = "X-LLMCache-Forwarded"
"""Set on a request a node forwards, so the receiver never forwards it again (no loops)."""
MAX_SKEW_MS = 60_000
MAX_HOPS = 3
"""Forwarding attempts per proposal: a leader that just stepped down names its successor."""
LEADER_WAIT_S = 3.0
"""How long a proposal waits for an election to name a leader before answering 503."""


def peer_key(raft_password: str) -> bytes:
    """The HMAC key of peer HTTP requests, derived from (never equal to) the Raft password."""
    return hashlib.pbkdf2_hmac("sha256", raft_password.encode(), b"llmcache-peer-http-v1", 100_000)


def sign(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(key: bytes | None, body: bytes, mac: str | None) -> None:
    """Raise :class:`Unauthorized` unless ``mac`` is ``body``'s MAC under ``key``."""
    if key is None or not mac or not hmac.compare_digest(sign(key, body), mac):
        raise Unauthorized("peer authentication failed")


def proposal_to_wire(p: Proposal) -> dict[str, Any]:
    r = p.result
    result = None if r is None else [r.index, r.value, r.error, r.message]
    return {"index": p.index, "term": p.term, "leader": p.leader, "result": result}


def proposal_from_wire(raw: Mapping[str, Any]) -> Proposal:
    r = raw.get("result")
    result = None if r is None else Result(r[0], r[1], r[2], r[3])
    return Proposal(int(raw["index"]), int(raw["term"]), raw.get("leader"), result)


def peer_url(peers_http: Mapping[str, str], store: Store, address: str | None) -> str | None:
    """The HTTP URL of member ``address``: from this node's configuration, else as the member
    advertised itself through the log (nodes added at run time)."""
    if address is None:
        return None
    return peers_http.get(address) or store.member_urls().get(address)


class ForwardingProposer:
    """A :class:`~llmcache.node.proposer.Proposer` that works on every node of a group.

    Guarantees beyond :class:`IpcProposer`'s: on a follower a proposal reaches the leader's log
    exactly as encoded here; with ``wait="applied"`` it returns only once *this* node's store
    applied the entry (read-your-writes on the node written to), else :class:`UnknownOutcome`
    when ``timeout`` runs out first. ``peers_http`` maps Raft addresses to HTTP base URLs.
    """

    def __init__(
        self,
        local: IpcProposer,
        peers_http: Mapping[str, str],
        secret: bytes | None,
        store: Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local = local
        self.clock = clock
        self.peers_http = dict(peers_http)
        self.secret = secret
        self.store = store
        self._session: aiohttp.ClientSession | None = None

    async def status(self) -> RaftStatus:
        return await self.local.status()

    async def propose(
        self, command: commands.Command, *, wait: Wait = "applied", timeout: float = 10.0
    ) -> Proposal:
        try:
            return await self.local.propose(command, wait=wait, timeout=timeout)
        except NotLeader as exc:
            return await self._forward(commands.encode(command), wait, timeout, exc.leader)

    async def barrier(self, timeout: float = 10.0) -> Proposal:
        """A :class:`~llmcache.cluster.commands.Noop` through the leader's log, applied here
        when this returns: everything committed before the call is then visible here."""
        try:
            return await self.local.barrier(timeout)
        except NotLeader as exc:
            noop = commands.encode(commands.Noop())
            return await self._forward(noop, "applied", timeout, exc.leader)

    async def leader_url(self, leader: str | None, timeout: float = LEADER_WAIT_S) -> str:
        """The HTTP URL of ``leader`` (or, when None, of the leader once an election names
        one within ``timeout``); :class:`NotLeader` when none is known."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout, LEADER_WAIT_S)
        while leader is None and loop.time() < deadline:
            await asyncio.sleep(0.1)
            leader = (await self.local.status()).leader
        url = peer_url(self.peers_http, self.store, leader)
        if url is None:
            raise NotLeader(f"no reachable leader known (leader {leader!r})", leader)
        return url

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        """Close the HTTP session to peers (``local`` belongs to the caller)."""
        if self._session is not None:
            await self._session.close()

    async def _forward(
        self, data: bytes, wait: Wait, timeout: float, leader: str | None
    ) -> Proposal:
        if self.secret is None:
            raise NotLeader("this node has no Raft password, so it cannot forward", leader)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(MAX_HOPS):
            url = await self.leader_url(leader, max(0.1, deadline - loop.time()))
            remaining = max(0.1, deadline - loop.time())
            try:
                proposal = await self._post(url, data, wait, remaining)
            except NotLeader as exc:
                if exc.leader is None or exc.leader == leader:
                    raise
                leader = exc.leader
                continue
            if wait == "applied" and proposal.index:
                left = max(0.0, deadline - loop.time())
                if not await wait_applied(self.store, proposal.index, left):
                    raise UnknownOutcome(
                        f"committed at index {proposal.index} but not yet applied on this node"
                    )
            return proposal
        raise NotLeader("leadership kept moving while forwarding", leader)

    async def _post(self, url: str, data: bytes, wait: Wait, timeout: float) -> Proposal:
        assert self.secret is not None
        body = msgpack.packb(
            {"data": data, "wait": wait, "timeout": timeout, "ts_ms": int(self.clock() * 1000)},
            use_bin_type=True,
        )
        headers = {AUTH_HEADER: sign(self.secret, body), "Content-Type": "application/msgpack"}
        try:
            async with self.session().post(
                url + INTERNAL_PROPOSE,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout + 5.0, connect=min(timeout, 5.0)),
            ) as resp:
                content = await resp.read()
                status = resp.status
                if resp.content_type == "application/json":  # the error middleware's answers
                    raw = json.loads(content)
                else:
                    raw = msgpack.unpackb(content, raw=False)
        except aiohttp.ClientConnectorError as exc:  # nothing was sent
            raise NotLeader(f"the leader at {url} is unreachable: {exc}", None) from None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise UnknownOutcome(f"no answer from the leader at {url}: {exc!r}") from None
        if status == 200 and isinstance(raw, dict):
            return proposal_from_wire(raw)
        error = raw.get("error", {}) if isinstance(raw, dict) else {}
        code, message = error.get("code"), str(error.get("message", f"HTTP {status}"))
        if code == NotLeader.code:
            raise NotLeader(message, error.get("leader"))
        # Nothing was proposed; the caller's own auth is not at fault.
        if status == 401:
            raise RaftUnavailable(
                f"the leader refused this node's peer authentication ({message}): do all "
                "nodes share the same Raft password?"
            )
        if status == 403:
            raise RaftUnavailable(f"the leader refused a forwarded proposal: {message}")
        if code == UnknownOutcome.code or status >= 500:
            raise UnknownOutcome(f"the leader answered {status}: {message}")
        raised = CacheError(f"the leader refused a forwarded proposal: {message}")
        raised.code, raised.http_status = str(code or "rejected"), status
        raise raised


FORWARD_HEADERS = frozenset({"authorization", "content-type", "accept", "cache-control"})
ANSWER_HEADERS = frozenset({"content-type", "age", "retry-after"})


async def forward_request(
    session: aiohttp.ClientSession, request: web.Request, url: str, timeout: float
) -> web.Response:
    """Send ``request`` (same method, path, query, body, auth and ``X-LLMCache-*`` headers) to
    the node at ``url`` and answer with its response. Marked with :data:`FORWARDED_HEADER` so
    it is not forwarded again; :class:`NotLeader` (503) when that node cannot be reached."""
    headers = {
        k: v
        for k, v in request.headers.items()
        if k.lower() in FORWARD_HEADERS or k.lower().startswith("x-llmcache-")
    }
    headers[FORWARDED_HEADER] = "1"
    try:
        async with session.request(
            request.method,
            url + request.rel_url.path_qs,
            data=await request.read(),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout + 5.0, connect=min(timeout, 5.0)),
        ) as resp:
            body = await resp.read()
            answer = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() in ANSWER_HEADERS or k.lower().startswith("x-llmcache-")
            }
            return web.Response(body=body, status=resp.status, headers=answer)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise NotLeader(f"the leader at {url} did not answer: {exc!r}", None) from None


routes = web.RouteTableDef()
"""The internal (peer-only) routes, deliberately absent from the public OpenAPI document."""


@routes.post(INTERNAL_PROPOSE)
async def internal_propose(request: web.Request) -> web.Response:
    """The leader's side of forwarding (``POST /v1/internal/propose``): verify the MAC and
    clock skew, propose the bytes unchanged on this node's raft-core, answer the Proposal as
    msgpack (errors as ``{"error": {code, message, leader}}`` with the error's status)."""
    services = request.app[SERVICES]
    proposer: Any = services.proposer
    body = await request.read()
    verify(services.settings.peer_key, body, request.headers.get(AUTH_HEADER))
    try:
        message = msgpack.unpackb(body, raw=False)
        data, wait = message["data"], message["wait"]
        timeout, ts_ms = float(message["timeout"]), int(message["ts_ms"])
        command = commands.decode(data)
    except Exception:
        raise InvalidRequest("malformed internal proposal", field="body") from None
    if abs(time.time() * 1000 - ts_ms) > MAX_SKEW_MS or wait not in WAITS:
        raise Forbidden(
            f"internal proposal stamped {ts_ms} is more than {MAX_SKEW_MS} ms from this leader's "
            f"clock (a replay, or clocks apart), or has a bad wait"
        )
    local = proposer.local if isinstance(proposer, ForwardingProposer) else proposer
    try:
        proposal = await local.propose(command, wait=wait, timeout=min(max(timeout, 0.1), 60.0))
        answer: dict[str, Any] = proposal_to_wire(proposal)
        status = 200
    except CacheError as exc:
        answer = {"error": {"code": exc.code, "message": str(exc)}}
        answer["error"]["leader"] = getattr(exc, "leader", None)
        status = exc.http_status
    packed = msgpack.packb(answer, use_bin_type=True)
    return web.Response(body=packed, status=status, content_type="application/msgpack")
