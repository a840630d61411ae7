"""Keeps a process's vector indexes current with the store, through the change feed.

The indexes are derived state. :class:`IndexFeed` applies the store's change-feed rows after
the index's ``applied_index``; when the index is too far behind (the feed was pruned past it),
or its checkpoint is missing or corrupt, it rebuilds every scope from LMDB instead. Both paths
insert in ascending id order, which is log order, so every node answers the same.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from llmcache.node.errors import CheckpointInvalid
from llmcache.node.index import IndexParams, IndexSet
from llmcache.node.store import FEED_RETENTION, OP_ADD, Store

log = logging.getLogger(__name__)


class IndexFeed:
    """An :class:`IndexSet` bound to a :class:`Store`. Thread-safe: one thread catches up at a
    time, the others wait for it, so a reader never sees an index behind a write it saw
    applied."""

    def __init__(self, store: Store, params: IndexParams | None = None) -> None:
        self.store = store
        self.params = params or IndexParams()
        self.indexes = IndexSet(self.params)
        self._lock = threading.Lock()
        self.rebuilds = 0

    def open(self, checkpoint: Path | None) -> str:
        """Load the checkpoint when it is valid, else rebuild; then catch up. Returns how."""
        how = "rebuilt"
        if checkpoint is not None and checkpoint.exists():
            try:
                self.indexes = IndexSet.load(checkpoint, self.params)
                how = "loaded"
            except CheckpointInvalid as exc:
                log.warning("index checkpoint %s not used (%s); rebuilding", checkpoint, exc)
        if how == "rebuilt":
            self.rebuild()
        else:
            self.catch_up()
        return how

    def catch_up(self) -> int:
        """Apply feed rows up to the store's applied index; returns that index."""
        with self._lock, self.store.read() as txn:
            target = self.store.applied_index(txn)
            current = self.indexes.applied_index
            if target == current:
                return current
            if current > target or current < target - FEED_RETENTION:
                # Rows after `current` may be pruned (or the store was restored to an older
                # state): only a rebuild is exact.
                self._rebuild(txn)
                return self.indexes.applied_index
            while current < target:
                last = current
                batch: list[tuple[int, int, bytes]] = []
                for index, changes in self.store.changes_since(txn, current):
                    batch.extend(changes)
                    last = index
                self._apply(txn, batch)
                if last == current:
                    break
                current = last
            self.indexes.applied_index = target
            return target

    def _apply(self, txn: object, changes: list[tuple[int, int, bytes]]) -> None:
        # Adds are buffered per scope and flushed before a removal in that scope, so each
        # scope sees its changes in log order while the index gets them in batches.
        pending: dict[bytes, list[tuple[int, np.ndarray]]] = {}
        for op, entry_id, scope in changes:
            if op == OP_ADD:
                vector = self.store.vector(txn, entry_id)
                if vector is not None:  # deleted again later in the log: nothing to add
                    pending.setdefault(scope, []).append((entry_id, vector))
            else:
                self._flush(scope, pending.pop(scope, []))
                self.indexes.remove(scope, [entry_id])
        for scope, adds in pending.items():
            self._flush(scope, adds)

    def _flush(self, scope: bytes, adds: list[tuple[int, np.ndarray]]) -> None:
        if adds:
            ids = np.array([i for i, _ in adds], np.uint64)
            self.indexes.add(scope, ids, np.stack([v for _, v in adds]))

    def rebuild(self) -> None:
        with self._lock, self.store.read() as txn:
            self._rebuild(txn)

    def _rebuild(self, txn: object) -> None:
        fresh = IndexSet(self.params)
        for scope, ids in self.store.scopes(txn):
            vectors = [self.store.vector(txn, i) for i in ids]
            kept = [(i, v) for i, v in zip(ids, vectors, strict=True) if v is not None]
            if kept:
                fresh.add(
                    scope,
                    np.array([i for i, _ in kept], np.uint64),
                    np.stack([v for _, v in kept]),
                )
        fresh.applied_index = self.store.applied_index(txn)
        self.indexes = fresh
        self.rebuilds += 1

    def checkpoint(self, directory: Path) -> int:
        """Save the indexes (with the applied index they reflect); returns that index."""
        with self._lock:
            self.indexes.save(directory)
            return self.indexes.applied_index
