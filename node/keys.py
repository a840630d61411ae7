"""Canonical cache keys: a request becomes (tenant, namespace, scope, exact key, text to embed).

**Scope** is a sha256 over everything except the prompt text that changes the answer: the kind of
request (chat, completion, text), the model and every sampling parameter (``temperature``,
``top_p``, ``max_tokens``, ``seed``, ``n``, ``stop``, ``tools``, ``response_format``, ``stream``…:
any field not listed in :data:`NON_SCOPE_FIELDS`), the system prompt and the conversation turns
before the embedded part. Exact and semantic matches only happen inside one scope, so a follow-up
question ("and in Python?") never matches the same follow-up in another conversation.

**Context policy** (chat): by default (``window=0``) the last user turn is embedded and every
other message — system prompts, earlier turns, and tool messages after that user turn — goes
into the scope. ``window=N`` embeds the last N non-system messages instead (rendered as
``role: content`` lines) and puts the earlier ones into the scope.

**Exact key** is sha256 of the canonical JSON of (tenant, namespace, scope, prompt), where the
prompt is the full embedded part: an exact hit needs the identical full text, even when the text
is longer than the embedder's window (the embedder then embeds head and tail and says so).

Numbers are canonicalised (``1.0`` and ``1`` are the same temperature) and JSON objects are
serialised with sorted keys, so field order never splits the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from llmcache.cluster.commands import NAME_RE
from llmcache.node import limits
from llmcache.node.errors import EmptyPrompt, InvalidRequest, OversizeInput
from llmcache.node.store import scope_key

NON_SCOPE_FIELDS = frozenset(
    {"messages", "prompt", "input", "user", "metadata", "store", "stream_options", "service_tier"}
)
"""Request fields that never change the answer's content (identity, accounting, transport)."""


@dataclass(frozen=True)
class CacheKey:
    """Where a request lives in the cache and what of it is embedded."""

    tenant: str
    namespace: str
    scope: str
    exact_key: bytes
    text: str
    """The text to embed (the last user turn by default)."""
    prompt: str
    """The canonical full prompt the exact key covers (shown when listing entries)."""

    @property
    def scope_key(self) -> bytes:
        return scope_key(self.tenant, self.namespace, self.scope)


def canonical_json(value: Any) -> str:
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _sha256(value: Any) -> bytes:
    return hashlib.sha256(canonical_json(value).encode()).digest()


def check_names(tenant: str, namespace: str) -> None:
    for field, value in (("tenant", tenant), ("namespace", namespace)):
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise InvalidRequest(
                f"{field} must be 1-128 characters of letters, digits and _.:@- "
                f"starting with a letter or digit, got {value!r}",
                field=field,
            )


def _make(
    tenant: str, namespace: str, kind: str, scope_parts: Any, text: str, prompt: str, field: str
) -> CacheKey:
    check_names(tenant, namespace)
    if not text.strip():
        raise EmptyPrompt("the prompt has no text to look up", field=field)
    if len(prompt) > limits.MAX_PROMPT_CHARS:
        raise OversizeInput(
            f"the prompt has {len(prompt)} characters; the limit is {limits.MAX_PROMPT_CHARS}",
            field=field,
        )
    if len(text) > limits.MAX_EMBED_TEXT_CHARS:
        raise OversizeInput(
            f"the text to embed has {len(text)} characters; "
            f"the limit is {limits.MAX_EMBED_TEXT_CHARS}",
            field=field,
        )
    scope = hashlib.sha256(canonical_json([kind, scope_parts]).encode()).hexdigest()
    exact = exact_key(tenant, namespace, scope, prompt)
    return CacheKey(tenant, namespace, scope, exact, text, prompt)


def exact_key(tenant: str, namespace: str, scope: str, prompt: str) -> bytes:
    """The exact key of a prompt entry (export/import recompute it rather than trust it)."""
    return _sha256([tenant, namespace, scope, prompt])


def _params(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in NON_SCOPE_FIELDS and v is not None}


def text_key(
    tenant: str, namespace: str, text: str, params: dict[str, Any] | None = None
) -> CacheKey:
    """A raw text prompt; ``params`` (model, sampling…) form its scope."""
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string", field="text")
    return _make(tenant, namespace, "text", _params(params or {}), text, text, "text")


def completion_key(tenant: str, namespace: str, body: dict[str, Any]) -> CacheKey:
    """An OpenAI ``/v1/completions`` request body (``prompt`` a string or a one-item list)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string (or a list of one string)", field="prompt")
    return _make(tenant, namespace, "completion", _params(body), prompt, prompt, "prompt")


def chat_key(tenant: str, namespace: str, body: dict[str, Any], *, window: int = 0) -> CacheKey:
    """An OpenAI ``/v1/chat/completions`` request body; see the module docstring's policy."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", field="messages")
    if len(messages) > limits.MAX_MESSAGES:
        raise OversizeInput(
            f"{len(messages)} messages; the limit is {limits.MAX_MESSAGES}", field="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("each message needs a string role", field=f"messages[{i}]")
    if window < 0:
        raise InvalidRequest("window must be >= 0", field="window")
    if window == 0:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise EmptyPrompt("no user message to look up", field="messages")
        embedded = [users[-1]]
    else:
        turns = [i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")]
        embedded = turns[-window:]
        if not embedded:
            raise EmptyPrompt("no conversation turn to look up", field="messages")
    context = [_canonical(m) for i, m in enumerate(messages) if i not in embedded]
    parts = [messages[i] for i in embedded]
    texts = [_message_text(m) for m in parts]
    if window == 0:
        text = texts[0]
    else:
        text = "\n".join(f"{m['role']}: {t}" for m, t in zip(parts, texts, strict=True))
    # Non-text content of the embedded turns (images, audio, tool calls) cannot be embedded,
    # so it must at least split the scope.
    extras = [_message_extras(m) for m in parts]
    scope_parts = {"params": _params(body), "context": context, "window": window, "extras": extras}
    return _make(tenant, namespace, "chat", scope_parts, text, canonical_json(parts), "messages")


def kv_key(tenant: str, namespace: str, key: str) -> bytes:
    """The exact key of an exact-only entry stored under a caller's ``key``."""
    check_names(tenant, namespace)
    if not isinstance(key, str) or not key or "\0" in key or len(key) > limits.MAX_KEY_LEN:
        raise InvalidRequest(
            f"key must be a non-empty string of at most {limits.MAX_KEY_LEN} characters "
            "without NUL",
            field="key",
        )
    return _sha256(["kv", tenant, namespace, key])


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    raise InvalidRequest("message content must be a string or a list of parts", field="messages")


def _message_extras(message: dict[str, Any]) -> Any:
    out = {k: v for k, v in message.items() if k not in ("role", "content")}
    content = message.get("content")
    if isinstance(content, list):
        out["parts"] = [p for p in content if not (isinstance(p, dict) and p.get("type") == "text")]
    return _canonical(out)
