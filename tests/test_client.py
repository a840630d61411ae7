"""``CacheClient`` and ``AsyncCacheClient`` against one real ``llmcache-node`` process (default
embedder, an admin token): every method's round trip, typed results, both wire formats, the
request-id reuse that makes retries safe, failover, and the errors a caller can act on."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from llmcache.client import AsyncCacheClient, CacheClient, RetryPolicy
from llmcache.client.errors import (
    BadRequest,
    ConnectionFailed,
    Forbidden,
    InvalidURL,
    NotCacheable,
    NotFound,
    ServerTooOld,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownTenant,
)
from tests.node_process import NodeProcess, free_port

ADMIN = "lc_client-tests-admin"
QUICK = RetryPolicy(attempts=2, base_s=0.01, cap_s=0.05)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(Path(tmp_path_factory.mktemp("client")), env={"LLMCACHE_ADMIN_TOKEN": ADMIN})
    try:
        proc.start()
        with CacheClient(proc.url, token=ADMIN) as admin:
            admin.create_tenant("acme")
        yield proc
    finally:
        proc.stop()


@pytest.fixture(params=[True, False], ids=["msgpack", "json"])
def client(node: NodeProcess, request: pytest.FixtureRequest) -> Iterator[CacheClient]:
    with CacheClient(node.url, token=ADMIN, tenant="acme", msgpack=request.param) as c:
        yield c


def test_store_then_exact_and_semantic_lookups_are_typed(client: CacheClient) -> None:
    ns = f"ns-{uuid.uuid4().hex[:8]}"
    stored = client.store(
        "How do I reset my password?", "Settings → Security", namespace=ns, tags=["faq"]
    )
    assert stored.id is not None and stored.index > 0 and not stored.duplicate
    exact = client.lookup("How do I reset my password?", namespace=ns)
    assert exact.status == "HIT" and exact.kind == "exact" and exact.hit
    assert exact.similarity == pytest.approx(1.0) and exact.entry_id == stored.id
    assert exact.entry is not None and exact.entry.response_text == "Settings → Security"
    assert exact.entry.tags == ("faq",) and exact.age_s is not None and exact.age_s >= 0
    assert exact.index is not None and exact.index >= stored.index
    semantic = client.lookup("how can i reset my password", namespace=ns)
    assert semantic.status == "SEMANTIC_HIT" and semantic.kind == "semantic"
    assert semantic.similarity is not None and 0.88 <= semantic.similarity < 1.0
    # No verifier: feedback on the hit is filed under its similarity; no probe on hits.
    assert semantic.feedback_similarity == semantic.similarity and semantic.probe is None
    miss = client.lookup("What is the capital of France?", namespace=ns)
    assert miss.status == "MISS" and not miss.hit and miss.kind is None and miss.entry is None


def test_kv_bytes_entries_listing_get_feedback_invalidate_delete(client: CacheClient) -> None:
    ns = f"kv-{uuid.uuid4().hex[:8]}"
    blob = bytes(range(256))
    first = client.store(key="blob", response=blob, namespace=ns, meta={"m": "1"})
    second = client.store(key="json", response={"a": [1, 2]}, namespace=ns, tags=["t"], ttl_s=60)
    found = client.lookup(key="blob", namespace=ns)
    assert found.entry is not None and found.entry.response == blob
    assert found.entry.meta == {"m": "1"} and found.entry.kind == "kv"
    entry = client.get_entry(second.id or 0)
    assert entry.response_json() == {"a": [1, 2]} and entry.content_type == "application/json"
    assert 0 < entry.expires_at_ms - entry.created_at_ms <= 66_000
    listed = list(client.iter_entries(namespace=ns, page=1))
    assert [e.id for e in listed] == [first.id, second.id]
    page = client.entries(namespace=ns, limit=1)
    assert len(page.entries) == 1 and page.next_cursor == first.id
    assert client.feedback(first.id or 0, "correct", similarity=1.0) > 0
    assert client.invalidate(namespace=ns, tags=["t"]).deleted == 1
    assert client.delete_entry(first.id or 0).deleted == 1
    assert client.lookup(key="blob", namespace=ns).status == "MISS"
    assert list(client.iter_entries(namespace=ns)) == []
    with pytest.raises(NotFound):
        client.get_entry(first.id or 0)


def test_a_retried_write_with_its_request_id_applies_once(client: CacheClient) -> None:
    ns = f"rid-{uuid.uuid4().hex[:8]}"
    request_id = uuid.uuid4().hex
    first = client.store(key="k", response="v1", namespace=ns, request_id=request_id)
    again = client.store(key="k", response="v2", namespace=ns, request_id=request_id)
    assert again.duplicate and again.id == first.id and not first.duplicate
    entries = list(client.iter_entries(namespace=ns))
    assert [(e.id, e.response) for e in entries] == [(first.id, b"v1")]


def test_tenants_tokens_settings_and_roles(node: NodeProcess) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with CacheClient(node.url, token=ADMIN) as admin:
        assert admin.create_tenant(name, {"description": "d"})["created"] is True
        assert name in {t["tenant"] for t in admin.list_tenants()}
        admin.set_settings(name, {"threshold": 0.9}, namespace="ns")
        assert admin.get_tenant(name)["namespaces"]["ns"]["threshold"] == 0.9
        writer = admin.create_token(name, "writer")
        reader = admin.create_token(name, "reader")
        assert writer.token.startswith("lc_") and writer.tenant == name
        with CacheClient(node.url, token=writer.token) as own:
            own.store(key="k", response="v")
            assert own.lookup(key="k").status == "HIT"
            with pytest.raises(Forbidden):
                own.lookup(key="k", tenant="acme")
        with CacheClient(node.url, token=reader.token) as reads:
            assert reads.lookup(key="k").status == "HIT"
            with pytest.raises(Forbidden):
                reads.store(key="k2", response="v")
        admin.revoke_token(name, writer.id)
        with (
            CacheClient(node.url, token=writer.token, retry=QUICK) as revoked,
            pytest.raises(Unauthorized),
        ):
            revoked.lookup(key="k")
        assert admin.delete_tenant(name).index > 0
        with pytest.raises(UnknownTenant):
            admin.lookup(key="k", tenant=name)
        status = admin.cluster_status()
        assert status["role"] == "leader" and status["applied_index"] > 0


def test_errors_are_specific(node: NodeProcess, client: CacheClient) -> None:
    with pytest.raises(InvalidURL):
        CacheClient("localhost:8080")
    with pytest.raises(InvalidURL):
        CacheClient("http://127.0.0.1:notaport")
    dead = CacheClient(f"http://127.0.0.1:{free_port()}", retry=QUICK)
    with dead, pytest.raises(ConnectionFailed):
        dead.lookup("x")
    bad = CacheClient(node.url, token="lc_wrong", retry=QUICK)
    with bad, pytest.raises(Unauthorized):
        bad.lookup("x")
    with pytest.raises(UnknownTenant) as unknown:
        client.lookup("x", tenant="nobody-here")
    assert unknown.value.status == 404 and unknown.value.field == "tenant"
    with pytest.raises(BadRequest) as bad_field:
        client.lookup("x", threshold=7.0)
    assert bad_field.value.field == "threshold"
    with pytest.raises(NotCacheable):
        client.store(request={"model": "m", "temperature": 1.5, "prompt": "p"}, response="r")


def test_reads_fail_over_to_the_next_node(node: NodeProcess) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with CacheClient([dead, node.url], token=ADMIN, tenant="acme") as c:
        assert c.lookup(key="missing").status == "MISS"
        assert c.urls == [dead, node.url]


class OldServer:
    """A loopback HTTP server standing in for an older node: it documents the routes of the
    first release only (no import, no ``full`` listings) and answers 404 to others. Its store
    speaks JSON only (415 to msgpack) and answers 503 ``fail`` times before storing; it records
    the bodies it was sent."""

    def __init__(self, fail: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.fail = fail
        self.bodies: list[tuple[str, bytes]] = []
        app = web.Application()
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_post("/v1/cache/store", self._store)
        self.runner = web.AppRunner(app)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", self.port))
        await web.SockSite(self.runner, sock).start()

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response({"paths": {"/v1/cache/entries": {"get": {"parameters": []}}}})

    async def _store(self, request: web.Request) -> web.Response:
        self.bodies.append((request.content_type, await request.read()))
        if request.content_type != "application/json":
            return web.json_response({"error": {"code": "unsupported_media_type"}}, status=415)
        if self.fail > 0:
            self.fail -= 1
            error = {"code": "raft_unavailable", "message": "no leader", "field": None}
            return web.json_response({"error": error}, status=503, headers={"Retry-After": "0"})
        data = await request.json()
        answer = {"id": 1, "index": 5, "request_id": data["request_id"], "replaced": None}
        return web.json_response(answer, status=201)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_a_server_too_old_for_a_feature_is_named() -> None:
    old = OldServer()
    try:
        with CacheClient(f"http://127.0.0.1:{old.port}", retry=QUICK) as c:
            with pytest.raises(ServerTooOld, match="no route /v1/cache/import"):
                c.import_entries([])
            with pytest.raises(ServerTooOld, match="no parameter 'full'"):
                c.entries(full=True)
            with pytest.raises(ServerTooOld, match="does not serve POST /v1/cache/feedback"):
                c.feedback(1, "wrong")
    finally:
        old.close()


def test_a_write_retried_through_503s_keeps_its_request_id_and_falls_back_to_json() -> None:
    server = OldServer(fail=2)
    try:
        with CacheClient(f"http://127.0.0.1:{server.port}", retry=QUICK) as c:
            with pytest.raises(Unavailable) as gave_up:  # 2 attempts: 415, then a 503
                c.store(key="k", response="v")
            assert gave_up.value.request_id and "retry with request_id=" in str(gave_up.value)
            stored = c.store(key="k", response="v", request_id=gave_up.value.request_id)
            assert stored.request_id == gave_up.value.request_id and stored.id == 1
        kinds = [kind for kind, _ in server.bodies]
        assert kinds == ["application/msgpack"] + ["application/json"] * 3
        sent = [json.loads(body)["request_id"] for kind, body in server.bodies[1:]]
        assert sent == [gave_up.value.request_id] * 3  # 503, then 503 and 201 on the retry
        with CacheClient(f"http://127.0.0.1:{server.port}", msgpack=False) as patient:
            server.fail = 3
            assert patient.store(key="k", response="v").id == 1  # 3 x 503, then stored
            ids = {json.loads(body)["request_id"] for _, body in server.bodies[4:]}
            assert len(ids) == 1 and len(server.bodies) == 8
    finally:
        server.close()


def test_async_client_round_trip(node: NodeProcess) -> None:
    async def scenario() -> None:
        ns = f"aio-{uuid.uuid4().hex[:8]}"
        async with AsyncCacheClient(node.url, token=ADMIN, tenant="acme") as c:
            stored = await asyncio.gather(
                *(c.store(key=f"k{i}", response=f"v{i}", namespace=ns) for i in range(8))
            )
            assert len({s.id for s in stored}) == 8
            hits = await asyncio.gather(*(c.lookup(key=f"k{i}", namespace=ns) for i in range(8)))
            assert [h.entry.response_text for h in hits if h.entry] == [f"v{i}" for i in range(8)]
            listed = [e.key async for e in c.iter_entries(namespace=ns, page=3)]
            assert sorted(listed) == sorted(f"k{i}" for i in range(8))
            assert (await c.invalidate(namespace=ns)).deleted == 8
            with pytest.raises(UnknownTenant):
                await c.lookup(key="k0", tenant="nobody-here")
            assert (await c.cluster_status())["role"] == "leader"

    asyncio.run(scenario())


def test_full_listings_and_import_checks(node: NodeProcess, client: CacheClient) -> None:
    ns = f"imp-{uuid.uuid4().hex[:8]}"
    client.store("What is LLM-Cache?", "A semantic cache.", namespace=ns)
    (view,) = [e.view for e in client.entries(namespace=ns, full=True).entries]
    assert len(base64.b64decode(view["vector_base64"])) == 384 * 4 and view["embedder"]
    record = {k: v for k, v in view.items() if k not in ("id", "age_s")}
    done = client.import_entries([record, {**record, "prompt": "other", "expires_at_ms": 1}])
    assert done == {"imported": 1, "duplicates": 0, "expired": 1, "index": done["index"]}
    again = client.import_entries([record])
    assert (again["imported"], again["duplicates"]) == (0, 1)
    (replaced,) = [e.view for e in client.entries(namespace=ns, full=True).entries]
    assert {**replaced, "id": 0, "age_s": 0} == {**view, "id": 0, "age_s": 0}  # itself

    def refused(entry: dict[str, object]) -> str | None:
        with pytest.raises(BadRequest) as failure:
            client.import_entries([record, entry])
        return failure.value.field

    unnormed = base64.b64encode(bytes(4 * 384)).decode()
    assert refused({**record, "vector_base64": unnormed}) == "entries[1].vector_base64"
    assert refused({**record, "kind": "other"}) == "entries[1].kind"
    assert refused({**record, "id": 3}) == "entries[1].id"
    with pytest.raises(TooLarge):
        client.import_entries([record] * 257)
    with CacheClient(node.url, token=ADMIN) as admin:
        writer = admin.create_token("acme", "writer")
    with CacheClient(node.url, token=writer.token) as own, pytest.raises(Forbidden):
        own.import_entries([record])
