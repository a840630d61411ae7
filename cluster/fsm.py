"""The state machine: applies decoded log commands to the LMDB store.

Guarantees:

- **Deterministic.** The result and the store content depend only on the sequence of
  ``(index, entry)`` applied: no clock, no randomness, no node identity is read here. Ids come
  from a counter in the store; every set of ids is applied in sorted order.
- **Atomic.** One command (or one batch of commands) is one LMDB transaction, and the applied
  index is written in that same transaction. A command that fails validation — malformed bytes,
  an unknown tenant, a vector of the wrong dimension — changes nothing but the applied index and
  returns an error result; it never half-applies.
- **Idempotent.** An index at or below the applied index is skipped (a replay after a restart is
  a no-op), and a ``request_id`` seen within the last ``REQUEST_WINDOW`` indexes returns the
  result it got the first time.
- **Fail-stop on the environment.** A store that cannot be written (disk full, map at its hard
  limit) raises: the caller (raft-core) must stop rather than skip an entry, or replicas diverge.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmcache.cluster import commands as c
from llmcache.node import adaptive
from llmcache.node.errors import MalformedCommand
from llmcache.node.store import (
    FEED_RETENTION,
    MEMBER_PREFIX,
    OP_ADD,
    OP_REMOVE,
    Entry,
    Store,
    config_key,
    from_u64,
    join,
    pack,
    u64,
    unpack,
)

REQUEST_WINDOW = 1_000_000
"""How many log indexes a request id is remembered for (client retries happen within seconds)."""
PRUNE_PER_APPLY = 16
"""Old feed / request rows deleted per apply: bounded work, and it keeps up (one row per apply)."""


@dataclass(frozen=True)
class Result:
    """What applying one command produced; ``error`` is a stable code, ``value`` a small map."""

    index: int
    value: dict[str, Any]
    error: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class Rejected(Exception):
    """A command that is well-formed but cannot apply to the current state (no change made)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StateMachine:
    """Applies log entries to a :class:`Store`. Not thread-safe: one applier per store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dbs = store.dbs

    @property
    def applied_index(self) -> int:
        return self.store.applied_index()

    def apply(self, index: int, data: bytes) -> Result:
        """Apply one log entry at ``index``; see the module docstring for the guarantees."""
        return self.apply_batch([(index, data)])[0]

    def apply_batch(self, items: Sequence[tuple[int, bytes]]) -> list[Result]:
        """Apply consecutive log entries in one transaction (one fsync for all of them)."""
        decoded: list[tuple[int, c.Command | MalformedCommand]] = []
        for index, data in items:
            try:
                decoded.append((index, c.decode(data)))
            except MalformedCommand as exc:
                decoded.append((index, exc))
        return self.store.write(lambda txn: [self._apply_one(txn, i, cmd) for i, cmd in decoded])

    # -- one command --------------------------------------------------------------------------

    def _apply_one(self, txn: Any, index: int, cmd: c.Command | MalformedCommand) -> Result:
        applied = self.store.applied_index(txn)
        if index <= applied:
            return Result(index, {"skipped": True})
        # Indexes may skip: Raft's own entries (leader no-ops, membership) share the log.
        meta = self.dbs["meta"]
        txn.put(b"applied_index", u64(index), db=meta)
        self._prune(txn, index)
        if isinstance(cmd, MalformedCommand):
            return Result(index, {}, cmd.code, cmd.message)
        # The group's clock (node/clock.py): the latest stamp a leader set. Not the highest:
        # after a leader whose clock ran ahead, the next leader's time must take over. Touch
        # and Advertise reach the log through pysyncobj's forwarding, unstamped by a leader.
        if cmd.ts_ms and not isinstance(cmd, (c.Touch, c.Advertise)):
            txn.put(b"last_ts_ms", u64(cmd.ts_ms), db=meta)
        if cmd.request_id:
            seen = self.store.request_result(txn, cmd.request_id)
            if seen is not None:
                first_index, (value, error, message) = seen
                return Result(index, {**value, "duplicate_of": first_index}, error, message)
        feed: list[list[Any]] = []
        # A nested transaction: a rejected command rolls back what it wrote, nothing else.
        child = self.store.env.begin(write=True, parent=txn)
        try:
            result = Result(index, self._dispatch(child, cmd, feed))
        except Rejected as exc:
            child.abort()
            feed.clear()
            result = Result(index, {}, exc.code, str(exc))
        except BaseException:
            child.abort()
            raise
        else:
            child.commit()
        if feed:
            txn.put(u64(index), pack(feed), db=self.dbs["feed"])
        if cmd.request_id:
            record = pack([index, [result.value, result.error, result.message]])
            txn.put(cmd.request_id.encode(), record, db=self.dbs["requests"])
            txn.put(u64(index), cmd.request_id.encode(), db=self.dbs["reqorder"])
        return result

    def _prune(self, txn: Any, index: int) -> None:
        for db, keep in (("feed", FEED_RETENTION), ("reqorder", REQUEST_WINDOW)):
            cursor = txn.cursor(db=self.dbs[db])
            for _ in range(PRUNE_PER_APPLY):
                if not cursor.first() or from_u64(bytes(cursor.key())) > index - keep:
                    break
                if db == "reqorder":
                    txn.delete(bytes(cursor.value()), db=self.dbs["requests"])
                cursor.delete()

    def _dispatch(self, txn: Any, cmd: c.Command, feed: list[list[Any]]) -> dict[str, Any]:
        if isinstance(cmd, c.Put):
            return self._put(txn, cmd, feed)
        if isinstance(cmd, c.Delete):
            ids = [i for i in sorted(set(cmd.ids)) if self._owner(txn, i) == cmd.tenant]
            return {"deleted": self._delete_many(txn, ids, feed, None)}
        if isinstance(cmd, c.Invalidate):
            return {"deleted": self._delete_many(txn, self._matching(txn, cmd), feed, None)}
        if isinstance(cmd, c.Expire):
            ids = [i for i in sorted(set(cmd.ids)) if self._expired(txn, i, cmd.ts_ms)]
            return {"expired": self._delete_many(txn, ids, feed, "expired")}
        if isinstance(cmd, c.Evict):
            return {"evicted": self._delete_many(txn, sorted(set(cmd.ids)), feed, "evicted")}
        if isinstance(cmd, (c.TenantUpsert, c.TenantDelete, c.ConfigSet)):
            # Readers cache resolved settings until this moves.
            txn.put(b"config_index", u64(self.store.applied_index(txn)), db=self.dbs["meta"])
        if isinstance(cmd, c.TenantUpsert):
            created = txn.get(cmd.tenant.encode(), db=self.dbs["tenants"]) is None
            txn.put(cmd.tenant.encode(), pack(cmd.config), db=self.dbs["tenants"])
            return {"created": created}
        if isinstance(cmd, c.TenantDelete):
            return self._tenant_delete(txn, cmd.tenant, feed)
        if isinstance(cmd, c.ConfigSet):
            return self._config_set(txn, cmd)
        if isinstance(cmd, c.Feedback):
            self._require_tenant(txn, cmd.tenant)
            record = {f: getattr(cmd, f) for f in ("tenant", "entry_id", "label", "similarity")}
            record.update(query=cmd.query, ts_ms=cmd.ts_ms)
            txn.put(u64(self.store.applied_index(txn)), pack(record), db=self.dbs["feedback"])
            return self._learn(txn, cmd)
        if isinstance(cmd, c.Touch):
            return {"touched": self._touch(txn, cmd)}
        if isinstance(cmd, c.Advertise):
            key = MEMBER_PREFIX + cmd.address.encode()
            txn.put(key, cmd.http_url.encode(), db=self.dbs["meta"])
            return {}
        if isinstance(cmd, c.Noop):
            return {}
        raise AssertionError(f"no apply for {type(cmd).__name__}")  # pragma: no cover

    def _put(self, txn: Any, cmd: c.Put, feed: list[list[Any]]) -> dict[str, Any]:
        self._require_tenant(txn, cmd.tenant)
        if cmd.kind == "prompt":
            ns_key = join(cmd.tenant, cmd.namespace)
            ns = txn.get(ns_key, db=self.dbs["nsmeta"])
            if ns is None:
                txn.put(
                    ns_key, pack({"embedder": cmd.embedder, "dim": cmd.dim}), db=self.dbs["nsmeta"]
                )
            else:
                recorded = unpack(ns)
                if (recorded["embedder"], recorded["dim"]) != (cmd.embedder, cmd.dim):
                    raise Rejected(
                        "dimension_mismatch",
                        f"namespace {cmd.namespace!r} holds {recorded['dim']}-d vectors of "
                        f"{recorded['embedder']!r}, not {cmd.dim}-d of {cmd.embedder!r}",
                    )
        old = self.store.exact_id(txn, cmd.tenant, cmd.exact_key)
        if cmd.kind == "kv":
            old = self.store.key_id(txn, cmd.tenant, cmd.namespace, cmd.key)
        if old is not None:
            self._delete_many(txn, [old], feed, None)
        new_id = from_u64(txn.get(b"next_id", db=self.dbs["meta"]) or u64(1))
        txn.put(b"next_id", u64(new_id + 1), db=self.dbs["meta"])
        entry = Entry(
            id=new_id,
            tenant=cmd.tenant,
            namespace=cmd.namespace,
            scope=cmd.scope,
            kind=cmd.kind,
            key=cmd.key,
            exact_key=cmd.exact_key,
            text=cmd.text,
            prompt=cmd.prompt,
            response=cmd.response,
            content_type=cmd.content_type,
            created_at_ms=cmd.created_at_ms,
            expires_at_ms=cmd.expires_at_ms,
            tags=tuple(sorted(set(cmd.tags))),
            usage=dict(cmd.usage),
            embedder=cmd.embedder,
            meta=dict(cmd.meta),
            size=0,
        )
        record = entry.record()
        size = len(pack(record)) + len(cmd.vector)
        record["size"] = size
        eid = u64(new_id)
        # Ids only grow: appending fills LMDB pages instead of splitting them in half.
        txn.put(eid, pack(record), db=self.dbs["entries"], append=True)
        txn.put(join(cmd.tenant, cmd.exact_key), eid, db=self.dbs["exact"])
        if cmd.kind == "kv":
            txn.put(join(cmd.tenant, cmd.namespace, cmd.key), eid, db=self.dbs["keys"])
        else:
            txn.put(eid, cmd.vector, db=self.dbs["vectors"], append=True)
            feed.append([OP_ADD, new_id, entry.scope_key])
        txn.put(join(entry.scope_key, eid), b"", db=self.dbs["members"])
        for tag in entry.tags:
            txn.put(join(cmd.tenant, tag, eid), b"", db=self.dbs["tags"])
        if entry.expires_at_ms:
            txn.put(u64(entry.expires_at_ms) + eid, b"", db=self.dbs["expiry"])
        self._count(txn, cmd.tenant, entries=1, size=size)
        return {"id": new_id, "replaced": old}

    def _touch(self, txn: Any, cmd: c.Touch) -> int:
        merged: dict[int, list[int]] = {}
        for entry_id, hits, last in zip(cmd.ids, cmd.hits, cmd.last_hit_ms, strict=True):
            row = merged.setdefault(entry_id, [0, 0])
            row[0] += hits
            row[1] = max(row[1], last)
        touched = 0
        for entry_id in sorted(merged):
            if txn.get(u64(entry_id), db=self.dbs["entries"]) is None:
                continue
            hits, last = self.store.access(txn, entry_id)
            row = [hits + merged[entry_id][0], max(last, merged[entry_id][1])]
            txn.put(u64(entry_id), pack(row), db=self.dbs["access"])
            touched += 1
        return touched

    def _delete_many(
        self, txn: Any, ids: Iterable[int], feed: list[list[Any]], counter: str | None
    ) -> int:
        deleted = 0
        for entry_id in ids:
            entry = self.store.entry(txn, entry_id)
            if entry is None:
                continue
            eid = u64(entry_id)
            txn.delete(eid, db=self.dbs["entries"])
            txn.delete(eid, db=self.dbs["access"])
            txn.delete(join(entry.tenant, entry.exact_key), db=self.dbs["exact"])
            if entry.kind == "kv":
                txn.delete(join(entry.tenant, entry.namespace, entry.key), db=self.dbs["keys"])
            else:
                txn.delete(eid, db=self.dbs["vectors"])
                feed.append([OP_REMOVE, entry_id, entry.scope_key])
            txn.delete(join(entry.scope_key, eid), db=self.dbs["members"])
            for tag in entry.tags:
                txn.delete(join(entry.tenant, tag, eid), db=self.dbs["tags"])
            if entry.expires_at_ms:
                txn.delete(u64(entry.expires_at_ms) + eid, db=self.dbs["expiry"])
            self._count(txn, entry.tenant, entries=-1, size=-entry.size, counter=counter)
            deleted += 1
        return deleted

    def _count(
        self, txn: Any, tenant: str, *, entries: int, size: int, counter: str | None = None
    ) -> None:
        key = tenant.encode()
        row = unpack(txn.get(key, db=self.dbs["stats"]) or pack([0, 0, 0, 0]))
        row[0] += entries
        row[1] += size
        if counter == "evicted":
            row[2] += 1
        elif counter == "expired":
            row[3] += 1
        txn.put(key, pack(row), db=self.dbs["stats"])

    def _owner(self, txn: Any, entry_id: int) -> str | None:
        entry = self.store.entry(txn, entry_id)
        return entry.tenant if entry else None

    def _expired(self, txn: Any, entry_id: int, now_ms: int) -> bool:
        entry = self.store.entry(txn, entry_id)
        return entry is not None and entry.expired(now_ms)

    def _require_tenant(self, txn: Any, tenant: str) -> None:
        if txn.get(tenant.encode(), db=self.dbs["tenants"]) is None:
            raise Rejected("unknown_tenant", f"no tenant {tenant!r}")

    def _matching(self, txn: Any, cmd: c.Invalidate) -> list[int]:
        """Ids of ``cmd.tenant``'s entries that match every filter of ``cmd``, sorted."""
        self._require_tenant(txn, cmd.tenant)
        if cmd.ids:
            candidates = set(cmd.ids)
        elif cmd.tags:
            candidates = set()
            for tag in cmd.tags:
                prefix = join(cmd.tenant, tag, b"")
                candidates.update(from_u64(k[-8:]) for k in self.store.prefix(txn, "tags", prefix))
        elif cmd.key_prefix:
            prefix = (
                join(cmd.tenant, cmd.namespace, cmd.key_prefix)
                if cmd.namespace
                else join(cmd.tenant, b"")
            )
            candidates = {
                from_u64(txn.get(k, db=self.dbs["keys"]))
                for k in self.store.prefix(txn, "keys", prefix)
            }
        else:
            prefix = join(cmd.tenant, cmd.namespace, b"")
            candidates = {from_u64(k[-8:]) for k in self.store.prefix(txn, "members", prefix)}
        matching = []
        for entry_id in sorted(candidates):
            entry = self.store.entry(txn, entry_id)
            if (
                entry is not None
                and entry.tenant == cmd.tenant
                and (not cmd.namespace or entry.namespace == cmd.namespace)
                and (not cmd.tags or not set(cmd.tags).isdisjoint(entry.tags))
                and (
                    not cmd.key_prefix
                    or (entry.kind == "kv" and entry.key.startswith(cmd.key_prefix))
                )
            ):
                matching.append(entry_id)
        return matching

    def _learn(self, txn: Any, cmd: c.Feedback) -> dict[str, Any]:
        """Count a label with a similarity in its namespace's histogram (adaptive thresholds).
        The namespace is the command's, else the entry's when it still exists."""
        namespace = cmd.namespace
        if not namespace:
            entry = self.store.entry(txn, cmd.entry_id)
            namespace = entry.namespace if entry is not None and entry.tenant == cmd.tenant else ""
        if cmd.similarity < 0 or not namespace:
            return {"learned": False}
        key = join(cmd.tenant, namespace)
        raw = txn.get(key, db=self.dbs["quality"])
        labels = adaptive.Labels.from_record(unpack(raw)) if raw else adaptive.Labels()
        labels = labels.add(cmd.similarity, cmd.label)
        txn.put(key, pack(labels.record()), db=self.dbs["quality"])
        return {"learned": True}

    def _tenant_delete(self, txn: Any, tenant: str, feed: list[list[Any]]) -> dict[str, Any]:
        self._require_tenant(txn, tenant)
        prefix = join(tenant, b"")
        ids = sorted(from_u64(k[-8:]) for k in self.store.prefix(txn, "members", prefix))
        deleted = self._delete_many(txn, ids, feed, None)
        for db in ("nsmeta", "config", "quality"):
            for key in list(self.store.prefix(txn, db, prefix)):
                txn.delete(key, db=self.dbs[db])
        txn.delete(config_key(tenant), db=self.dbs["config"])
        for db in ("tenants", "stats"):
            txn.delete(tenant.encode(), db=self.dbs[db])
        return {"deleted": deleted}

    def _config_set(self, txn: Any, cmd: c.ConfigSet) -> dict[str, Any]:
        if cmd.tenant:
            self._require_tenant(txn, cmd.tenant)
        key = config_key(cmd.tenant, cmd.namespace)
        current = self.store.config(txn, cmd.tenant, cmd.namespace)
        for name, value in sorted(cmd.values.items()):
            if value is None:
                current.pop(name, None)
            else:
                current[name] = value
        if current:
            txn.put(key, pack(current), db=self.dbs["config"])
        else:
            txn.delete(key, db=self.dbs["config"])
        return {"config": current}
