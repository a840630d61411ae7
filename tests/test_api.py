"""The cache HTTP API end to end: a real aiohttp server on a loopback port, a real LocalCache
(LMDB in tmp_path) behind LocalProposer, and plain HTTP requests over the socket."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from llmcache.node import api
from llmcache.node.app import make_app
from llmcache.node.embed import MiniLMEmbedder
from llmcache.node.local import LocalCache
from llmcache.node.openapi import document
from llmcache.node.proposer import LocalProposer
from llmcache.node.services import ServerSettings, Services
from tests.conftest import near, unit_vector

ADMIN = "lc_admin-secret-for-tests"
OPEN = ServerSettings(node_id="n1", open_access=True)
LOCKED = ServerSettings(node_id="n1", admin_token=ADMIN)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        if self.headers.get("Content-Type", "").startswith("application/msgpack"):
            return msgpack.unpackb(self.raw, raw=False)
        return json.loads(self.raw)

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error


class Served:
    """``make_app`` over ``cache`` served on a free 127.0.0.1 port from a background loop."""

    def __init__(self, cache: LocalCache, settings: ServerSettings = OPEN) -> None:
        services = Services(cache.engine, LocalProposer(cache, settings.node_id), settings)
        self.app = make_app(services)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = 0

    def __enter__(self) -> Served:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self.runner, sock).start()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        packed: bool = False,
    ) -> Reply:
        """One request; ``packed`` sends the body as msgpack and asks for msgpack back."""
        sent = dict(headers or {})
        if token:
            sent["X-LLMCache-Token"] = token
        data = raw
        if body is not None:
            data = msgpack.packb(body) if packed else json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/msgpack" if packed else "application/json")
        if packed:
            sent.setdefault("Accept", "application/msgpack")
        request = urllib.request.Request(
            self.base_url + path, data=data, headers=sent, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return Reply(answer.status, dict(answer.headers), answer.read())
        except urllib.error.HTTPError as answer:
            return Reply(answer.code, dict(answer.headers), answer.read())


def _vector_cache(path: Path, clock: Callable[[], float] = time.time) -> LocalCache:
    cache = LocalCache(path, embedders={}, durable=False, clock=clock)
    engine = cache.engine
    cache.propose(engine.prepare_config({"embedder": "supplied"}))
    for tenant in ("default", "t1", "t2"):
        cache.propose(engine.prepare_tenant(tenant))
    return cache


@pytest.fixture
def vcache(tmp_path: Path) -> Iterator[LocalCache]:
    """Namespaces take caller-supplied 16-d vectors; tenants default, t1, t2."""
    cache = _vector_cache(tmp_path / "cache")
    yield cache
    cache.close(checkpoint=False)


@pytest.fixture
def node(vcache: LocalCache) -> Iterator[Served]:
    with Served(vcache) as served:
        yield served


def vec(seed: str) -> list[float]:
    return [float(x) for x in unit_vector(seed)]


def store_text(node: Served, text: str, vector: list[float], **fields: Any) -> dict[str, Any]:
    reply = node.call(
        "POST", "/v1/cache/store", {"text": text, "vector": vector, "response": "ok", **fields}
    )
    assert reply.status == 201, reply.body
    body: dict[str, Any] = reply.body
    return body


def metric(node: Served, name: str, **labels: str) -> float:
    text = node.call("GET", "/metrics").raw.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- lookup and store --------------------------------------------------------------------------


def test_store_then_exact_semantic_and_miss(node: Served) -> None:
    v = vec("password")
    stored = node.call(
        "POST",
        "/v1/cache/store",
        {
            "text": "how do I reset my password?",
            "vector": v,
            "response": "Settings → Security",
            "tags": ["faq"],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3},
            "meta": {"source": "test"},
        },
    )
    assert stored.status == 201
    body = stored.body
    assert body["id"] >= 1 and body["replaced"] is None and body["request_id"]
    assert stored.headers["X-LLMCache-Index"] == str(body["index"])
    assert stored.headers["X-LLMCache-Leader"] == "n1" and stored.headers["X-LLMCache-Term"] == "1"
    assert stored.headers["X-LLMCache-Node"] == "n1"

    exact = node.call(
        "POST", "/v1/cache/lookup", {"text": "how do I reset my password?", "vector": v}
    )
    assert exact.status == 200
    assert exact.headers["X-LLMCache-Status"] == "HIT"
    assert exact.headers["X-LLMCache-Entry"] == str(body["id"])
    assert exact.headers["X-LLMCache-Similarity"] == "1.0000"
    assert exact.headers["Age"] == "0"
    entry = exact.body["entry"]
    assert exact.body["status"] == "HIT" and exact.body["similarity"] == 1.0
    assert entry["response"] == "Settings → Security"
    assert entry["content_type"] == "text/plain; charset=utf-8"
    assert entry["tags"] == ["faq"] and entry["usage"]["prompt_tokens"] == 7
    assert entry["meta"] == {"source": "test"} and entry["kind"] == "prompt"
    assert entry["text"] == "how do I reset my password?" and entry["age_s"] >= 0

    paraphrase = node.call(
        "POST",
        "/v1/cache/lookup",
        {"text": "password reset?", "vector": near(np.array(v), 0.05).tolist(), "threshold": 0.9},
    )
    assert paraphrase.body["status"] == "SEMANTIC_HIT"
    assert paraphrase.headers["X-LLMCache-Status"] == "SEMANTIC_HIT"
    similarity = paraphrase.body["similarity"]
    assert 0.9 <= similarity < 1.0
    assert paraphrase.headers["X-LLMCache-Similarity"] == f"{similarity:.4f}"
    assert paraphrase.body["candidates"] == [{"id": body["id"], "similarity": similarity}]

    miss = node.call("POST", "/v1/cache/lookup", {"text": "other", "vector": vec("other")})
    assert miss.body["status"] == "MISS" and miss.body["entry"] is None
    assert miss.headers["X-LLMCache-Status"] == "MISS"
    assert "X-LLMCache-Entry" not in miss.headers and "Age" not in miss.headers
    assert miss.body["candidates"] and miss.body["similarity"] < miss.body["threshold"]

    again = store_text(node, "how do I reset my password?", v)
    assert again["replaced"] == body["id"] and again["id"] > body["id"]


@pytest.mark.slow
def test_text_with_the_default_embedder(tmp_path: Path, minilm: MiniLMEmbedder) -> None:
    with LocalCache(tmp_path / "c", embedders={"default": minilm}, durable=False) as cache:
        cache.propose(cache.engine.prepare_tenant("default"))
        with Served(cache) as node:
            stored = node.call(
                "POST",
                "/v1/cache/store",
                {"text": "How do I reset my password?", "response": {"answer": "Settings"}},
            )
            assert stored.status == 201
            found = node.call(
                "POST",
                "/v1/cache/lookup",
                {"text": "How can I reset my password?", "threshold": 0.7},
            )
            assert found.body["status"] == "SEMANTIC_HIT", found.body
            assert found.body["tokens"] > 0 and found.body["truncated"] is False
            entry = found.body["entry"]
            assert json.loads(entry["response"]) == {"answer": "Settings"}
            assert entry["content_type"] == "application/json"
            unrelated = node.call(
                "POST", "/v1/cache/lookup", {"text": "What is the capital of France?"}
            )
            assert unrelated.body["status"] == "MISS"


def test_chat_requests_scope_window_and_cacheability(vcache: LocalCache, node: Served) -> None:
    chat = {
        "model": "gpt-x",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is LMDB?"},
        ],
    }
    v = vec("lmdb")
    stored = node.call(
        "POST", "/v1/cache/store", {"request": chat, "vector": v, "response": {"choices": []}}
    )
    assert stored.status == 201
    hit = node.call("POST", "/v1/cache/lookup", {"request": chat, "vector": v})
    assert hit.body["status"] == "HIT"
    assert hit.body["entry"]["text"] == "what is LMDB?"
    # Another model is another scope: not even a candidate.
    other = node.call(
        "POST", "/v1/cache/lookup", {"request": {**chat, "model": "gpt-y"}, "vector": v}
    )
    assert other.body["status"] == "MISS" and other.body["candidates"] == []
    # window=2 embeds other turns: another scope and key.
    windowed = node.call("POST", "/v1/cache/lookup", {"request": chat, "vector": v, "window": 2})
    assert windowed.body["status"] == "MISS"
    completion = {"model": "gpt-x", "prompt": "complete me"}
    assert (
        node.call(
            "POST", "/v1/cache/store", {"request": completion, "vector": v, "response": "x"}
        ).status
        == 201
    )
    assert (
        node.call("POST", "/v1/cache/lookup", {"request": completion, "vector": v}).body["status"]
        == "HIT"
    )

    digest = vcache.store.digest()
    hot = node.call(
        "POST",
        "/v1/cache/store",
        {"request": {**chat, "temperature": 1.5}, "vector": v, "response": "x"},
    )
    assert hot.status == 422
    assert hot.error["code"] == "not_cacheable" and hot.error["field"] == "request.temperature"
    many = node.call(
        "POST", "/v1/cache/store", {"request": {**chat, "n": 3}, "vector": v, "response": "x"}
    )
    assert many.status == 422 and many.error["field"] == "request.n"
    params = node.call(
        "POST",
        "/v1/cache/store",
        {"text": "t", "params": {"temperature": 2}, "vector": v, "response": "x"},
    )
    assert params.status == 422 and params.error["field"] == "params.temperature"
    bad_message = node.call(
        "POST", "/v1/cache/lookup", {"request": {"messages": ["hi"]}, "vector": v}
    )
    assert bad_message.status == 400 and bad_message.error["field"] == "request.messages[0]"
    assert vcache.store.digest() == digest


def test_key_entries_json_and_binary_responses(node: Served) -> None:
    stored = node.call(
        "POST", "/v1/cache/store", {"key": "user:1", "response": {"name": "Ada"}, "ttl_s": 60}
    )
    assert stored.status == 201
    hit = node.call("POST", "/v1/cache/lookup", {"key": "user:1"})
    assert hit.body["status"] == "HIT" and hit.headers["X-LLMCache-Status"] == "HIT"
    entry = hit.body["entry"]
    assert json.loads(entry["response"]) == {"name": "Ada"}
    assert entry["content_type"] == "application/json" and entry["kind"] == "kv"
    assert entry["key"] == "user:1"
    assert 54_000 <= entry["expires_at_ms"] - entry["created_at_ms"] <= 66_000

    blob = bytes(range(256))
    node.call(
        "POST",
        "/v1/cache/store",
        {"key": "blob", "response_base64": base64.b64encode(blob).decode()},
    )
    got = node.call("POST", "/v1/cache/lookup", {"key": "blob"}).body["entry"]
    assert base64.b64decode(got["response_base64"]) == blob and "response" not in got
    assert got["content_type"] == "application/octet-stream"

    miss = node.call("POST", "/v1/cache/lookup", {"key": "user:2"})
    assert miss.status == 200 and miss.body["status"] == "MISS"


def test_msgpack_both_ways(node: Served) -> None:
    v = vec("mp")
    stored = node.call(
        "POST",
        "/v1/cache/store",
        {"text": "packed", "vector": v, "response": b"\x00\xffraw"},
        packed=True,
    )
    assert stored.status == 201
    assert stored.headers["Content-Type"].startswith("application/msgpack")
    assert isinstance(stored.body["id"], int)
    found = node.call("POST", "/v1/cache/lookup", {"text": "packed", "vector": v}, packed=True)
    assert found.body["status"] == "HIT"
    entry = found.body["entry"]
    assert base64.b64decode(entry["response_base64"]) == b"\x00\xffraw"
    assert entry["content_type"] == "application/octet-stream"
    # JSON in, msgpack out (Accept); msgpack in, JSON out (Accept names JSON).
    accept = node.call(
        "POST",
        "/v1/cache/lookup",
        {"text": "packed", "vector": v},
        headers={"Accept": "application/x-msgpack"},
    )
    assert accept.headers["Content-Type"].startswith("application/msgpack")
    as_json = node.call(
        "POST",
        "/v1/cache/lookup",
        raw=msgpack.packb({"text": "packed", "vector": v}),
        headers={"Content-Type": "application/x-msgpack", "Accept": "application/json"},
    )
    assert as_json.headers["Content-Type"].startswith("application/json")
    assert as_json.body["status"] == "HIT"
    for accept, expected in (
        ("application/json, application/msgpack;q=0.5", "application/json"),
        ("application/msgpack;q=0.9, application/json;q=0.5", "application/msgpack"),
        ("application/msgpack;q=0", "application/json"),
    ):
        rated = node.call(
            "POST",
            "/v1/cache/lookup",
            raw=msgpack.packb({"text": "packed", "vector": v}),
            headers={"Content-Type": "application/msgpack", "Accept": accept},
        )
        assert rated.headers["Content-Type"].startswith(expected), accept
        assert rated.body["status"] == "HIT"
    # Errors follow the same rule.
    bad = node.call("POST", "/v1/cache/lookup", {"text": 5}, packed=True)
    assert bad.status == 400 and bad.headers["Content-Type"].startswith("application/msgpack")
    assert bad.error == {
        "code": "invalid_request",
        "message": bad.error["message"],
        "field": "text",
    }


def test_per_request_headers(tmp_path: Path) -> None:
    now = [time.time()]
    with _vector_cache(tmp_path / "c", clock=lambda: now[0]) as cache, Served(cache) as node:
        per_request_headers(node, now)


def per_request_headers(node: Served, now: list[float]) -> None:
    v = vec("h")
    stored = node.call(
        "POST",
        "/v1/cache/store",
        {"text": "hdr", "vector": v, "response": "r"},
        headers={"X-LLMCache-Namespace": "ns2", "X-LLMCache-TTL": "100", "X-LLMCache-Tags": "a, b"},
    )
    entry = node.call("GET", f"/v1/cache/entries/{stored.body['id']}").body
    assert entry["namespace"] == "ns2" and entry["tags"] == ["a", "b"]
    assert 90_000 <= entry["expires_at_ms"] - entry["created_at_ms"] <= 110_000
    # Cache-Control max-age on store is the TTL when nothing else gives one.
    aged = store_text(node, "aged", vec("aged"), namespace="ns3")
    by_cc = node.call(
        "POST",
        "/v1/cache/store",
        {"text": "cc", "vector": vec("cc"), "response": "r"},
        headers={"Cache-Control": "max-age=10"},
    )
    cc_entry = node.call("GET", f"/v1/cache/entries/{by_cc.body['id']}").body
    assert 9_000 <= cc_entry["expires_at_ms"] - cc_entry["created_at_ms"] <= 11_000

    query = {"text": "hdr", "vector": v}
    assert node.call("POST", "/v1/cache/lookup", query).body["status"] == "MISS"  # namespace
    in_ns = node.call("POST", "/v1/cache/lookup", query, headers={"X-LLMCache-Namespace": "ns2"})
    assert in_ns.body["status"] == "HIT"
    body_wins = node.call(
        "POST",
        "/v1/cache/lookup",
        {**query, "namespace": "ns2"},
        headers={"X-LLMCache-Namespace": "elsewhere"},
    )
    assert body_wins.body["status"] == "HIT"
    threshold = node.call(
        "POST",
        "/v1/cache/lookup",
        {"text": "x", "vector": near(np.array(v), 0.3, seed=3).tolist(), "namespace": "ns2"},
        headers={"X-LLMCache-Threshold": "0.05"},
    )
    assert threshold.body["status"] == "SEMANTIC_HIT" and threshold.body["threshold"] == 0.05

    bypassed_before = metric(node, "llmcache_lookups_total", result="bypass")
    no_cache = node.call(
        "POST",
        "/v1/cache/lookup",
        {**query, "namespace": "ns2"},
        headers={"Cache-Control": "no-cache"},
    )
    assert no_cache.body["status"] == "MISS" and no_cache.body["candidates"] == []
    assert metric(node, "llmcache_lookups_total", result="bypass") == bypassed_before + 1

    old_query = {"text": "aged", "vector": vec("aged"), "namespace": "ns3"}
    assert aged["id"]
    fresh = node.call(
        "POST", "/v1/cache/lookup", old_query, headers={"Cache-Control": "max-age=3600"}
    )
    assert fresh.body["status"] == "HIT"
    now[0] += 5  # the node's clock: the entry is 5 s old now
    fresh_enough = node.call(
        "POST", "/v1/cache/lookup", old_query, headers={"Cache-Control": "max-age=10"}
    )
    assert fresh_enough.body["status"] == "HIT" and fresh_enough.headers["Age"] == "5"
    stale = node.call("POST", "/v1/cache/lookup", old_query, headers={"Cache-Control": "max-age=4"})
    assert stale.body["status"] == "MISS" and stale.body["entry"] is None

    leader = node.call(
        "POST", "/v1/cache/lookup", query, headers={"X-LLMCache-Consistency": "leader"}
    )
    # A group of one: this node is the leader, so it answers itself.
    assert leader.status == 200 and leader.headers["X-LLMCache-Leader"] == "n1"
    bogus = node.call("POST", "/v1/cache/lookup", query, headers={"X-LLMCache-Consistency": "x"})
    assert bogus.status == 400 and bogus.error["field"] == "consistency"


def test_wait_levels_and_request_ids(node: Served) -> None:
    v = vec("w")
    none = store_text(node, "w1", v, wait="none")
    assert none["id"] is None and none["index"] >= 1
    committed = store_text(node, "w2", vec("w2"), wait="committed")
    assert committed["id"] is None and committed["index"] > none["index"]
    first = store_text(node, "w3", vec("w3"), request_id="req-1")
    retry = store_text(node, "w3", vec("w3"), request_id="req-1")
    assert retry["id"] == first["id"] and retry["duplicate_of"] == first["index"]
    assert retry["request_id"] == "req-1"
    listed = node.call("GET", "/v1/cache/entries").body["entries"]
    assert sorted(e["text"] for e in listed) == ["w1", "w2", "w3"]


def test_invalidate_filters(node: Served) -> None:
    a = store_text(node, "a", vec("a"), tags=["red"])["id"]
    b = store_text(node, "b", vec("b"), tags=["blue"])["id"]
    c = store_text(node, "c", vec("c"), namespace="other")["id"]
    node.call("POST", "/v1/cache/store", {"key": "user:1", "response": "1"})
    node.call("POST", "/v1/cache/store", {"key": "user:2", "response": "2"})
    node.call("POST", "/v1/cache/store", {"key": "item:1", "response": "3"})

    by_tag = node.call("POST", "/v1/cache/invalidate", {"tags": ["red"]})
    assert by_tag.status == 200 and by_tag.body["deleted"] == 1
    assert by_tag.headers["X-LLMCache-Index"] == str(by_tag.body["index"])
    assert node.call("GET", f"/v1/cache/entries/{a}").status == 404
    by_prefix = node.call(
        "POST", "/v1/cache/invalidate", {"namespace": "default", "key_prefix": "user:"}
    )
    assert by_prefix.body["deleted"] == 2
    assert node.call("POST", "/v1/cache/lookup", {"key": "item:1"}).body["status"] == "HIT"
    assert node.call("POST", "/v1/cache/invalidate", {"namespace": "other"}).body["deleted"] == 1
    assert node.call("GET", f"/v1/cache/entries/{c}").status == 404
    assert node.call("POST", "/v1/cache/invalidate", {"ids": [b]}).body["deleted"] == 1
    deferred = node.call("POST", "/v1/cache/invalidate", {"ids": [b], "wait": "none"})
    assert deferred.body["deleted"] is None
    empty = node.call("POST", "/v1/cache/invalidate", {})
    assert empty.status == 400 and empty.error["field"] == "filter"


def test_entries_paging_filters_and_tenant_isolation(vcache: LocalCache) -> None:
    with Served(vcache, LOCKED) as node:
        t1_reader = make_token(node, "t1", "reader")
        t1_writer = make_token(node, "t1", "writer")
        t2_writer = make_token(node, "t2", "writer")
        ids = []
        for i in range(7):
            tenant_token = t1_writer if i % 2 == 0 else t2_writer
            reply = node.call(
                "POST",
                "/v1/cache/store",
                {"text": f"q{i}", "vector": vec(f"q{i}"), "response": "r", "tags": [f"m{i % 3}"]},
                token=tenant_token,
            )
            assert reply.status == 201
            ids.append(reply.body["id"])
        node.call("POST", "/v1/cache/store", {"key": "k", "response": "v"}, token=t1_writer)
        t1_ids = [ids[i] for i in (0, 2, 4, 6)]

        seen: list[int] = []
        cursor = 0
        for _ in range(10):
            page = node.call(
                "GET", f"/v1/cache/entries?limit=3&kind=prompt&cursor={cursor}", token=t1_reader
            ).body
            seen += [e["id"] for e in page["entries"]]
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        assert seen == t1_ids
        tagged = node.call("GET", "/v1/cache/entries?tag=m0", token=t1_reader).body["entries"]
        assert [e["id"] for e in tagged] == [ids[0], ids[6]]
        kv = node.call("GET", "/v1/cache/entries?kind=kv", token=t1_reader).body["entries"]
        assert [e["key"] for e in kv] == ["k"]
        assert (
            node.call("GET", "/v1/cache/entries?namespace=nope", token=t1_reader).body["entries"]
            == []
        )
        admin_view = node.call("GET", "/v1/cache/entries?tenant=t2", token=ADMIN).body["entries"]
        assert [e["id"] for e in admin_view] == [ids[1], ids[3], ids[5]]

        one = node.call("GET", f"/v1/cache/entries/{ids[0]}", token=t1_reader)
        assert one.status == 200 and one.body["text"] == "q0"
        foreign = node.call("GET", f"/v1/cache/entries/{ids[1]}", token=t1_reader)
        assert foreign.status == 404 and foreign.error["field"] == "id"
        digest = vcache.store.digest()
        assert node.call("DELETE", f"/v1/cache/entries/{ids[1]}", token=t1_writer).status == 404
        assert node.call("DELETE", f"/v1/cache/entries/{ids[0]}", token=t1_reader).status == 403
        assert vcache.store.digest() == digest
        deleted = node.call("DELETE", f"/v1/cache/entries/{ids[0]}", token=t1_writer)
        assert deleted.status == 200 and deleted.body["deleted"] == 1
        assert node.call("GET", f"/v1/cache/entries/{ids[0]}", token=t1_reader).status == 404
        for bad in ("limit=0", "limit=1001", "limit=x", "cursor=-1", "kind=other"):
            reply = node.call("GET", f"/v1/cache/entries?{bad}", token=t1_reader)
            assert reply.status == 400 and reply.error["field"] == bad.split("=")[0]
        assert node.call("GET", "/v1/cache/entries/abc", token=t1_reader).error["field"] == "id"


def test_feedback(node: Served) -> None:
    entry = store_text(node, "fb", vec("fb"))["id"]
    before = metric(node, "llmcache_feedback_total", tenant="default", label="wrong")
    reply = node.call(
        "POST",
        "/v1/cache/feedback",
        {"entry_id": entry, "label": "wrong", "similarity": 0.91, "query": "fb?"},
    )
    assert reply.status == 202 and reply.body["index"] >= 1
    assert metric(node, "llmcache_feedback_total", tenant="default", label="wrong") == before + 1
    bad = node.call("POST", "/v1/cache/feedback", {"entry_id": entry, "label": "meh"})
    assert bad.status == 400 and bad.error["field"] == "label"
    bad_id = node.call("POST", "/v1/cache/feedback", {"entry_id": 0, "label": "correct"})
    assert bad_id.status == 400 and bad_id.error["field"] == "entry_id"


# -- tenants and auth --------------------------------------------------------------------------


def make_token(node: Served, tenant: str, role: str, token: str = ADMIN) -> str:
    reply = node.call("POST", f"/v1/tenants/{tenant}/tokens", {"role": role}, token=token)
    assert reply.status == 201, reply.body
    assert reply.body["role"] == role and reply.body["tenant"] == tenant
    value: str = reply.body["token"]
    return value


def test_tenant_admin_api(vcache: LocalCache) -> None:
    with Served(vcache, LOCKED) as node:
        created = node.call(
            "POST", "/v1/tenants", {"tenant": "t3", "config": {"max_entries": 10}}, token=ADMIN
        )
        assert created.status == 201 and created.body["created"] is True
        writer = make_token(node, "t3", "writer")
        node.call(
            "PUT",
            "/v1/tenants/t3/settings",
            {"values": {"embedder": "supplied"}},
            token=ADMIN,
        )
        assert (
            node.call(
                "POST",
                "/v1/cache/store",
                {"text": "x", "vector": vec("x"), "response": "y"},
                token=writer,
            ).status
            == 201
        )
        updated = node.call(
            "POST",
            "/v1/tenants",
            {"tenant": "t3", "config": {"max_entries": 20, "eviction": "lfu"}},
            token=ADMIN,
        )
        assert updated.status == 200 and updated.body["created"] is False
        # The update kept the token.
        assert node.call("GET", "/v1/cache/entries", token=writer).status == 200

        settings = node.call(
            "PUT",
            "/v1/tenants/t3/settings",
            {"namespace": "ns", "values": {"threshold": 0.7, "ttl_s": 60}},
            token=ADMIN,
        )
        assert settings.status == 200 and settings.body["config"] == {"threshold": 0.7, "ttl_s": 60}
        view = node.call("GET", "/v1/tenants/t3", token=ADMIN)
        assert view.status == 200
        assert view.body["config"] == {"max_entries": 20, "eviction": "lfu"}
        assert view.body["settings"] == {"embedder": "supplied"}
        assert view.body["namespaces"] == {"ns": {"threshold": 0.7, "ttl_s": 60}}
        assert view.body["stats"]["entries"] == 1
        assert [t["role"] for t in view.body["tokens"]] == ["writer"]
        listed = node.call("GET", "/v1/tenants", token=ADMIN)
        names = [t["tenant"] for t in listed.body["tenants"]]
        assert names == ["default", "t1", "t2", "t3"]
        with vcache.store.read() as txn:
            hashes = list((vcache.store.tenant(txn, "t3") or {})["tokens"])
        assert hashes and all(h not in (view.raw + listed.raw).decode() for h in hashes)

        token_id = view.body["tokens"][0]["id"]
        revoked = node.call("DELETE", f"/v1/tenants/t3/tokens/{token_id}", token=ADMIN)
        assert revoked.status == 200 and revoked.body["revoked"] == token_id
        assert node.call("GET", "/v1/cache/entries", token=writer).status == 401
        again = node.call("DELETE", f"/v1/tenants/t3/tokens/{token_id}", token=ADMIN)
        assert again.status == 404 and again.error["field"] == "id"

        gone = node.call("DELETE", "/v1/tenants/t3", token=ADMIN)
        assert gone.status == 200 and gone.body["deleted"] == 1
        assert node.call("GET", "/v1/tenants/t3", token=ADMIN).status == 404
        assert node.call("DELETE", "/v1/tenants/t3", token=ADMIN).error["code"] == "unknown_tenant"


def test_auth_roles_and_tenants(vcache: LocalCache) -> None:
    with Served(vcache, LOCKED) as node:
        reader = make_token(node, "t1", "reader")
        writer = make_token(node, "t1", "writer")
        tenant_admin = make_token(node, "t1", "admin")
        t2_writer = make_token(node, "t2", "writer")
        store = {"text": "q", "vector": vec("q"), "response": "r"}
        lookup = {"text": "q", "vector": vec("q")}
        digest = vcache.store.digest()

        none = node.call("POST", "/v1/cache/lookup", lookup)
        assert none.status == 401 and none.error["code"] == "unauthorized"
        assert none.headers["X-LLMCache-Node"] == "n1"
        assert node.call("POST", "/v1/cache/lookup", lookup, token="lc_wrong").status == 401
        assert node.call("POST", "/v1/cache/lookup", lookup, token=reader).status == 200
        denied = node.call("POST", "/v1/cache/store", store, token=reader)
        assert denied.status == 403 and denied.error["code"] == "forbidden"
        foreign = node.call("POST", "/v1/cache/store", {**store, "tenant": "t1"}, token=t2_writer)
        assert foreign.status == 403 and foreign.error["field"] == "tenant"
        assert node.call("GET", "/v1/tenants", token=writer).status == 403
        assert node.call("GET", "/v1/tenants", token=tenant_admin).status == 403
        assert node.call("GET", "/v1/tenants/t2", token=tenant_admin).status == 403
        assert node.call("POST", "/v1/tenants", {"tenant": "x"}, token=tenant_admin).status == 403
        assert node.call("DELETE", "/v1/tenants/t1", token=tenant_admin).status == 403
        assert (
            node.call("POST", "/v1/tenants/t2/tokens", {"role": "admin"}, token=tenant_admin).status
            == 403
        )
        assert vcache.store.digest() == digest

        bearer = node.call(
            "POST", "/v1/cache/store", store, headers={"Authorization": f"Bearer {writer}"}
        )
        assert bearer.status == 201
        assert node.call("GET", "/v1/tenants/t1", token=tenant_admin).status == 200
        own = make_token(node, "t1", "reader", token=tenant_admin)
        assert node.call("POST", "/v1/cache/lookup", lookup, token=own).body["status"] == "HIT"
        # The node admin acts on any tenant by naming it.
        as_admin = node.call("POST", "/v1/cache/lookup", {**lookup, "tenant": "t1"}, token=ADMIN)
        assert as_admin.body["status"] == "HIT"
        assert (
            node.call("POST", "/v1/cache/lookup", lookup, token=t2_writer).body["status"] == "MISS"
        )
        # Public routes need no token.
        for path in ("/livez", "/readyz", "/metrics", "/openapi.json"):
            assert node.call("GET", path).status == 200, path


# -- bad input ---------------------------------------------------------------------------------

DEEP: Any = "x"
for _ in range(40):
    DEEP = [DEEP]
V16 = [0.25] * 16
L, S, INV = "/v1/cache/lookup", "/v1/cache/store", "/v1/cache/invalidate"
MP = {"Content-Type": "application/msgpack"}


def bad(
    name: str,
    path: str,
    field: str | None,
    body: Any = None,
    *,
    expect: tuple[int, str] = (400, "invalid_request"),
    **kwargs: Any,
) -> Any:
    """One malformed request: ``kwargs`` go to :meth:`Served.call` (raw, headers, method)."""
    return pytest.param(path, {"body": body, **kwargs}, *expect, field, id=name)


KV = {"key": "a", "response": "r"}
TEXT = {"text": "a", "vector": V16}
CHAT = {"messages": [{"role": "user", "content": "a"}]}
BAD = [
    bad("bad json", L, "body", raw=b"{nope"),
    bad("empty body", S, "body", raw=b""),
    bad("array body", S, "body", [1]),
    bad("NaN", L, "body", raw=b'{"text":"a","threshold":NaN}'),
    bad("1e400", L, "threshold", raw=b'{"text":"a","threshold":1e400}'),
    bad("vector 1e400", L, "vector", raw=b'{"text":"a","vector":[0.5,1e400,0.5]}'),
    bad("lone surrogate", S, "text", raw=b'{"text":"\\ud800","response":"r"}'),
    bad("deep", S, "response" + "[0]" * 32, {"text": "a", "response": DEEP}),
    bad("bad msgpack", S, "body", raw=b"\xc1", headers=MP),
    bad(
        "msgpack ext", S, "text", raw=msgpack.packb({"text": msgpack.ExtType(1, b"x")}), headers=MP
    ),
    bad("msgpack int key", S, "body", raw=msgpack.packb({1: "x"}), headers=MP),
    bad("msgpack bin text", S, "text", raw=msgpack.packb({"text": b"x", **KV}), headers=MP),
    bad("unknown field", S, "treshold", {**KV, "treshold": 1}),
    bad("no selector", S, "text", {"response": "r", "vector": V16}),
    bad("two selectors", S, "key", {**KV, "text": "a"}),
    bad("text type", S, "text", {**TEXT, "text": 5, "response": "r"}),
    bad(
        "empty text",
        S,
        "text",
        {**TEXT, "text": " ", "response": "r"},
        expect=(400, "empty_prompt"),
    ),
    bad("missing response", S, "response", TEXT),
    bad("both responses", S, "response_base64", {**KV, "response_base64": "AA=="}),
    bad("bad base64", S, "response_base64", {"key": "a", "response_base64": "!!"}),
    bad("no vector", S, "vector", {"text": "a", "response": "r"}),
    bad(
        "vector strings",
        L,
        "vector",
        {**TEXT, "vector": ["a"] * 16},
        expect=(400, "invalid_vector"),
    ),
    bad("vector zero", L, "vector", {**TEXT, "vector": [0] * 16}, expect=(400, "invalid_vector")),
    bad(
        "vector too long", L, "vector", {**TEXT, "vector": [1.0] * 5000}, expect=(413, "too_large")
    ),
    bad("vector with key", S, "vector", {**KV, "vector": V16}),
    bad("window with text", L, "window", {**TEXT, "window": 1}),
    bad("window type", L, "window", {"request": CHAT, "window": "2"}),
    bad("no messages", L, "request.messages", {"request": {"model": "m"}}),
    bad("threshold type", L, "threshold", {**TEXT, "threshold": "high"}),
    bad("threshold range", L, "threshold", {**TEXT, "threshold": 1.5}),
    bad("top_k bool", L, "top_k", {**TEXT, "top_k": True}),
    bad("exact_only type", L, "exact_only", {**TEXT, "exact_only": "yes"}),
    bad(
        "consistency", L, "consistency", {**TEXT, "consistency": "x"}, expect=(400, "not_supported")
    ),
    bad("tags type", S, "tags", {**KV, "tags": "x"}),
    bad("tags items", S, "tags", {**KV, "tags": [""]}),
    bad("ttl negative", S, "ttl_s", {**KV, "ttl_s": -1}),
    bad("usage", S, "usage", {**TEXT, "response": "r", "usage": {"x": "1"}}),
    bad("meta", S, "meta", {**KV, "meta": {"x": 1}}),
    bad("content_type", S, "content_type", {**KV, "content_type": "a\r\nb"}),
    bad("request_id", S, "request_id", {**KV, "request_id": "x" * 200}),
    bad("wait", S, "wait", {**KV, "wait": "forever"}),
    bad("namespace", S, "namespace", {**KV, "namespace": "bad/ns"}),
    bad("namespace newline", S, "namespace", {**KV, "namespace": "ns\n"}),
    bad("unknown tenant", S, "tenant", {**KV, "tenant": "nobody"}, expect=(404, "unknown_tenant")),
    bad(
        "huge response",
        S,
        "response",
        {**KV, "response": "x" * (5 << 20)},
        expect=(413, "too_large"),
    ),
    bad("threshold header", L, "X-LLMCache-Threshold", TEXT, headers={"X-LLMCache-Threshold": "a"}),
    bad("ttl header", S, "X-LLMCache-TTL", KV, headers={"X-LLMCache-TTL": "-5"}),
    bad("cache-control", L, "Cache-Control", TEXT, headers={"Cache-Control": "max-age=soon"}),
    bad("invalidate ids", INV, "ids", {"ids": ["1"]}),
    bad("invalidate tags", INV, "tags", {"tags": [1]}),
    bad("feedback missing", "/v1/cache/feedback", "entry_id", {"label": "wrong"}),
    bad(
        "tenant config",
        "/v1/tenants",
        "config.max_entries",
        {"tenant": "x", "config": {"max_entries": -1}},
    ),
    bad(
        "tenant config key",
        "/v1/tenants",
        "config.tokens",
        {"tenant": "x", "config": {"tokens": {}}},
    ),
    bad("tenant name", "/v1/tenants", "tenant", {"tenant": "-x"}),
    bad("token role", "/v1/tenants/t1/tokens", "role", {"role": "root"}),
    bad("setting name", "/v1/tenants/t1/settings", "values.x", {"values": {"x": 1}}, method="PUT"),
    bad(
        "setting range",
        "/v1/tenants/t1/settings",
        "values.top_k",
        {"values": {"top_k": 0}},
        method="PUT",
    ),
    bad(
        "setting embedder",
        "/v1/tenants/t1/settings",
        "values.embedder",
        {"values": {"embedder": "gpt"}},
        method="PUT",
        expect=(400, "unknown_embedder"),
    ),
    bad(
        "settings tenant",
        "/v1/tenants/no/settings",
        "tenant",
        {"values": {}},
        method="PUT",
        expect=(404, "unknown_tenant"),
    ),
    bad("not found", "/v1/nothing", None, method="GET", expect=(404, "not_found")),
    bad("method", L, None, method="GET", expect=(405, "method_not_allowed")),
]


@pytest.mark.parametrize(("path", "kwargs", "status", "code", "field"), BAD)
def test_bad_input_is_rejected_and_changes_nothing(
    vcache: LocalCache,
    node: Served,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    field: str | None,
) -> None:
    # Something to dimension-check against and to replace, so a wrong change would show.
    store_text(node, "seed", vec("seed"))
    digest = vcache.store.digest()
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    reply = node.call(method, path, **kwargs)
    assert (reply.status, reply.error["code"], reply.error["field"]) == (status, code, field), (
        reply.body
    )
    assert reply.headers["X-LLMCache-Node"] == "n1"
    assert vcache.store.digest() == digest


def test_dimension_mismatch_and_oversize_body(vcache: LocalCache) -> None:
    with Served(vcache, replace(OPEN, max_body_bytes=4096)) as node:
        store_text(node, "seed", vec("seed"))
        digest = vcache.store.digest()
        wrong = node.call(
            "POST", "/v1/cache/store", {"text": "a", "response": "r", "vector": [1.0] * 8}
        )
        assert wrong.status == 409 and wrong.error == {
            "code": "dimension_mismatch",
            "message": wrong.error["message"],
            "field": "vector",
        }
        big = node.call("POST", "/v1/cache/store", {"key": "a", "response": "x" * 10_000})
        assert big.status == 413 and big.error["field"] == "body"
        assert vcache.store.digest() == digest
        method = node.call("PUT", "/v1/cache/store", {"key": "a", "response": "r"})
        assert method.status == 405 and "POST" in method.headers["Allow"]


# -- cluster, health, metrics, OpenAPI ---------------------------------------------------------


def test_status_health_metrics_and_openapi(node: Served) -> None:
    status = node.call("GET", "/v1/cluster/status")
    assert status.status == 200
    assert status.body["node_id"] == "n1" and status.body["role"] == "leader"
    assert status.body["ready"] is True and status.body["applied_index"] >= 4
    assert node.call("GET", "/livez").body == {"status": "ok"}
    ready = node.call("GET", "/readyz")
    assert ready.status == 200 and ready.body["worker_index"] == ready.body["applied_index"]

    store_text(node, "m", vec("m"))
    node.call("GET", "/v1/cache/entries/99999")
    scrape = node.call("GET", "/metrics")
    assert scrape.headers["Content-Type"].startswith("text/plain")
    assert (
        metric(node, "llmcache_http_requests_total", route="/v1/cache/entries/{id}", status="404")
        >= 1
    )
    assert metric(node, "llmcache_stores_total", tenant="default", result="stored") >= 1
    node.call("POST", "/v1/cache/lookup", {"text": "m", "vector": vec("m")})
    assert metric(node, "llmcache_lookups_total", tenant="default", kind="exact", result="hit") >= 1
    assert metric(node, "llmcache_stage_seconds_count", stage="total") >= 1

    document = node.call("GET", "/openapi.json").body
    assert document["openapi"] == "3.1.0"
    documented = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {(r.path, r.method) for r in api.routes if isinstance(r, web.RouteDef)}
    assert served == documented
    schemes = document["components"]["securitySchemes"]
    assert (
        schemes["token"]["name"] == "X-LLMCache-Token" and schemes["bearer"]["scheme"] == "bearer"
    )


def test_openapi_hook_adds_extra_paths(vcache: LocalCache) -> None:
    extra = {"/v1/embeddings": {"post": {"responses": {"200": {"description": "ok"}}}}}
    services = Services(vcache.engine, LocalProposer(vcache), OPEN)
    app = make_app(services, extra_paths=extra)
    assert app[api.OPENAPI_PATHS] == extra
    assert "/v1/embeddings" in document(extra)["paths"]
    assert "/v1/cache/lookup" in document(extra)["paths"]
