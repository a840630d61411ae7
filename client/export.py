"""Export a tenant's entries to a file and import them back, keeping every field and vector.

Format (version 1): a gzip stream of msgpack objects. First a header ``{"format":
"llmcache-export", "version": 1, "tenant", "exported_at_ms", "source", "tenant_view"}``
(``tenant_view`` is ``GET /v1/tenants/{t}`` less tokens, when the exporter may read it, so an
import can recreate the tenant and its settings), then one record per entry (the server's
``full=1`` view less ``id`` and ``age_s``, with ``response`` and ``vector`` as raw bytes),
then a trailer ``{"end": true, "count": n}``. A file without its trailer is truncated and
refused. Reading and writing stream: memory does not grow with the file.

Import (``POST /v1/cache/import``) keeps timestamps, vectors and responses; ids are the
target's own. It is **idempotent** (the server derives each entry's request id from what
identifies it, and a later replay replaces the entry with itself) and **resumable**: after
each acknowledged batch the number of records done is written to ``<file>.progress``
(atomically); a new import of the same file into the same tenant skips them, and a crash
between a batch and its progress line only replays that batch.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack

from llmcache.client.errors import LLMCacheError, UnknownTenant
from llmcache.client.sync import CacheClient

FORMAT = "llmcache-export"
VERSION = 1
BATCH = 128
"""Entries per import call (the server takes up to 256)."""


class ExportFormatError(LLMCacheError):
    """Not an export file, of an unknown version, or truncated."""

    code = "bad_export_file"


@dataclass(frozen=True)
class ImportReport:
    imported: int
    duplicates: int
    expired: int
    skipped: int
    """Records skipped because ``<file>.progress`` said an earlier run had imported them."""


def _record(view: dict[str, Any]) -> dict[str, Any]:
    record = {k: v for k, v in view.items() if k not in ("id", "age_s")}
    if "response_base64" in record:
        record["response"] = base64.b64decode(record.pop("response_base64"))
    else:
        record["response"] = str(record.get("response", "")).encode()
    if "vector_base64" in record:
        record["vector"] = base64.b64decode(record.pop("vector_base64"))
    return record


def _view(record: dict[str, Any]) -> dict[str, Any]:
    """A file record as ``POST /v1/cache/import`` takes it (base64 for JSON's sake)."""
    view = {k: v for k, v in record.items() if k not in ("response", "vector")}
    view["response_base64"] = base64.b64encode(record["response"]).decode()
    if "vector" in record:
        view["vector_base64"] = base64.b64encode(record["vector"]).decode()
    return view


def export(
    client: CacheClient,
    out: IO[bytes],
    *,
    tenant: str | None = None,
    namespace: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write every live entry of ``tenant`` (default: the client's) to ``out``; the count."""
    client.require("/v1/cache/entries", "full")
    name = tenant or client.tenant or "default"
    try:
        tenant_view: dict[str, Any] | None = {
            k: v for k, v in client.get_tenant(name).items() if k != "tokens"
        }
    except LLMCacheError as exc:
        if isinstance(exc, UnknownTenant):
            raise
        tenant_view = None  # a tenant token may not read its tenant's admin view
    header = {
        "format": FORMAT,
        "version": VERSION,
        "tenant": name,
        "exported_at_ms": int(time.time() * 1000),
        "source": client.urls[0],
        "tenant_view": tenant_view,
    }
    entries = client.iter_entries(namespace=namespace, full=True, tenant=name)
    return write(out, header, (_record(entry.view) for entry in entries), progress)


def write(
    out: IO[bytes],
    header: dict[str, Any],
    records: Iterable[dict[str, Any]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write an export stream (header, ``records``, trailer) to ``out``; the record count."""
    count = 0
    with gzip.GzipFile(fileobj=out, mode="wb") as stream:
        stream.write(msgpack.packb(header, use_bin_type=True))
        for record in records:
            stream.write(msgpack.packb(record, use_bin_type=True))
            count += 1
            if progress is not None:
                progress(1)
        stream.write(msgpack.packb({"end": True, "count": count}, use_bin_type=True))
    return count


def read(path: Path) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """The header of the export file at ``path`` and an iterator over its records, which
    raises :class:`ExportFormatError` at the end if the trailer is missing or disagrees."""
    stream = gzip.open(path, "rb")  # noqa: SIM115  # closed when the records end
    unpacker = msgpack.Unpacker(stream, raw=False, strict_map_key=False)
    try:
        header = next(unpacker)
    except (StopIteration, ValueError, OSError, EOFError, zlib.error) as exc:
        stream.close()
        raise ExportFormatError(f"{path} is not an LLM-Cache export: {exc!r}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        stream.close()
        raise ExportFormatError(f"{path} is not an LLM-Cache export")
    if header.get("version") != VERSION:
        stream.close()
        raise ExportFormatError(f"{path} is export version {header.get('version')}, not {VERSION}")

    def records() -> Iterator[dict[str, Any]]:
        count = 0
        try:
            for item in unpacker:
                if isinstance(item, dict) and item.get("end") is True:
                    if item.get("count") != count:
                        raise ExportFormatError(f"{path}: trailer says {item.get('count')}")
                    return
                if not isinstance(item, dict):
                    raise ExportFormatError(f"{path}: record {count + 1} is not a map")
                count += 1
                yield item
        except (ValueError, OSError, EOFError, zlib.error) as exc:
            raise ExportFormatError(f"{path} is damaged after {count} records: {exc}") from None
        finally:
            stream.close()
        raise ExportFormatError(f"{path} is truncated after {count} records (no trailer)")

    return header, records()


def progress_path(path: Path, tenant: str) -> Path:
    return path.with_name(f"{path.name}.{tenant}.progress")


def _done(marker: Path) -> int:
    try:
        return int(json.loads(marker.read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _mark(marker: Path, done: int) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"done": done}))
    os.replace(tmp, marker)


def _ensure_tenant(client: CacheClient, tenant: str, view: dict[str, Any] | None) -> None:
    """Create ``tenant`` with the exported configuration and settings when it is missing."""
    try:
        client.get_tenant(tenant)
        return
    except UnknownTenant:
        if view is None:
            raise
    client.create_tenant(tenant, view.get("config") or {})
    if view.get("settings"):
        client.set_settings(tenant, view["settings"])
    for namespace, values in (view.get("namespaces") or {}).items():
        if values:
            client.set_settings(tenant, values, namespace=namespace)


def import_file(
    client: CacheClient,
    path: Path,
    *,
    tenant: str | None = None,
    resume: bool = True,
    create_tenant: bool = True,
    progress: Callable[[int], None] | None = None,
    stop_after: int | None = None,
) -> ImportReport:
    """Import the export file at ``path`` into ``tenant`` (default: the exported tenant);
    see the module docstring. ``stop_after`` batches, when given, ends early (as a crash
    would, progress kept)."""
    client.require("/v1/cache/import")
    header, records = read(path)
    target = tenant or str(header["tenant"])
    if create_tenant:
        _ensure_tenant(client, target, header.get("tenant_view"))
    marker = progress_path(path, target)
    skip = _done(marker) if resume else 0
    imported = duplicates = expired = done = batches = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal imported, duplicates, expired, done, batches
        answer = client.import_entries([_view(r) for r in batch], tenant=target)
        imported += answer["imported"]
        duplicates += answer["duplicates"]
        expired += answer["expired"]
        done += len(batch)
        batches += 1
        _mark(marker, done)
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for record in records:
        if done < skip:
            done += 1
            continue
        batch.append(record)
        if len(batch) == BATCH:
            flush()
            if stop_after is not None and batches >= stop_after:
                return ImportReport(imported, duplicates, expired, skip)
    if batch:
        flush()
    marker.unlink(missing_ok=True)  # complete: a later import starts from the top
    return ImportReport(imported, duplicates, expired, skip)
