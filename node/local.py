"""The whole cache in one process, without replication.

:class:`LocalCache` wires the real parts together — LMDB store, state machine, derived indexes,
engine — and applies each command straight to the state machine instead of going through Raft.
It is the embedded mode (a cache inside one program), and what tests and benchmarks drive. The
node server puts raft-core between ``propose`` and the state machine; nothing else changes.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llmcache.cluster import commands as c
from llmcache.cluster.fsm import Result, StateMachine
from llmcache.node.cross_encoder import CrossEncoders
from llmcache.node.embed import Embedder
from llmcache.node.engine import Engine
from llmcache.node.index import IndexParams
from llmcache.node.index_feed import IndexFeed
from llmcache.node.store import Store


class LocalCache:
    """Store + state machine + indexes + engine in one process (see the module docstring).

    Thread-safe: proposals are applied one at a time under a lock, lookups run concurrently.
    Durability is the store's (``durable=True``: every applied command is fsynced).
    ``embedders`` maps the names namespaces choose (setting ``embedder``) to embedders; without
    it the default embedder (all-MiniLM-L6-v2) is loaded as ``default``, and the re-ranking
    model as ``rerank`` when it is installed (loaded at its first use). Cross-encoders
    (``node/cross_encoder.py``) come from ``models_dir``, default ``<path>/models``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        embedders: Mapping[str, Embedder] | None = None,
        index_params: IndexParams | None = None,
        durable: bool = True,
        max_map_size: int = 64 << 30,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        models_dir: Path | None = None,
    ) -> None:
        if embedders is None:
            from llmcache.node.embed import bge, default_embedder

            embedders = {"default": default_embedder()}
            if bge.available():
                embedders["rerank"] = bge.LazyEmbedder()
        self.path = Path(path)
        self.store = Store(self.path / "store", durable=durable, max_map_size=max_map_size)
        self.fsm = StateMachine(self.store)
        self.feed = IndexFeed(self.store, index_params)
        self.feed.open(self.path / "index")
        self.engine = Engine(
            self.store,
            self.feed,
            embedders,
            clock=clock,
            rng=rng,
            cross_encoders=CrossEncoders(models_dir or self.path / "models"),
        )
        self._lock = threading.Lock()

    def propose(self, command: c.Command) -> Result:
        """Apply one command as the next log entry; returns its result."""
        return self.propose_many([command])[0]

    def propose_many(self, commands: Sequence[c.Command]) -> list[Result]:
        """Apply commands as consecutive log entries in one transaction."""
        with self._lock:
            start = self.store.applied_index() + 1
            return self.fsm.apply_batch(
                [(start + i, c.encode(cmd)) for i, cmd in enumerate(commands)]
            )

    def checkpoint(self) -> int:
        """Save the indexes beside the store (so a restart need not rebuild them)."""
        self.feed.catch_up()
        return self.feed.checkpoint(self.path / "index")

    def close(self, *, checkpoint: bool = True) -> None:
        if checkpoint:
            self.checkpoint()
        self.store.close()

    def __enter__(self) -> LocalCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
