"""Cluster operations over HTTP: membership and leadership transfer (admin of all tenants).

=========================================== ===================================================
route                                       answer
=========================================== ===================================================
``GET /v1/cluster/members``                 this node's view: ``{self, leader, term, members:
                                            [{address, url, self, role, connected}]}``
``POST /v1/cluster/members``                ``{"address": "host:raftport"}`` → ``{"added"}``
``DELETE /v1/cluster/members/{address}``    → ``{"removed"}``
``POST /v1/cluster/transfer-leader``        ``{"to": address | null}`` → ``{"leader"}``
=========================================== ===================================================

Guarantees: a membership change has been committed by the group when the answer is 200; a
transfer answers 200 once the old leader stepped down, naming the leader it then knows (None
while the election runs). Only the leader can change the group, so a follower passes the request
on to the leader it knows (same body and token, marked so it is never passed on twice) and
answers with the leader's response. Errors: 503 ``not_leader`` when no leader is reachable, 409
``request_denied`` when Raft refuses (e.g. a change already in progress), 503
``unknown_outcome`` when no outcome came in time (check ``GET /v1/cluster/members``), 401 or
403 without the node's admin token (open access counts as admin).

A peer's ``role`` is inferred (``leader`` if it is the leader this node believes in, else
``follower``); only this node's own role is first-hand. A peer's ``url`` is the HTTP URL this
node was configured with (``peers``), so it is null for a node added at runtime that this
node's configuration does not list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llmcache.cluster.ipc import IpcProposer
from llmcache.node import wire
from llmcache.node.auth import require_cluster_admin
from llmcache.node.errors import InvalidRequest, RaftUnavailable
from llmcache.node.forwarding import FORWARDED_HEADER, ForwardingProposer, forward_request
from llmcache.node.proposer import NotLeader
from llmcache.node.services import PRINCIPAL, SERVICES

MEMBERSHIP_TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 15.0

cluster_routes = web.RouteTableDef()


def _admin(request: web.Request) -> Any:
    """The proposer, once the caller is known to be an admin of all tenants."""
    require_cluster_admin(request[PRINCIPAL])
    return request.app[SERVICES].proposer


def _raft(proposer: Any) -> IpcProposer:
    local = proposer.local if isinstance(proposer, ForwardingProposer) else proposer
    if not isinstance(local, IpcProposer):  # an in-process node has no group to change
        raise RaftUnavailable("this node runs without raft-core: no membership to change")
    return local


def _address(value: str, field: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"{value!r} is not host:raftport", field=field)
    return value


async def _on_leader(
    request: web.Request, call: Callable[[], Awaitable[web.Response]], timeout: float
) -> web.Response:
    """``call()`` on this node; on a follower the leader's answer to the same request."""
    proposer = request.app[SERVICES].proposer
    try:
        return await call()
    except NotLeader as exc:
        if request.headers.get(FORWARDED_HEADER) or not isinstance(proposer, ForwardingProposer):
            raise
        url = await proposer.leader_url(exc.leader)
        return await forward_request(proposer.session(), request, url, timeout)


@cluster_routes.get("/v1/cluster/members")
async def members(request: web.Request) -> web.Response:
    proposer = _admin(request)
    status = await proposer.status()
    services = request.app[SERVICES]
    urls = {**services.engine.store.member_urls(), **services.settings.peers_http}
    me = {
        "address": status.node_id,
        "url": f"{request.scheme}://{request.host}",
        "self": True,
        "role": status.role,
        "connected": True,
    }
    others = [
        {
            "address": address,
            "url": urls.get(address),
            "self": False,
            "role": "leader" if address == status.leader else "follower",
            "connected": bool(info.get("connected")),
        }
        for address, info in sorted(status.peers.items())
    ]
    body = {
        "self": status.node_id,
        "leader": status.leader,
        "term": status.term,
        "members": [me, *others],
    }
    return wire.respond(request, body)


@cluster_routes.post("/v1/cluster/members")
async def add_member(request: web.Request) -> web.Response:
    raft = _raft(_admin(request))
    data = await wire.read_body(request)
    wire.known(data, ("address",))
    address = _address(wire.require(data, "address", str), "address")

    async def add() -> web.Response:
        await raft.add_node(address, MEMBERSHIP_TIMEOUT_S)
        return wire.respond(request, {"added": address})

    return await _on_leader(request, add, MEMBERSHIP_TIMEOUT_S)


@cluster_routes.delete("/v1/cluster/members/{address}")
async def remove_member(request: web.Request) -> web.Response:
    raft = _raft(_admin(request))
    address = _address(request.match_info["address"], "address")

    async def remove() -> web.Response:
        await raft.remove_node(address, MEMBERSHIP_TIMEOUT_S)
        return wire.respond(request, {"removed": address})

    return await _on_leader(request, remove, MEMBERSHIP_TIMEOUT_S)


@cluster_routes.post("/v1/cluster/transfer-leader")
async def transfer_leader(request: web.Request) -> web.Response:
    raft = _raft(_admin(request))
    data = await wire.read_body(request) if request.can_read_body else {}
    wire.known(data, ("to",))
    to = wire.get(data, "to", str, None)
    if to is not None:
        _address(to, "to")

    async def transfer() -> web.Response:
        leader = await raft.transfer_leader(to, TRANSFER_TIMEOUT_S)
        return wire.respond(request, {"leader": leader})

    return await _on_leader(request, transfer, TRANSFER_TIMEOUT_S)
