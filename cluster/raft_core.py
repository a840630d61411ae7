"""raft-core: the replication process of a node (pysyncobj + the LMDB state machine).

:class:`RaftCore` is a ``SyncObj`` that owns the node's :class:`~llmcache.node.store.Store` (its
only writer) and :class:`~llmcache.cluster.fsm.StateMachine`. It has one replicated method,
``_apply(data)``, which applies the log entry at ``raftLastApplied + 1`` (pysyncobj counts an
entry as applied only after the method returns); Raft's own entries (leader no-ops, membership)
take indexes too, which the state machine accepts as gaps. Everything runs on pysyncobj's tick
thread except the IPC server and the asyncio methods, which run in the main thread's loop: they
only queue commands (thread-safe in pysyncobj), hand transport work to the tick thread, and never
touch LMDB while a snapshot could be swapping it (``_store_lock``). Log compaction writes its
snapshot from a background thread, out of a read transaction pinned on the tick thread. The
loop also runs leader maintenance (:mod:`llmcache.cluster.maintenance`): workers' access reports
into ``Touch`` on every node, and on the leader only, ``Expire`` and ``Evict``.

Settings that were measured (shared/DESIGN.md §5): journal and full dump always together,
new entries sent once per tick (not per command, not on a 100 ms timer), Raft frames not
compressed, election timeouts 1.5–3 s with the leader fallback at 3 s, and
a mandatory password on a multi-node group. The password keys :class:`RaftCipher`: every Raft
frame is encrypted and authenticated with AES-256-GCM, and frames that fail it are dropped
before they are unpickled. (pysyncobj's own encryption is Fernet: AES-CBC plus HMAC, base64
encoded, a third larger on the wire, with one key for every message ever sent.)

Data directory: ``store/`` (LMDB, what workers open read-only), ``raft/journal``,
``raft/snapshot`` (the full dump, :mod:`llmcache.cluster.snapshot`), ``raft/lock``. Installing a
snapshot replaces ``store/``: a reader in another process notices by the inode of
``store/data.mdb`` changing and reopens.

Run it as ``python -m llmcache.cluster.raft_core --data-dir D --socket PATH --self HOST:PORT
[--peer HOST:PORT ...] [--password-env VAR]`` or through :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import functools
import hashlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pysyncobj import (
    FAIL_REASON,
    SERIALIZER_STATE,
    SyncObj,
    SyncObjConf,
    replicated,
    tcp_connection,
)
from pysyncobj import pickle as pysyncobj_pickle
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.syncobj import SyncObjException

from llmcache.cluster import commands, maintenance, snapshot
from llmcache.cluster.compaction import CompactionHold
from llmcache.cluster.fsm import Result, StateMachine
from llmcache.cluster.ipc import IpcServer
from llmcache.node.errors import RaftUnavailable, RequestDenied
from llmcache.node.proposer import NotLeader, Proposal, RaftStatus, UnknownOutcome, Wait
from llmcache.node.store import Store, fsync_dir

log = logging.getLogger("llmcache.raft")
ROLES = {0: "follower", 1: "candidate", 2: "leader"}
BOOTSTRAP_REQUEST_ID = "bootstrap-default-tenant"
EXIT_APPLY_FAILED = 3
"""Exit status when an entry cannot be applied: stopping beats skipping (replicas would
diverge); the supervisor restarts the node, which replays the entry from its journal."""
AUTH_WARNING_INTERVAL_S = 60.0
SNAPSHOT_JOIN_S = 30.0
ADVERTISE_RETRY_S = 2.0
TRANSFER_RETRY_S = 0.1
SELF_RESOLVE_TIMEOUT_S = 60.0
"""How long raft-core waits for its own Raft host name to resolve (a pod's DNS record may come
after the pod starts); pysyncobj resolves its bind address once and fails on a name it cannot."""


class _StoredFrames:
    """Stands in for ``zlib`` in pysyncobj's connections: frames are zlib streams of stored
    blocks (level 0), which any pysyncobj peer still decompresses. pysyncobj compresses every
    frame at level 3, once per follower: the entries are mostly float32 vectors, which do not
    compress (about 14 % smaller), and it cost the leader ~55 µs per entry per follower."""

    decompress = staticmethod(zlib.decompress)

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        return zlib.compress(data, 0)


tcp_connection.zlib = _StoredFrames
# pysyncobj pickles every command, message and journal record with protocol 2, which has no
# bytes type: each entry's bytes became a latin-1 string, 1.5 times as large, at ~45 µs to
# pickle and ~55 µs to unpickle per 2.5 KB entry, several times per entry on every node.
# Protocol 5 reads back anywhere (unpickling detects the protocol, so old journals load too).
setattr(pysyncobj_pickle, "__protocol", pickle.HIGHEST_PROTOCOL)  # a module global, not mangled


@dataclass(frozen=True)
class RaftCoreOptions:
    """Options of one raft-core process; invalid combinations raise ``ValueError``."""

    data_dir: Path
    socket_path: Path
    self_address: str
    peers: list[str]
    password: str | None = field(default=None, repr=False)
    journal: bool = True
    full_dump: bool = True
    raft_min_timeout_s: float = 1.5
    raft_max_timeout_s: float = 3.0
    leader_fallback_timeout_s: float = 3.0
    log_compaction_min_entries: int = 5000
    log_compaction_min_time_s: float = 300
    durable: bool = True
    max_map_size: int = 64 << 30
    http_url: str | None = None
    """This node's HTTP front door, advertised to the group through the log."""
    maintenance_period_s: float = 5.0
    """How often access reports become ``Touch`` and, on the leader, expiry and eviction run."""

    def __post_init__(self) -> None:
        if self.journal and not self.full_dump:
            raise ValueError(
                "journal without full_dump: once the journal is compacted a restarted node has "
                "no snapshot to start from and is lost; enable both"
            )
        if not (self.journal and self.full_dump):
            raise ValueError(
                "journal and full_dump must both be enabled: the snapshot is how a restarted or "
                "lagging node gets the store"
            )
        if [p for p in self.peers if p != self.self_address] and not self.password:
            raise ValueError(
                "a multi-node Raft group needs a password: the Raft port unpickles what it "
                "receives, so only authenticated peers may talk to it"
            )
        if not 0 < self.raft_min_timeout_s < self.raft_max_timeout_s:
            raise ValueError("need 0 < raft_min_timeout_s < raft_max_timeout_s")
        if not self.maintenance_period_s > 0:
            raise ValueError("maintenance_period_s must be positive")

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def raft_dir(self) -> Path:
        return self.data_dir / "raft"


class RaftCipher:
    """pysyncobj's transport "encryptor" interface: AES-256-GCM keyed by the Raft password.

    Frame: send time (u64, the sender's monotonic seconds, as pysyncobj passes it), a session
    salt (16 random bytes, new per process), a nonce (a 96-bit counter), then the ciphertext
    with its tag; the first three are authenticated as associated data. Each session key is
    HKDF(PBKDF2(password), salt), so nonces never repeat under one key, across restarts and
    nodes included. pysyncobj adds a per-connection random key to every message and rejects
    timestamps that go backwards, so frames cannot be replayed across connections. Used by
    pysyncobj's tick thread only (its transport is single-threaded).
    """

    HEAD = struct.Struct(">Q16s12s")
    MAX_SESSIONS = 256
    """Peers' session keys kept; a peer restarting makes a new one."""

    def __init__(self, password: str) -> None:
        self._master = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), b"llmcache-raft-v2", 100_000
        )
        self._salt = os.urandom(16)
        self._sealer = AESGCM(self._session_key(self._salt))
        self._counter = itertools.count(1)
        self._openers: dict[bytes, AESGCM] = {}
        self._opened: tuple[bytes, int, bytes] | None = None  # pysyncobj opens a frame twice
        self._last_warning = -AUTH_WARNING_INTERVAL_S

    def _session_key(self, salt: bytes) -> bytes:
        hkdf = HKDF(algorithm=SHA256(), length=32, salt=salt, info=b"llmcache raft frames")
        return hkdf.derive(self._master)

    def encrypt_at_time(self, data: bytes, ts: int) -> bytes:
        head = self.HEAD.pack(ts, self._salt, next(self._counter).to_bytes(12, "big"))
        return head + self._sealer.encrypt(head[-12:], data, head)

    def extract_timestamp(self, token: bytes) -> int:
        return self._open(token)[0]

    def decrypt(self, token: bytes) -> bytes:
        return self._open(token)[1]

    def _open(self, token: bytes) -> tuple[int, bytes]:
        if self._opened is not None and self._opened[0] is token:
            return self._opened[1], self._opened[2]
        try:
            ts, salt, nonce = self.HEAD.unpack_from(token)
            opener = self._openers.get(salt)
            if opener is None:
                if len(self._openers) >= self.MAX_SESSIONS:
                    self._openers.pop(next(iter(self._openers)))
                opener = AESGCM(self._session_key(salt))
            data = opener.decrypt(nonce, token[self.HEAD.size :], token[: self.HEAD.size])
        except (struct.error, InvalidTag):
            # pysyncobj drops the connection silently; say why, but not on every retry.
            if time.monotonic() - self._last_warning > AUTH_WARNING_INTERVAL_S:
                self._last_warning = time.monotonic()
                log.warning("a Raft peer failed authentication (another cluster password?)")
            raise ValueError("Raft frame failed authentication") from None
        self._openers[salt] = opener  # only keys that opened a frame are kept
        self._opened = (token, ts, data)
        return ts, data


class RaftStateLost(Exception):
    """The store is ahead of a Raft log that is gone: starting would skip new entries."""


class _SnapshotInBackground(Exception):
    """Raised by the serializer to tell pysyncobj the snapshot is being written elsewhere."""


class RaftCore(SyncObj):  # type: ignore[misc]  # pysyncobj is untyped
    """The Raft node of one LLM-Cache node; see the module docstring.

    ``propose``, ``barrier``, ``transfer_leadership``, ``add_node`` and ``remove_node`` are
    coroutines for the main thread's asyncio loop; pysyncobj's callbacks come back to it with
    ``call_soon_threadsafe``. ``status`` may be called from any thread.
    """

    def __init__(self, options: RaftCoreOptions) -> None:
        # Everything set before SyncObj.__init__ is excluded from pysyncobj's own pickling,
        # and the encryptor property must answer while SyncObj.__init__ inspects the class.
        self.options = options
        self.self_id = options.self_address
        self._auth = RaftCipher(options.password) if options.password else None
        self._role = "follower"
        self.bootstrapped = False  # tenant default seen in the store (set by run())
        self.access = maintenance.AccessBuffer()  # workers' reports until the next Touch
        self._store_lock = threading.Lock()
        options.raft_dir.mkdir(parents=True, exist_ok=True)
        snapshot.recover(options.store_dir)
        self.store = self._open_store()
        self.fsm = StateMachine(self.store)
        self._applied = self.store.applied_index()
        if self._applied and not any(
            p.exists() for p in (options.raft_dir / "journal", self.snapshot_path)
        ):
            self.store.close()
            raise RaftStateLost(
                f"the store is at applied index {self._applied} but {options.raft_dir} holds no "
                f"Raft log, so new entries would be skipped as already applied; move "
                f"{options.store_dir} away to resync it from the group"
            )
        self._outstanding = 0  # proposals whose callback has not fired yet
        self._outstanding_lock = threading.Lock()
        self._wake: PipeNotifier | None = None
        self._tick_calls: deque[Callable[[], None]] = deque()
        self._acks: deque[Callable[[], None]] = deque()  # answered after the tick's fsync
        self._synced = self._applied  # applied index known to be fsynced
        self._snapshot_state: int = SERIALIZER_STATE.NOT_SERIALIZING
        self._snapshot_thread: threading.Thread | None = None
        conf = SyncObjConf(
            autoTick=True,
            # Batch mode only stops pysyncobj from sending on every command: _on_tick sends the
            # tick's new entries once per follower (see there).
            appendEntriesUseBatch=True,
            raftMinTimeout=options.raft_min_timeout_s,
            raftMaxTimeout=options.raft_max_timeout_s,
            leaderFallbackTimeout=options.leader_fallback_timeout_s,
            connectionTimeout=max(3.5, options.raft_max_timeout_s),
            connectionRetryTime=1.0,
            logCompactionMinEntries=options.log_compaction_min_entries,
            logCompactionMinTime=options.log_compaction_min_time_s,
            journalFile=str(options.raft_dir / "journal"),
            fullDumpFile=str(self.snapshot_path),
            serializer=self._serialize,
            serializeChecker=self._snapshot_progress,
            deserializer=self._deserialize,
            dynamicMembershipChange=True,
            onStateChanged=self._on_state_changed,
            bindAddress=options.self_address,
            maxBindRetries=10,
            # A peer's name may resolve only after its pod started, and resolves to a new address
            # after the pod restarts: retry failed names after 1 s (default 30 s) and re-resolve
            # every 5 s (default 600 s, which would keep dialling a restarted pod's old address).
            dnsFailCacheTime=1.0,
            dnsCacheTime=5.0,
        )
        peers = [p for p in options.peers if p != options.self_address]
        super().__init__(options.self_address, peers, conf)
        self._compaction_hold = CompactionHold(self)  # see cluster/compaction.py
        self.addOnTickCallback(self._on_tick)
        self._leader_contact: float | None = None  # monotonic time of the last append entries
        self._conflict: tuple[int, int] | None = None  # (term, index): see _hold_conflict
        self._sent: tuple[int, int, int] = (0, 0, 0)  # (term, last index, commit) sent last
        self._large_entry = b""  # the chunks of a large entry received so far
        # pysyncobj keeps no time of last contact: note it on the way into its own handler.
        transport = self._SyncObj__transport
        handler = self._SyncObj__onMessageReceived

        def on_message(node: Any, message: Any) -> None:
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "append_entries":
                self._leader_contact = time.monotonic()
                message = self._hold_conflict(self._whole_large_entry(message))
            in_flight = self._SyncObj__raftNextIndex.get(node) if kind == "next_node_idx" else None
            handler(node, message)
            if in_flight is not None and message["success"] and not message["reset"]:
                self._keep_next_index(node, in_flight)
            chunk = message.get("serialized") if isinstance(message, dict) else None
            if chunk is not None and not chunk[2]:
                # A follower answers nothing until a snapshot's last chunk, so the leader's
                # connection timed out (connectionTimeout) on any transfer longer than that,
                # and a restarted transfer whose first chunk was lost was spliced onto the
                # old one: a corrupt file, again and again (seen catching up 100k entries).
                # Acknowledge each chunk, as pysyncobj does for chunked large entries.
                self._SyncObj__sendNextNodeIdx(node, success=False, reset=False)

        transport.setOnMessageReceivedCallback(on_message)
        serializer = self._SyncObj__serializer
        next_chunk = serializer.getTransmissionData

        def paced_chunk(node: Any) -> Any:
            # pysyncobj queues snapshot chunks for 0.1 s per send, whatever the socket drains,
            # into a bytes buffer it grows and slices with a copy per call: at 500 MB the
            # leader's tick thread spent seconds copying, heartbeats queued behind the chunks,
            # and the group lost its leader again and again. While this follower's connection
            # still holds unsent bytes, no new chunk: None sends a heartbeat instead.
            connection = transport._connections.get(node)
            if connection is not None and connection._TcpConnection__writeBuffer:
                return None
            return next_chunk(node)

        serializer.getTransmissionData = paced_chunk

    def _keep_next_index(self, node: Any, in_flight: int) -> None:
        """Work around pysyncobj's pipelining: the leader sends a follower's entries batch after
        batch, moving its next index on, but each acknowledgement set the next index back to
        just after the batch it acknowledged, so every batch sent meanwhile was sent again and
        the follower truncated and re-appended it (one append entries in seven, 3,000 puts).
        An acknowledgement now only moves the match index; the next index stays with what is
        in flight. A follower that lacks entries still answers a refusal that resets it."""
        if self._SyncObj__raftNextIndex.get(node, in_flight) < in_flight:
            self._SyncObj__raftNextIndex[node] = in_flight

    def _whole_large_entry(self, message: dict[str, Any]) -> dict[str, Any]:
        """Work around a pysyncobj bug: an entry of 64 KB or more travels in chunks of its
        pickle, and the leader marks a chunk the last when it reaches the end of the *entry*,
        not of its pickle, which is a few bytes longer. When those bytes spill into one more
        chunk, the follower unpickles a truncated entry ("pickle data was truncated", a
        traceback per entry; with pysyncobj's protocol-2 pickles, 1.5 times as large, it was
        almost every large entry). So a "finish" chunk whose data does not unpickle yet is
        passed on as "process", and the one that completes it as "finish"."""
        transmission = message.get("transmission")
        if transmission is None:
            return message
        data = message.get("data", b"")
        self._large_entry = data if transmission == "start" else self._large_entry + data
        if transmission == "finish":
            try:
                pickle.loads(self._large_entry)
            except (pickle.UnpicklingError, EOFError, ValueError):
                return {**message, "transmission": "process"}
            self._large_entry = b""
        return message

    def _hold_conflict(self, message: dict[str, Any]) -> dict[str, Any]:
        """Work around a pysyncobj livelock (found by jepsen_like item 1): the leader sends
        several append-entries batches per tick, moving its next index for a follower on
        optimistically. A follower whose log conflicts at index i answers the first batch
        "reset to i", but answers each later batch, whose previous index lies beyond its log,
        "reset to the end of my log"; the last answer wins, the leader retries from the same
        conflicting index, and the follower never applies again. So, in a term in which this
        follower found a conflict at i, a batch starting beyond its log is answered as a
        conflict at i too (pysyncobj's own reply to a mismatched term), until a batch matches.
        """
        if "prevLogIdx" not in message or message.get("transmission") is not None:
            return message
        prev, term = message["prevLogIdx"], message["term"]
        if prev <= self._SyncObj__getCurrentLogIndex():
            mine = self._SyncObj__getEntries(prev, 1)
            mismatch = bool(mine) and mine[0][2] != message["prevLogTerm"]
            self._conflict = (term, prev) if mismatch else None
        elif self._conflict is not None and self._conflict[0] == term:
            return {**message, "prevLogIdx": self._conflict[1], "prevLogTerm": -1, "entries": []}
        return message

    @property
    def encryptor(self) -> RaftCipher | None:
        return self._auth

    @property
    def snapshot_path(self) -> Path:
        return self.options.raft_dir / "snapshot"

    # -- the replicated state machine (tick thread) ----------------------------------------

    @replicated  # type: ignore[untyped-decorator]
    def _apply(self, data: bytes) -> tuple[int, dict[str, Any], str | None, str]:
        index = self.raftLastApplied + 1
        try:
            result = self.fsm.apply(index, data)
        except BaseException:
            log.critical("cannot apply log index %d; stopping", index, exc_info=True)
            logging.shutdown()
            os._exit(EXIT_APPLY_FAILED)
        if not result.value.get("skipped"):
            self._applied = index
        return result.index, result.value, result.error, result.message

    def _serialize(self, path: str, raft_state: tuple[Any, ...]) -> None:
        """pysyncobj's serializer, on the tick thread at ``raftLastApplied``: pin that state in
        a read transaction and write the snapshot from a thread (copying a large store takes
        seconds, long enough to miss heartbeats). pysyncobj would rename ``path`` into place at
        once, so the thread installs the file itself and :meth:`_snapshot_progress` (the
        ``serializeChecker``) tells pysyncobj when the log may be compacted; raising here
        leaves pysyncobj waiting for that verdict, and the previous snapshot in place."""
        txn = self.store.env.begin(buffers=False)
        self._snapshot_state = SERIALIZER_STATE.SERIALIZING
        self._snapshot_thread = threading.Thread(
            target=self._write_snapshot, args=(txn, raft_state), name="snapshot", daemon=True
        )
        self._snapshot_thread.start()
        raise _SnapshotInBackground(path)

    def _write_snapshot(self, txn: Any, raft_state: tuple[Any, ...]) -> None:
        final = self.snapshot_path
        tmp = final.with_name(final.name + ".next")
        state: int = SERIALIZER_STATE.FAILED
        started = time.monotonic()
        try:
            manifest = snapshot.save(tmp, self.store, raft_state, txn)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            took = time.monotonic() - started
            log.info("snapshot written at applied index %d in %.1f s", manifest.applied_index, took)
            state = SERIALIZER_STATE.SUCCESS
        except Exception:
            log.exception("writing a snapshot failed; the log is not compacted")
        finally:
            txn.abort()
            self._snapshot_state = state

    def _snapshot_progress(self) -> int:
        state: int = self._snapshot_state
        if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
            self._snapshot_state = SERIALIZER_STATE.NOT_SERIALIZING
        return state

    def join_snapshot(self, timeout: float | None = None) -> bool:
        """Wait for a background snapshot to finish; False if it is still running."""
        thread = self._snapshot_thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _deserialize(self, path: str) -> tuple[Any, ...]:
        # Our own snapshot may still be copying the store, and may even have replaced the file
        # pysyncobj just received (then Raft simply sends it again): both are whole snapshots.
        self.join_snapshot()
        store_dir = self.options.store_dir
        loaded = snapshot.load(path, snapshot.staging_dir(store_dir), self.store.applied_index())
        if loaded.store_dir is not None:
            with self._store_lock:
                self.store.close()
                try:
                    snapshot.install(loaded.store_dir, store_dir)
                finally:
                    snapshot.recover(store_dir)
                    self.store = self._open_store()
                    self.fsm = StateMachine(self.store)
            log.info("installed snapshot at applied index %d", loaded.manifest.applied_index)
            self._restart_election_timer()
        self._applied = self.store.applied_index()
        return loaded.raft_state

    def _restart_election_timer(self) -> None:
        """A full election timeout from now. An install runs on the tick thread for as long as
        the store is big, while the deadline set by the leader's last chunk runs out; the next
        tick checks the deadline before it reads the leader's queued heartbeats, so the node
        would start an election (pysyncobj has no PreVote) and depose a healthy leader with its
        higher term. A node that has just taken the leader's snapshot has heard from it."""
        timeout = self._SyncObj__generateRaftTimeout()
        self._SyncObj__raftElectionDeadline = time.monotonic() + timeout

    def _open_store(self) -> Store:
        # LMDB does not fsync per commit: _on_tick fsyncs once per tick for every entry applied
        # in it (group commit), before their proposers hear of them.
        o = self.options
        return Store(o.store_dir, durable=False, max_map_size=o.max_map_size)

    def _on_tick(self) -> None:
        if self._wake is None:  # created here: the poller belongs to the tick thread
            self._wake = PipeNotifier(self._poller)
        # pysyncobj applies a tick's entries before it runs the tick callbacks.
        if self.options.durable and self._synced != self._applied:
            with self._store_lock:
                self.store.env.sync(True)
            self._synced = self._applied
        while self._acks:
            self._acks.popleft()()
        while self._tick_calls:
            self._tick_calls.popleft()()
        self._send_new_entries()
        self._compaction_hold.tick()  # no log compaction while a snapshot is in flight
        # A group of one commits an entry on the tick after the one that logged it, and that
        # tick would wait for the poll timeout (50 ms): wake it at once while proposals wait.
        # Bigger groups are woken by their followers' acknowledgements.
        if self._outstanding and not self.otherNodes:
            self._notify()

    def _send_new_entries(self) -> None:
        """On the leader, send this tick's new entries and commit index to every follower at
        once. pysyncobj's own choice is between sending on a timer (``appendEntriesPeriod``,
        100 ms added to every write) and, without batching, one message per command per
        follower, each pickled, compressed and encrypted on its own: with tens of proposals per
        tick that was the largest part of the leader's CPU per write. Sending once per tick
        gives the latency of per-command sends at nearly the cost of the timer."""
        if not self._isLeader():
            return
        sent = (self.raftCurrentTerm, self._SyncObj__getCurrentLogIndex(), self.raftCommitIndex)
        if sent != self._sent:
            self._SyncObj__sendAppendEntries()
            self._sent = sent

    def _applyCommand(self, command: Any, callback: Any, commandType: Any = None) -> None:
        super()._applyCommand(command, callback, commandType)
        # In batch mode pysyncobj no longer wakes its tick for a new command; do it here, or
        # the command would wait for the poll timeout (autoTickPeriod, 50 ms).
        self._notify()

    def _on_tick_thread(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the tick thread (pysyncobj's transport is not thread-safe)."""
        self._tick_calls.append(call)
        self._notify()

    def _notify(self) -> None:
        """Wake the tick thread (from any thread)."""
        try:
            if self._wake is not None:
                self._wake.notify()
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the tick has not read yet: it will wake

    def _track(self, delta: int) -> None:
        with self._outstanding_lock:
            self._outstanding += delta

    def _on_state_changed(self, old: int, new: int) -> None:
        self._role = ROLES.get(new, str(new))
        log.info("raft role %s -> %s", ROLES.get(old), self._role)

    # -- reads (any thread) -----------------------------------------------------------------

    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else str(leader.id)

    def status(self) -> RaftStatus:
        leader = self.leader_address()
        return RaftStatus(
            node_id=self.self_id,
            role=self._role,
            term=self.raftCurrentTerm,
            leader=leader,
            # A follower's own commit index stops at the end of its log, so a node that is
            # still receiving a snapshot would look caught up: report the leader's when known.
            commit_index=max(self.raftCommitIndex, self._SyncObj__leaderCommitIndex or 0),
            applied_index=self._applied,
            has_quorum=self.hasQuorum,
            ready=self.isReady() and leader is not None and self.bootstrapped,
            peers={n.id: {"connected": self.isNodeConnected(n)} for n in self.otherNodes},
            leader_contact_ms=self._leader_contact_ms(),
        )

    def _leader_contact_ms(self) -> int | None:
        if self._role == "leader":
            return 0
        if self._leader_contact is None:
            return None
        return int((time.monotonic() - self._leader_contact) * 1000)

    def read_store(self, fn: Callable[[Store], Any]) -> Any:
        """Run ``fn`` on the store, safe against a concurrent snapshot install."""
        with self._store_lock:
            return fn(self.store)

    def report_access(self, ids: list[int], hits: list[int], last_hit_ms: list[int]) -> int:
        """Buffer a worker's access report until the next maintenance period (loop thread)."""
        return self.access.add(ids, hits, last_hit_ms)

    # -- writes (asyncio loop of the main thread) ---------------------------------------------

    def propose_forwarded(self, data: bytes) -> None:
        """Append ``data`` to the log from any role, without waiting: on a follower pysyncobj
        forwards it to the leader, and drops it (reporting MISSING_LEADER) while none is known.
        For small best-effort entries only (``Touch``): the outcome is logged, never awaited."""

        def done(_res: Any, err: int) -> None:
            if err != FAIL_REASON.SUCCESS:
                log.debug("a forwarded entry was not appended (reason %s)", err)

        self._apply(data, callback=done)

    async def propose(self, data: bytes, wait: Wait = "applied", timeout: float = 10.0) -> Proposal:
        """Append ``data`` to the log (this node must lead). ``none`` returns once pysyncobj
        queued it (index 0: not known yet); ``committed`` and ``applied`` once the entry is
        applied here (on the leader pysyncobj reports commit after the local apply, which is
        also when LMDB shows it). Raises NotLeader or UnknownOutcome."""
        if not self._isLeader():
            raise NotLeader(f"{self.self_id} is not the leader", self.leader_address())
        future = self._callback_future()
        # Times in the log are the leader's (node/clock.py), whichever node prepared the write.
        self._apply(commands.rebase(data, int(time.time() * 1000)), callback=future.callback)
        if wait == "none":
            return Proposal(0, self.raftCurrentTerm, self.self_id)
        res = await future.result(timeout, "propose")
        result = Result(*res)
        term = self.raftCurrentTerm
        return Proposal(result.index, term, self.self_id, result if wait == "applied" else None)

    async def barrier(self, timeout: float = 10.0) -> Proposal:
        """Propose a :class:`~llmcache.cluster.commands.Noop`; once it is applied every entry
        committed before the call is applied here (for linearizable reads)."""
        return await self.propose(commands.encode(commands.Noop()), "applied", timeout)

    async def transfer_leadership(self, to: str | None = None, timeout: float = 10.0) -> str | None:
        """Hand leadership to ``to`` (None: the most caught-up connected follower) and wait,
        within ``timeout``, until this node stepped down; returns the leader it then knows."""
        if not self._isLeader():
            raise NotLeader(f"{self.self_id} is not the leader", self.leader_address())
        if to is not None and to not in {n.id for n in self.otherNodes}:
            raise RequestDenied(f"leadership transfer: {to} is not another member of this group")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            future = self._callback_future()
            self._on_tick_thread(functools.partial(self.transferLeadership, to, future.callback))
            try:
                await future.result(max(0.1, deadline - loop.time()), "leadership transfer")
            except RequestDenied:
                # pysyncobj denies a target whose log is not fully matched yet, which under
                # writes is a matter of a heartbeat or two; anything else (not a member, no
                # follower connected) stays denied until the deadline.
                if loop.time() + TRANSFER_RETRY_S >= deadline or not self._isLeader():
                    raise
                await asyncio.sleep(TRANSFER_RETRY_S)
                continue
            # The target campaigns at once, but loses if writes reached the others and not it
            # in the meantime (they refuse a shorter log), and this node may win the election
            # that follows: wait for another leader, else ask again while the deadline allows.
            retry_at = min(deadline, loop.time() + self.options.raft_max_timeout_s)
            while loop.time() < deadline:
                leader = self.leader_address()
                if leader is not None and leader != self.self_id:
                    return leader
                if self._isLeader() and loop.time() >= retry_at:
                    break  # still, or again, the leader: ask again
                await asyncio.sleep(0.05)
            else:
                if self._isLeader():
                    raise UnknownOutcome("leadership transfer sent but this node still leads")
                return self.leader_address()

    async def add_node(self, addr: str, timeout: float = 30.0) -> None:
        """Add one node to the group (committed when this returns)."""
        await self._change_membership(self.addNodeToCluster, addr, timeout)

    async def remove_node(self, addr: str, timeout: float = 30.0) -> None:
        """Remove one node from the group (committed when this returns)."""
        await self._change_membership(self.removeNodeFromCluster, addr, timeout)

    async def _change_membership(self, change: Any, addr: str, timeout: float) -> None:
        if not self._isLeader():
            raise NotLeader(f"{self.self_id} is not the leader", self.leader_address())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # pysyncobj denies a change until a new leader has applied its first entry, and while an
        # earlier change is uncommitted: both pass by themselves, so wait them out.
        while not self._membership_change_allowed() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        future = self._callback_future()
        change(addr, callback=future.callback)
        await future.result(max(0.1, deadline - loop.time()), "membership change")

    def _membership_change_allowed(self) -> bool:
        applied = self._SyncObj__raftLastApplied
        noop, pending = self._SyncObj__noopIDx, self._SyncObj__changeClusterIDx
        return (noop is None or applied >= noop) and (pending is None or applied >= pending)

    def _callback_future(self) -> _CallbackFuture:
        self._track(1)
        return _CallbackFuture(asyncio.get_running_loop(), self)


class _CallbackFuture:
    """A pysyncobj callback ``(result, fail_reason)`` delivered to an asyncio future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, core: RaftCore) -> None:
        self.loop = loop
        self.core = core
        self.future: asyncio.Future[tuple[Any, int]] = loop.create_future()

    def callback(self, res: Any, err: int) -> None:  # tick thread (or the caller's on QUEUE_FULL)
        self.core._track(-1)
        # Answered at the end of the tick, after the group commit's fsync.
        self.core._acks.append(lambda: self._deliver(res, err))

    def _deliver(self, res: Any, err: int) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are shutting down
            self.loop.call_soon_threadsafe(self._settle, res, err)

    def _settle(self, res: Any, err: int) -> None:
        if not self.future.done():
            self.future.set_result((res, err))

    async def result(self, timeout: float, what: str) -> Any:
        try:
            res, err = await asyncio.wait_for(self.future, timeout)
        except TimeoutError:
            raise UnknownOutcome(f"{what}: no outcome within {timeout} s") from None
        if err == FAIL_REASON.SUCCESS:
            return res
        if err == FAIL_REASON.REQUEST_DENIED:
            raise RequestDenied(f"{what} denied by Raft")
        if err == FAIL_REASON.QUEUE_FULL:
            raise RaftUnavailable(f"{what}: the Raft command queue is full")
        if err in (FAIL_REASON.NOT_LEADER, FAIL_REASON.MISSING_LEADER):
            raise NotLeader(f"{what}: leadership lost", self.core.leader_address())
        raise UnknownOutcome(f"{what}: leader changed before commit (reason {err})")


# -- the process -------------------------------------------------------------------------------


def run(options: RaftCoreOptions) -> int:
    """Run raft-core until SIGTERM/SIGINT; returns the process exit status (0 on a clean stop)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO,
            format="%(asctime)s raft-core %(levelname)s %(name)s: %(message)s",
        )
    return asyncio.run(_serve(options))


async def _serve(options: RaftCoreOptions) -> int:
    options.raft_dir.mkdir(parents=True, exist_ok=True)
    with open(options.raft_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("another raft-core holds %s", options.data_dir)
            return 1
        return await _serve_locked(options)


async def _serve_locked(options: RaftCoreOptions) -> int:
    snapshot.recover(options.store_dir)
    dump = options.raft_dir / "snapshot"
    if dump.exists():
        # pysyncobj would log a bad dump and carry on, unable to apply anything: fail-stop.
        try:
            snapshot.load(dump, snapshot.staging_dir(options.store_dir), sys.maxsize)
        except snapshot.SnapshotInvalid as exc:
            log.error("snapshot %s is invalid (%s); move the raft dir away to resync", dump, exc)
            return 1
    if not await _resolvable(options.self_address.rpartition(":")[0], SELF_RESOLVE_TIMEOUT_S):
        log.error("this node's Raft host %s does not resolve", options.self_address)
        return 1
    try:
        core = RaftCore(options)
    except RaftStateLost as exc:
        log.error("%s", exc)
        return 1
    try:
        core.waitBinded()
    except SyncObjException:
        log.error("cannot bind the Raft port %s", options.self_address)
        core.destroy_synchronous()
        return 1
    server = IpcServer(core, options.socket_path)
    await server.start()
    log.info("raft-core %s serving on %s", options.self_address, options.socket_path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    status = 0
    bootstrap = asyncio.create_task(_bootstrap_default_tenant(core))
    maintain = asyncio.create_task(maintenance.run(core, options.maintenance_period_s))
    advertise = asyncio.create_task(_advertise(core, options.http_url))
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if not core.tick_thread_alive():
            log.error("the Raft tick thread died")
            status = 1
            break
    bootstrap.cancel()
    maintain.cancel()
    advertise.cancel()
    if status == 0 and core._isLeader() and core.otherNodes:
        try:
            leader = await core.transfer_leadership(None, 2 * options.raft_max_timeout_s)
            log.info("handed leadership to %s", leader)
        except Exception as exc:  # stopping anyway: the followers will elect after a timeout
            log.warning("leadership transfer failed: %s", exc)
    await server.close()
    core.destroy_synchronous()
    if core.join_snapshot(SNAPSHOT_JOIN_S):
        core.store.close()
    else:  # a partial snapshot file is harmless: the previous one and the journal stand
        log.warning("exiting while a snapshot is still being written")
    log.info("raft-core %s stopped", options.self_address)
    return status


async def _resolvable(host: str, timeout: float) -> bool:
    """True once ``host`` resolves (checked every 0.5 s), False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            await asyncio.get_running_loop().getaddrinfo(host, None)
            return True
        except socket.gaierror:
            if time.monotonic() >= deadline:
                return False
        if not waiting:
            log.warning("waiting for this node's Raft host %s to resolve", host)
            waiting = True
        await asyncio.sleep(0.5)


async def _bootstrap_default_tenant(core: RaftCore) -> None:
    """Once this node leads a ready group, create tenant ``default`` if it does not exist.

    The fixed request id makes the proposal idempotent if two leaders in turn both propose it.
    """
    upsert = commands.encode(
        commands.TenantUpsert(tenant="default", request_id=BOOTSTRAP_REQUEST_ID)
    )

    def exists(store: Store) -> bool:
        with store.read() as txn:
            return store.tenant(txn, "default") is not None

    # Until tenant default exists, requests without a token would fail: not ready yet.
    while not core.read_store(exists):
        st = core.status()
        if st.role == "leader" and core.isReady():
            try:
                await core.propose(upsert, "applied", 10.0)
            except Exception as exc:  # leadership moved, or slow: look again
                log.info("bootstrap of tenant default: %s", exc)
        await asyncio.sleep(0.5)
    core.bootstrapped = True


async def _advertise(core: RaftCore, url: str | None) -> None:
    """Once the group is ready, make sure its replicated member URLs name ``url`` for this node
    (followers forward writes to a leader by this URL when their config does not list it)."""
    if url is None or not core.options.peers:  # a group of one forwards to nobody
        return
    data = commands.encode(commands.Advertise(address=core.self_id, http_url=url))
    while core.read_store(lambda store: store.member_urls().get(core.self_id)) != url:
        if core.status().ready:
            if core._isLeader():
                with contextlib.suppress(Exception):  # leadership moved: look again
                    await core.propose(data, "applied", 10.0)
            else:
                core.propose_forwarded(data)
        await asyncio.sleep(ADVERTISE_RETRY_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmcache.cluster.raft_core", description="Run a node's raft-core."
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True, help="the IPC Unix socket")
    parser.add_argument("--self", dest="self_address", required=True, help="HOST:PORT")
    parser.add_argument("--peer", action="append", default=[], help="HOST:PORT (repeatable)")
    parser.add_argument("--password-env", help="environment variable holding the Raft password")
    parser.add_argument("--log-compaction-min-entries", type=int, default=5000)
    parser.add_argument(
        "--election-timeout",
        nargs=2,
        type=float,
        metavar=("MIN", "MAX"),
        default=(2.0, 4.0),
        help="seconds; the leader fallback timeout follows MAX",
    )
    parser.add_argument("--no-fsync", action="store_true", help="LMDB durable=False")
    parser.add_argument(
        "--maintenance-period", type=float, default=5.0, help="seconds between maintenance runs"
    )
    args = parser.parse_args(argv)
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if not password:
            print(f"raft-core: ${args.password_env} is not set", file=sys.stderr)
            return 2
    try:
        options = RaftCoreOptions(
            data_dir=args.data_dir,
            socket_path=args.socket,
            self_address=args.self_address,
            peers=args.peer,
            password=password,
            raft_min_timeout_s=args.election_timeout[0],
            raft_max_timeout_s=args.election_timeout[1],
            leader_fallback_timeout_s=args.election_timeout[1],
            log_compaction_min_entries=args.log_compaction_min_entries,
            durable=not args.no_fsync,
            maintenance_period_s=args.maintenance_period,
        )
    except ValueError as exc:
        print(f"raft-core: {exc}", file=sys.stderr)
        return 2
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
