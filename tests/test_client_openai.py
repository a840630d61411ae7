"""The openai drop-in (``llmcache.client.openai_wrap.cached``): the official ``openai`` client
talking to a real loopback fake LLM, its calls cached in a real node."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from llmcache.client import AsyncCacheClient, CacheClient, RetryPolicy
from llmcache.client.openai_wrap import cached, cached_async
from tests.fake_llm import CHAT, FakeLLM
from tests.node_process import NodeProcess, free_port

KEY = "sk-test"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(Path(tmp_path_factory.mktemp("openai-wrap")))
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(api_key=KEY) as fake:
        yield fake


def ask(client: object, question: str, **extra: object) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": question}]
    body = {"model": "gpt-test", "temperature": 0, "messages": messages, **extra}
    reply = client.chat.completions.create(**body)  # type: ignore[attr-defined]
    assert isinstance(reply, openai.types.chat.ChatCompletion)
    return reply


def test_chat_calls_hit_the_cache_exactly_and_semantically(node: NodeProcess, llm: FakeLLM) -> None:
    upstream = openai.OpenAI(base_url=llm.base_url, api_key=KEY)
    with CacheClient(node.url) as cache:
        wrapped = cached(upstream, cache, namespace="wrap-chat")
        first = ask(wrapped, "How do I reset my password?")
        assert wrapped.last_status == "MISS" and llm.call_count(CHAT) == 1
        again = ask(wrapped, "How do I reset my password?")
        assert wrapped.last_status == "HIT" and again == first
        similar = ask(wrapped, "how can i reset my password")
        assert wrapped.last_status == "SEMANTIC_HIT" and similar == first
        assert llm.call_count(CHAT) == 1
        other_model = wrapped.chat.completions.create(
            model="gpt-other",
            temperature=0,
            messages=[{"role": "user", "content": "How do I reset my password?"}],
        )
        assert wrapped.last_status == "MISS" and llm.call_count(CHAT) == 2
        assert other_model.choices[0].message.content == first.choices[0].message.content
        hot = ask(wrapped, "Write me a poem", temperature=1.5)
        ask(wrapped, "Write me a poem", temperature=1.5)  # not cacheable: asked again
        assert llm.call_count(CHAT) == 4 and hot.choices
        stream = wrapped.chat.completions.create(
            model="gpt-test",
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": "How do I reset my password?"}],
        )
        assert wrapped.last_status == "BYPASS" and "".join(
            c.choices[0].delta.content or "" for c in stream if c.choices
        )
        assert wrapped.models is upstream.models  # everything else is the client's own


def test_embeddings_are_cached_exactly(node: NodeProcess, llm: FakeLLM) -> None:
    upstream = openai.OpenAI(base_url=llm.base_url, api_key=KEY)
    with CacheClient(node.url) as cache:
        wrapped = cached(upstream, cache, namespace="wrap-emb")
        first = wrapped.embeddings.create(model="e", input=["a", "b"])
        second = wrapped.embeddings.create(model="e", input=["a", "b"])
        assert wrapped.last_status == "HIT" and second == first
        wrapped.embeddings.create(model="e", input=["a", "c"])
        assert wrapped.last_status == "MISS" and llm.call_count() == 2


def test_the_wrapper_fails_open_when_the_cache_is_down(llm: FakeLLM) -> None:
    upstream = openai.OpenAI(base_url=llm.base_url, api_key=KEY)
    dead = CacheClient(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=1))
    with dead:
        wrapped = cached(upstream, dead)
        assert ask(wrapped, "Still answered?").choices[0].message.content
        assert wrapped.last_status == "BYPASS" and llm.call_count(CHAT) == 1


def test_the_async_wrapper(node: NodeProcess, llm: FakeLLM) -> None:
    async def scenario() -> None:
        upstream = openai.AsyncOpenAI(base_url=llm.base_url, api_key=KEY)
        async with AsyncCacheClient(node.url) as cache:
            wrapped = cached_async(upstream, cache, namespace="wrap-async")
            body = {
                "model": "gpt-test",
                "temperature": 0,
                "messages": [{"role": "user", "content": "Is the async path cached?"}],
            }
            first = await wrapped.chat.completions.create(**body)
            assert wrapped.last_status == "MISS"
            second = await wrapped.chat.completions.create(**body)
            assert wrapped.last_status == "HIT" and second == first
            vectors = await wrapped.embeddings.create(model="e", input="x")
            assert await wrapped.embeddings.create(model="e", input="x") == vectors
            assert wrapped.last_status == "HIT"
        assert llm.call_count(CHAT) == 1 and llm.call_count() == 1
        await upstream.close()

    asyncio.run(scenario())
