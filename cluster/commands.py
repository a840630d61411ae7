"""The replicated log's commands and their wire codec.

A log entry is ``VERSION`` (one byte) followed by a msgpack array ``[type_code, fields]``.
Everything a command needs to apply deterministically travels inside it: timestamps are stamped
by the node that took the write, expiry times (with their jitter) are decided there, and victims
of expiry and eviction are chosen by the leader. :func:`decode` checks the version byte, the
command type and every field's type before anything is applied, so a malformed entry raises
:class:`~llmcache.node.errors.MalformedCommand` and never half-applies.

``request_id`` makes a command idempotent: the state machine remembers the result of every
request id it applied (for a bounded window of log indexes) and answers a repeat with that
result instead of applying twice. That is what makes a client's retry after an unknown outcome
safe.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from llmcache.node.errors import MalformedCommand

VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
"""Tenant and namespace names: they are parts of LMDB keys joined by NUL, so no NUL or slash."""


@dataclass(frozen=True, kw_only=True)
class Command:
    """Base of every log command. ``ts_ms`` is the proposing node's wall clock, in the log."""

    TYPE: ClassVar[int] = 0
    request_id: str = ""
    ts_ms: int = 0


@dataclass(frozen=True, kw_only=True)
class Put(Command):
    """Insert one entry, replacing the entry of the same exact key (or caller key) if any.

    ``kind`` is ``"prompt"`` (a prompt/response pair with a vector, found exactly or
    semantically) or ``"kv"`` (a value under a caller's ``key``, found exactly only).
    ``vector`` is little-endian float32, unit length; ``expires_at_ms`` 0 means never.
    """

    TYPE: ClassVar[int] = 1
    tenant: str
    namespace: str
    scope: str
    exact_key: bytes
    kind: str
    key: str = ""
    text: str = ""
    prompt: str = ""
    vector: bytes = b""
    embedder: str = ""
    dim: int = 0
    response: bytes = b""
    content_type: str = "application/json"
    created_at_ms: int = 0
    expires_at_ms: int = 0
    tags: tuple[str, ...] = ()
    usage: dict[str, int] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Delete(Command):
    """Delete entries by id; ids of another tenant are ignored (no cross-tenant writes)."""

    TYPE: ClassVar[int] = 2
    tenant: str
    ids: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Invalidate(Command):
    """Delete a tenant's entries matching every given filter (AND); ``tags`` match any-of.

    At least one filter must be given: wiping a whole tenant is :class:`TenantDelete`.
    """

    TYPE: ClassVar[int] = 3
    tenant: str
    namespace: str = ""
    tags: tuple[str, ...] = ()
    key_prefix: str = ""
    ids: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not (self.namespace or self.tags or self.key_prefix or self.ids)


@dataclass(frozen=True, kw_only=True)
class Expire(Command):
    """Physically delete entries whose ``expires_at_ms`` is at or before ``ts_ms`` (leader's)."""

    TYPE: ClassVar[int] = 4
    ids: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Evict(Command):
    """Delete entries chosen by the leader's eviction policy."""

    TYPE: ClassVar[int] = 5
    ids: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class TenantUpsert(Command):
    """Create a tenant or replace its whole configuration (see ``policy.TenantConfig``)."""

    TYPE: ClassVar[int] = 6
    tenant: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TenantDelete(Command):
    """Delete a tenant with all its entries and configuration."""

    TYPE: ClassVar[int] = 7
    tenant: str


@dataclass(frozen=True, kw_only=True)
class ConfigSet(Command):
    """Merge ``values`` into the configuration of the cluster (no tenant), a tenant, or one of
    its namespaces; a value of ``None`` removes that setting."""

    TYPE: ClassVar[int] = 8
    tenant: str = ""
    namespace: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Noop(Command):
    """Changes nothing; a barrier through the log for linearizable reads."""

    TYPE: ClassVar[int] = 9


@dataclass(frozen=True, kw_only=True)
class Feedback(Command):
    """A label on a served hit (or a probe): was entry ``entry_id`` a ``correct`` or ``wrong``
    answer for ``query``? Kept in the ``feedback`` db; with a ``similarity`` (0..1, -1 when
    unknown) it also counts in the ``quality`` histogram of ``namespace`` (the entry's, filled
    in by the proposer), from which adaptive thresholds are learned (``node/adaptive.py``)."""

    TYPE: ClassVar[int] = 10
    tenant: str
    entry_id: int
    label: str
    similarity: float = -1.0
    query: str = ""
    namespace: str = ""


@dataclass(frozen=True, kw_only=True)
class Touch(Command):
    """Access statistics reported by a node's workers: entry ``ids[i]`` was hit ``hits[i]``
    times, last at ``last_hit_ms[i]``. Applied into the replicated ``access`` db (hits add up,
    the last hit takes the max), so every node holds the statistics the leader's eviction
    policy reads. Ids of entries that no longer exist are ignored."""

    TYPE: ClassVar[int] = 11
    ids: tuple[int, ...]
    hits: tuple[int, ...]
    last_hit_ms: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Advertise(Command):
    """Member ``address`` (its Raft ``host:port``) serves HTTP at ``http_url``: how a node
    added at run time becomes known to followers that forward writes to it when it leads."""

    TYPE: ClassVar[int] = 12
    address: str
    http_url: str


MAX_URL_CHARS = 512
MAX_TOUCH_IDS = 4096
"""Ids per :class:`Touch`: a few tens of KB, small enough for pysyncobj to forward safely."""

COMMAND_TYPES: dict[int, type[Command]] = {
    cls.TYPE: cls
    for cls in (
        Put,
        Delete,
        Invalidate,
        Expire,
        Evict,
        TenantUpsert,
        TenantDelete,
        ConfigSet,
        Noop,
        Feedback,
        Touch,
        Advertise,
    )
}


def encode(command: Command) -> bytes:
    fields = {f.name: getattr(command, f.name) for f in dataclasses.fields(command)}
    for name, value in fields.items():
        if isinstance(value, tuple):
            fields[name] = list(value)
    body: bytes = msgpack.packb([command.TYPE, fields], use_bin_type=True)
    return bytes((VERSION,)) + body


def decode(data: bytes) -> Command:
    """Decode and type-check one log entry; raises :class:`MalformedCommand` on anything odd."""
    if not data:
        raise MalformedCommand("empty log entry")
    if data[0] != VERSION:
        raise MalformedCommand(
            f"unknown command version byte {data[0]} (this node knows {VERSION})"
        )
    try:
        decoded = msgpack.unpackb(data[1:], raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedCommand(f"undecodable command body: {exc}") from None
    if not (isinstance(decoded, list) and len(decoded) == 2 and isinstance(decoded[1], dict)):
        raise MalformedCommand("command body must be [type, fields]")
    type_code, fields = decoded
    cls = COMMAND_TYPES.get(type_code) if isinstance(type_code, int) else None
    if cls is None:
        raise MalformedCommand(f"unknown command type {type_code!r}")
    checkers = _checkers(cls)
    unknown = set(fields) - set(checkers)
    if unknown:
        raise MalformedCommand(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {
        name: checkers[name](f"{cls.__name__}.{name}", value) for name, value in fields.items()
    }
    try:
        command = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise MalformedCommand(f"{cls.__name__}: {exc}") from None
    validate(command)
    return command


REBASE_TOLERANCE_MS = 1000
"""Stamps this close to the leader's clock are kept as they are (no re-encoding)."""


def rebase(data: bytes, now_ms: int) -> bytes:
    """``data`` with its times moved onto the leader's clock ``now_ms`` (see node/clock.py):
    ``ts_ms`` becomes ``now_ms`` and a Put's ``created_at_ms`` and ``expires_at_ms`` move by
    the same amount, so a TTL counts from when the leader took the write whatever the clock of
    the node that prepared it. Unstamped commands (``ts_ms`` 0) and malformed ones are returned
    unchanged (the state machine rejects the latter)."""
    try:  # most writes need no change: find out from ts_ms alone (full decoding is dearer)
        fields = msgpack.unpackb(data[1:])[1]
        if abs(now_ms - fields["ts_ms"]) <= REBASE_TOLERANCE_MS or not fields["ts_ms"]:
            return data
    except (ValueError, TypeError, KeyError, IndexError):
        pass  # malformed: decode below decides
    try:
        command = decode(data)
    except MalformedCommand:
        return data
    delta = now_ms - command.ts_ms
    if not command.ts_ms or abs(delta) <= REBASE_TOLERANCE_MS:
        return data
    changes: dict[str, Any] = {"ts_ms": now_ms}
    if isinstance(command, Put):
        changes["created_at_ms"] = max(0, command.created_at_ms + delta)
        if command.expires_at_ms:
            changes["expires_at_ms"] = max(1, command.expires_at_ms + delta)
    return encode(dataclasses.replace(command, **changes))


def validate(command: Command) -> None:
    """Checks that do not depend on the store: names, kinds, non-empty filters, sizes."""
    for name in ("tenant", "namespace"):
        if not hasattr(command, name):
            continue
        value = getattr(command, name)
        required = name == "tenant" and not isinstance(command, ConfigSet)
        if (value or required) and not NAME_RE.match(value):
            raise MalformedCommand(f"{type(command).__name__}: bad {name} {value!r}")
    if isinstance(command, Put):
        if command.kind not in ("prompt", "kv"):
            raise MalformedCommand(f"Put: unknown kind {command.kind!r}")
        if len(command.exact_key) != 32:
            raise MalformedCommand("Put: exact_key must be 32 bytes")
        if command.kind == "prompt" and (
            command.dim <= 0 or len(command.vector) != 4 * command.dim or not command.embedder
        ):
            raise MalformedCommand("Put: a prompt entry needs a float32 vector of its dim")
        if command.kind == "kv" and (not command.key or command.vector):
            raise MalformedCommand("Put: a kv entry needs a key and no vector")
        if any("\0" in s for s in (command.key, *command.tags)):
            raise MalformedCommand("Put: NUL in key or tag")
    if isinstance(command, Invalidate) and command.is_empty():
        raise MalformedCommand("Invalidate: at least one filter is required")
    if isinstance(command, Feedback) and command.label not in ("correct", "wrong"):
        raise MalformedCommand(f"Feedback: label must be correct or wrong, not {command.label!r}")
    if isinstance(command, Feedback) and not (
        command.similarity == -1.0 or 0.0 <= command.similarity <= 1.0
    ):
        raise MalformedCommand("Feedback: similarity must be -1 (unknown) or within 0..1")
    if isinstance(command, Touch) and (
        not len(command.ids) == len(command.hits) == len(command.last_hit_ms)
        or len(command.ids) > MAX_TOUCH_IDS
        or min((*command.ids, *command.hits, *command.last_hit_ms), default=0) < 0
    ):
        raise MalformedCommand(
            f"Touch: ids, hits and last_hit_ms must be equal-length lists of non-negative "
            f"integers, at most {MAX_TOUCH_IDS}"
        )
    if isinstance(command, Advertise) and not (
        ":" in command.address
        and command.http_url.startswith(("http://", "https://"))
        and max(len(command.address), len(command.http_url)) <= MAX_URL_CHARS
    ):
        raise MalformedCommand("Advertise: needs host:port and an http(s) URL")
    if isinstance(command, ConfigSet) and command.namespace and not command.tenant:
        raise MalformedCommand("ConfigSet: a namespace needs its tenant")


Checker = Callable[[str, Any], Any]
"""``checker(where, value)`` returns ``value`` in the dataclass's shape or raises."""
_CHECKERS: dict[type[Command], dict[str, Checker]] = {}


def _checkers(cls: type[Command]) -> dict[str, Checker]:
    """Per-field checkers, compiled once per command class from its annotations (the log is
    decoded on every apply, so annotations are not re-inspected per entry)."""
    if cls not in _CHECKERS:
        hints = typing.get_type_hints(cls)
        _CHECKERS[cls] = {f.name: _compile(hints[f.name]) for f in dataclasses.fields(cls)}
    return _CHECKERS[cls]


def _compile(hint: Any) -> Checker:
    origin = typing.get_origin(hint)
    if hint is Any:
        return lambda where, value: value
    if origin is tuple:
        item = _compile(typing.get_args(hint)[0])

        def check_tuple(where: str, value: Any) -> Any:
            if not isinstance(value, list):
                raise MalformedCommand(f"{where}: expected a list")
            return tuple(item(where, v) for v in value)

        return check_tuple
    if origin is dict:
        key, val = (_compile(t) for t in typing.get_args(hint))

        def check_dict(where: str, value: Any) -> Any:
            if not isinstance(value, dict):
                raise MalformedCommand(f"{where}: expected a map")
            return {key(where, k): val(where, v) for k, v in value.items()}

        return check_dict
    if origin is not None:
        raise TypeError(f"{hint} is not part of the codec")

    def check_scalar(where: str, value: Any) -> Any:
        # bool is an int in Python; an int field must not accept True, nor a bool field 1.
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise MalformedCommand(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value

    return check_scalar
