"""Exceptions of the client library: one type per thing a caller can act on.

Every exception is an :class:`LLMCacheError`. Answers of the server carry its stable ``code``,
the ``field`` at fault and the HTTP ``status``; :func:`from_answer` maps them to the most
specific class (by code first, then by status), so ``except UnknownTenant`` works whatever the
message says.
"""

from __future__ import annotations

from typing import Any


class LLMCacheError(Exception):
    """Base of every client error. ``code`` is the server's stable code (or the client's own
    for errors that never reached a server), ``status`` the HTTP status when there was one."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        status: int | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.field = field
        self.status = status
        self.url = url


class InvalidURL(LLMCacheError, ValueError):
    """A node URL that is not ``http(s)://host[:port]`` (raised when the client is built)."""

    code = "invalid_url"


class ConnectionFailed(LLMCacheError):
    """No node answered over HTTP (refused, timed out, reset, DNS) within the retries."""

    code = "connection_failed"


class Unavailable(LLMCacheError):
    """The group kept answering 503 (no leader, not ready, raft-core restarting) through every
    retry. For a write this is an *unknown outcome*: retry with the same ``request_id``."""

    code = "unavailable"

    def __init__(self, message: str, *, request_id: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.request_id = request_id


class ServerTooOld(LLMCacheError):
    """The server lacks a route or parameter this call needs (it predates the feature)."""

    code = "server_too_old"


class BadRequest(LLMCacheError):
    """The server refused the request as malformed (4xx ``invalid_request`` and kin)."""

    code = "invalid_request"


class Unauthorized(LLMCacheError):
    """No valid token (401): a missing, mistyped or revoked token."""

    code = "unauthorized"


class Forbidden(LLMCacheError):
    """A valid token without the right to this tenant or action (403)."""

    code = "forbidden"


class NotFound(LLMCacheError):
    """No such entry or token (404)."""

    code = "not_found"


class UnknownTenant(NotFound):
    """The tenant does not exist on this group (404 ``unknown_tenant``)."""

    code = "unknown_tenant"


class Conflict(LLMCacheError):
    """A concurrent change won, or a vector does not fit the namespace (409)."""

    code = "conflict"


class NotCacheable(LLMCacheError):
    """The request must not be cached (422: e.g. a temperature above ``max_temperature``)."""

    code = "not_cacheable"


class TooLarge(BadRequest):
    """A text, response, vector or batch over the server's limits (413)."""

    code = "too_large"


class ServerError(LLMCacheError):
    """Any other answer of the server that is neither the caller's mistake nor transient."""

    code = "server_error"


_BY_CODE: dict[str, type[LLMCacheError]] = {
    "unknown_tenant": UnknownTenant,
    "not_found": NotFound,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_cacheable": NotCacheable,
    "too_large": TooLarge,
    "conflict": Conflict,
    "dimension_mismatch": Conflict,
}
_BY_STATUS: dict[int, type[LLMCacheError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: NotCacheable,
    503: Unavailable,
}


def from_answer(status: int, body: Any, url: str) -> LLMCacheError:
    """The exception for a non-2xx answer whose body is ``body`` (decoded, maybe not ours)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ServerError(f"{url}: HTTP {status}", status=status, url=url)
    code = str(error.get("code") or "")
    message = str(error.get("message") or f"HTTP {status}")
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = BadRequest if 400 <= status < 500 else ServerError
    return cls(message, code=code or None, field=error.get("field"), status=status, url=url)
