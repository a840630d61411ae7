"""The OpenAI-compatible proxy, driven by the official ``openai`` client over real sockets.

The app is ``make_app(services, extra_routes=proxy.routes)`` + ``proxy.setup`` on a loopback
port (its own event loop thread), over a real LocalCache (LMDB in a tmp dir, the real default
embedder) with a LocalProposer; the upstream is a real loopback fake LLM (``tests/fake_llm``).
Each test uses its own namespace, so the module shares one cache and one server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import schemathesis
from aiohttp import web
from prometheus_client import REGISTRY
from schemathesis.core.result import Ok

from llmcache.node import proxy
from llmcache.node.app import make_app
from llmcache.node.auth import hash_token, new_token
from llmcache.node.embed import Embedder, RemoteEmbedder, default_embedder
from llmcache.node.keys import chat_key
from llmcache.node.local import LocalCache
from llmcache.node.proposer import LocalProposer
from llmcache.node.services import PriceEntry, ServerSettings, Services
from llmcache.node.singleflight import SingleFlight
from tests.fake_llm import CHAT, JUDGE_MODEL, FakeLLM

KEY = "sk-upstream-key"
MODEL = "gpt-test"
WAIT_S = 60.0


def dead_url() -> str:
    """A loopback URL nobody listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class Server:
    """The proxy app served on a free loopback port by an event loop in its own thread."""

    def __init__(self, services: Services) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = make_app(services, extra_routes=proxy.routes, extra_paths=proxy.openapi_paths())
        proxy.setup(self.app)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        self.port = self.call(self._start())

    async def _start(self) -> int:
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        port: int = sock.getsockname()[1]
        return port

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=WAIT_S)

    def flush(self) -> None:
        """Wait for the background stores of the answers served so far."""
        self.call(proxy.flush(self.app))

    def client(self, namespace: str, api_key: str = KEY, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1",
            api_key=api_key,
            max_retries=0,
            timeout=WAIT_S,
            default_headers={"X-LLMCache-Namespace": namespace, **headers},
        )

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=WAIT_S)
        self.loop.close()


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(api_key=KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCache]:
    # "remote" embeds through a server that is not there: the cache fails, the proxy degrades.
    remote = RemoteEmbedder(dead_url(), "gone", 8, retries=0, timeout_s=5)
    embedders: dict[str, Embedder] = {"default": default_embedder(), "remote": remote}
    with LocalCache(tmp_path_factory.mktemp("proxy"), embedders=embedders, durable=False) as c:
        c.propose(c.engine.prepare_tenant("default"))
        yield c


@pytest.fixture(scope="module")
def serve(local: LocalCache, llm: FakeLLM) -> Iterator[Callable[..., Server]]:
    """Start a proxy server over the module's cache; ``serve(**ServerSettings fields)``."""
    servers: list[Server] = []

    def start(**changes: Any) -> Server:
        settings = ServerSettings(
            upstream_base_url=llm.base_url,
            upstream_timeout_s=WAIT_S,
            upstream_api_key="sk-server-key",
            open_access=True,
            prices={MODEL: PriceEntry(prompt=1.0, completion=2.0)},
        )
        settings = dataclasses.replace(settings, **changes)
        servers.append(Server(Services(local.engine, LocalProposer(local), settings)))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(serve: Callable[..., Server]) -> Server:
    return serve()


def entries(local: LocalCache, tenant: str = "default") -> int:
    with local.store.read() as txn:
        return local.store.stats(txn, tenant)["entries"]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ask(client: openai.OpenAI, question: str, **kw: Any) -> Any:
    """A chat completion through ``with_raw_response`` (headers and parsed body)."""
    messages: Any = [{"role": "user", "content": question}]
    return client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **kw)


def status(raw: Any) -> str:
    value: str = raw.headers["X-LLMCache-Status"]
    return value


# -- hits and misses -----------------------------------------------------------------------------


def test_miss_then_exact_hit_without_upstream_call(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    client = server.client("exact")
    before = llm.call_count(CHAT)
    first = ask(client, "What is the capital of France?")
    assert status(first) == "MISS"
    assert llm.call_count(CHAT) == before + 1
    server.flush()
    saved = metric("llmcache_tokens_saved_total", tenant="default", type="completion")
    second = ask(client, "What is the capital of France?")
    assert status(second) == "HIT"
    assert second.headers["X-LLMCache-Similarity"] == "1.0000"
    assert int(second.headers["X-LLMCache-Entry"]) > 0
    assert int(second.headers["Age"]) >= 0
    assert llm.call_count(CHAT) == before + 1
    assert second.http_response.content == first.http_response.content
    answer = second.parse()
    assert answer.choices[0].message.content == FakeLLM.answer_for("What is the capital of France?")
    assert answer.usage is not None
    after = metric("llmcache_tokens_saved_total", tenant="default", type="completion")
    assert after == saved + answer.usage.completion_tokens


def test_completions_endpoint_is_cached(server: Server, llm: FakeLLM) -> None:
    client = server.client("legacy")
    create = client.completions.with_raw_response.create
    first = create(model=MODEL, prompt="Say hello")
    server.flush()
    second = create(model=MODEL, prompt="Say hello")
    assert (status(first), status(second)) == ("MISS", "HIT")
    assert second.parse().choices[0].text == FakeLLM.answer_for("Say hello")
    assert llm.call_count("/v1/completions") == 1


def test_paraphrase_is_a_semantic_hit(server: Server, llm: FakeLLM) -> None:
    client = server.client("semantic")
    ask(client, "How do I reset my password?")
    server.flush()
    cost = metric("llmcache_cost_saved_usd_total", tenant="default")
    calls = llm.call_count(CHAT)
    hit = ask(client, "how can i reset my password")
    assert status(hit) == "SEMANTIC_HIT"
    assert 0.88 <= float(hit.headers["X-LLMCache-Similarity"]) < 1.0
    content = hit.parse().choices[0].message.content
    assert content == FakeLLM.answer_for("How do I reset my password?")
    assert llm.call_count(CHAT) == calls
    assert metric("llmcache_cost_saved_usd_total", tenant="default") > cost
    # The caller's controls: a stricter threshold, or max-age=0, turn the same request away.
    strict = server.client("semantic", **{"X-LLMCache-Threshold": "0.999"})
    assert status(ask(strict, "how can i reset my password")) == "MISS"
    fresh = server.client("semantic", **{"Cache-Control": "max-age=0"})
    assert status(ask(fresh, "How do I reset my password?")) == "MISS"
    assert llm.call_count(CHAT) == calls + 2


def judge_requests(llm: FakeLLM) -> list[str]:
    """The user prompts of the judge calls the fake LLM received, in order."""
    with llm._lock:
        bodies = [b for p, b, _ in llm.requests if p == CHAT and b.get("model") == JUDGE_MODEL]
    return [str(b["messages"][-1]["content"]) for b in bodies]


def test_a_judge_labels_probes_and_hits_of_an_adaptive_namespace(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    """judge_rate 1: every probe and every semantic hit is judged, in the background, and the
    verdict arrives as replicated feedback at the candidate's similarity."""
    engine = local.engine
    settings = {
        "threshold": 0.99,
        "adaptive_delta": 0.1,
        "judge_model": JUDGE_MODEL,
        "judge_rate": 1.0,
    }
    local.propose(engine.prepare_config(settings, "default", "judged"))
    client = server.client("judged")
    ask(client, "How do I reset my password?", stream=True)  # stored as server-sent events
    server.flush()
    assert judge_requests(llm) == [] and engine.labels("default", "judged").total == 0
    before = metric("llmcache_judge_total", tenant="default", verdict="correct")
    # A paraphrase below 0.99: a miss with a probe; the judge compares the two answers.
    llm.judge_says("Yes.")
    assert status(ask(client, "how can i reset my password", stream=True)) == "MISS"
    server.flush()
    prompts = judge_requests(llm)
    assert len(prompts) == 1
    for text in (
        "how can i reset my password",
        "How do I reset my password?",
        FakeLLM.answer_for("How do I reset my password?"),
        FakeLLM.answer_for("how can i reset my password"),  # the fresh, streamed answer
    ):
        assert text in prompts[0]
    labels = engine.labels("default", "judged")
    assert labels.total == 1 and sum(labels.correct) == 1
    assert 0.85 <= labels.correct.index(1) / 100 < 0.99  # at the probe's similarity
    assert metric("llmcache_judge_total", tenant="default", verdict="correct") == before + 1
    # A semantic hit (a lower threshold): served from the cache at once, then the request goes
    # upstream once more for a fresh answer, and the judge says no.
    local.propose(engine.prepare_config({"threshold": 0.8}, "default", "judged"))
    llm.judge_says("no")
    calls = llm.call_count(CHAT)
    hit = ask(client, "what are the steps to reset my password", stream=True)
    assert status(hit) == "SEMANTIC_HIT"
    server.flush()
    assert llm.call_count(CHAT) == calls + 2  # the fresh answer and the judge
    labels = engine.labels("default", "judged")
    assert labels.total == 2 and sum(labels.wrong) == 1
    similarity = float(hit.headers["X-LLMCache-Similarity"])
    assert labels.wrong[int(similarity * 100)] == 1
    # A verdict that is neither yes nor no labels nothing.
    unclear = metric("llmcache_judge_total", tenant="default", verdict="unclear")
    llm.judge_says("maybe")
    assert status(ask(client, "reset password how", stream=True)) in ("SEMANTIC_HIT", "MISS")
    server.flush()
    assert engine.labels("default", "judged").total == 2
    assert metric("llmcache_judge_total", tenant="default", verdict="unclear") == unclear + 1
    llm.judge_says("yes")


def test_no_judge_without_adaptive_thresholds_or_at_rate_zero(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    engine = local.engine
    for namespace, values in (
        ("judge-off", {"threshold": 0.8, "judge_model": JUDGE_MODEL, "judge_rate": 1.0}),
        (
            "judge-zero",
            {
                "threshold": 0.8,
                "adaptive_delta": 0.1,
                "judge_model": JUDGE_MODEL,
                "judge_rate": 0.0,
            },
        ),
    ):
        local.propose(engine.prepare_config(values, "default", namespace))
        client = server.client(namespace)
        ask(client, "How do I bake bread?")
        server.flush()
        assert status(ask(client, "how can i bake bread")) == "SEMANTIC_HIT"
        server.flush()
        assert engine.labels("default", namespace).total == 0
    assert all("bake bread" not in p for p in judge_requests(llm))
    with pytest.raises(Exception, match="judge_rate"):
        engine.prepare_config({"judge_rate": 1.5}, "default", "judged")


def test_streamed_miss_then_streamed_hit_replays_the_chunks(server: Server, llm: FakeLLM) -> None:
    client = server.client("stream")

    def run(include_usage: bool) -> tuple[str, list[Any]]:
        options = {"include_usage": True} if include_usage else None
        raw = ask(client, "Explain streaming", stream=True, stream_options=options)
        chunks = list(raw.parse())
        return status(raw), chunks

    def text(chunks: list[Any]) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    calls = llm.call_count(CHAT)
    miss_status, miss = run(include_usage=True)
    server.flush()
    hit_status, hit = run(include_usage=True)
    assert (miss_status, hit_status) == ("MISS", "HIT")
    assert len(hit) == len(miss) > 3
    assert text(hit) == text(miss) == FakeLLM.answer_for("Explain streaming")
    assert hit[-1].usage == miss[-1].usage and hit[-1].usage is not None
    assert hit[-2].choices[0].finish_reason == "stop"
    # A caller that did not ask for usage does not get the usage-only chunk.
    plain_status, plain = run(include_usage=False)
    assert plain_status == "HIT" and len(plain) == len(miss) - 1
    assert all(c.choices for c in plain) and text(plain) == text(miss)
    assert llm.call_count(CHAT) == calls + 1
    # Stream and non-stream entries are kept apart.
    assert status(ask(client, "Explain streaming")) == "MISS"
    assert llm.call_count(CHAT) == calls + 2


def test_concurrent_identical_misses_make_one_upstream_call(server: Server, llm: FakeLLM) -> None:
    joins = metric("llmcache_singleflight_joins_total")
    calls = llm.call_count(CHAT)

    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1",
            api_key=KEY,
            max_retries=0,
            timeout=WAIT_S,
            default_headers={"X-LLMCache-Namespace": "flight"},
        )
        messages: Any = [{"role": "user", "content": "Tell me about single flight"}]
        create: Any = client.chat.completions.with_raw_response.create
        tasks = [asyncio.create_task(create(model=MODEL, messages=messages)) for _ in range(50)]
        # The upstream holds its answer until the 49 others have joined the first call.
        deadline = time.monotonic() + WAIT_S
        while metric("llmcache_singleflight_joins_total") < joins + 49:
            assert time.monotonic() < deadline, "the identical misses did not all join"
            assert not any(t.done() for t in tasks)
            await asyncio.sleep(0.05)
        llm.release()
        answers = await asyncio.gather(*tasks)
        await client.close()
        return answers

    llm.hold()
    try:
        answers = asyncio.run(main())
    finally:
        llm.release()
    assert llm.call_count(CHAT) == calls + 1
    assert [status(a) for a in answers] == ["MISS"] * 50
    joined = [a for a in answers if a.headers.get("X-LLMCache-Singleflight") == "joined"]
    assert len(joined) == 49
    expected = FakeLLM.answer_for("Tell me about single flight")
    assert {a.parse().choices[0].message.content for a in answers} == {expected}


def test_invalid_control_header_is_a_400_before_any_upstream_call(
    server: Server, llm: FakeLLM
) -> None:
    calls = llm.call_count(CHAT)
    bad = server.client("controls", **{"X-LLMCache-Threshold": "very"})
    with pytest.raises(openai.BadRequestError) as failure:
        ask(bad, "Hello")
    assert failure.value.code == "invalid_request"
    assert llm.call_count(CHAT) == calls


# -- bypass ------------------------------------------------------------------------------------


def test_hot_temperature_bypasses_and_stores_nothing(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    client = server.client("hot")
    stored = entries(local)
    calls = llm.call_count(CHAT)
    for _ in range(2):
        raw = ask(client, "Write a poem", temperature=0.9)
        assert status(raw) == "BYPASS"
        assert "temperature" in raw.headers["X-LLMCache-Reason"]
        server.flush()
    assert llm.call_count(CHAT) == calls + 2
    assert entries(local) == stored
    no_store = server.client("hot", **{"Cache-Control": "no-store"})
    assert status(ask(no_store, "Write a limerick")) == "BYPASS"
    server.flush()
    assert entries(local) == stored


def test_kill_switch_bypasses(
    serve: Callable[..., Server], llm: FakeLLM, local: LocalCache
) -> None:
    off = serve(cache_enabled=False)
    client = off.client("killed")
    stored = entries(local)
    calls = llm.call_count(CHAT)
    for _ in range(2):
        raw = ask(client, "Is the cache on?")
        assert status(raw) == "BYPASS"
        assert raw.headers["X-LLMCache-Reason"] == "kill switch"
    off.flush()
    assert llm.call_count(CHAT) == calls + 2
    assert entries(local) == stored


# -- upstream failures are relayed and never stored ----------------------------------------------


def test_upstream_error_is_relayed_and_not_stored(server: Server, llm: FakeLLM) -> None:
    client = server.client("errors")
    llm.fail_next(1, 500)
    calls = llm.call_count(CHAT)
    with pytest.raises(openai.InternalServerError) as failure:
        ask(client, "Will this fail?")
    assert failure.value.status_code == 500
    assert failure.value.response.headers["X-LLMCache-Status"] == "MISS"
    assert failure.value.message.endswith("injected failure")
    server.flush()
    assert status(ask(client, "Will this fail?")) == "MISS"
    assert llm.call_count(CHAT) == calls + 2
    server.flush()
    assert status(ask(client, "Will this fail?")) == "HIT"


def test_cut_stream_is_cut_for_the_caller_and_not_stored(server: Server, llm: FakeLLM) -> None:
    client = server.client("cut")
    llm.cut_next(1, after_chunks=2)
    calls = llm.call_count(CHAT)
    raw = ask(client, "Stream and break", stream=True)
    assert status(raw) == "MISS"
    with pytest.raises(Exception):  # noqa: B017 (the transport's own error type)
        list(raw.parse())
    server.flush()
    again = ask(client, "Stream and break", stream=True)
    assert status(again) == "MISS"
    assert "".join(c.choices[0].delta.content or "" for c in again.parse() if c.choices) == (
        FakeLLM.answer_for("Stream and break")
    )
    assert llm.call_count(CHAT) == calls + 2
    server.flush()
    assert status(ask(client, "Stream and break", stream=True)) == "HIT"


def test_upstream_timeout_is_504_and_not_stored(serve: Callable[..., Server], llm: FakeLLM) -> None:
    impatient = serve(upstream_timeout_s=1.0)
    client = impatient.client("timeout")
    calls = llm.call_count(CHAT)
    llm.hold()
    try:
        with pytest.raises(openai.APIStatusError) as failure:
            ask(client, "Are you there?")
    finally:
        llm.release()
    assert failure.value.status_code == 504
    assert failure.value.code == "upstream_timeout"
    impatient.flush()
    assert status(ask(client, "Are you there?")) == "MISS"
    assert llm.call_count(CHAT) == calls + 2


def test_unreachable_upstream_is_502(serve: Callable[..., Server]) -> None:
    nowhere = serve(upstream_base_url=dead_url())
    with pytest.raises(openai.APIStatusError) as failure:
        ask(nowhere.client("nowhere"), "Hello?")
    assert failure.value.status_code == 502
    assert failure.value.code == "upstream_unreachable"


# -- credentials -----------------------------------------------------------------------------------


def test_callers_authorization_reaches_upstream_and_is_never_stored(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    ask(server.client("auth"), "Who am I?")
    server.flush()
    assert llm.authorizations()[-1] == f"Bearer {KEY}"
    local.store.env.sync(True)
    stored = b"".join(p.read_bytes() for p in local.path.rglob("*") if p.is_file())
    assert b"Who am I?" in stored  # the scan does see what was stored
    assert KEY.encode() not in stored


def test_llmcache_token_is_ours_server_key_and_tenant_upstream_are_used(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    token, token_id = new_token()
    with FakeLLM(api_key="sk-server-key") as acme_llm:
        config = {
            "tokens": {hash_token(token): {"role": "writer", "id": token_id}},
            "upstream_base_url": acme_llm.base_url,
        }
        local.propose(local.engine.prepare_tenant("acme", config))
        calls = llm.call_count(CHAT)
        raw = ask(server.client("default", api_key=token), "Which upstream?")
        assert status(raw) == "MISS"
        server.flush()
        assert acme_llm.authorizations() == ["Bearer sk-server-key"]
        assert all(token not in str(h) for _, _, h in acme_llm.requests)
        assert llm.call_count(CHAT) == calls
        assert entries(local, "acme") == 1


# -- embeddings and degradation ------------------------------------------------------------------


def test_embeddings_are_cached_exactly(server: Server, llm: FakeLLM) -> None:
    create = server.client("emb").embeddings.with_raw_response.create
    first = create(model="text-embedding-3-small", input="hello world", encoding_format="float")
    server.flush()
    second = create(model="text-embedding-3-small", input="hello world", encoding_format="float")
    by_user = create(
        model="text-embedding-3-small", input="hello world", encoding_format="float", user="u1"
    )
    other = create(model="text-embedding-3-small", input="hello there", encoding_format="float")
    assert [status(r) for r in (first, second, by_user, other)] == ["MISS", "HIT", "HIT", "MISS"]
    assert second.http_response.content == first.http_response.content
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    assert llm.call_count("/v1/embeddings") == 2


def test_cache_failure_degrades_to_pass_through(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    engine = local.engine
    local.propose(engine.prepare_config({"embedder": "remote"}, "default", "broken"))
    seed = chat_key(
        "default", "broken", {"model": MODEL, "messages": [{"role": "user", "content": "seed"}]}
    )
    local.propose(engine.prepare_put(seed, b"{}", vector=[1.0] + [0.0] * 7))
    degraded = metric("llmcache_degraded_total", reason="embedder_unavailable")
    calls = llm.call_count(CHAT)
    raw = ask(server.client("broken"), "Is the embedder up?")
    assert status(raw) == "BYPASS"
    assert raw.headers["X-LLMCache-Degraded"] == "embedder_unavailable"
    assert raw.parse().choices[0].message.content == FakeLLM.answer_for("Is the embedder up?")
    assert llm.call_count(CHAT) == calls + 1
    assert metric("llmcache_degraded_total", reason="embedder_unavailable") == degraded + 1


def test_a_missing_cross_encoder_degrades_to_pass_through(
    server: Server, llm: FakeLLM, local: LocalCache
) -> None:
    # The verifier names a cross-encoder this node never installed: no hit may be served
    # unverified, so the paraphrase goes upstream, marked degraded.
    verifier = '{"format":1,"weights":{"cross_encoder":1.0},"bias":0,"cross_encoder":"sha256:%s"}'
    settings = {"verifier": verifier % ("1" * 64), "threshold": 0.5}
    local.propose(local.engine.prepare_config(settings, "default", "cross"))
    client = server.client("cross")
    assert status(ask(client, "How do I reset my password?")) == "MISS"  # no candidate yet
    server.flush()
    calls = llm.call_count(CHAT)
    raw = ask(client, "how can i reset my password")
    assert status(raw) == "BYPASS"
    assert raw.headers["X-LLMCache-Degraded"] == "cross_encoder_missing"
    assert raw.parse().choices[0].message.content == FakeLLM.answer_for(
        "how can i reset my password"
    )
    assert llm.call_count(CHAT) == calls + 1


def test_openapi_document_has_the_proxy_routes(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/openapi.json"
    with urllib.request.urlopen(url, timeout=WAIT_S) as answer:
        document = json.load(answer)
    paths = document["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert paths[path] == proxy.openapi_paths()[path]
    assert (
        "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    )
    operations = list(schemathesis.openapi.from_dict(document).get_all_operations())
    assert all(isinstance(op, Ok) for op in operations)  # every operation (refs) resolves


# -- single flight -------------------------------------------------------------------------------


def test_singleflight_shares_one_execution_and_releases_the_key() -> None:
    async def main() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        runs = 0
        gate = asyncio.Event()

        async def work() -> int:
            nonlocal runs
            runs += 1
            await gate.wait()
            return runs

        calls = [asyncio.create_task(flights.do("k", work)) for _ in range(5)]
        await asyncio.sleep(0)
        assert len(flights) == 1
        gate.set()
        results = await asyncio.gather(*calls)
        assert results == [(1, False)] + [(1, True)] * 4
        assert len(flights) == 0
        assert await flights.do("k", work) == (2, False)

    asyncio.run(main())


def test_singleflight_propagates_errors_and_survives_a_cancelled_leader() -> None:
    async def main() -> None:
        flights: SingleFlight[str, str] = SingleFlight()
        gate = asyncio.Event()

        async def fail() -> str:
            await gate.wait()
            raise ValueError("boom")

        calls = [asyncio.create_task(flights.do("k", fail)) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)

        slow = asyncio.Event()

        async def answer() -> str:
            await slow.wait()
            return "done"

        leader = asyncio.create_task(flights.do("k", answer))
        await asyncio.sleep(0)
        follower = asyncio.create_task(flights.do("k", answer))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        slow.set()
        assert await follower == ("done", True)
        assert leader.cancelled()

    asyncio.run(main())
