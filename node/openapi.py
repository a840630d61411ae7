"""The OpenAPI 3.1 document of a node's HTTP API (served as ``/openapi.json``).

It describes every route of ``node/api.py``: request bodies and answers as JSON Schemas (the
same shapes travel as msgpack), the error shape, the per-request headers, and the two ways to
present a token. The schemas are as strict as the handlers (unknown fields are rejected), so a
generated request that fits the schema is one the handlers accept the shape of.

Other routes (the OpenAI-compatible proxy) add their path items through
``document(extra_paths)``; ``make_app(extra_paths=...)`` passes them on.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from llmcache.node import adaptive, limits

VERSION = "0.1.0"
JSON = "application/json"
MSGPACK = "application/msgpack"
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
MAX_ID = 2**63 - 1

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: Schema, required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return {**schema, **extra}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _str(max_length: int, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


NAME: Schema = {"type": "string", "pattern": NAME_PATTERN}
ENTRY_ID: Schema = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
INDEX: Schema = {"type": "integer", "minimum": 0}
TAGS: Schema = {
    "type": "array",
    "maxItems": limits.MAX_TAGS,
    "items": {
        "type": "string",
        "minLength": 1,
        "maxLength": limits.MAX_TAG_LEN,
        "pattern": "^[^\\x00]*$",
    },
}
WAIT: Schema = {
    "type": "string",
    "enum": ["none", "committed", "applied"],
    "default": "applied",
    "description": "Answer once the command is in the leader's log (none), committed by a "
    "quorum (committed), or applied on this node (applied: read-your-writes here).",
}
REQUEST_ID: Schema = _str(
    128,
    description="Makes the write idempotent: a retry with the same id (after a 503 unknown "
    "outcome) is applied at most once. Generated when absent.",
)
TENANT: Schema = {
    **NAME,
    "description": "Act on this tenant: admins of all tenants only (default: the token's).",
}

SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {"type": "string", "description": "Stable, machine-readable."},
                    "message": {"type": "string"},
                    "field": nullable({"type": "string"}),
                },
                ("code", "message", "field"),
            )
        },
        ("error",),
    ),
    "Vector": {
        "type": "array",
        "minItems": 1,
        "maxItems": limits.MAX_VECTOR_DIM,
        "items": {"type": "number"},
        "description": "The caller's own embedding of the text (namespaces with embedder "
        "'supplied' need it); normalised to unit length, its dimension fixed per namespace.",
    },
    "Message": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string"},
            "content": {"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]},
        },
    },
    "LLMRequest": {
        "type": "object",
        "description": "An OpenAI chat body (with messages) or completion body (with prompt): "
        "model and sampling parameters form the scope; temperature and n decide cacheability.",
        "oneOf": [
            {
                "required": ["messages"],
                "properties": {
                    "messages": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": limits.MAX_MESSAGES,
                        "items": ref("Message"),
                    }
                },
            },
            {
                "required": ["prompt"],
                "not": {"required": ["messages"]},
                "properties": {"prompt": {"type": "string", "minLength": 1}},
            },
        ],
    },
    "Entry": obj(
        {
            "id": ENTRY_ID,
            "namespace": NAME,
            "kind": {"type": "string", "enum": ["prompt", "kv"]},
            "key": {"type": "string", "description": "The caller's key (kv entries)."},
            "text": {"type": "string", "description": "The embedded text (prompt entries)."},
            "response": {"type": "string", "description": "The response, when it is UTF-8."},
            "response_base64": {"type": "string", "description": "The response otherwise."},
            "scope": {"type": "string", "description": "full=1: the scope hash."},
            "prompt": {"type": "string", "description": "full=1: what the exact key covers."},
            "embedder": {"type": "string", "description": "full=1: the vector's embedder."},
            "vector_base64": {
                "type": "string",
                "description": "full=1, prompt entries: the vector, little-endian float32.",
            },
            "content_type": {"type": "string"},
            "created_at_ms": {"type": "integer"},
            "expires_at_ms": {"type": "integer", "description": "0: never expires."},
            "age_s": {"type": "number", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}},
            "usage": {"type": "object", "additionalProperties": {"type": "integer"}},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        (
            "id",
            "namespace",
            "kind",
            "key",
            "text",
            "content_type",
            "created_at_ms",
            "expires_at_ms",
            "age_s",
            "tags",
            "usage",
            "meta",
        ),
    ),
    "Candidate": obj({"id": ENTRY_ID, "similarity": {"type": "number"}}, ("id", "similarity")),
    "LookupAnswer": obj(
        {
            "status": {"type": "string", "enum": ["HIT", "SEMANTIC_HIT", "MISS"]},
            "similarity": nullable({"type": "number"}),
            "entry": nullable(ref("Entry")),
            "candidates": {"type": "array", "items": ref("Candidate")},
            "threshold": {"type": "number"},
            "tokens": {"type": "integer", "minimum": 0},
            "truncated": {"type": "boolean"},
            "rejected": {
                "type": "array",
                "items": obj({"id": ENTRY_ID, "guard": {"type": "string"}}, ("id", "guard")),
                "description": "Candidates at or above the threshold vetoed by a guard, or by "
                "the re-ranker (guard 'rerank') or the learned verifier (guard 'verifier').",
            },
            "probe": nullable(
                {
                    **ref("Candidate"),
                    "description": "Adaptive namespaces: on a miss, the best candidate. "
                    "Compare the fresh answer with this entry's and send the label with this "
                    "similarity to /v1/cache/feedback (0: a guard vetoed it; in namespaces "
                    "with a verifier, its probability).",
                }
            ),
            "feedback_similarity": nullable(
                {
                    "type": "number",
                    "description": "On a hit: the similarity to send with feedback on it (the "
                    "learned verifier's probability in namespaces with one, else the cosine).",
                }
            ),
        },
        ("status", "similarity", "entry", "candidates", "threshold", "tokens", "truncated"),
    ),
    "StoreAnswer": obj(
        {
            "id": nullable(ENTRY_ID),
            "index": INDEX,
            "request_id": {"type": "string"},
            "replaced": nullable(ENTRY_ID),
            "duplicate_of": {
                "type": "integer",
                "description": "The log index that first applied this request id (a retry).",
            },
        },
        ("id", "index", "request_id", "replaced"),
    ),
    "InvalidateRequest": obj(
        {
            "tenant": TENANT,
            "namespace": NAME,
            "tags": TAGS,
            "key_prefix": _str(limits.MAX_KEY_LEN),
            "ids": {"type": "array", "maxItems": limits.MAX_BATCH, "items": ENTRY_ID},
            "wait": WAIT,
            "request_id": REQUEST_ID,
        },
        description="Deletes the entries matching every given filter; at least one filter.",
        anyOf=[
            {"required": ["namespace"]},
            {"required": ["tags"], "properties": {"tags": {"minItems": 1}}},
            {"required": ["key_prefix"], "properties": {"key_prefix": {"minLength": 1}}},
            {"required": ["ids"], "properties": {"ids": {"minItems": 1}}},
        ],
    ),
    "WriteAnswer": obj(
        {
            "deleted": nullable({"type": "integer", "minimum": 0}),
            "index": INDEX,
            "request_id": {"type": "string"},
        },
        ("deleted", "index"),
    ),
    "EntryList": obj(
        {
            "entries": {"type": "array", "items": ref("Entry")},
            "next_cursor": nullable({"type": "integer", "minimum": 0}),
        },
        ("entries", "next_cursor"),
    ),
    "FeedbackRequest": obj(
        {
            "tenant": TENANT,
            "entry_id": ENTRY_ID,
            "label": {"type": "string", "enum": ["correct", "wrong"]},
            "similarity": {"type": "number", "minimum": 0, "maximum": 1},
            "query": _str(limits.MAX_PROMPT_CHARS),
            "wait": WAIT,
            "request_id": REQUEST_ID,
        },
        ("entry_id", "label"),
    ),
    "IndexAnswer": obj({"index": INDEX}, ("index",)),
    "TenantConfig": obj(
        {
            "max_entries": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
            "max_bytes": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
            "upstream_base_url": _str(2048, pattern="^https?://"),
            "eviction": {"type": "string", "enum": ["lru", "lfu", "ttl"]},
            "description": _str(1024),
        }
    ),
    "Tenant": obj(
        {
            "tenant": NAME,
            "config": {"type": "object"},
            "settings": {"type": "object", "description": "The tenant's policy settings."},
            "namespaces": {
                "type": "object",
                "additionalProperties": {"type": "object"},
                "description": "Policy settings of each namespace that has its own.",
            },
            "stats": obj(
                {
                    "entries": {"type": "integer"},
                    "bytes": {"type": "integer"},
                    "evicted": {"type": "integer"},
                    "expired": {"type": "integer"},
                },
                ("entries", "bytes", "evicted", "expired"),
            ),
            "tokens": {
                "type": "array",
                "items": obj(
                    {"id": {"type": "string"}, "role": {"type": "string"}}, ("id", "role")
                ),
            },
        },
        ("tenant", "config", "settings", "namespaces", "stats", "tokens"),
    ),
    "TenantUpsert": obj(
        {"tenant": NAME, "config": ref("TenantConfig"), "request_id": REQUEST_ID}, ("tenant",)
    ),
    "TenantUpsertAnswer": obj(
        {"tenant": NAME, "created": {"type": "boolean"}, "index": INDEX},
        ("tenant", "created", "index"),
    ),
    "TokenRequest": obj(
        {"role": {"type": "string", "enum": ["reader", "writer", "admin"]}}, ("role",)
    ),
    "TokenAnswer": obj(
        {
            "token": {"type": "string", "description": "Shown once; only its hash is kept."},
            "id": {"type": "string"},
            "role": {"type": "string"},
            "tenant": NAME,
        },
        ("token", "id", "role", "tenant"),
    ),
    "SettingsRequest": obj(
        {
            "namespace": NAME,
            "values": obj(
                {
                    "threshold": nullable({"type": "number", "minimum": 0, "maximum": 1}),
                    "ttl_s": nullable(
                        {"type": "integer", "minimum": 0, "maximum": limits.MAX_TTL_S}
                    ),
                    "ttl_jitter": nullable({"type": "number", "minimum": 0, "maximum": 0.5}),
                    "max_temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
                    "cache_multiple_choices": nullable({"type": "boolean"}),
                    "context_window": nullable(
                        {"type": "integer", "minimum": 0, "maximum": limits.MAX_MESSAGES}
                    ),
                    "top_k": nullable(
                        {"type": "integer", "minimum": 1, "maximum": limits.MAX_TOP_K}
                    ),
                    "embedder": nullable({"type": "string"}),
                    "enabled": nullable({"type": "boolean"}),
                    "guards": nullable({"type": "string"}),
                    "adaptive_delta": nullable({"type": "number", "minimum": 0, "maximum": 0.5}),
                    "adaptive_bound": nullable({"type": "string", "enum": list(adaptive.BOUNDS)}),
                    "judge_model": nullable({"type": "string", "maxLength": 200}),
                    "judge_rate": nullable({"type": "number", "minimum": 0, "maximum": 1}),
                    "rerank": nullable({"type": "boolean"}),
                    "rerank_threshold": nullable({"type": "number", "minimum": 0, "maximum": 1}),
                    "verifier": nullable({"type": "string"}),
                },
                description="Merged into the tenant's (or namespace's) settings; null removes one.",
            ),
            "request_id": REQUEST_ID,
        },
        ("values",),
    ),
    "SettingsAnswer": obj({"config": {"type": "object"}, "index": INDEX}, ("config", "index")),
    "RaftStatus": obj(
        {
            "node_id": {"type": "string"},
            "role": {"type": "string", "enum": ["leader", "follower", "candidate"]},
            "term": {"type": "integer"},
            "leader": nullable({"type": "string"}),
            "commit_index": {"type": "integer"},
            "applied_index": {"type": "integer"},
            "has_quorum": {"type": "boolean"},
            "ready": {"type": "boolean"},
            "peers": {"type": "object"},
            "leader_contact_ms": nullable(
                {
                    "type": "integer",
                    "description": "ms since this node last heard the leader (0 on the leader)",
                }
            ),
        },
        (
            "node_id",
            "role",
            "term",
            "leader",
            "commit_index",
            "applied_index",
            "has_quorum",
            "ready",
        ),
    ),
}

_SELECTORS: Schema = {
    "text": _str(limits.MAX_EMBED_TEXT_CHARS, pattern="\\S", description="A raw text prompt."),
    "params": {
        "type": "object",
        "description": "With text: model and sampling parameters that form the scope.",
    },
    "request": ref("LLMRequest"),
    "window": {
        "type": "integer",
        "minimum": 0,
        "maximum": limits.MAX_MESSAGES,
        "description": "With a chat request: 0 embeds the last user turn, N the last N turns "
        "(default: the namespace's context_window).",
    },
    "key": _str(
        limits.MAX_KEY_LEN, pattern="^[^\\x00]+$", description="The key of an exact-only entry."
    ),
    "vector": ref("Vector"),
}
_ONE_SELECTOR: list[Schema] = [
    {"required": ["text"], "properties": {"window": False}},
    {"required": ["request"], "properties": {"params": False}},
    {"required": ["key"], "properties": {"params": False, "window": False, "vector": False}},
]
SCHEMAS["LookupRequest"] = obj(
    {
        "tenant": TENANT,
        "namespace": {**NAME, "default": "default"},
        **_SELECTORS,
        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 1, "maximum": limits.MAX_TOP_K},
        "consistency": {
            "type": "string",
            "enum": ["stale", "leader", "linearizable"],
            "default": "stale",
            "description": "stale: this node's data; leader: answered by the leader (a "
            "follower forwards, or answers 307 with ?redirect=1); linearizable: after a "
            "barrier through the log.",
        },
        "max_staleness_ms": {
            "type": "number",
            "minimum": 0,
            "description": "With stale: 503 stale_read when this node may be older than this.",
        },
        "min_index": {
            "type": "integer",
            "minimum": 0,
            "maximum": 2**63 - 1,
            "description": "Wait (up to 10 s) until this node applied this index.",
        },
        "exact_only": {"type": "boolean", "default": False},
    },
    description="Exactly one of text, request or key says what is looked up.",
    oneOf=copy.deepcopy(_ONE_SELECTOR),
)
SCHEMAS["StoreRequest"] = obj(
    {
        "tenant": TENANT,
        "namespace": {**NAME, "default": "default"},
        **_SELECTORS,
        "response": {
            "description": "A string is stored as UTF-8 (text/plain); any other JSON value as "
            "JSON (application/json); msgpack bin as raw bytes."
        },
        "response_base64": {
            "type": "string",
            "contentEncoding": "base64",
            "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
        },
        "content_type": _str(255, minLength=1, pattern="^[ -~]+$"),
        "ttl_s": {"type": "integer", "minimum": 0, "maximum": limits.MAX_TTL_S},
        "tags": TAGS,
        "usage": {
            "type": "object",
            "maxProperties": 16,
            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 2**53 - 1},
        },
        "meta": {
            "type": "object",
            "maxProperties": 32,
            "additionalProperties": {"type": "string"},
        },
        "request_id": REQUEST_ID,
        "wait": WAIT,
    },
    description="Exactly one of text, request or key, and exactly one of response or "
    "response_base64. usage applies to text and request entries only.",
    allOf=[
        {"oneOf": copy.deepcopy(_ONE_SELECTOR)},
        {"oneOf": [{"required": ["response"]}, {"required": ["response_base64"]}]},
    ],
)

_B64 = {
    "type": "string",
    "contentEncoding": "base64",
    "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
}
SCHEMAS["ImportedEntry"] = obj(
    {
        "namespace": NAME,
        "kind": {"type": "string", "enum": ["prompt", "kv"]},
        "key": _str(limits.MAX_KEY_LEN),
        "text": {"type": "string"},
        "prompt": _str(limits.MAX_PROMPT_CHARS),
        "scope": _str(128),
        "embedder": {"type": "string"},
        "vector_base64": _B64,
        "response": {"type": "string"},
        "response_base64": _B64,
        "content_type": _str(255, minLength=1, pattern="^[ -~]+$"),
        "created_at_ms": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
        "expires_at_ms": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
        "tags": TAGS,
        "usage": SCHEMAS["StoreRequest"]["properties"]["usage"],
        "meta": SCHEMAS["StoreRequest"]["properties"]["meta"],
    },
    ("namespace", "kind", "created_at_ms"),
    description="An entry as GET /v1/cache/entries?full=1 shows it, less id and age_s. A kv "
    "entry needs key; a prompt entry scope, prompt, embedder and a unit vector_base64.",
)
SCHEMAS["ImportRequest"] = obj(
    {
        "tenant": TENANT,
        "entries": {"type": "array", "maxItems": limits.MAX_BATCH, "items": ref("ImportedEntry")},
        "wait": WAIT,
    },
    ("entries",),
)
SCHEMAS["ImportAnswer"] = obj(
    {
        "imported": {"type": "integer", "minimum": 0},
        "duplicates": {"type": "integer", "minimum": 0, "description": "Imported before."},
        "expired": {"type": "integer", "minimum": 0, "description": "Skipped: expired."},
        "index": INDEX,
    },
    ("imported", "duplicates", "expired", "index"),
)


def _content(schema: Schema) -> Schema:
    return {JSON: {"schema": schema}, MSGPACK: {"schema": schema}}


def _body(name: str) -> Schema:
    return {"required": True, "content": _content(ref(name))}


HEADER_NODE = {"description": "The node that answered.", "schema": {"type": "string"}}
WRITE_HEADERS = {
    "X-LLMCache-Leader": {"description": "The leader's id.", "schema": {"type": "string"}},
    "X-LLMCache-Term": {"description": "The Raft term.", "schema": {"type": "string"}},
    "X-LLMCache-Index": {"description": "The command's log index.", "schema": {"type": "string"}},
}
LOOKUP_HEADERS = {
    "X-LLMCache-Status": {
        "schema": {"type": "string", "enum": ["HIT", "SEMANTIC_HIT", "MISS"]},
        "required": True,
    },
    "X-LLMCache-Similarity": {"description": "On hits.", "schema": {"type": "string"}},
    "X-LLMCache-Entry": {"description": "On hits: the entry id.", "schema": {"type": "string"}},
    "Age": {
        "description": "On hits: seconds since the entry was stored.",
        "schema": {"type": "string"},
    },
}
ERRORS = {
    "4XX": {
        "description": "The caller's mistake; nothing was changed. field names the culprit.",
        "content": _content(ref("Error")),
    },
    "503": {
        "description": "Transient (no leader, unknown outcome, not ready): retry after "
        "Retry-After, with the same request_id for writes.",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
        "content": _content(ref("Error")),
    },
}


def _answer(status: str, schema: str, description: str, headers: Schema | None = None) -> Schema:
    return {
        status: {
            "description": description,
            "headers": {"X-LLMCache-Node": HEADER_NODE, **(headers or {})},
            "content": _content(ref(schema)),
        },
        **ERRORS,
    }


def _op(summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"summary": summary, "responses": responses, **extra}


def _header_param(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


CACHE_HEADERS = [
    _header_param("X-LLMCache-Namespace", NAME, "The namespace, when the body names none."),
    _header_param(
        "X-LLMCache-Threshold",
        {"type": "string", "pattern": "^(0(\\.[0-9]{1,6})?|1(\\.0{1,6})?)$"},
        "Lookup: the similarity threshold, when the body gives none.",
    ),
    _header_param(
        "X-LLMCache-TTL", {"type": "string", "pattern": "^[0-9]{1,8}$"}, "Store: TTL in seconds."
    ),
    _header_param(
        "X-LLMCache-Tags",
        {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.-]{1,64}){0,7}$"},
        "Store: comma-separated tags, when the body gives none.",
    ),
    _header_param("X-LLMCache-Consistency", {"type": "string", "enum": ["stale"]}, "Lookup."),
    _header_param(
        "Cache-Control",
        {"type": "string", "pattern": "^(no-cache|no-store|max-age=[0-9]{1,8})$"},
        "Lookup: no-cache skips the cache (MISS); max-age=N treats older entries as misses. "
        "Store: max-age=N is the TTL when neither body nor X-LLMCache-TTL gives one.",
    ),
]
TENANT_QUERY = _query("tenant", NAME, "Act on this tenant (admins of all tenants only).")
PATH_TENANT = {"name": "tenant", "in": "path", "required": True, "schema": NAME}
PATH_ID = {"name": "id", "in": "path", "required": True, "schema": ENTRY_ID}
PUBLIC: list[Schema] = []


def paths() -> dict[str, Schema]:
    return {
        "/v1/cache/lookup": {
            "post": _op(
                "Exact, then semantic lookup",
                _answer("200", "LookupAnswer", "HIT, SEMANTIC_HIT or MISS.", LOOKUP_HEADERS),
                requestBody=_body("LookupRequest"),
                parameters=CACHE_HEADERS,
                description="Reader role. Candidates are the nearest live entries of the scope, "
                "hit or not; similarity is the hit's, or the best candidate's on a miss.",
            )
        },
        "/v1/cache/store": {
            "post": _op(
                "Store a response",
                _answer("201", "StoreAnswer", "Proposed; id when applied.", WRITE_HEADERS),
                requestBody=_body("StoreRequest"),
                parameters=CACHE_HEADERS,
                description="Writer role. A request whose sampling makes it not cacheable "
                "(temperature above max_temperature, n > 1) is a 422 not_cacheable.",
            )
        },
        "/v1/cache/invalidate": {
            "post": _op(
                "Delete entries by filter",
                _answer("200", "WriteAnswer", "deleted is known with wait=applied.", WRITE_HEADERS),
                requestBody=_body("InvalidateRequest"),
                description="Writer role.",
            )
        },
        "/v1/cache/entries": {
            "get": _op(
                "List live entries, ascending ids",
                _answer("200", "EntryList", "A page; follow next_cursor until it is null."),
                parameters=[
                    TENANT_QUERY,
                    _query("namespace", NAME),
                    _query("tag", _str(limits.MAX_TAG_LEN)),
                    _query("kind", {"type": "string", "enum": ["prompt", "kv"]}),
                    _query(
                        "limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
                    ),
                    _query(
                        "cursor",
                        {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                        "The last id seen.",
                    ),
                    _query(
                        "full",
                        {"type": "integer", "enum": [0, 1]},
                        "1: add scope, prompt, embedder and vector_base64 (for export).",
                    ),
                ],
                description="Reader role. A page may be short (even empty) with a next_cursor: "
                "one page examines at most 10,000 entries.",
            )
        },
        "/v1/cache/import": {
            "post": _op(
                "Recreate exported entries, keeping timestamps, vectors and responses",
                _answer("200", "ImportAnswer", "Applied as wait says.", WRITE_HEADERS),
                requestBody=_body("ImportRequest"),
                description="Admin role of the tenant. Idempotent: an entry's request id derives "
                "from its tenant, namespace, exact key and created_at_ms. Expired entries are "
                "skipped; ids are the target's own.",
            )
        },
        "/v1/cache/entries/{id}": {
            "parameters": [PATH_ID],
            "get": _op(
                "One entry",
                _answer("200", "Entry", "The entry."),
                parameters=[TENANT_QUERY],
                description="Reader role; another tenant's id is a 404.",
            ),
            "delete": _op(
                "Delete one entry",
                _answer("200", "WriteAnswer", "Deleted.", WRITE_HEADERS),
                parameters=[TENANT_QUERY, _query("wait", WAIT)],
                description="Writer role; another tenant's id is a 404.",
            ),
        },
        "/v1/cache/feedback": {
            "post": _op(
                "Label a served hit correct or wrong",
                _answer("202", "IndexAnswer", "Recorded in the log.", WRITE_HEADERS),
                requestBody=_body("FeedbackRequest"),
                description="Writer role.",
            )
        },
        "/v1/tenants": {
            "get": _op(
                "All tenants",
                _answer("200", "TenantList", "Never token hashes."),
                description="Admin of all tenants.",
            ),
            "post": _op(
                "Create a tenant or replace its configuration (its tokens are kept)",
                {
                    **_answer("201", "TenantUpsertAnswer", "Created.", WRITE_HEADERS),
                    "200": {
                        "description": "Updated.",
                        "headers": {"X-LLMCache-Node": HEADER_NODE, **WRITE_HEADERS},
                        "content": _content(ref("TenantUpsertAnswer")),
                    },
                },
                requestBody=_body("TenantUpsert"),
                description="Admin of all tenants.",
            ),
        },
        "/v1/tenants/{tenant}": {
            "parameters": [PATH_TENANT],
            "get": _op(
                "One tenant",
                _answer("200", "Tenant", "The tenant."),
                description="Admin of all tenants, or the tenant's admin.",
            ),
            "delete": _op(
                "Delete a tenant with all its entries",
                _answer("200", "WriteAnswer", "Deleted.", WRITE_HEADERS),
                description="Admin of all tenants.",
            ),
        },
        "/v1/tenants/{tenant}/tokens": {
            "parameters": [PATH_TENANT],
            "post": _op(
                "Create a token",
                _answer("201", "TokenAnswer", "The token, shown this once.", WRITE_HEADERS),
                requestBody=_body("TokenRequest"),
                description="Admin of all tenants, or the tenant's admin.",
            ),
        },
        "/v1/tenants/{tenant}/tokens/{id}": {
            "parameters": [
                PATH_TENANT,
                {"name": "id", "in": "path", "required": True, "schema": _str(64)},
            ],
            "delete": _op(
                "Revoke a token",
                _answer("200", "Revoked", "Revoked.", WRITE_HEADERS),
                description="Admin of all tenants, or the tenant's admin.",
            ),
        },
        "/v1/tenants/{tenant}/settings": {
            "parameters": [PATH_TENANT],
            "put": _op(
                "Merge policy settings of the tenant or one of its namespaces",
                _answer("200", "SettingsAnswer", "The resulting settings.", WRITE_HEADERS),
                requestBody=_body("SettingsRequest"),
                description="Admin of all tenants, or the tenant's admin.",
            ),
        },
        "/v1/cluster/status": {
            "get": _op(
                "This node's view of its Raft group", _answer("200", "RaftStatus", "Status.")
            )
        },
        "/livez": {
            "get": _op(
                "The process is alive",
                _answer("200", "Live", "Alive."),
                security=PUBLIC,
            )
        },
        "/readyz": {
            "get": _op(
                "Ready to serve: Raft ready and this worker's indexes caught up",
                _answer("200", "Ready", "Ready; a 503 says why not."),
                security=PUBLIC,
            )
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": PUBLIC,
                "responses": {
                    "200": {
                        "description": "The exposition text.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": PUBLIC,
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


SCHEMAS["TenantList"] = obj({"tenants": {"type": "array", "items": ref("Tenant")}}, ("tenants",))
SCHEMAS["Revoked"] = obj({"revoked": {"type": "string"}, "index": INDEX}, ("revoked", "index"))
SCHEMAS["Live"] = obj({"status": {"const": "ok"}}, ("status",))
SCHEMAS["Ready"] = obj(
    {
        "status": {"const": "ready"},
        "leader": {"type": ["string", "null"]},
        "commit_index": INDEX,
        "applied_index": INDEX,
        "worker_index": INDEX,
    },
    ("status", "applied_index", "worker_index"),
)


def document(extra_paths: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, with ``extra_paths`` (path → path item) added.

    Path items of ``extra_paths`` may refer to ``#/components/schemas/Error`` and use the
    ``token`` and ``bearer`` security schemes.
    """
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LLM-Cache node API",
            "version": VERSION,
            "description": "A replicated semantic cache for LLM applications. Bodies are JSON, "
            "or msgpack (application/msgpack) both ways. Errors are "
            '{"error": {"code", "message", "field"}}.',
        },
        "paths": {**paths(), **copy.deepcopy(dict(extra_paths or {}))},
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "X-LLMCache-Token"},
                "bearer": {"type": "http", "scheme": "bearer", "description": "An lc_ token."},
            },
        },
        "security": [{"token": []}, {"bearer": []}, {}],
    }
