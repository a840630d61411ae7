"""A real, small OpenAI-compatible HTTP server for tests, on loopback, in a background thread.

``FakeUpstream`` runs an aiohttp app on its own event loop thread, so synchronous code under test
(urllib clients in worker threads) talks to it over a real socket. It serves
``POST /v1/embeddings`` with deterministic vectors (:meth:`FakeUpstream.vector_for`) and has knobs
to fail or delay the next requests. New endpoints are added in :meth:`FakeUpstream._routes`.

    with FakeUpstream(dim=8) as up:
        client = RemoteEmbedder(up.base_url, "fake", 8)
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections import Counter
from typing import Any

import numpy as np
from aiohttp import web


class FakeUpstream:
    """A loopback OpenAI-compatible server; knobs and counters are safe to use from any thread.

    - ``calls[path]``: requests received per path (failed and delayed ones included);
    - ``requests``: ``(path, json_body, headers)`` of every request, in arrival order;
    - :meth:`fail_next` answers the next N requests with an error status;
    - :meth:`delay_next` sleeps before answering the next N requests;
    - ``reverse_order``: return ``data`` items in reverse (their ``index`` still correct);
    - ``answer_dim``: answer vectors of this length instead of ``dim`` (a misbehaving server);
    - ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get a 401.
    """

    def __init__(
        self, *, dim: int = 8, api_key: str | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.host = host  # where it listens (another address for clients in a network namespace)
        self.dim = dim
        self.api_key = api_key
        self.reverse_order = False
        self.answer_dim: int | None = None
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._fail: list[int] = []  # statuses for the next requests
        self._delays: list[float] = []  # seconds for the next requests
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeUpstream:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-upstream", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._routes(app)
        # A short shutdown timeout: tests stop the server while delayed handlers still sleep.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        # Bind port 0 ourselves: the kernel picks a free port and we can read it back.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        # Handlers still sleeping in a delay would otherwise die with the loop, noisily.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/embeddings", self._embeddings)

    # ---- knobs -------------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` requests (any endpoint) with ``status`` and a JSON error."""
        with self._lock:
            self._fail.extend([status] * n)

    def delay_next(self, n: int, seconds: float) -> None:
        """Sleep ``seconds`` before handling each of the next ``n`` requests."""
        with self._lock:
            self._delays.extend([seconds] * n)

    def reset(self) -> None:
        """Forget pending failures/delays, counters and recorded requests; default behaviour."""
        with self._lock:
            self._fail.clear()
            self._delays.clear()
            self.calls.clear()
            self.requests.clear()
            self.reverse_order = False
            self.answer_dim = None

    def call_count(self, path: str = "/v1/embeddings") -> int:
        with self._lock:
            return self.calls[path]

    @staticmethod
    def vector_for(text: str, dim: int) -> np.ndarray:
        """The unit float64 vector the server returns for ``text``: seeded by its sha256."""
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(dim)
        unit: np.ndarray = v / np.linalg.norm(v)
        return unit

    # ---- handlers ----------------------------------------------------------------------------

    async def _admit(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Count and record the request, apply delay/failure knobs and auth; returns the body
        and, when the request must not be served normally, the response to send instead."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        with self._lock:
            self.calls[request.path] += 1
            self.requests.append((request.path, body, dict(request.headers)))
            delay = self._delays.pop(0) if self._delays else 0.0
            fail = self._fail.pop(0) if self._fail else None
        if delay:
            await asyncio.sleep(delay)
        if fail is not None:
            return body, _error(fail, "injected failure")
        if self.api_key is not None and request.headers.get("Authorization") != (
            f"Bearer {self.api_key}"
        ):
            return body, _error(401, "bad api key")
        if not isinstance(body, dict):
            return body, _error(400, "body must be a JSON object")
        return body, None

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, refusal = await self._admit(request)
        if refusal is not None:
            return refusal
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) and t for t in inputs):
            return _error(400, "input must be a non-empty string or a list of them")
        dim = self.answer_dim if self.answer_dim is not None else self.dim
        data = [
            {"object": "embedding", "index": i, "embedding": self.vector_for(t, dim).tolist()}
            for i, t in enumerate(inputs)
        ]
        if self.reverse_order:
            data.reverse()
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }
        )


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "fake_upstream", "code": status}}, status=status
    )
