"""Schemathesis against the node's own OpenAPI document: generated requests (valid and invalid,
JSON and msgpack) to every documented operation of a real server on a loopback port never get a
5xx, and every answer conforms to the document (status code, content type, headers, body schema).

The schema is built from ``openapi.document()`` at collection time (schemathesis's lazy fixture
loader does not work with pytest 9); the server's ``/openapi.json`` is checked to be that very
document.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llmcache.node.embed import MiniLMEmbedder
from llmcache.node.local import LocalCache
from llmcache.node.openapi import document
from tests.test_api import Served


def _fit(value: Any) -> Any:
    """msgpack has no integers beyond 64 bits: a client would send those as floats."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, dict):
        return {k: _fit(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fit(v) for v in value]
    return value


@schemathesis.serializer("application/msgpack")
def _pack(ctx: Any, value: Any) -> bytes:
    data: bytes = msgpack.packb(_fit(value), use_bin_type=True)
    return data


@schemathesis.deserializer("application/msgpack")
def _unpack(ctx: Any, response: Any) -> Any:
    return msgpack.unpackb(response.content, raw=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, minilm: MiniLMEmbedder) -> Iterator[Served]:
    path: Path = tmp_path_factory.mktemp("fuzz")
    with LocalCache(path, embedders={"default": minilm}, durable=False) as cache:
        cache.propose(cache.engine.prepare_tenant("default"))
        with Served(cache) as node:
            yield node


def _fuzzed_document() -> dict[str, Any]:
    """The served document, with one change: ``min_index`` is fuzzed only at 0. A lookup for an
    index this node has not applied waits up to 10 s and then answers 503 ``stale_read`` by
    design (tests/test_cluster_writes.py covers it); here every example would wait that long."""
    doc = copy.deepcopy(document())
    doc["components"]["schemas"]["LookupRequest"]["properties"]["min_index"]["maximum"] = 0
    return doc


schema = schemathesis.openapi.from_dict(_fuzzed_document())
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_documented_answers(case: Any, served: Served) -> None:
    case.call_and_validate(base_url=served.base_url, checks=CHECKS, timeout=60)


def test_the_served_document_is_the_fuzzed_one(served: Served) -> None:
    assert served.call("GET", "/openapi.json").body == document()
