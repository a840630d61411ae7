"""The Unix-socket protocol between a node's server workers and its raft-core process.

Frames: a 4-byte big-endian length, then a msgpack map. A request is
``{"id": int, "op": str, ...}``; its response carries the same ``id`` and either ``"ok": True``
with the op's fields or ``"ok": False`` with ``"error": {"code", "message", "leader"}``. Many
requests may be in flight on one connection (pipelined); responses come back as each finishes,
in any order.

======================= ========================================== ==========================
op                      request fields                             response fields
======================= ========================================== ==========================
``propose``             ``data`` (log entry bytes), ``wait``       ``index``, ``term``,
                        (none / committed / applied), ``timeout``  ``leader``, ``result``
``status``              —                                          ``status`` (RaftStatus map)
``barrier``             ``timeout``                                ``index``, ``term``,
                                                                   ``leader``
``transfer_leader``     ``to`` (address or None), ``timeout``      ``leader``
``add_node``            ``addr``, ``timeout``                      —
``remove_node``         ``addr``, ``timeout``                      —
``report_access``       ``ids``, ``hits``, ``last_hit_ms`` (equal-  ``accepted`` (ids kept)
                        length lists of non-negative integers)
======================= ========================================== ==========================

``result`` is ``[index, value, error, message]`` (the state machine's
:class:`~llmcache.cluster.fsm.Result`) or None. Error codes are the :class:`CacheError` codes
of :class:`~llmcache.node.proposer.NotLeader` (with ``leader``),
:class:`~llmcache.node.proposer.UnknownOutcome`, :class:`RequestDenied`,
:class:`RaftUnavailable` and ``invalid_request``.

:class:`IpcServer` runs in raft-core's asyncio loop; :class:`IpcProposer` is the workers' client
and implements :class:`~llmcache.node.proposer.Proposer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import msgpack

from llmcache.cluster import commands
from llmcache.cluster.fsm import Result
from llmcache.node.errors import CacheError, InvalidRequest, RaftUnavailable, RequestDenied
from llmcache.node.proposer import WAITS, NotLeader, Proposal, RaftStatus, UnknownOutcome, Wait

log = logging.getLogger("llmcache.raft.ipc")
HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
"""Far above one log entry (a 4 MiB response plus its prompt and vector)."""
REPLY_GRACE_S = 5.0
"""How long past the request's own timeout a client waits for raft-core's answer."""


class ConnectionLost(Exception):
    """The connection to raft-core closed while a request was in flight."""


def frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise InvalidRequest(f"IPC frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream. Raises on an oversize frame."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionLost("stream ended inside a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ConnectionLost(f"frame of {length} bytes exceeds {MAX_FRAME}")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionLost("stream ended inside a frame") from None
    message = msgpack.unpackb(body, raw=False)
    if not isinstance(message, dict):
        raise ConnectionLost("a frame must hold a map")
    return message


def status_to_wire(status: RaftStatus) -> dict[str, Any]:
    return asdict(status)


def status_from_wire(raw: dict[str, Any]) -> RaftStatus:
    return RaftStatus(**raw)


def _proposal_to_wire(p: Proposal) -> dict[str, Any]:
    r = p.result
    result = None if r is None else [r.index, r.value, r.error, r.message]
    return {"index": p.index, "term": p.term, "leader": p.leader, "result": result}


def _proposal_from_wire(raw: dict[str, Any]) -> Proposal:
    r = raw["result"]
    result = None if r is None else Result(r[0], r[1], r[2], r[3])
    return Proposal(raw["index"], raw["term"], raw["leader"], result)


class Core(Protocol):
    """What the server needs of raft-core (implemented by ``raft_core.RaftCore``)."""

    async def propose(self, data: bytes, wait: Wait, timeout: float) -> Proposal: ...

    def status(self) -> RaftStatus: ...

    async def barrier(self, timeout: float) -> Proposal: ...

    async def transfer_leadership(self, to: str | None, timeout: float) -> str | None: ...

    async def add_node(self, addr: str, timeout: float) -> None: ...

    async def remove_node(self, addr: str, timeout: float) -> None: ...

    def report_access(self, ids: list[int], hits: list[int], last_hit_ms: list[int]) -> int: ...


class IpcServer:
    """Serves :class:`Core` on a Unix socket (mode 0600) from the running asyncio loop."""

    def __init__(self, core: Core, socket_path: str | os.PathLike[str]) -> None:
        self.core = core
        self.socket_path = Path(socket_path)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket of a previous run
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        requests: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await read_frame(reader)
                if message is None:
                    break
                request = asyncio.create_task(self._answer(message, writer))
                requests.add(request)
                request.add_done_callback(requests.discard)
        except (ConnectionLost, ConnectionError, msgpack.UnpackException, ValueError) as exc:
            log.warning("dropping an IPC connection: %s", exc)
        finally:
            for request in requests:
                request.cancel()
            writer.close()
            self._tasks.discard(task)

    async def _answer(self, message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        rid = message.get("id")
        try:
            reply = {"id": rid, "ok": True, **await self._dispatch(message)}
        except CacheError as exc:
            error = {"code": exc.code, "message": str(exc), "leader": getattr(exc, "leader", None)}
            reply = {"id": rid, "ok": False, "error": error}
        except Exception as exc:  # a bug must answer the caller, not hang it
            log.exception("IPC request %r failed", message.get("op"))
            error = {"code": RaftUnavailable.code, "message": f"internal error: {exc}"}
            reply = {"id": rid, "ok": False, "error": error}
        if not writer.is_closing():
            writer.write(frame(reply))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def _dispatch(self, m: dict[str, Any]) -> dict[str, Any]:
        op = m.get("op")
        timeout = m.get("timeout", 10.0)
        if not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
            raise InvalidRequest("timeout must be a number of seconds in (0, 3600]")
        if op == "propose":
            data, wait = m.get("data"), m.get("wait", "applied")
            if not isinstance(data, bytes) or wait not in WAITS:
                raise InvalidRequest(
                    "propose needs data (bytes) and wait in none/committed/applied"
                )
            return _proposal_to_wire(await self.core.propose(data, wait, float(timeout)))
        if op == "status":
            return {"status": status_to_wire(self.core.status())}
        if op == "barrier":
            return _proposal_to_wire(await self.core.barrier(float(timeout)))
        if op == "transfer_leader":
            to = m.get("to")
            if to is not None and not isinstance(to, str):
                raise InvalidRequest("to must be an address or None")
            return {"leader": await self.core.transfer_leadership(to, float(timeout))}
        if op in ("add_node", "remove_node"):
            addr = m.get("addr")
            if not isinstance(addr, str) or ":" not in addr:
                raise InvalidRequest("addr must be host:port")
            change = self.core.add_node if op == "add_node" else self.core.remove_node
            await change(addr, float(timeout))
            return {}
        if op == "report_access":
            ids, hits, last = m.get("ids"), m.get("hits"), m.get("last_hit_ms")
            if (
                _counts(ids)
                and _counts(hits)
                and _counts(last)
                and len({*map(len, (ids, hits, last))}) == 1
            ):
                return {"accepted": self.core.report_access(ids, hits, last)}
            raise InvalidRequest(
                "report_access needs ids, hits and last_hit_ms: equal-length lists of "
                "non-negative integers"
            )
        raise InvalidRequest(f"unknown op {op!r}")


class IpcProposer:
    """A :class:`~llmcache.node.proposer.Proposer` that talks to raft-core over its socket.

    One connection, opened on first use and shared by every coroutine of the loop that uses it;
    requests are pipelined. When raft-core goes away the next request reconnects. Outcomes:
    :class:`NotLeader` (nothing was logged), :class:`UnknownOutcome` (sent, but no answer in
    time or the connection dropped: retry with the same request id), :class:`RaftUnavailable`
    (could not be sent at all).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        connect_timeout: float = 5.0,
        reply_grace_s: float = REPLY_GRACE_S,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.connect_timeout = connect_timeout
        self.reply_grace_s = reply_grace_s
        self._ids = itertools.count(1)
        self._conn: _Conn | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock: asyncio.Lock | None = None

    async def propose(
        self, command: commands.Command, *, wait: Wait = "applied", timeout: float = 10.0
    ) -> Proposal:
        message = {"op": "propose", "data": commands.encode(command), "wait": wait}
        return _proposal_from_wire(await self._request(message, timeout, outcome_unknown=True))

    async def status(self) -> RaftStatus:
        reply = await self._request({"op": "status"}, 10.0, outcome_unknown=False)
        return status_from_wire(reply["status"])

    async def barrier(self, timeout: float = 10.0) -> Proposal:
        """A no-op through the log: once it returns, this node has applied everything that
        was committed before the call (the building block of linearizable reads)."""
        reply = await self._request({"op": "barrier"}, timeout, outcome_unknown=True)
        return _proposal_from_wire(reply)

    async def transfer_leader(self, to: str | None = None, timeout: float = 10.0) -> str | None:
        """Ask the leader to hand over to ``to`` (None: the most caught-up follower); returns
        the leader this node knows once it stepped down (None if not known yet)."""
        reply = await self._request(
            {"op": "transfer_leader", "to": to}, timeout, outcome_unknown=True
        )
        leader: str | None = reply["leader"]
        return leader

    async def add_node(self, addr: str, timeout: float = 30.0) -> None:
        await self._request({"op": "add_node", "addr": addr}, timeout, outcome_unknown=True)

    async def remove_node(self, addr: str, timeout: float = 30.0) -> None:
        await self._request({"op": "remove_node", "addr": addr}, timeout, outcome_unknown=True)

    async def report_access(self, stats: dict[int, tuple[int, int]]) -> int:
        """Hand ``{id: (hits, last_hit_ms)}`` (``AccessStats.drain()``) to raft-core, which
        puts it in the log with its next ``Touch``; returns how many ids it kept."""
        ids = sorted(stats)
        message = {
            "op": "report_access",
            "ids": ids,
            "hits": [stats[i][0] for i in ids],
            "last_hit_ms": [stats[i][1] for i in ids],
        }
        reply = await self._request(message, 10.0, outcome_unknown=False)
        accepted: int = reply["accepted"]
        return accepted

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def _request(
        self, message: dict[str, Any], timeout: float, *, outcome_unknown: bool
    ) -> dict[str, Any]:
        conn = await self._connect()
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        conn.pending[rid] = future
        try:
            conn.writer.write(frame({**message, "id": rid, "timeout": timeout}))
            await conn.writer.drain()
            reply = await asyncio.wait_for(future, timeout + self.reply_grace_s)
        except (TimeoutError, ConnectionLost, ConnectionError) as exc:
            if outcome_unknown:
                raise UnknownOutcome(f"no answer from raft-core: {exc or 'timeout'}") from None
            raise RaftUnavailable(f"no answer from raft-core: {exc or 'timeout'}") from None
        finally:
            conn.pending.pop(rid, None)
        if reply.get("ok"):
            return reply
        raise _error(reply.get("error") or {})

    async def _connect(self) -> _Conn:
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is not None and not self._conn.writer.is_closing():
                return self._conn
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.socket_path)), self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                raise RaftUnavailable(f"raft-core at {self.socket_path}: {exc}") from None
            conn = self._conn = _Conn(writer, {})
            self._reader_task = asyncio.create_task(self._read(reader, conn))
            return conn

    async def _read(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        error: Exception = ConnectionLost("raft-core closed the connection")
        try:
            while (message := await read_frame(reader)) is not None:
                future = conn.pending.get(message.get("id", -1))
                if future is not None and not future.done():
                    future.set_result(message)
        except (ConnectionLost, ConnectionError, msgpack.UnpackException, ValueError) as exc:
            error = ConnectionLost(str(exc))
        finally:
            conn.writer.close()
            if self._conn is conn:
                self._conn = None
            for future in conn.pending.values():
                if not future.done():
                    future.set_exception(error)


@dataclass
class _Conn:
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[dict[str, Any]]]


def _counts(value: Any) -> TypeGuard[list[int]]:
    """A list of non-negative integers (bools are not integers here)."""
    return isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    )


def _error(raw: dict[str, Any]) -> CacheError:
    code, message = raw.get("code"), str(raw.get("message", ""))
    if code == NotLeader.code:
        return NotLeader(message, raw.get("leader"))
    if code == UnknownOutcome.code:
        return UnknownOutcome(message)
    if code == RequestDenied.code:
        return RequestDenied(message)
    if code == InvalidRequest.code:
        return InvalidRequest(message)
    return RaftUnavailable(message or f"raft-core error {code!r}")
