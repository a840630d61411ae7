"""What the sync and asyncio clients share, free of I/O: a call's description, encoding,
which node to ask, and what to do with an answer (return, retry where, or raise).

Guarantees the two clients build on:

- A :class:`Call` is built once per user call, so a write's ``request_id`` is fixed before the
  first attempt and every retry sends the same one (the state machine applies a request id
  once; a retry after a lost answer returns the first result with ``duplicate``).
- Retries are bounded (:attr:`RetryPolicy.attempts`) and spaced by exponential backoff with
  full jitter (capped; a server's ``Retry-After`` is a lower bound). Transient: connection
  errors and timeouts (the next node of the group is tried), 502/503/504, a 307 to the leader
  (followed at once). Anything else is raised as its :mod:`~llmcache.client.errors` type.
- Writes go to the leader once known: they carry ``?redirect=1``, so a follower answers 307
  with the leader's URL (the *leader hint*) instead of forwarding, and the next writes go there
  directly. Reads stay on the node that last answered (failing over in list order).
"""

from __future__ import annotations

import base64
import json
import random
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

from llmcache.client.errors import (
    ConnectionFailed,
    InvalidURL,
    LLMCacheError,
    ServerTooOld,
    Unavailable,
    from_answer,
)

T = TypeVar("T")
MSGPACK = "application/msgpack"
JSON = "application/json"
TRANSIENT = frozenset({502, 503, 504})
USER_AGENT = "llmcache-client/0.1"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: ``parse`` turns a 2xx body (decoded) and its headers into the result."""

    method: str
    path: str
    parse: Callable[[Any, Mapping[str, str]], T]
    body: dict[str, Any] | None = None
    query: dict[str, str] = field(default_factory=dict)
    write: bool = False
    request_id: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the n-th wait is uniform in [0, min(cap, base * 2**n)]. The
    default waits ~5 s in all on average (11 s at most): an election (2-4 s) fits."""

    attempts: int = 10
    base_s: float = 0.1
    cap_s: float = 2.0

    def delay(self, attempt: int, floor: float = 0.0) -> float:
        wait = random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
        return max(wait, min(floor, self.cap_s))


def check_url(url: str) -> str:
    """``url`` without a trailing slash; :class:`InvalidURL` unless ``http(s)://host[:port]``."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        parts.port  # noqa: B018  # raises on a port that is not a number or out of range
    except ValueError as exc:
        raise InvalidURL(f"{url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidURL(f"{url!r} is not an http(s)://host[:port] URL")
    return url.strip().rstrip("/")


def missing_feature(document: Mapping[str, Any], path: str, query: str | None) -> str | None:
    """Why a node whose OpenAPI document is ``document`` cannot serve ``path`` (with the query
    parameter ``query``), or ``None`` when it can."""
    item = document.get("paths", {}).get(path)
    if item is None:
        return f"no route {path}"
    if query is not None:
        names = {p.get("name") for op in item.values() if isinstance(op, dict)
                 for p in op.get("parameters", ()) if isinstance(p, dict)}  # fmt: skip
        if query not in names:
            return f"{path} has no parameter {query!r}"
    return None


class Nodes:
    """The nodes of one group and who is believed to lead (a URL learnt from a 307)."""

    def __init__(self, urls: list[str]) -> None:
        if not urls:
            raise InvalidURL("give at least one node URL")
        self.urls = list(dict.fromkeys(check_url(u) for u in urls))
        self.current = 0
        self.leader: str | None = None

    def target(self, write: bool) -> str:
        return self.leader if write and self.leader else self.urls[self.current]

    def failed(self, url: str) -> None:
        """``url`` gave no answer: forget it as the leader, move reads to the next node."""
        if url == self.leader:
            self.leader = None
        if url == self.urls[self.current]:
            self.current = (self.current + 1) % len(self.urls)

    def redirected(self, location: str) -> None:
        parts = urllib.parse.urlsplit(location)
        self.leader = f"{parts.scheme}://{parts.netloc}"


class Protocol:
    """Encoding and the decision after each attempt; one per client (holds the wire format,
    which falls back to JSON if a server refuses msgpack with 415)."""

    def __init__(self, nodes: Nodes, retry: RetryPolicy, token: str | None, packed: bool):
        self.nodes = nodes
        self.retry = retry
        self.token = token
        self.msgpack = packed

    def request(self, call: Call[Any], url: str) -> tuple[str, dict[str, str], bytes | None]:
        """The full URL, headers and body bytes of one attempt of ``call`` on ``url``."""
        query = dict(call.query)
        if call.write:
            query["redirect"] = "1"
        full = url + call.path + ("?" + urllib.parse.urlencode(query) if query else "")
        kind = MSGPACK if self.msgpack else JSON
        headers = {"Accept": kind, "User-Agent": USER_AGENT}
        if self.token:
            headers["X-LLMCache-Token"] = self.token
        content = None
        if call.body is not None:
            headers["Content-Type"] = kind
            content = encode(call.body, self.msgpack)
        return full, headers, content

    def outcome(
        self, call: Call[T], url: str, status: int, headers: Mapping[str, str], raw: bytes
    ) -> T:
        """The call's result from a 2xx; :class:`Retry` when another attempt should follow;
        the call's error otherwise."""
        body = decode(raw, headers.get("Content-Type", ""))
        if 200 <= status < 300:
            return call.parse(body, headers)
        if status in (307, 308) and headers.get("Location"):
            self.nodes.redirected(headers["Location"])
            raise Retry(None, immediate=True)
        if status == 415 and self.msgpack:
            self.msgpack = False
            raise Retry(None, immediate=True)
        if status in (404, 405) and not _is_error(body):
            raise ServerTooOld(
                f"{url} does not serve {call.method} {call.path}: the server predates this "
                "feature (or the URL is not an LLM-Cache node)",
                status=status,
                url=url,
            )
        error = from_answer(status, body, url)
        if status in TRANSIENT:  # this node cannot serve now: another may (or a new leader)
            self.nodes.failed(url)
            raise Retry(error, floor=_retry_after(headers))
        raise error

    def failed(self, url: str, exc: Exception) -> Retry:
        """An attempt on ``url`` got no answer: try the next node after a backoff."""
        self.nodes.failed(url)
        return Retry(ConnectionFailed(f"{url}: {exc or type(exc).__name__}", url=url))

    def exhausted(self, call: Call[Any], last: LLMCacheError | None) -> LLMCacheError:
        """The error raised when every attempt failed transiently."""
        tried = ", ".join(self.nodes.urls)
        what = f"{call.method} {call.path}"
        if isinstance(last, ConnectionFailed):
            return ConnectionFailed(f"no node answered {what} ({tried}): {last.message}")
        message = f"{what} still unavailable after {self.retry.attempts} attempts ({tried})"
        if last is not None:
            message += f": {last.message}"
        if call.write:
            message += f"; outcome unknown: retry with request_id={call.request_id}"
        return Unavailable(message, request_id=call.request_id, status=503)


class Retry(Exception):
    """Try again: at once when ``immediate`` (a redirect, a format fallback), else after a
    backoff of at least ``floor`` seconds (a server's ``Retry-After``). ``error`` is what to
    report if the attempts run out."""

    def __init__(
        self, error: LLMCacheError | None, *, floor: float = 0.0, immediate: bool = False
    ) -> None:
        super().__init__(error.message if error else "retry")
        self.error = error
        self.floor = floor
        self.immediate = immediate

    def wait(self, policy: RetryPolicy, attempt: int) -> float:
        return 0.0 if self.immediate else policy.delay(attempt, self.floor)


def _is_error(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def _retry_after(headers: Mapping[str, str]) -> float:
    try:
        return float(headers.get("Retry-After") or 0)
    except ValueError:
        return 0.0


def encode(body: dict[str, Any], packed: bool) -> bytes:
    if packed:
        data: bytes = msgpack.packb(body, use_bin_type=True)
        return data
    response = body.get("response")
    if isinstance(response, bytes):  # JSON has no bytes: the API's base64 field carries them
        body = {k: v for k, v in body.items() if k != "response"}
        body["response_base64"] = base64.b64encode(response).decode()
    return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()


def decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind in (MSGPACK, "application/x-msgpack"):
            return msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if kind == JSON or kind.endswith("+json"):
            return json.loads(raw)
    except ValueError:
        pass
    return raw.decode("utf-8", errors="replace")
