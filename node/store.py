"""The LMDB scalar store: the replicated state of one node.

One LMDB environment (a directory) with named sub-databases:

============ ================================================ ===================================
db           key                                              value
============ ================================================ ===================================
``meta``     ``applied_index``, ``next_id``, ``config_index``  u64 / msgpack
             ``schema``, ``last_ts_ms``                        ``last_ts_ms``: latest leader stamp
             ``member:`` + Raft address                        a member's HTTP URL (``Advertise``)
``entries``  id (u64 big-endian)                              msgpack entry record (no vector)
``vectors``  id                                               float32 little-endian bytes
``exact``    tenant NUL exact_key (32 bytes)                  id
``keys``     tenant NUL namespace NUL caller key              id (exact-only "kv" entries)
``members``  tenant NUL namespace NUL scope NUL id            empty (scope membership)
``tags``     tenant NUL tag NUL id                            empty
``expiry``   expires_at_ms (u64) id                           empty (only entries with a TTL)
``feed``     applied index (u64)                              msgpack [[op, id, scope key]...]
``tenants``  tenant                                           msgpack tenant config
``config``   ``*`` / tenant / tenant NUL namespace            msgpack settings
``nsmeta``   tenant NUL namespace                             msgpack {embedder, dim}
``stats``    tenant                                           msgpack [entries, bytes, evicted,
                                                              expired]
``requests`` request id                                       msgpack [index, result]
``reqorder`` applied index (u64)                              request id (to prune ``requests``)
``feedback`` applied index (u64)                              msgpack feedback label on a hit
``access``   id                                               msgpack [hits, last_hit_ms]
                                                              (replicated by ``Touch``)
``quality``  tenant NUL namespace                             msgpack {correct: [...], wrong:
                                                              [...]} labels by similarity bucket
============ ================================================ ===================================

Only the state machine (``llmcache.cluster.fsm``) writes it, from one thread of one process
(raft-core); any number of threads and processes read it concurrently (LMDB MVCC: a reader sees
one committed transaction, never a half-applied command).

Durability: with ``durable=True`` (the default) each write transaction is fsynced before
:meth:`write` returns, so a committed apply survives power loss. With ``durable=False`` LMDB skips
the fsync (``sync=False``, ``metasync=False``): a process crash still loses nothing (the pages are
in the OS cache) and a power loss can only drop the last transactions as a whole — the store
stays consistent and its ``applied_index`` rolls back with them, so Raft re-applies them.

Size: the map is ``max_map_size`` from the start. That reserves address space only (the file
grows with the pages written), and it never has to be resized while the process runs: py-lmdb's
``set_mapsize`` kills every open transaction of the process ("closed/deleted object": a lookup
in another thread, a snapshot being copied) and LMDB forbids it while one is active. A write
past it raises :class:`~llmcache.node.errors.StoreFull` and eviction has to make room. A
reader whose own ``max_map_size`` is smaller than the writer's adopts the larger map once no
read of its process is in flight.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgpack
import numpy as np

from llmcache.node.errors import StoreFull

T = TypeVar("T")
U64 = struct.Struct(">Q")
SCHEMA_VERSION = 1
DB_NAMES = (
    "meta",
    "entries",
    "vectors",
    "exact",
    "keys",
    "members",
    "tags",
    "expiry",
    "feed",
    "tenants",
    "config",
    "nsmeta",
    "stats",
    "requests",
    "reqorder",
    "feedback",
    "access",
    "quality",
)
REOPEN_CHECK_S = 1.0
"""How often a read-only store checks whether its directory was replaced by a snapshot."""
MEMBER_PREFIX = b"member:"
"""Prefix of ``meta`` keys holding members' HTTP URLs, after it the Raft address."""
FEED_RETENTION = 100_000
"""Log indexes of change feed kept; a reader further behind rebuilds its indexes instead."""
OP_REMOVE, OP_ADD = 0, 1
"""Change-feed operations: a row ``[op, id, scope key]`` per changed entry, in apply order."""


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (the directory entry itself is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def u64(value: int) -> bytes:
    return U64.pack(value)


def from_u64(data: bytes) -> int:
    value: int = U64.unpack(data)[0]
    return value


def join(*parts: str | bytes) -> bytes:
    return b"\0".join(p.encode() if isinstance(p, str) else p for p in parts)


def scope_key(tenant: str, namespace: str, scope: str) -> bytes:
    """The key of one (tenant, namespace, scope): the unit of exact and semantic matching."""
    return join(tenant, namespace, scope)


def config_key(tenant: str = "", namespace: str = "") -> bytes:
    """Key of a ``config`` row: the cluster's (``*``, never a tenant name), a tenant's or a
    namespace's."""
    if namespace:
        return join(tenant, namespace)
    return tenant.encode() if tenant else b"*"


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass(frozen=True)
class Entry:
    """One cached entry as stored (the vector lives in its own db: see :meth:`Store.vector`)."""

    id: int
    tenant: str
    namespace: str
    scope: str
    kind: str
    key: str
    exact_key: bytes
    text: str
    prompt: str
    response: bytes
    content_type: str
    created_at_ms: int
    expires_at_ms: int
    tags: tuple[str, ...]
    usage: dict[str, int]
    embedder: str
    meta: dict[str, str]
    size: int

    @classmethod
    def from_record(cls, entry_id: int, record: dict[str, Any]) -> Entry:
        return cls(id=entry_id, **{**record, "tags": tuple(record["tags"])})

    def record(self) -> dict[str, Any]:
        fields = dict(self.__dict__)
        del fields["id"]
        fields["tags"] = list(self.tags)
        return fields

    @property
    def scope_key(self) -> bytes:
        return scope_key(self.tenant, self.namespace, self.scope)

    def expired(self, now_ms: int) -> bool:
        return self.expires_at_ms != 0 and self.expires_at_ms <= now_ms


class Store:
    """An LMDB environment holding the replicated state; see the module docstring.

    Thread-safe and process-safe for readers; writes must come from one thread of one process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_map_size: int = 64 << 30,
        durable: bool = True,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.max_map_size = max_map_size
        self.readonly = readonly
        self._options: dict[str, Any] = {
            "map_size": max_map_size,
            "sync": durable,
            "metasync": durable,
        }
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.env, self.dbs = self._open()
        self._identity = self._file_identity()
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no read is in flight
        self._active = 0  # read transactions in flight
        self._reading = threading.local()  # this thread's reads in flight
        self._retired: list[Any] = []

    def _open(self) -> tuple[Any, dict[str, Any]]:
        env = lmdb.open(
            str(self.path),
            max_dbs=len(DB_NAMES) + 1,
            subdir=True,
            readonly=self.readonly,
            max_readers=1024,
            lock=True,
            **self._options,
        )
        dbs: dict[str, Any] = {}
        if self.readonly:
            for name in DB_NAMES:
                dbs[name] = env.open_db(name.encode(), create=False)
        else:
            with env.begin(write=True) as txn:
                for name in DB_NAMES:
                    dbs[name] = env.open_db(name.encode(), txn=txn)
                if txn.get(b"schema", db=dbs["meta"]) is None:
                    txn.put(b"schema", pack(SCHEMA_VERSION), db=dbs["meta"])
        return env, dbs

    def _file_identity(self) -> tuple[int, int]:
        stat = os.stat(self.path / "data.mdb")
        return stat.st_dev, stat.st_ino

    def _follow_replacement(self) -> None:
        """A read-only store follows raft-core's snapshot installs, which replace the whole
        directory: checked at most once per ``REOPEN_CHECK_S`` and reopened, under
        ``_lock``, only while no read is in flight (a transaction must never meet the
        db handles of another environment). The old environment is closed at ``close``."""
        now = time.monotonic()
        if self._active or now - self._checked_at < REOPEN_CHECK_S:
            return
        self._checked_at = now
        try:
            identity = self._file_identity()
        except FileNotFoundError:  # between the two renames of an install
            return
        if identity != self._identity:
            self._retired.append(self.env)
            self.env, self.dbs = self._open()
            self._identity = identity

    def close(self) -> None:
        for env in (*self._retired, self.env):
            env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A read-only transaction: one consistent committed state."""
        with self._lock:
            if self.readonly:
                self._follow_replacement()
            txn = self._begin()
            self._active += 1
        depth = getattr(self._reading, "depth", 0)
        self._reading.depth = depth + 1
        try:
            yield txn
        finally:
            txn.abort()
            self._reading.depth = depth
            with self._lock:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

    def _begin(self) -> Any:
        """Begin a read transaction (``_lock`` held)."""
        while True:
            try:
                return self.env.begin(buffers=False)
            except lmdb.MapResizedError:
                # The writer's map is larger than ours. Adopting it kills this process's open
                # transactions, so wait until none is in flight; a thread inside a read of its
                # own would wait for itself, and gets the error instead.
                if getattr(self._reading, "depth", 0):
                    raise
                while self._active:
                    self._idle.wait()
                self.env.set_mapsize(0)

    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(txn)`` in one write transaction and commit it.

        If ``fn`` raises, nothing it wrote is kept; past ``max_map_size`` that is
        :class:`~llmcache.node.errors.StoreFull`.
        """
        try:
            with self.env.begin(write=True) as txn:
                return fn(txn)
        except lmdb.MapFullError:
            raise StoreFull(
                f"the store at {self.path} reached its size limit of {self.max_map_size} bytes"
            ) from None

    # -- reads --------------------------------------------------------------------------------

    def applied_index(self, txn: Any | None = None) -> int:
        if txn is None:
            with self.read() as txn:
                return self.applied_index(txn)
        raw = txn.get(b"applied_index", db=self.dbs["meta"])
        return from_u64(raw) if raw else 0

    def last_ts_ms(self) -> int:
        """The latest leader stamp applied (``ts_ms`` of commands; 0: none yet)."""
        with self.read() as txn:
            raw = txn.get(b"last_ts_ms", db=self.dbs["meta"])
            return from_u64(raw) if raw else 0

    def member_urls(self) -> dict[str, str]:
        """Raft address → HTTP URL of every member that advertised itself through the log."""
        with self.read() as txn, txn.cursor(db=self.dbs["meta"]) as cursor:
            urls: dict[str, str] = {}
            if cursor.set_range(MEMBER_PREFIX):
                for key, value in cursor:
                    if not key.startswith(MEMBER_PREFIX):
                        break
                    urls[key[len(MEMBER_PREFIX) :].decode()] = value.decode()
            return urls

    def config_index(self, txn: Any) -> int:
        """The applied index of the last change to tenants or settings (0: none yet)."""
        raw = txn.get(b"config_index", db=self.dbs["meta"])
        return from_u64(raw) if raw else 0

    def entry(self, txn: Any, entry_id: int) -> Entry | None:
        raw = txn.get(u64(entry_id), db=self.dbs["entries"])
        return Entry.from_record(entry_id, unpack(raw)) if raw else None

    def vector(self, txn: Any, entry_id: int) -> np.ndarray | None:
        raw = txn.get(u64(entry_id), db=self.dbs["vectors"])
        return np.frombuffer(raw, dtype="<f4").astype(np.float32) if raw else None

    def exact_id(self, txn: Any, tenant: str, exact_key: bytes) -> int | None:
        raw = txn.get(join(tenant, exact_key), db=self.dbs["exact"])
        return from_u64(raw) if raw else None

    def key_id(self, txn: Any, tenant: str, namespace: str, key: str) -> int | None:
        raw = txn.get(join(tenant, namespace, key), db=self.dbs["keys"])
        return from_u64(raw) if raw else None

    def tenant(self, txn: Any, tenant: str) -> dict[str, Any] | None:
        raw = txn.get(tenant.encode(), db=self.dbs["tenants"])
        return unpack(raw) if raw else None

    def tenants(self, txn: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, raw in txn.cursor(db=self.dbs["tenants"]):
            yield bytes(key).decode(), unpack(raw)

    def config(self, txn: Any, tenant: str = "", namespace: str = "") -> dict[str, Any]:
        raw = txn.get(config_key(tenant, namespace), db=self.dbs["config"])
        return unpack(raw) if raw else {}

    def nsmeta(self, txn: Any, tenant: str, namespace: str) -> dict[str, Any] | None:
        raw = txn.get(join(tenant, namespace), db=self.dbs["nsmeta"])
        return unpack(raw) if raw else None

    def stats(self, txn: Any, tenant: str) -> dict[str, int]:
        raw = txn.get(tenant.encode(), db=self.dbs["stats"])
        entries, size, evicted, expired = unpack(raw) if raw else (0, 0, 0, 0)
        return {"entries": entries, "bytes": size, "evicted": evicted, "expired": expired}

    def access(self, txn: Any, entry_id: int) -> tuple[int, int]:
        """``(hits, last_hit_ms)`` of an entry as replicated by ``Touch``; ``(0, 0)``: never."""
        raw = txn.get(u64(entry_id), db=self.dbs["access"])
        hits, last_hit_ms = unpack(raw) if raw else (0, 0)
        return hits, last_hit_ms

    def request_result(self, txn: Any, request_id: str) -> tuple[int, Any] | None:
        """``(applied index, result)`` of an already-applied request id, if remembered."""
        raw = txn.get(request_id.encode(), db=self.dbs["requests"])
        if not raw:
            return None
        index, result = unpack(raw)
        return index, result

    def prefix(self, txn: Any, db: str, prefix: bytes) -> Iterator[bytes]:
        """Keys of ``db`` starting with ``prefix``, in key order."""
        cursor = txn.cursor(db=self.dbs[db])
        if not cursor.set_range(prefix):
            return
        for key in cursor.iternext(keys=True, values=False):
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key

    def scope_ids(self, txn: Any, key: bytes) -> Iterator[int]:
        """Ids of the entries of one scope (``scope_key``), ascending."""
        prefix = key + b"\0"
        for member in self.prefix(txn, "members", prefix):
            yield from_u64(member[len(prefix) :])

    def scopes(self, txn: Any) -> Iterator[tuple[bytes, list[int]]]:
        """Every scope with its ids, in key order (used to rebuild indexes)."""
        current: bytes | None = None
        ids: list[int] = []
        for member in self.prefix(txn, "members", b""):
            key, entry_id = member[:-9], from_u64(member[-8:])
            if key != current:
                if current is not None:
                    yield current, ids
                current, ids = key, []
            ids.append(entry_id)
        if current is not None:
            yield current, ids

    def changes_since(
        self, txn: Any, index: int, limit: int = 10_000
    ) -> Iterator[tuple[int, list[tuple[int, int, bytes]]]]:
        """Change-feed rows after ``index``: ``(applied index, [(op, id, scope key), ...])``."""
        cursor = txn.cursor(db=self.dbs["feed"])
        if not cursor.set_range(u64(index + 1)):
            return
        for n, (key, raw) in enumerate(cursor):
            if n >= limit:
                return
            yield from_u64(bytes(key)), [(op, i, bytes(s)) for op, i, s in unpack(raw)]

    def expiring(self, txn: Any, now_ms: int, limit: int) -> list[int]:
        """Ids whose ``expires_at_ms`` is at or before ``now_ms``, soonest first."""
        out: list[int] = []
        for key in self.prefix(txn, "expiry", b""):
            if from_u64(key[:8]) > now_ms or len(out) >= limit:
                break
            out.append(from_u64(key[8:]))
        return out

    def digest(self) -> str:
        """sha256 over every db's keys and values: equal on nodes that applied the same log."""
        h = hashlib.sha256()
        with self.read() as txn:
            for name in DB_NAMES:
                h.update(name.encode() + b"\0")
                for key, value in txn.cursor(db=self.dbs[name]):
                    h.update(U64.pack(len(key)) + key + U64.pack(len(value)) + value)
        return h.hexdigest()

    def copy_to(self, path: str | os.PathLike[str]) -> None:
        """A consistent compacted copy of the environment (for snapshots)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.env.copy(str(path), compact=True)
