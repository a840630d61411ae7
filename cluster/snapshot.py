"""Raft snapshots: one file holding a node's LMDB store and pysyncobj's metadata, checksummed.

pysyncobj calls the serializer on log compaction and the deserializer when a node restarts from
its full dump or installs a snapshot sent by the leader (pysyncobj's transfer has no integrity
check of its own). A snapshot file is::

    members, concatenated in manifest order
    manifest (JSON, UTF-8)
    sha256 of the manifest (32 bytes)
    manifest length (u32 big-endian)
    MAGIC (8 bytes)

The manifest is ``{"format": 1, "applied_index": n, "members": [{"name", "size", "sha256"}]}``
with exactly two members: ``raft`` (pysyncobj's metadata tuple in its own pickle format: it
holds ``Node`` objects, and only ever comes from our own nodes over the password-authenticated
Raft port or from our own disk) and ``data.mdb`` (a compacted copy of the LMDB environment).
``applied_index`` is the store's applied index in that copy.

:func:`save` copies the store inside one read transaction, so raft-core can run it in a
background thread while it keeps applying. Guarantees of :func:`load`: the trailer, the
manifest's own checksum, the file size and every member's size and sha256 are verified before
the store copy is handed back, so nothing unverified ever reaches ``lmdb.open``; a corrupt or
truncated file raises :class:`SnapshotInvalid` and leaves the staging directory removed.
:func:`install` swaps the store directory with two renames and an fsync of the parent;
:func:`recover` finishes or undoes an install that a crash interrupted and must run before the
store is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pysyncobj import pickle as raft_pickle

from llmcache.node.store import Store, fsync_dir

FORMAT = 1
MAGIC = b"LLMCSNP\x01"
TRAILER = struct.Struct(">32sI8s")  # manifest sha256, manifest length, magic
MEMBERS = ("raft", "data.mdb")
CHUNK = 1 << 20


class SnapshotInvalid(Exception):
    """The snapshot file is corrupt, truncated or of an unknown format."""


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    applied_index: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Loaded:
    manifest: Manifest
    raft_state: tuple[Any, ...]
    store_dir: Path | None
    """The verified store copy (a directory holding ``data.mdb``), or None when not extracted."""


def save(
    path: str | os.PathLike[str], store: Store, raft_state: tuple[Any, ...], txn: Any = None
) -> Manifest:
    """Write a snapshot of ``store`` as of the read transaction ``txn`` (default: a new one)
    and ``raft_state`` to ``path`` (fsynced). Writes may go on meanwhile: the copy and its
    applied index both come from ``txn`` (a compacting LMDB copy inside that transaction)."""
    if txn is None:
        with store.read() as txn:
            return save(path, store, raft_state, txn)
    path = Path(path)
    scratch = path.with_name(path.name + ".d")
    shutil.rmtree(scratch, ignore_errors=True)
    applied = store.applied_index(txn)
    scratch.mkdir(parents=True)
    store.env.copy(str(scratch), compact=True, txn=txn)
    try:
        raft_blob = raft_pickle.dumps(raft_state)
        members = []
        with open(path, "wb") as out:
            out.write(raft_blob)
            members.append(Member("raft", len(raft_blob), hashlib.sha256(raft_blob).hexdigest()))
            with open(scratch / "data.mdb", "rb") as src:
                size, digest = _copy(src, None, out)
            members.append(Member("data.mdb", size, digest))
            manifest = Manifest(applied, tuple(members))
            body = json.dumps(
                {
                    "format": FORMAT,
                    "applied_index": applied,
                    "members": [m.__dict__ for m in members],
                }
            ).encode()
            out.write(body)
            out.write(TRAILER.pack(hashlib.sha256(body).digest(), len(body), MAGIC))
            out.flush()
            os.fsync(out.fileno())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def read_manifest(f: IO[bytes]) -> Manifest:
    """The verified manifest of an open snapshot file (checks trailer, checksum and sizes)."""
    total = f.seek(0, os.SEEK_END)
    if total < TRAILER.size:
        raise SnapshotInvalid("snapshot shorter than its trailer")
    f.seek(total - TRAILER.size)
    digest, length, magic = TRAILER.unpack(f.read(TRAILER.size))
    if magic != MAGIC:
        raise SnapshotInvalid("not a snapshot of this format (bad magic: truncated?)")
    if length > total - TRAILER.size:
        raise SnapshotInvalid("manifest length exceeds the file")
    f.seek(total - TRAILER.size - length)
    body = f.read(length)
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotInvalid("manifest checksum mismatch")
    try:
        raw = json.loads(body)
        if raw["format"] != FORMAT:
            raise SnapshotInvalid(f"unknown snapshot format {raw['format']!r}")
        members = tuple(
            Member(str(m["name"]), int(m["size"]), str(m["sha256"])) for m in raw["members"]
        )
        manifest = Manifest(int(raw["applied_index"]), members)
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotInvalid(f"unreadable manifest: {exc}") from None
    if tuple(m.name for m in members) != MEMBERS:
        raise SnapshotInvalid(f"unexpected members {[m.name for m in members]}")
    if sum(m.size for m in members) != total - TRAILER.size - length:
        raise SnapshotInvalid("member sizes do not add up to the file size")
    return manifest


def load(path: str | os.PathLike[str], staging: Path, local_applied: int) -> Loaded:
    """Verify the whole snapshot at ``path`` and return its contents.

    The store copy is extracted into ``staging`` (replaced if present, fsynced) only when the
    snapshot is ahead of the local store (``applied_index > local_applied``); otherwise it is
    only verified and ``store_dir`` is None. Raises :class:`SnapshotInvalid` on any mismatch.
    """
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with open(path, "rb") as f:
            manifest = read_manifest(f)
            extract = manifest.applied_index > local_applied
            f.seek(0)
            raft_member, store_member = manifest.members
            raft_blob = f.read(raft_member.size)
            if hashlib.sha256(raft_blob).hexdigest() != raft_member.sha256:
                raise SnapshotInvalid("raft metadata checksum mismatch")
            if extract:
                staging.mkdir(parents=True)
                with open(staging / "data.mdb", "wb") as out:
                    _, digest = _copy(f, store_member.size, out)
                    out.flush()
                    os.fsync(out.fileno())
                fsync_dir(staging)
            else:
                _, digest = _copy(f, store_member.size, None)
            if digest != store_member.sha256:
                raise SnapshotInvalid("store copy checksum mismatch")
        raft_state = raft_pickle.loads(raft_blob)
        if not isinstance(raft_state, tuple):
            raise SnapshotInvalid("raft metadata is not a tuple")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Loaded(manifest, raft_state, staging if extract else None)


def install(staging: Path, store_dir: Path) -> None:
    """Replace ``store_dir`` by the verified copy in ``staging``; the store must be closed.

    Two renames (old away, new in) then an fsync of the parent directory; a crash in between
    is repaired by :func:`recover`. The old directory is deleted last (LMDB readers in other
    processes that still map it keep reading it until they reopen).
    """
    old = _old(store_dir)
    shutil.rmtree(old, ignore_errors=True)
    if store_dir.exists():
        os.rename(store_dir, old)
    os.rename(staging, store_dir)
    fsync_dir(store_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(store_dir: Path) -> None:
    """Finish or undo an interrupted :func:`install`; call before opening the store.

    ``store_dir`` missing while the old one exists means the crash came between the renames, so
    the staging copy is complete and verified: it goes in. Any other leftover is removed.
    """
    staging, old = staging_dir(store_dir), _old(store_dir)
    if not store_dir.exists() and old.exists():
        os.rename(staging if staging.exists() else old, store_dir)
        fsync_dir(store_dir.parent)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(store_dir: Path) -> Path:
    return store_dir.with_name(store_dir.name + ".incoming")


def _old(store_dir: Path) -> Path:
    return store_dir.with_name(store_dir.name + ".old")


def _copy(src: IO[bytes], size: int | None, out: IO[bytes] | None) -> tuple[int, str]:
    """Stream ``size`` bytes (all when None) from ``src`` into ``out``: (bytes, sha256 hex)."""
    h = hashlib.sha256()
    done = 0
    while size is None or done < size:
        chunk = src.read(CHUNK if size is None else min(CHUNK, size - done))
        if not chunk:
            break
        h.update(chunk)
        if out is not None:
            out.write(chunk)
        done += len(chunk)
    if size is not None and done != size:
        raise SnapshotInvalid("snapshot truncated inside a member")
    return done, h.hexdigest()
