"""The wire format of the cache API: decoding bodies, typed field access, per-request headers,
and encoding answers.

Guarantees:

- A body is a JSON object (any Content-Type but msgpack) or a msgpack map (``application/msgpack``
  or ``application/x-msgpack``). Whatever else arrives — bad syntax, another top-level type,
  ``NaN``/``Infinity``, strings that are not valid UTF-8 (lone surrogates), non-string map keys,
  msgpack extension types, nesting deeper than :data:`MAX_DEPTH` — is a 4xx
  :class:`~llmcache.node.errors.CacheError` naming the field (``body`` for the whole), before any
  handler sees it. msgpack ``bin`` values are accepted only as the top-level ``response``.
- Every getter here raises :class:`~llmcache.node.errors.InvalidRequest` naming the field when
  the value has the wrong type; ``null`` counts as absent. ``bool`` is never an int or a number.
- Answers are JSON, or msgpack when the request's ``Accept`` names a msgpack type — or when the
  request body was msgpack and ``Accept`` does not name JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import orjson
from aiohttp import web

from llmcache.cluster.commands import NAME_RE
from llmcache.node.errors import CacheError, InvalidRequest

T = TypeVar("T")
D = TypeVar("D")

MSGPACK = "application/msgpack"
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack"})
MAX_DEPTH = 32
"""Deepest nesting accepted in a body (an OpenAI chat body needs about 6)."""

_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


class UnsupportedMediaType(CacheError):
    code = "unsupported_media_type"
    http_status = 415


# -- bodies ------------------------------------------------------------------------------------


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a checked dict (see the module docstring)."""
    raw = await request.read()
    if not raw:
        raise InvalidRequest("the body must be a JSON object (or a msgpack map)", field="body")
    if is_msgpack(request.content_type):
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many unrelated types on bad input
            raise InvalidRequest(f"the body is not valid msgpack: {exc}", field="body") from None
    else:
        try:
            data = orjson.loads(raw)  # ~20x the json module's speed on a vector
        except ValueError:
            # The json module names what is wrong more precisely (1e400 is a field out of range,
            # not bad syntax; UTF-16 with a BOM is JSON too): the slow path is for odd bodies.
            try:
                data = json.loads(raw, parse_constant=_reject_constant)
            except (ValueError, RecursionError) as exc:
                raise InvalidRequest(f"the body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be an object", field="body")
    for key, value in data.items():
        if not isinstance(key, str):
            raise InvalidRequest("field names must be strings", field="body")
        if not (key == "response" and isinstance(value, bytes)):
            _check_value(value, key, 1)
    return data


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _check_value(value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"nested deeper than {MAX_DEPTH} levels", field=path)
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest("numbers must be finite", field=path)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequest("object keys must be strings", field=path)
            _check_text(key, path)
            _check_value(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        # Vectors are long lists of numbers: check them without building a path per item.
        if all(type(item) is float or type(item) is int for item in value):
            if not all(map(math.isfinite, value)):
                raise InvalidRequest("numbers must be finite", field=path)
            return
        for i, item in enumerate(value):
            _check_value(item, f"{path}[{i}]", depth + 1)
    elif not (value is None or isinstance(value, (bool, int))):
        raise InvalidRequest(f"unsupported value of type {type(value).__name__}", field=path)


def _check_text(text: str, path: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("strings must be valid unicode", field=path) from None


def is_msgpack(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() in MSGPACK_TYPES


# -- fields ------------------------------------------------------------------------------------


def known(data: Mapping[str, Any], allowed: Iterable[str], prefix: str = "") -> None:
    """Reject the first field of ``data`` not in ``allowed`` (a typo must not be ignored)."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", field=prefix + unknown[0])


def get(data: Mapping[str, Any], name: str, kind: type[T], default: D) -> T | D:
    """``data[name]`` checked to be a ``kind``, or ``default`` when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    return check(value, name, kind)


def require(data: Mapping[str, Any], name: str, kind: type[T]) -> T:
    value = data.get(name)
    if value is None:
        raise InvalidRequest(f"{name} is required", field=name)
    return check(value, name, kind)


def check(value: Any, name: str, kind: type[T]) -> T:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise InvalidRequest(f"{name} must be {_KIND_NAMES[kind]}", field=name)
    return value


def str_list(data: Mapping[str, Any], name: str) -> list[str] | None:
    """A list of strings, or ``None`` when absent."""
    values = get(data, name, list, None)
    if values is not None and not all(isinstance(v, str) for v in values):
        raise InvalidRequest(f"{name} must be a list of strings", field=name)
    return values


def name(value: str, field: str) -> str:
    """A tenant or namespace name (the same rule as the log's, matched over the whole string)."""
    if not NAME_RE.fullmatch(value):
        raise InvalidRequest(
            f"{field} must be 1-128 characters of letters, digits and _.:@- starting with a "
            f"letter or digit, got {value!r}",
            field=field,
        )
    return value


def choice(value: str, field: str, allowed: Iterable[str]) -> str:
    options = tuple(allowed)
    if value not in options:
        raise InvalidRequest(f"{field} must be one of {', '.join(options)}", field=field)
    return value


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    return int_in(raw, name, low, high)


def int_in(raw: str, field: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{field} must be an integer from {low} to {high}", field=field)
    return int(raw)


# -- per-request headers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Overrides:
    """The per-request controls of the cache API's headers (a body field of the same meaning
    wins over its header). ``no_store`` is parsed for the proxy's sake: on the cache API a
    store is explicit, so it has no effect there."""

    namespace: str | None = None
    threshold: float | None = None
    ttl_s: int | None = None
    tags: list[str] | None = None
    consistency: str | None = None
    no_cache: bool = False
    no_store: bool = False
    max_age_s: int | None = None


def overrides(headers: Mapping[str, str]) -> Overrides:
    """Parse ``X-LLMCache-Namespace``, ``-Threshold``, ``-TTL``, ``-Tags``, ``-Consistency`` and
    ``Cache-Control``; a malformed value is a 400 naming the header."""
    threshold = headers.get("X-LLMCache-Threshold")
    ttl = headers.get("X-LLMCache-TTL")
    tags = headers.get("X-LLMCache-Tags")
    no_cache = no_store = False
    max_age: int | None = None
    for directive in headers.get("Cache-Control", "").split(","):
        key, _, value = directive.strip().lower().partition("=")
        if key == "no-cache":
            no_cache = True
        elif key == "no-store":
            no_store = True
        elif key == "max-age":
            max_age = int_in(value.strip('"'), "Cache-Control", 0, 2**62)
    return Overrides(
        namespace=headers.get("X-LLMCache-Namespace"),
        threshold=_header_float(threshold, "X-LLMCache-Threshold") if threshold else None,
        ttl_s=int_in(ttl.strip(), "X-LLMCache-TTL", 0, 2**62) if ttl else None,
        tags=[t.strip() for t in tags.split(",") if t.strip()] if tags else None,
        consistency=headers.get("X-LLMCache-Consistency"),
        no_cache=no_cache,
        no_store=no_store,
        max_age_s=max_age,
    )


def _header_float(raw: str, field: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{field} must be a number", field=field) from None
    if not math.isfinite(value):
        raise InvalidRequest(f"{field} must be finite", field=field)
    return value


# -- answers -----------------------------------------------------------------------------------


def wants_msgpack(request: web.Request) -> bool:
    """Answer in msgpack? When ``Accept`` rates a msgpack type above zero and at least as high
    as JSON, or when the body was msgpack and ``Accept`` names neither."""
    quality: dict[str, float] = {}
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media] = max(q, quality.get(media, 0.0))
    packed = max(quality.get(t, 0.0) for t in MSGPACK_TYPES)
    if packed > 0:
        return packed >= quality.get("application/json", 0.0)
    named = any(t in quality for t in (*MSGPACK_TYPES, "application/json"))
    return not named and is_msgpack(request.headers.get("Content-Type", ""))


def respond(
    request: web.Request,
    body: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """``body`` encoded as the request asked (see :func:`wants_msgpack`)."""
    if wants_msgpack(request):
        data: bytes = msgpack.packb(body, use_bin_type=True)
        content_type = MSGPACK
    else:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        content_type = "application/json"
    response = web.Response(body=data, status=status, headers=headers)
    response.content_type = content_type
    return response
