"""The log codec: round trips, and malformed entries rejected before anything applies."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given

from llmcache.cluster import commands as c
from llmcache.node.errors import MalformedCommand
from tests.strategies import COMMANDS


@given(COMMANDS)
def test_round_trip(command: c.Command) -> None:
    data = c.encode(command)
    assert data[0] == c.VERSION
    assert c.decode(data) == command
    assert c.encode(c.decode(data)) == data


def _raw(type_code: object, fields: object) -> bytes:
    return bytes((c.VERSION,)) + msgpack.packb([type_code, fields], use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x02" + c.encode(c.Noop())[1:], "version byte 2"),
        (b"\x01\xc1", "undecodable"),
        (_raw(99, {}), "unknown command type 99"),
        (_raw("1", {}), "unknown command type"),
        (_raw(2, {"tenant": "t"}), "missing"),
        (_raw(2, {"tenant": "t", "ids": "1"}), "expected a list"),
        (_raw(2, {"tenant": "t", "ids": [True]}), "expected int"),
        (_raw(2, {"tenant": "t", "ids": [], "bogus": 1}), "unknown fields"),
        (_raw(2, {"tenant": "a\0b", "ids": []}), "bad tenant"),
        (_raw(3, {"tenant": "t"}), "at least one filter"),
        (_raw(7, {"tenant": ""}), "bad tenant"),
        (_raw(8, {"namespace": "ns"}), "needs its tenant"),
        (_raw(12, {"address": "a:1", "http_url": "ftp://x"}), "http"),
        (_raw(12, {"address": "nohost", "http_url": "http://x"}), "host:port"),
        ([1, 2, 3], None),
    ],
)
def test_malformed_entries_are_rejected(data: object, message: str | None) -> None:
    if isinstance(data, list):
        data = bytes((c.VERSION,)) + msgpack.packb(data)
        message = r"must be \[type, fields\]"
    assert isinstance(data, bytes)
    with pytest.raises(MalformedCommand, match=message):
        c.decode(data)


def test_put_shape_is_checked() -> None:
    base = {
        "tenant": "t",
        "namespace": "n",
        "scope": "s",
        "exact_key": b"x" * 32,
        "text": "q",
        "embedder": "e",
    }
    ok = c.Put(kind="prompt", vector=b"\0" * 16, dim=4, **base)
    c.decode(c.encode(ok))
    bad = [
        c.Put(kind="prompt", vector=b"\0" * 12, dim=4, **base),  # vector of the wrong length
        c.Put(kind="other", **base),
        c.Put(kind="kv", **base),  # kv without a key
        c.Put(kind="kv", key="k", vector=b"\0" * 16, dim=4, **base),
        c.Put(kind="prompt", vector=b"\0" * 16, dim=4, **{**base, "exact_key": b"short"}),
        c.Put(kind="kv", key="k", tags=("a\0b",), **base),
    ]
    for command in bad:
        with pytest.raises(MalformedCommand):
            c.decode(c.encode(command))
