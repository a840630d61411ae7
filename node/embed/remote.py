"""A client for an OpenAI-compatible ``/v1/embeddings`` endpoint (vLLM, TEI, llama.cpp, OpenAI).

Synchronous on purpose: the engine calls embedders from worker threads, never from the event loop.
Standard library only.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

import numpy as np

from llmcache.node import limits
from llmcache.node.embed.base import EmbedResult, check_texts, normalize_rows, utf8_safe
from llmcache.node.errors import EmbedderUnavailable, InvalidVector

log = logging.getLogger(__name__)

# An answer for 256 texts of 4096 floats as JSON is ~25 MB; refuse anything far beyond.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""


class RemoteEmbedder:
    """Embeds with ``POST {base_url}/embeddings`` (``base_url`` like ``http://host:port/v1``).

    - Texts are sent in requests of at most ``batch_size``; answers are re-ordered by their
      ``index`` and checked (count, indices, ``dim``, finite, non-zero), then L2-normalised.
    - Each request is tried ``1 + retries`` times. Connection errors, timeouts, HTTP 429 and 5xx
      are retried after ``backoff_s * 2**attempt`` seconds times a random factor in [0.5, 1.5)
      (jitter keeps a fleet of nodes from retrying in step). Other 4xx answers and malformed
      answers are not retried. Any final failure raises :class:`EmbedderUnavailable`.
    - ``timeout_s`` bounds each connect and each socket read, so one request takes at most about
      ``(1 + retries) * timeout_s`` plus backoff when the server stalls.
    - Environment proxy variables are ignored: embedding servers are internal services, and a
      node's behaviour should not depend on its shell.
    - The API key is only put in the ``Authorization`` header; it is never logged, included in
      errors or shown by ``repr``.

    Thread-safe: no state is shared between calls. ``token_counts`` are 0 (unknown) and
    ``truncated`` is False: what the server does with long texts is its own policy.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        dim: int,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        batch_size: int = 64,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if parsed.username is not None or parsed.password is not None:
            # The URL is logged and recorded in the identity: credentials go in api_key.
            raise ValueError("base_url must not hold credentials; pass api_key")
        if not model:
            raise ValueError("model must not be empty")
        if not 0 < dim <= limits.MAX_VECTOR_DIM:
            raise ValueError(f"dim must be in 1..{limits.MAX_VECTOR_DIM}, got {dim}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, retries and backoff_s >= 0")
        if not 0 < batch_size <= limits.MAX_BATCH:
            raise ValueError(f"batch_size must be in 1..{limits.MAX_BATCH}, got {batch_size}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.dim = dim
        self.identity = f"remote:{model}@{self.base_url}"
        self._url = f"{self.base_url}/embeddings"
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._batch_size = batch_size
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"RemoteEmbedder(identity={self.identity!r}, dim={self.dim})"

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts`` (at most ``limits.MAX_BATCH``); see the class docstring."""
        check_texts(texts)
        parts = [
            self._embed_batch([utf8_safe(t) for t in texts[i : i + self._batch_size]])
            for i in range(0, len(texts), self._batch_size)
        ]
        vectors = np.vstack(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)
        return EmbedResult(vectors, [0] * len(texts), [False] * len(texts))

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"model": self.model, "input": texts}).encode()
        attempts = 1 + self._retries
        for attempt in range(attempts):
            try:
                return self._parse(self._post(body), len(texts))
            except _Retryable as e:
                if attempt == attempts - 1:
                    raise EmbedderUnavailable(
                        f"embedder at {self._url} failed after {attempts} attempt(s): {e}"
                    ) from None
                delay = self._backoff_s * 2**attempt * random.uniform(0.5, 1.5)
                log.warning(
                    "embedder %s: %s; retry %d/%d in %.2fs",
                    self._url,
                    e,
                    attempt + 1,
                    self._retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _post(self, body: bytes) -> object:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self._timeout_s) as resp:
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as e:
            detail = _snippet(e)
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code} {detail}") from None
            raise EmbedderUnavailable(
                f"embedder at {self._url} rejected the request: HTTP {e.code} {detail}"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            # Refused, reset, DNS failure, timeout, a connection closed mid-answer.
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise EmbedderUnavailable(f"embedder at {self._url} answered more than 64 MiB")
        try:
            return json.loads(raw)
        except ValueError:
            raise EmbedderUnavailable(f"embedder at {self._url} answered invalid JSON") from None

    def _parse(self, answer: object, n: int) -> np.ndarray:
        def bad(why: str) -> EmbedderUnavailable:
            return EmbedderUnavailable(f"embedder at {self._url} answered badly: {why}")

        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise bad("no 'data' list")
        if len(data) != n:
            raise bad(f"{len(data)} embeddings for {n} inputs")
        rows: list[object] = [None] * n
        for item in data:
            idx = item.get("index") if isinstance(item, dict) else None
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n:
                raise bad(f"missing or out-of-range index {idx!r}")
            if rows[idx] is not None:
                raise bad(f"index {idx} appears twice")
            rows[idx] = item.get("embedding")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != self.dim:
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise bad(f"embedding {i} has {got} components, expected {self.dim}")
            if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in row):
                raise bad(f"embedding {i} holds a non-number")
        try:
            return normalize_rows(np.asarray(rows, dtype=np.float64))
        except (InvalidVector, OverflowError) as e:  # NaN/inf, a zero row, an int beyond float64
            raise bad(str(e)) from None


def _snippet(e: urllib.error.HTTPError) -> str:
    """The start of an error body, for diagnostics (bounded so a huge page is not kept)."""
    try:
        text = e.read(300).decode("utf-8", "replace")
    except Exception:
        return ""
    return " ".join(text.split())[:200]
