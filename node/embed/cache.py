"""An exact text -> embedding cache on local disk, so a repeated text is not embedded twice.

It lives in its own LMDB environment, separate from the replicated store: it is node-local,
never replicated, and may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import lmdb
import numpy as np

from llmcache.node.embed.base import Embedder, EmbedResult, check_texts

log = logging.getLogger(__name__)

# Value layout: version, truncated flag, token count, then the vector as little-endian float32.
_HEADER = struct.Struct("<BBI")
_VERSION = 1
_F32 = np.dtype("<f4")


class CachedVector(NamedTuple):
    vector: np.ndarray  # float32, 1-D, as it was stored
    token_count: int
    truncated: bool


class EmbeddingCache:
    """Exact cache of embeddings keyed by ``sha256(identity + "\\0" + text)``.

    Stores the float32 vector together with its token count and truncated flag, so a cached
    result is bit-identical to a fresh one. Keys include the embedder identity, so embedders
    never see each other's vectors.

    Safety: thread-safe, and several processes may open the same ``path`` at once (LMDB locks
    writers and gives readers snapshots). Open it after ``fork``, never before: an LMDB
    environment must not cross a fork.

    It is a cache, not a store: when the map (``max_bytes``) is full it deletes every entry and
    carries on, and a write that still does not fit is dropped. Commits skip the metadata fsync,
    so an OS crash may lose the last writes but cannot corrupt the file.
    """

    def __init__(self, path: Path, *, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._env = lmdb.open(
            str(self.path),
            map_size=max_bytes,
            subdir=True,
            metasync=False,
            readahead=False,  # random reads; readahead only fills the page cache
            max_dbs=0,
        )
        self._lock = threading.Lock()  # guards the counters below
        self._hits = 0
        self._misses = 0
        self._clears = 0
        self._dropped = 0

    @staticmethod
    def key(identity: str, text: str) -> bytes:
        # surrogatepass: a Python str may hold lone surrogates; keys must still be exact.
        raw = (
            identity.encode("utf-8", "surrogatepass")
            + b"\0"
            + text.encode("utf-8", "surrogatepass")
        )
        return hashlib.sha256(raw).digest()

    def lookup(self, identity: str, texts: Sequence[str]) -> list[CachedVector | None]:
        """The cached entry of each text, or None where there is none; in input order."""
        keys = [self.key(identity, t) for t in texts]
        found: list[CachedVector | None] = []
        with self._env.begin(buffers=False) as txn:
            for k in keys:
                raw = txn.get(k)
                found.append(_decode(raw) if raw is not None else None)
        hits = sum(f is not None for f in found)
        with self._lock:
            self._hits += hits
            self._misses += len(found) - hits
        return found

    def get_many(self, identity: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached vector of each text, or None where there is none; in input order."""
        return [f.vector if f is not None else None for f in self.lookup(identity, texts)]

    def put_many(
        self,
        identity: str,
        texts: Sequence[str],
        vectors: np.ndarray | Sequence[np.ndarray],
        *,
        token_counts: Sequence[int] | None = None,
        truncated: Sequence[bool] | None = None,
    ) -> None:
        """Store one vector per text (token counts 0 and not truncated unless given).

        Never raises for a full map: it clears the cache and retries once, then drops the write.
        """
        if len(vectors) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
        counts = token_counts if token_counts is not None else [0] * len(texts)
        flags = truncated if truncated is not None else [False] * len(texts)
        items = [
            (self.key(identity, t), _encode(np.asarray(v), c, f))
            for t, v, c, f in zip(texts, vectors, counts, flags, strict=True)
        ]
        if not items:
            return
        try:
            self._write(items)
            return
        except lmdb.MapFullError:
            pass
        self.clear()
        try:
            self._write(items)
        except lmdb.MapFullError:
            # A single batch larger than the whole map: caching it is impossible, not an error.
            with self._lock:
                self._dropped += len(items)
            log.warning("embedding cache %s: %d entries do not fit; dropped", self.path, len(items))

    def _write(self, items: list[tuple[bytes, bytes]]) -> None:
        with self._env.begin(write=True) as txn:
            for k, v in items:
                txn.put(k, v)

    def clear(self) -> None:
        """Delete every entry (in all processes sharing the path)."""
        # Pages still held by readers of dead processes could not be reused after the drop.
        self._env.reader_check()
        with self._env.begin(write=True) as txn:
            txn.drop(self._env.open_db(txn=txn), delete=False)
        with self._lock:
            self._clears += 1
        log.info("embedding cache %s was full and has been cleared", self.path)

    def stats(self) -> dict[str, int]:
        """``entries`` and ``used_bytes`` are the shared file's; ``hits``, ``misses``, ``clears``
        and ``dropped`` count this process's calls since it opened the cache."""
        st = self._env.stat()
        info = self._env.info()
        with self._lock:
            return {
                "entries": int(st["entries"]),
                "used_bytes": int((info["last_pgno"] + 1) * st["psize"]),
                "max_bytes": int(info["map_size"]),
                "hits": self._hits,
                "misses": self._misses,
                "clears": self._clears,
                "dropped": self._dropped,
            }

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(vector: np.ndarray, token_count: int, truncated: bool) -> bytes:
    if vector.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {vector.shape}")
    return _HEADER.pack(_VERSION, int(truncated), token_count) + vector.astype(_F32).tobytes()


def _decode(raw: bytes) -> CachedVector | None:
    if len(raw) < _HEADER.size:
        return None
    version, truncated, count = _HEADER.unpack_from(raw)
    if version != _VERSION:
        return None  # written by another format: treat as a miss, it will be overwritten
    vector = np.frombuffer(raw, dtype=_F32, offset=_HEADER.size).astype(np.float32)
    return CachedVector(vector, count, bool(truncated))


class CachedEmbedder:
    """An :class:`Embedder` that answers from an :class:`EmbeddingCache` and embeds only misses.

    Misses of one call (duplicates collapsed) go to ``inner.embed`` in a single call and are
    stored with their token counts and truncated flags, so results are identical whether cached
    or not. Input is validated before the cache is consulted, so errors are the same as
    ``inner``'s. A failing cache (an LMDB error) is logged and bypassed, never fatal.
    Thread-safe if ``inner`` is. ``identity`` and ``dim`` are ``inner``'s.
    """

    def __init__(self, inner: Embedder, cache: EmbeddingCache) -> None:
        self.inner = inner
        self.cache = cache
        self.identity = inner.identity
        self.dim = inner.dim

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.inner!r}, cache={str(self.cache.path)!r})"

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        check_texts(texts)
        n = len(texts)
        try:
            found = self.cache.lookup(self.identity, texts)
        except lmdb.Error as e:
            log.warning("embedding cache lookup failed, bypassing it: %s", e)
            found = [None] * n
        vectors = np.empty((n, self.dim), dtype=np.float32)
        counts = [0] * n
        flags = [False] * n
        missing: dict[str, list[int]] = {}  # text -> its positions, so duplicates embed once
        for i, f in enumerate(found):
            if f is not None and f.vector.shape == (self.dim,):
                vectors[i], counts[i], flags[i] = f.vector, f.token_count, f.truncated
            else:
                missing.setdefault(texts[i], []).append(i)
        if missing:
            miss_texts = list(missing)
            res = self.inner.embed(miss_texts)
            for j, text in enumerate(miss_texts):
                for i in missing[text]:
                    vectors[i], counts[i], flags[i] = (
                        res.vectors[j],
                        res.token_counts[j],
                        res.truncated[j],
                    )
            try:
                self.cache.put_many(
                    self.identity,
                    miss_texts,
                    res.vectors,
                    token_counts=res.token_counts,
                    truncated=res.truncated,
                )
            except lmdb.Error as e:
                log.warning("embedding cache write failed, not cached: %s", e)
        return EmbedResult(vectors, counts, flags)
