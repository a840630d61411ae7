"""RemoteEmbedder against a real HTTP server on loopback (tests/fake_upstream.py)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest

from llmcache.node import limits
from llmcache.node.embed import Embedder, RemoteEmbedder
from llmcache.node.errors import EmbedderUnavailable, EmptyPrompt, OversizeInput
from tests.fake_upstream import FakeUpstream

DIM = 8


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream(dim=DIM, api_key="sk-secret-123") as up:
        yield up


@pytest.fixture
def up(server: FakeUpstream) -> FakeUpstream:
    """The shared server with its knobs reset and counters zeroed."""
    server.reset()
    return server


def client(up: FakeUpstream, **kw: object) -> RemoteEmbedder:
    opts: dict[str, object] = {"api_key": "sk-secret-123", "backoff_s": 0.01, "timeout_s": 2.0}
    opts.update(kw)
    return RemoteEmbedder(up.base_url, "fake-embed", DIM, **opts)  # type: ignore[arg-type]


def expected(texts: list[str]) -> np.ndarray:
    return np.vstack([FakeUpstream.vector_for(t, DIM) for t in texts]).astype(np.float32)


def test_embeds_and_normalises(up: FakeUpstream) -> None:
    emb = client(up)
    assert isinstance(emb, Embedder)
    assert emb.identity == f"remote:fake-embed@{up.base_url}"
    texts = ["alpha", "beta", "gamma"]
    res = emb.embed(texts)
    assert res.vectors.dtype == np.float32 and res.vectors.shape == (3, DIM)
    np.testing.assert_allclose(res.vectors, expected(texts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-6)
    assert res.token_counts == [0, 0, 0] and res.truncated == [False, False, False]
    path, body, headers = up.requests[0]
    assert path == "/v1/embeddings"
    assert body == {"model": "fake-embed", "input": texts}
    assert headers["Authorization"] == "Bearer sk-secret-123"


def test_batches_and_keeps_order(up: FakeUpstream) -> None:
    up.reverse_order = True  # the server answers out of order; "index" decides
    texts = [f"text {i}" for i in range(10)]
    res = client(up, batch_size=4).embed(texts)
    np.testing.assert_allclose(res.vectors, expected(texts), atol=1e-6)
    assert up.call_count() == 3
    assert [len(body["input"]) for _, body, _ in up.requests] == [4, 4, 2]


def test_retries_then_succeeds(up: FakeUpstream) -> None:
    up.fail_next(2, status=500)
    up.fail_next(1, status=429)
    res = client(up, retries=3).embed(["x"])
    np.testing.assert_allclose(res.vectors, expected(["x"]), atol=1e-6)
    assert up.call_count() == 4


def test_retries_exhausted(up: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    up.fail_next(10, status=503)
    with caplog.at_level(logging.DEBUG), pytest.raises(EmbedderUnavailable, match="3 attempt"):
        client(up, retries=2).embed(["x"])
    assert up.call_count() == 3
    # The key never reaches logs or errors.
    assert "sk-secret-123" not in caplog.text
    assert "sk-secret-123" not in repr(client(up))


def test_client_error_not_retried(up: FakeUpstream) -> None:
    up.fail_next(1, status=400)
    with pytest.raises(EmbedderUnavailable, match="HTTP 400") as e:
        client(up, retries=3).embed(["x"])
    assert up.call_count() == 1
    assert "sk-secret-123" not in str(e.value)


def test_bad_api_key_not_retried(up: FakeUpstream) -> None:
    with pytest.raises(EmbedderUnavailable, match="HTTP 401"):
        client(up, api_key="wrong", retries=3).embed(["x"])
    assert up.call_count() == 1


def test_timeout(up: FakeUpstream) -> None:
    up.delay_next(1, 2.0)
    t0 = time.monotonic()
    with pytest.raises(EmbedderUnavailable):
        client(up, timeout_s=0.3, retries=0).embed(["x"])
    assert time.monotonic() - t0 < 1.5


def test_timeout_is_retried(up: FakeUpstream) -> None:
    up.delay_next(1, 1.0)
    res = client(up, timeout_s=0.3, retries=1).embed(["x"])
    np.testing.assert_allclose(res.vectors, expected(["x"]), atol=1e-6)
    assert up.call_count() == 2


def test_wrong_dim_rejected(up: FakeUpstream) -> None:
    up.answer_dim = DIM + 1
    with pytest.raises(EmbedderUnavailable, match=f"expected {DIM}"):
        client(up).embed(["x"])
    assert up.call_count() == 1  # a malformed answer is not retried


def test_connection_refused(up: FakeUpstream) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emb = RemoteEmbedder(f"http://127.0.0.1:{port}/v1", "m", DIM, retries=1, backoff_s=0.01)
    with pytest.raises(EmbedderUnavailable, match="2 attempt"):
        emb.embed(["x"])


def test_input_validation(up: FakeUpstream) -> None:
    emb = client(up)
    with pytest.raises(EmptyPrompt):
        emb.embed(["ok", " "])
    with pytest.raises(OversizeInput):
        emb.embed(["x" * (limits.MAX_EMBED_TEXT_CHARS + 1)])
    with pytest.raises(OversizeInput):
        emb.embed(["x"] * (limits.MAX_BATCH + 1))
    assert up.call_count() == 0
    assert emb.embed([]).vectors.shape == (0, DIM)
    with pytest.raises(ValueError):
        RemoteEmbedder("ftp://example.com/v1", "m", DIM)
    with pytest.raises(ValueError):
        RemoteEmbedder(up.base_url, "m", 0)
    with pytest.raises(ValueError, match="credentials"):
        RemoteEmbedder("http://user:pw@127.0.0.1:1/v1", "m", DIM)
