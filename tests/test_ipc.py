"""raft-core IPC over real Unix sockets: framing, pipelining, reconnects, outcomes, admin ops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmcache.cluster import commands as c
from llmcache.cluster.ipc import (
    HEADER,
    MAX_FRAME,
    ConnectionLost,
    IpcProposer,
    RaftUnavailable,
    RequestDenied,
    frame,
    read_frame,
)
from llmcache.node.errors import InvalidRequest
from llmcache.node.proposer import NotLeader, Proposer, UnknownOutcome
from tests.test_raft_core import (
    RaftProcess,
    eventually,
    kv_put,
    spawn_fixture,  # noqa: F401  # the ``spawn`` fixture
    wait_default_tenant,
    wait_leader,
)

# -- framing ------------------------------------------------------------------------------------


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_frames_round_trip_and_bad_streams_are_refused() -> None:
    async def scenario() -> None:
        message = {"id": 7, "op": "propose", "data": b"\x01\x00bytes", "wait": "none"}
        reader = feed(frame(message) + frame({"id": 8}))
        assert await read_frame(reader) == message
        assert await read_frame(reader) == {"id": 8}
        assert await read_frame(reader) is None  # clean end of stream
        with pytest.raises(ConnectionLost):
            await read_frame(feed(frame(message)[:-1]))
        with pytest.raises(ConnectionLost):
            await read_frame(feed(HEADER.pack(MAX_FRAME + 1)))
        with pytest.raises(ConnectionLost):
            await read_frame(feed(b"\x00\x00"))
        with pytest.raises(ConnectionLost):
            await read_frame(feed(frame([1, 2])))  # type: ignore[arg-type]

    asyncio.run(scenario())
    with pytest.raises(InvalidRequest):
        frame({"data": b"x" * (MAX_FRAME + 1)})


# -- the client against misbehaving servers ------------------------------------------------------


async def serve_once(path: Path, answer: bool) -> asyncio.Server:
    """A socket that reads one request, then hangs up (or, with ``answer``, stays silent)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        if answer:
            await asyncio.sleep(30)
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


def test_a_dropped_or_silent_connection_is_an_unknown_outcome(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "s.sock"
        proposer = IpcProposer(sock, reply_grace_s=0.2)
        with pytest.raises(RaftUnavailable):
            await proposer.propose(kv_put(1))  # nothing listens: nothing was sent
        server = await serve_once(sock, answer=False)
        with pytest.raises(UnknownOutcome):
            await proposer.propose(kv_put(1))
        with pytest.raises(RaftUnavailable):
            await proposer.status()  # reconnects; a read has no outcome to be unsure of
        server.close()
        await server.wait_closed()
        silent = await serve_once(sock, answer=True)
        with pytest.raises(UnknownOutcome):
            await proposer.propose(kv_put(1), timeout=0.2)
        await proposer.close()
        silent.close()

    asyncio.run(scenario())


# -- against a real raft-core ------------------------------------------------------------------


def test_many_concurrent_proposals_share_one_pipelined_connection(
    spawn: Callable[..., list[RaftProcess]],
) -> None:
    (node,) = spawn(1)

    async def scenario() -> None:
        await wait_leader([node])
        await wait_default_tenant(node)
        proposer = IpcProposer(node.sock)
        as_protocol: Proposer = proposer  # what the HTTP workers are handed
        await as_protocol.status()
        conn = proposer._conn
        proposals = await asyncio.gather(*(proposer.propose(kv_put(i)) for i in range(300)))
        status = await proposer.status()
        assert proposer._conn is conn  # one connection carried all of them
        await proposer.close()
        indexes = sorted(p.index for p in proposals)
        assert len(set(indexes)) == 300
        assert all(p.result is not None and p.result.ok for p in proposals)
        assert status.applied_index >= indexes[-1]
        state = node.store_state()
        assert state is not None and state[0] >= indexes[-1]

    asyncio.run(scenario())


def test_the_proposer_reconnects_after_a_restart_and_answers_every_op(
    spawn: Callable[..., list[RaftProcess]],
) -> None:
    (node,) = spawn(1)
    proposer = IpcProposer(node.sock, connect_timeout=2.0)

    async def before() -> None:
        await wait_leader([node])
        await wait_default_tenant(node)
        assert (await proposer.propose(kv_put(1))).index > 0
        barrier = await proposer.barrier()
        assert barrier.result is not None and barrier.result.ok
        with pytest.raises(RequestDenied):
            await proposer.transfer_leader()  # nobody to hand over to

    async def after() -> None:
        with pytest.raises(RaftUnavailable):
            await proposer.status()
        node.start()
        await wait_leader([node])
        p = await proposer.propose(kv_put(2))
        assert p.result is not None and p.result.ok
        await proposer.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(before())
        assert node.stop() == 0
        loop.run_until_complete(after())
    finally:
        loop.close()


def test_raft_core_rejects_malformed_requests(spawn: Callable[..., list[RaftProcess]]) -> None:
    (node,) = spawn(1)

    async def call(reader: Any, writer: Any, message: dict[str, Any]) -> dict[str, Any]:
        writer.write(frame(message))
        reply = await read_frame(reader)
        assert reply is not None and reply["id"] == message["id"]
        return reply

    async def scenario() -> None:
        await wait_leader([node])
        reader, writer = await asyncio.open_unix_connection(str(node.sock))
        for message in (
            {"id": 1, "op": "bogus"},
            {"id": 2, "op": "propose", "data": b"\x01", "wait": "sometimes"},
            {"id": 3, "op": "propose", "data": "not bytes"},
            {"id": 4, "op": "status", "timeout": -1},
            {"id": 5, "op": "add_node", "addr": "nohost"},
        ):
            reply = await call(reader, writer, message)
            assert not reply["ok"] and reply["error"]["code"] == "invalid_request"
        # A log entry the state machine cannot decode is applied as an error, not a crash.
        reply = await call(reader, writer, {"id": 6, "op": "propose", "data": b"\x09junk"})
        assert reply["ok"] and reply["result"][2] == "malformed_command"
        writer.write(HEADER.pack(MAX_FRAME + 1))
        assert await reader.read() == b""  # raft-core hangs up on an oversize frame
        writer.close()
        status = await IpcProposer(node.sock).status()
        assert status.role == "leader"  # and keeps serving

    asyncio.run(scenario())


def test_membership_changes_through_the_leader(spawn: Callable[..., list[RaftProcess]]) -> None:
    nodes = spawn(3)

    async def scenario() -> None:
        leader, _ = await wait_leader(nodes)
        gone = next(n for n in nodes if n is not leader)
        admin = IpcProposer(leader.sock)
        via_follower = IpcProposer(gone.sock)
        with pytest.raises(NotLeader):
            await via_follower.remove_node(leader.address)
        await admin.remove_node(gone.address)
        assert gone.address not in (await admin.status()).peers
        with pytest.raises(RequestDenied):
            await admin.remove_node(gone.address)  # not a member any more
        await admin.add_node(gone.address)

        async def back() -> bool:
            peers = (await admin.status()).peers
            return bool(peers.get(gone.address, {}).get("connected", False))

        await eventually(back, "the re-added node connected")
        p = await admin.propose(c.Noop())
        assert p.result is not None and p.result.ok
        await admin.close()
        await via_follower.close()

    asyncio.run(scenario())
