"""Derived in-memory vector indexes, one per scope, and their on-disk checkpoints.

The entries live in LMDB; these indexes are derived from it and can always be rebuilt. A scope
(``tenant\\0namespace\\0scopehash``, opaque bytes here) is searched on its own, so no answer ever
crosses scopes. Vectors are float32 and L2-normalised; a scope's dimension is fixed by the first
vector added to it and forgotten when the scope becomes empty.

Two kinds of scope index:

* **flat** (up to ``small_scope_max`` live vectors): a preallocated float32 matrix and a uint64 id
  array with amortised 1.5x growth and swap-with-last removal. Search is exact: one matrix-vector
  product. Most scopes are tiny, and an hnswlib index costs ~2.7 MB before its first vector
  (65,536 label mutexes), so tiny scopes must not have one.
* **graph** (past ``small_scope_max``): an hnswlib index, space ``cosine``. Removal marks the
  label deleted and a later insert reuses the slot (``allow_replace_deleted``), so the TTL churn of
  a cache does not grow the index without bound; capacity doubles with ``resize_index``. A graph
  scope that shrinks stays a graph until it is empty (demoting would need every live vector back
  from hnswlib for little gain); an empty scope of either kind is dropped.

Similarity is ``dot(q, v)`` (hnswlib reports ``1 - dot``), clipped to the product's 0..1 scale.
Results are ordered by similarity, best first, ties broken by the smaller id (in a graph scope,
among the candidates hnswlib found: which of many equal vectors it finds is up to the graph).

Determinism: every hnswlib insert is single-threaded with the configured seed, batches are
inserted in id order, and flat scopes are exact, so two ``IndexSet`` objects given the same
sequence of ``add``/``remove``/``drop_scope`` calls give the same answers. A checkpoint answers
exactly like its source when loaded, but hnswlib does not save its random generators, so graph
inserts made after a load may build a different (equally good) graph than the source would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

from llmcache.node.errors import CheckpointInvalid
from llmcache.node.store import fsync_dir

FORMAT = 1
MANIFEST = "manifest.json"
# All flat scopes in one file: each one's ids ('<u8') then its vectors ('<f4'), in manifest order.
FLAT_FILE = "flat.bin"

IdArray = npt.NDArray[np.uint64]
VecArray = npt.NDArray[np.float32]

# Per-object costs the arrays do not show: two ndarray headers, the slotted object, the dict slot
# and the scope key. Measured by tests/bench/bench_index.py (10,000 scopes of 5).
_FLAT_OVERHEAD = 500
# hnswlib allocates 65,536 label-operation mutexes (40 B each) per index, whatever its size.
_GRAPH_OVERHEAD = 65_536 * 40
# Per slot of capacity: link-list pointer, level, mutex and visited-list mark.
_GRAPH_PER_SLOT = 8 + 4 + 40 + 2
# Per inserted element, besides its level-0 record: label map node and bucket.
_GRAPH_PER_ELEMENT = 40


@dataclass(frozen=True)
class IndexParams:
    """Index tuning. All but ``ef_search`` shape what is built, so a checkpoint needs them equal."""

    m: int = 16
    ef_construction: int = 200
    ef_search: int = 64
    small_scope_max: int = 512  # scopes with up to this many live vectors are exact flat arrays
    random_seed: int = 100


class _Flat:
    """An exact index: rows ``[:n]`` of ``vecs`` are live, ``ids[i]`` names row ``i``."""

    __slots__ = ("dim", "ids", "n", "vecs")

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.ids: IdArray = np.empty(0, np.uint64)
        self.vecs: VecArray = np.empty((0, dim), np.float32)

    def count_new(self, ids: IdArray) -> int:
        return int(np.count_nonzero(~np.isin(ids, self.ids[: self.n])))

    def add(self, ids: IdArray, vecs: VecArray) -> None:
        """Add unique ``ids``; an id already present has its row overwritten."""
        present = np.isin(ids, self.ids[: self.n])
        for i in np.flatnonzero(present):  # replacements are rare: a scan each is fine
            self.vecs[np.flatnonzero(self.ids[: self.n] == ids[i])[0]] = vecs[i]
        new = ~present
        n, m = self.n, int(np.count_nonzero(new))
        if n + m > len(self.ids):
            cap = max(n + m, len(self.ids) * 3 // 2)
            self.ids = np.concatenate([self.ids[:n], np.empty(cap - n, np.uint64)])
            self.vecs = np.concatenate([self.vecs[:n], np.empty((cap - n, self.dim), np.float32)])
        self.ids[n : n + m] = ids[new]
        self.vecs[n : n + m] = vecs[new]
        self.n = n + m

    def remove(self, ids: Iterable[int]) -> None:
        for label in ids:
            rows = np.flatnonzero(self.ids[: self.n] == np.uint64(label))
            if len(rows):
                last = self.n - 1
                self.ids[rows[0]] = self.ids[last]
                self.vecs[rows[0]] = self.vecs[last]
                self.n = last

    def search(self, q: VecArray, k: int) -> list[tuple[int, float]]:
        n, k = self.n, min(k, self.n)
        sims = self.vecs[:n] @ q
        # Keep everything tied with the k-th best so that the id tie-break stays exact.
        cand = np.flatnonzero(sims >= np.partition(sims, n - k)[n - k]) if k < n else np.arange(n)
        best = cand[np.lexsort((self.ids[cand], -sims[cand]))[:k]]
        return [(int(self.ids[i]), _clip(float(sims[i]))) for i in best]

    def memory_bytes(self) -> int:
        return int(self.ids.nbytes + self.vecs.nbytes) + _FLAT_OVERHEAD


class _Graph:
    """An hnswlib index plus the counts hnswlib keeps to itself (its counts include deleted)."""

    __slots__ = ("dim", "index", "live", "max_id")

    def __init__(self, index: Any, dim: int, live: int, max_id: int) -> None:
        self.index = index
        self.dim = dim
        self.live = live
        self.max_id = max_id  # ids above it are certainly new: a rebuild never probes hnswlib

    @classmethod
    def create(cls, dim: int, capacity: int, p: IndexParams) -> _Graph:
        index = hnswlib.Index(space="cosine", dim=dim)
        index.init_index(
            max_elements=capacity,
            M=p.m,
            ef_construction=p.ef_construction,
            random_seed=p.random_seed,
            allow_replace_deleted=True,
        )
        return cls(index, dim, 0, -1)

    @property
    def n(self) -> int:
        return self.live

    def add(self, ids: IdArray, vecs: VecArray) -> None:
        """Add unique ascending ``ids``; an id known to hnswlib (live or deleted) is updated."""
        known = np.zeros(len(ids), bool)
        for i in np.flatnonzero(ids <= self.max_id):
            label = int(ids[i])
            try:
                self.index.get_items([label])  # raises for unknown and for deleted labels
                known[i] = True
                continue
            except RuntimeError:
                pass
            try:
                # A deleted label must be revived before it is updated: a replacing insert would
                # leave the old slot behind, and a plain insert refuses deleted labels.
                self.index.unmark_deleted(label)
                self.live += 1
                known[i] = True
            except RuntimeError:
                pass  # never seen: a new id below max_id
        if known.any():
            self.index.add_items(vecs[known], ids[known], num_threads=1)
            ids, vecs = ids[~known], vecs[~known]
        m = len(ids)
        if m:
            used, cap = self.index.element_count, self.index.max_elements
            need = used + max(0, m - (used - self.live))  # deleted slots are reused first
            if need > cap:
                self.index.resize_index(max(need, 2 * cap))
            # num_threads=1: the same inserts in the same order give the same graph everywhere.
            self.index.add_items(vecs, ids, num_threads=1, replace_deleted=True)
            self.live += m
            self.max_id = max(self.max_id, int(ids[-1]))

    def remove(self, ids: Iterable[int]) -> None:
        for label in ids:
            try:
                self.index.mark_deleted(int(label))
                self.live -= 1
            except RuntimeError:
                pass  # unknown or already deleted

    def search(self, q: VecArray, k: int, ef: int) -> list[tuple[int, float]]:
        k = min(k, self.live)  # hnswlib refuses to return fewer than k
        while k > 0:
            self.index.set_ef(max(ef, k))
            try:
                labels, dists = self.index.knn_query(q, k=k, num_threads=1)
            except RuntimeError:
                # Deletions can leave live elements unreachable from the entry point, so fewer
                # than k are found: widen the beam to everything, then settle for fewer.
                if ef < self.index.element_count:
                    ef = self.index.element_count
                else:
                    k //= 2
                continue
            hits = sorted(zip(dists[0].tolist(), labels[0].tolist(), strict=True))
            return [(int(i), _clip(1.0 - d)) for d, i in hits]
        return []

    def memory_bytes(self) -> int:
        ix = self.index
        record = (2 * ix.M + 1) * 4 + self.dim * 4 + 8  # level-0 links, vector, label
        upper = (ix.M + 1) * 4 / (ix.M - 1) if ix.M > 1 else 0  # expected upper-level links
        per_element = record + _GRAPH_PER_ELEMENT + upper
        return int(
            _GRAPH_OVERHEAD + ix.max_elements * _GRAPH_PER_SLOT + ix.element_count * per_element
        )


_Scope = _Flat | _Graph


def _clip(sim: float) -> float:
    return min(1.0, max(0.0, sim))


class IndexSet:
    """All scopes' indexes of one process. Thread-safe: one lock, held for every call.

    ``applied_index`` is the state-machine applied index these indexes reflect; the caller keeps
    it current and it travels with checkpoints.
    """

    def __init__(self, params: IndexParams = IndexParams()) -> None:
        self.params = params
        self.applied_index = 0
        self._scopes: dict[bytes, _Scope] = {}
        self._lock = threading.RLock()

    def add(self, scope: bytes, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add ``vectors`` (n, dim) under ``ids`` (n,); an existing id gets the new vector.

        A batch naming an id twice keeps its last vector. Raises ``ValueError`` on a shape
        mismatch or when ``dim`` differs from the scope's.
        """
        ids_a = np.asarray(ids, dtype=np.uint64).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or len(vecs) != len(ids_a) or vecs.shape[1] < 1:
            raise ValueError(f"expected {len(ids_a)} vectors as (n, dim), got {vecs.shape}")
        if not len(ids_a):
            return
        if not np.all(ids_a[1:] > ids_a[:-1]):  # a rebuild's batches already are: no copy
            # Keep each id's last vector and go in id order: the same batch builds the same graph.
            _, last = np.unique(ids_a[::-1], return_index=True)
            keep = len(ids_a) - 1 - last
            ids_a, vecs = ids_a[keep], vecs[keep]
        vecs = np.ascontiguousarray(vecs)
        dim = vecs.shape[1]
        with self._lock:
            idx = self._scopes.get(scope)
            if idx is not None and idx.dim != dim:
                raise ValueError(f"scope has dimension {idx.dim}, got vectors of {dim}")
            if idx is None:
                idx = _Flat(dim)
            if isinstance(idx, _Flat):
                size = idx.n + idx.count_new(ids_a)
                if size > self.params.small_scope_max:
                    idx = self._promote(idx, size)
            idx.add(ids_a, vecs)
            self._scopes[scope] = idx

    def _promote(self, flat: _Flat, size: int) -> _Graph:
        p = self.params
        graph = _Graph.create(flat.dim, max(size, 2 * (p.small_scope_max + 1)), p)
        if flat.n:
            order = np.argsort(flat.ids[: flat.n])  # id order, whatever the removal history
            graph.add(flat.ids[order], flat.vecs[order])
        return graph

    def remove(self, scope: bytes, ids: Iterable[int]) -> None:
        """Remove ``ids`` from ``scope``; unknown ids and scopes are ignored."""
        with self._lock:
            idx = self._scopes.get(scope)
            if idx is not None:
                idx.remove(ids)
                if idx.n == 0:
                    del self._scopes[scope]

    def drop_scope(self, scope: bytes) -> None:
        with self._lock:
            self._scopes.pop(scope, None)

    def search(self, scope: bytes, vector: npt.ArrayLike, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest live ids of ``scope`` as ``(id, similarity)``, best first.

        Exact for flat scopes, approximate (hnswlib, ``ef = max(ef_search, k)``) for graph
        scopes. ``[]`` for an unknown or empty scope or ``k < 1``; fewer than ``k`` when the
        scope holds fewer. Raises ``ValueError`` when the vector's dimension is not the scope's.
        """
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._lock:
            idx = self._scopes.get(scope)
            if idx is None or k < 1:
                return []
            if len(q) != idx.dim:
                raise ValueError(f"scope has dimension {idx.dim}, got a query of {len(q)}")
            if isinstance(idx, _Flat):
                return idx.search(q, k)
            return idx.search(q, k, self.params.ef_search)

    def __len__(self) -> int:
        """Live vectors over all scopes."""
        with self._lock:
            return sum(idx.n for idx in self._scopes.values())

    def scope_count(self) -> int:
        with self._lock:
            return len(self._scopes)

    def memory_bytes(self) -> int:
        """Estimated bytes held: vectors, graph links, hnswlib's fixed costs and bookkeeping.

        Graph capacity not yet written to is counted only for its per-slot bookkeeping, since
        hnswlib's untouched vector slots take no resident memory.
        """
        with self._lock:
            return sum(idx.memory_bytes() for idx in self._scopes.values())

    def save(self, directory: Path) -> None:
        """Write a checkpoint to ``directory``, replacing any previous one.

        Files are written into ``.<name>.tmp`` beside it and fsynced; ``manifest.json`` (which
        holds every file's sha256 and its own checksum) is written last; then the old directory is
        moved aside and the new one renamed into place. A crash leaves either the old checkpoint,
        the new one, or none (``load`` then fails and the caller rebuilds from LMDB), never a mix.
        The lock is held only while files are written, not while they are hashed and synced.
        Calls for the same directory must not overlap.
        """
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        old = directory.with_name(f".{directory.name}.old")
        for leftover in (tmp, old):  # from a crashed save
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            scopes: list[dict[str, Any]] = []
            with self._lock, open(tmp / FLAT_FILE, "wb") as flat_file:
                for scope, idx in sorted(self._scopes.items()):
                    meta: dict[str, Any] = {"scope": scope.hex(), "dim": idx.dim, "count": idx.n}
                    if isinstance(idx, _Flat):
                        flat_file.write(idx.ids[: idx.n].astype("<u8").tobytes())
                        flat_file.write(idx.vecs[: idx.n].astype("<f4").tobytes())
                    else:
                        meta["file"] = f"hnsw-{hashlib.sha256(scope).hexdigest()[:32]}.bin"
                        meta["max_id"] = idx.max_id
                        idx.index.save_index(str(tmp / meta["file"]))
                    scopes.append(meta)
                applied_index = self.applied_index
            files = {path.name: _sha256(path, fsync=True) for path in sorted(tmp.iterdir())}
            body = {
                "format": FORMAT,
                "applied_index": applied_index,
                "params": asdict(self.params),
                "files": files,
                "scopes": scopes,
            }
            manifest = {**body, "checksum": _checksum(body)}
            with open(tmp / MANIFEST, "wb") as f:  # compact: every byte matters to the checksum
                f.write(json.dumps(manifest, separators=(",", ":")).encode())
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            if directory.exists():
                directory.rename(old)
            tmp.rename(directory)
            fsync_dir(directory.parent)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Path, params: IndexParams) -> IndexSet:
        """Load a checkpoint written by :meth:`save`.

        The manifest's checksum, format, params (all but ``ef_search``, which is taken from
        ``params``) and every file's sha256 are verified before any file is parsed or handed to
        hnswlib. Raises :class:`CheckpointInvalid` on anything missing, corrupt or mismatched.
        """
        directory = Path(directory)
        try:
            man = json.loads((directory / MANIFEST).read_bytes())
            if man.pop("checksum", None) != _checksum(man):
                raise CheckpointInvalid("manifest checksum mismatch")
            if man["format"] != FORMAT:
                raise CheckpointInvalid(f"unsupported checkpoint format {man['format']!r}")
            saved, wanted = dict(man["params"]), asdict(params)
            saved.pop("ef_search", None)
            wanted.pop("ef_search")
            if saved != wanted:
                raise CheckpointInvalid(f"checkpoint params {saved} differ from {wanted}")
            files: dict[str, str] = man["files"]
            for name, digest in files.items():
                if Path(name).name != name or name == MANIFEST:
                    raise CheckpointInvalid(f"bad file name {name!r} in manifest")
                if _sha256(directory / name) != digest:
                    raise CheckpointInvalid(f"sha256 mismatch for {name}")
            if FLAT_FILE not in files:
                raise CheckpointInvalid(f"{FLAT_FILE} missing from manifest")
            out = cls(params)
            out.applied_index = int(man["applied_index"])
            flat_bytes = (directory / FLAT_FILE).read_bytes()
            offset = 0
            for meta in man["scopes"]:
                scope = bytes.fromhex(meta["scope"])
                dim, count = int(meta["dim"]), int(meta["count"])
                if count < 1 or dim < 1:
                    raise CheckpointInvalid(f"bad scope entry {meta}")
                idx: _Scope
                if "file" not in meta:
                    ids = np.frombuffer(flat_bytes, "<u8", count, offset)
                    offset += ids.nbytes
                    vecs = np.frombuffer(flat_bytes, "<f4", count * dim, offset)
                    offset += vecs.nbytes
                    idx = _Flat(dim)
                    idx.add(ids.astype(np.uint64), vecs.reshape(count, dim).astype(np.float32))
                else:
                    if meta["file"] not in files:  # only verified files reach hnswlib
                        raise CheckpointInvalid(f"{meta['file']} missing from manifest")
                    index = hnswlib.Index(space="cosine", dim=dim)
                    index.load_index(str(directory / meta["file"]), allow_replace_deleted=True)
                    idx = _Graph(index, dim, count, int(meta["max_id"]))
                    if index.dim != dim or index.element_count < count:
                        raise CheckpointInvalid(f"{meta['file']} does not match its manifest")
                out._scopes[scope] = idx
            if offset != len(flat_bytes):
                raise CheckpointInvalid(f"{FLAT_FILE} has {len(flat_bytes) - offset} extra bytes")
            return out
        except CheckpointInvalid:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise CheckpointInvalid(f"{directory}: {e}") from e


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path, *, fsync: bool = False) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if fsync:
            os.fsync(f.fileno())
        return digest
