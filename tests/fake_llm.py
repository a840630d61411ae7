"""A real loopback OpenAI-compatible LLM for tests: :class:`FakeUpstream` plus text generation.

Adds ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events
with ``stream: true``, in OpenAI's exact shapes, usage included; a usage chunk with
``stream_options.include_usage``). Answers are deterministic: :meth:`FakeLLM.answer_for`.
FakeUpstream's knobs (``fail_next``, ``delay_next``, ``api_key``) and records (``calls``,
``requests``) apply to these endpoints too; this class adds :meth:`FakeLLM.cut_next` (close the
connection in the middle of a stream, before ``[DONE]``), :meth:`FakeLLM.hold` /
:meth:`FakeLLM.release` (keep answers waiting until the test says so) and
:meth:`FakeLLM.judge_says` (what model :data:`JUDGE_MODEL` answers: a judge's verdict).

    with FakeLLM(api_key="sk-test") as llm:
        openai.OpenAI(base_url=llm.base_url, api_key="sk-test").chat.completions.create(...)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from typing import Any

from aiohttp import web

from tests.fake_upstream import FakeUpstream, _error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JUDGE_MODEL = "fake-judge"
"""Requests for this model get :meth:`FakeLLM.judge_says`'s text as the answer."""
HOLD_LIMIT_S = 60.0
"""A held answer is released after this long even if the test forgets to (bounded waits)."""


class FakeLLM(FakeUpstream):
    """A fake LLM on loopback (see the module docstring); knobs are safe from any thread."""

    def __init__(self, *, api_key: str | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(api_key=api_key, host=host)
        self._cuts: list[int] = []  # chunks to send before cutting, for the next streams
        self._gate = threading.Event()
        self._gate.set()
        self._verdict = "yes"

    def __enter__(self) -> FakeLLM:
        self.start()
        return self

    # ---- knobs -------------------------------------------------------------------------------

    def cut_next(self, n: int, after_chunks: int = 2) -> None:
        """The next ``n`` streamed answers close the connection after ``after_chunks`` chunks."""
        with self._lock:
            self._cuts.extend([after_chunks] * n)

    def judge_says(self, verdict: str) -> None:
        """What requests for :data:`JUDGE_MODEL` get as the answer from now on."""
        with self._lock:
            self._verdict = verdict

    def hold(self) -> None:
        """Generation requests wait (after being counted) until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def authorizations(self, path: str = CHAT) -> list[str | None]:
        """The ``Authorization`` header of every request to ``path``, in arrival order."""
        with self._lock:
            return [h.get("Authorization") for p, _, h in self.requests if p == path]

    @staticmethod
    def answer_for(prompt: str) -> str:
        """The deterministic answer to ``prompt`` (several words, so streams have chunks)."""
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        return f"Answer {digest}: you asked about {prompt.strip()[:40]}"

    # ---- handlers ----------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        super()._routes(app)
        app.router.add_post(CHAT, self._generate)
        app.router.add_post(COMPLETIONS, self._generate)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._admit(request)
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not self._gate.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if refusal is not None:
            return refusal
        chat = request.path == CHAT
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _error(400, "messages must be a non-empty list")
            prompt = str(messages[-1].get("content", ""))
        else:
            prompt = str(body.get("prompt", ""))
        with self._lock:
            text = self._verdict if body.get("model") == JUDGE_MODEL else self.answer_for(prompt)
        usage = {
            "prompt_tokens": len(prompt.split()) + 3,
            "completion_tokens": len(text.split()),
            "total_tokens": len(prompt.split()) + 3 + len(text.split()),
        }
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + hashlib.sha256(prompt.encode()).hexdigest(),
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "system_fingerprint": "fp_fake",
        }
        if body.get("stream") is True:
            return await self._stream(request, body, chat, head, text, usage)
        if chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason="stop")
        obj = "chat.completion" if chat else "text_completion"
        return web.json_response({**head, "object": obj, "choices": [choice], "usage": usage})

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        head: dict[str, Any],
        text: str,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        with_usage = (body.get("stream_options") or {}).get("include_usage") is True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {} if piece is None else {"content": piece}
                if role:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece or ""}
            choice.update(logprobs=None, finish_reason=finish)
            out = {**head, "object": obj, "choices": [choice]}
            return {**out, "usage": None} if with_usage else out

        words = text.split(" ")
        chunks = [chunk("", None, role=True)] if chat else []
        chunks += [chunk(w if i == 0 else " " + w, None) for i, w in enumerate(words)]
        chunks.append(chunk(None, "stop"))
        if with_usage:
            chunks.append({**head, "object": obj, "choices": [], "usage": usage})
        with self._lock:
            cut = self._cuts.pop(0) if self._cuts else None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, data in enumerate(chunks):
            if i == cut:
                # Drop the connection without ending the chunked body: a cut stream.
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
