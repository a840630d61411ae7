"""Exceptions of the cache core.

Every error a caller can cause is a :class:`CacheError` subclass carrying a stable ``code``, the
``field`` of the request it is about (when there is one) and the HTTP status the server maps it to,
so the HTTP layer never has to guess. Errors that are not the caller's fault (a full disk, an
unreachable remote embedder) use 5xx statuses.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class: ``code`` is stable and machine-readable, ``message`` is for people."""

    code = "cache_error"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class InvalidRequest(CacheError):
    """A field is missing, of the wrong type or out of range."""

    code = "invalid_request"


class EmptyPrompt(InvalidRequest):
    code = "empty_prompt"


class OversizeInput(InvalidRequest):
    """A text, response, vector or batch is larger than the documented limit (see ``limits``)."""

    code = "too_large"
    http_status = 413


class InvalidVector(InvalidRequest):
    """Wrong dimension, NaN/inf, or a zero vector that has no direction."""

    code = "invalid_vector"


class DimensionMismatch(InvalidRequest):
    """The vector or embedder does not match what the namespace was created with."""

    code = "dimension_mismatch"
    http_status = 409


class UnknownTenant(CacheError):
    code = "unknown_tenant"
    http_status = 404


class NotFound(CacheError):
    code = "not_found"
    http_status = 404


class UnknownEmbedder(InvalidRequest):
    code = "unknown_embedder"


class MalformedCommand(CacheError):
    """A log entry that cannot be decoded (unknown version byte, bad shape). Never half-applied."""

    code = "malformed_command"


class EmbedderUnavailable(CacheError):
    """The remote embedder failed after its retries; transient, so the caller may retry."""

    code = "embedder_unavailable"
    http_status = 503


class CrossEncoderMissing(CacheError):
    """A namespace's verifier needs a cross-encoder this node does not have, or whose files do
    not match their digest (``node/cross_encoder.py``); no hit is served unverified."""

    code = "cross_encoder_missing"
    http_status = 503


class StoreFull(CacheError):
    """The LMDB map reached its configured hard limit; eviction must make room first."""

    code = "store_full"
    http_status = 507


class CheckpointInvalid(Exception):
    """An index checkpoint is missing, corrupt or from another format; rebuild from LMDB."""


class Unauthorized(CacheError):
    """No valid token (HTTP 401)."""

    code = "unauthorized"
    http_status = 401


class Forbidden(CacheError):
    """A valid token without the right to this tenant or action (HTTP 403)."""

    code = "forbidden"
    http_status = 403


class NotCacheable(CacheError):
    """The request asks for an answer that must not be cached (e.g. a hot temperature)."""

    code = "not_cacheable"
    http_status = 422


class Conflict(CacheError):
    """A concurrent change won; read again and retry."""

    code = "conflict"
    http_status = 409


class NotReady(CacheError):
    """This node cannot serve yet (no leader known, or applying behind)."""

    code = "not_ready"
    http_status = 503


class RaftUnavailable(CacheError):
    """raft-core cannot be reached (restarting) or cannot take the request now."""

    code = "raft_unavailable"
    http_status = 503


class RequestDenied(CacheError):
    """Raft refused a membership change or leadership transfer (see the message)."""

    code = "request_denied"
    http_status = 409
