"""``llmcache-node`` as a real process: start, serve, shut down, restart, refuse bad config."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fake_llm import FakeLLM
from tests.node_process import NodeProcess

PAIRS = [
    ("How do I reset my password?", "how can i reset my password"),
    ("What is your refund policy?", "what's the refund policy"),
    ("How do I delete my account?", "how can I delete my account"),
]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.kill()


def test_two_workers_serve_writes_at_once_and_restart_keeps_indexes(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node = NodeProcess(tmp_path / "n", workers=2)
    nodes.append(node)
    node.start()
    for prompt, _ in PAIRS:
        status, headers, body = node.request(
            "POST", "/v1/cache/store", {"text": prompt, "response": f"answer: {prompt}"}
        )
        assert status == 201, body
        assert headers["X-LLMCache-Index"] == str(body["index"])
        # Acknowledged as applied: every worker (each new connection may land on either)
        # sees it right away.
        for _ in range(6):
            status, headers, found = node.request("POST", "/v1/cache/lookup", {"text": prompt})
            assert status == 200 and found["status"] == "HIT", found
    for prompt, paraphrase in PAIRS:
        _, headers, found = node.request("POST", "/v1/cache/lookup", {"text": paraphrase})
        assert found["status"] == "SEMANTIC_HIT" and found["entry"]["text"] == prompt
        assert float(headers["X-LLMCache-Similarity"]) >= found["threshold"]
    # Both workers' counters add up in /metrics (prometheus multiprocess mode).
    _, _, text = node.request("GET", "/metrics")
    hits = re.findall(
        r'^llmcache_lookups_total\{kind="(exact|semantic)",result="hit",tenant="default"\} (\S+)$',
        text.decode(),
        re.M,
    )
    assert sum(float(n) for _, n in hits) == 6 * len(PAIRS) + len(PAIRS), hits
    # Ready means one worker answers: let the other finish starting before stopping.
    deadline = time.monotonic() + 60
    while node.log().count(": serving") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.stop(signal.SIGTERM) == 0
    log = node.log()
    assert log.count("indexes checkpointed") == 2, log

    node.start()
    # Ready means one worker answers; the other may still be opening its indexes.
    deadline = time.monotonic() + 60
    while node.log().count("indexes loaded") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "worker 0: indexes loaded" in node.log() and "worker 1: indexes loaded" in node.log()
    for prompt, paraphrase in PAIRS:
        _, _, found = node.request("POST", "/v1/cache/lookup", {"text": paraphrase})
        assert found["status"] == "SEMANTIC_HIT" and found["entry"]["response"] == (
            f"answer: {prompt}"
        )
    assert node.stop() == 0


def test_a_dead_child_stops_the_node_with_a_reason(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    node = NodeProcess(tmp_path / "n")
    nodes.append(node)
    node.start()
    match = re.search(r"started raft-core \(pid (\d+)\)", node.log())
    assert match, node.log()
    os.kill(int(match[1]), signal.SIGKILL)  # our grandchild, started by our node
    assert node.proc is not None
    assert node.proc.wait(60) == 1
    assert re.search(r"raft-core exited with code -9; stopping the node", node.log())


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    cases = [
        ({"LLMCACHE_FULL_DUMP": "false"}, "journal without full_dump"),
        ({"LLMCACHE_PEERS": "127.0.0.1:7999"}, "raft_password"),
        ({"LLMCACHE_HOST": "0.0.0.0"}, "admin_token"),
        ({"LLMCACHE_EMBEDDER": "word2vec"}, "embedder"),
    ]
    for env, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "llmcache.node.main", "--data-dir", str(tmp_path)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and message in result.stderr, (env, result.stderr)


def test_print_config_masks_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "LLMCACHE_ADMIN_TOKEN": "very-secret-admin", "LLMCACHE_PORT": "9999"}
    result = subprocess.run(
        [sys.executable, "-m", "llmcache.node.main", "--print-config", "--port", "8181"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "very-secret-admin" not in result.stdout and "********" in result.stdout
    assert "8181" in result.stdout  # flags beat the environment


def test_proxy_through_a_real_node_with_the_openai_client(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    with FakeLLM() as upstream:
        node = NodeProcess(tmp_path / "n", env={"LLMCACHE_UPSTREAM_BASE_URL": upstream.base_url})
        nodes.append(node)
        node.start()
        client = openai.OpenAI(base_url=node.url + "/v1", api_key="sk-caller-key", max_retries=0)

        def ask(content: str, **kw: object) -> tuple[str, str]:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-test",
                messages=[{"role": "user", "content": content}],
                **{"temperature": 0, **kw},  # type: ignore[arg-type]
            )
            answer = raw.parse().choices[0].message.content or ""
            return raw.headers["X-LLMCache-Status"], answer

        def wait_stored(count: int) -> None:
            """The proxy stores in the background, after answering."""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                _, _, listed = node.request("GET", "/v1/cache/entries")
                if len(listed["entries"]) >= count:
                    return
                time.sleep(0.1)
            raise AssertionError(f"fewer than {count} entries stored")

        assert ask("How do I reset my password?")[0] == "MISS"
        wait_stored(1)
        calls = upstream.call_count("/v1/chat/completions")
        status, answer = ask("How do I reset my password?")
        assert status == "HIT" and upstream.call_count("/v1/chat/completions") == calls
        status, paraphrased = ask("how can i reset my password")
        assert status == "SEMANTIC_HIT" and paraphrased == answer
        assert ask("How do I reset my password?", temperature=0.9)[0] == "BYPASS"

        # Streamed: a miss, then the hit replays through the client's stream iterator.
        def stream(content: str) -> tuple[str, str]:
            with client.chat.completions.with_streaming_response.create(
                model="gpt-test",
                temperature=0,
                stream=True,
                messages=[{"role": "user", "content": content}],
            ) as response:
                text = "".join(
                    chunk.choices[0].delta.content or ""
                    for chunk in response.parse()
                    if chunk.choices
                )
                return response.headers["X-LLMCache-Status"], text

        first = stream("Explain caching in one line")
        wait_stored(2)
        second = stream("Explain caching in one line")
        assert first[0] == "MISS" and second == ("HIT", first[1]) and first[1]

        # 50 concurrent identical misses make one upstream call.
        upstream.delay_next(1, 1.0)
        before = upstream.call_count("/v1/chat/completions")
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(lambda _: ask("What is the capital of Peru?")[0], range(50)))
        assert upstream.call_count("/v1/chat/completions") == before + 1
        assert set(statuses) <= {"MISS", "HIT"}
        assert node.stop() == 0


def test_tls_when_given_a_certificate(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    node = NodeProcess(
        tmp_path / "n", env={"LLMCACHE_TLS_CERT": str(cert), "LLMCACHE_TLS_KEY": str(key)}
    )
    nodes.append(node)
    node.start()
    assert node.url.startswith("https://")
    status, _, body = node.request("GET", "/livez")
    assert status == 200 and body == {"status": "ok"}
    # Plain HTTP on the TLS port is not served.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{node.port}/livez", timeout=10)
