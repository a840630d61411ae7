"""The client's pure parts over wide inputs (Hypothesis): the export file format, truncation
and damage, error mapping, URL checks and the tenant ring."""

from __future__ import annotations

import contextlib
import gzip
import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcache.client import errors
from llmcache.client import export as exporting
from llmcache.client.protocol import check_url
from llmcache.client.sharded import TenantRing

HEADER = {"format": exporting.FORMAT, "version": exporting.VERSION, "tenant": "t"}
values = st.one_of(
    st.text(max_size=40), st.binary(max_size=40), st.integers(-(2**63), 2**63 - 1),
    st.lists(st.text(max_size=8), max_size=4),
    st.dictionaries(st.text(max_size=8), st.integers(0, 2**53), max_size=3),
)  # fmt: skip
records = st.lists(
    st.dictionaries(st.sampled_from(["namespace", "kind", "key", "response", "vector", "tags",
                                     "usage", "created_at_ms"]), values, min_size=1),
    max_size=12,
)  # fmt: skip
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


def dump(items: list[dict[str, Any]]) -> bytes:
    out = io.BytesIO()
    assert exporting.write(out, HEADER, items) == len(items)
    return out.getvalue()


def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    header, found = exporting.read(path)
    return header, list(found)


@SETTINGS
@given(items=records)
def test_export_files_round_trip(tmp_path: Path, items: list[dict[str, Any]]) -> None:
    path = tmp_path / "x.llmcache"
    path.write_bytes(dump(items))
    assert load(path) == (HEADER, items)


@SETTINGS
@given(items=records, data=st.data())
def test_a_cut_or_damaged_file_is_refused(
    tmp_path: Path, items: list[dict[str, Any]], data: st.DataObject
) -> None:
    whole = dump(items)
    path = tmp_path / "cut.llmcache"
    cut = data.draw(st.integers(0, len(whole) - 1))
    path.write_bytes(whole[:cut])
    with pytest.raises(exporting.ExportFormatError):
        load(path)
    raw = gzip.decompress(whole)  # cut inside the msgpack stream, then a valid gzip
    path.write_bytes(gzip.compress(raw[: data.draw(st.integers(0, len(raw) - 1))]))
    with pytest.raises(exporting.ExportFormatError):
        load(path)
    flipped = bytearray(whole)
    at = data.draw(st.integers(0, len(whole) - 1))
    flipped[at] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(flipped))
    with contextlib.suppress(exporting.ExportFormatError):  # refused, or a flip gzip cannot
        assert load(path) == (HEADER, items)  # see (in its header's mtime): the same records


def test_other_versions_and_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "v2"
    out = io.BytesIO()
    exporting.write(out, {**HEADER, "version": 2}, [])
    path.write_bytes(out.getvalue())
    with pytest.raises(exporting.ExportFormatError, match="version 2"):
        load(path)
    path.write_bytes(gzip.compress(b"\x93\x01\x02\x03"))
    with pytest.raises(exporting.ExportFormatError, match="not an LLM-Cache export"):
        load(path)


@given(
    status=st.integers(400, 599),
    body=st.one_of(
        st.none(), st.text(), st.dictionaries(st.text(), st.text()),
        st.fixed_dictionaries({"error": st.dictionaries(
            st.sampled_from(["code", "message", "field"]),
            st.one_of(st.none(), st.text(), st.sampled_from(["unknown_tenant", "forbidden"])),
        )}),
    ),
)  # fmt: skip
def test_every_error_answer_maps_to_a_client_error(status: int, body: Any) -> None:
    error = errors.from_answer(status, body, "http://n")
    assert isinstance(error, errors.LLMCacheError) and error.url == "http://n"
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    if code == "unknown_tenant":
        assert isinstance(error, errors.UnknownTenant)
    elif code == "forbidden":
        assert isinstance(error, errors.Forbidden)
    elif isinstance(body, dict) and isinstance(body.get("error"), dict) and status < 500:
        assert isinstance(error, errors.BadRequest | errors.Unauthorized | errors.Forbidden |
                          errors.NotFound | errors.Conflict | errors.NotCacheable)  # fmt: skip


@given(st.text(max_size=60))
def test_urls_are_checked_at_construction(url: str) -> None:
    try:
        checked = check_url(url)
    except errors.InvalidURL:
        return
    assert checked.startswith(("http://", "https://")) and not checked.endswith("/")


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(st.text("abcdefgh0123", min_size=1, max_size=6), min_size=1, max_size=6,
                    unique=True),
    new=st.text("xyz", min_size=1, max_size=4),
)  # fmt: skip
def test_a_new_group_only_takes_tenants(groups: list[str], new: str) -> None:
    ring = TenantRing(groups)
    tenants = [f"t{i}" for i in range(200)]
    before = {t: ring.group_of(t) for t in tenants}
    assert set(before.values()) <= set(groups)
    ring.add(new)
    assert all(ring.group_of(t) in (before[t], new) for t in tenants)
