"""Every API call as a :class:`~llmcache.client.protocol.Call`: its route, body and parser.

The sync and asyncio clients are thin: each method builds one of these and runs it. Options
travel as typed keyword arguments (``TypedDict`` + ``Unpack``), defined once here.
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from llmcache.client.models import (
    Entry,
    EntryPage,
    LookupResult,
    StoreResult,
    Token,
    WriteResult,
)
from llmcache.client.protocol import Call

Wait = Literal["none", "committed", "applied"]
Consistency = Literal["stale", "leader", "linearizable"]


class Selector(TypedDict, total=False):
    """What an entry is about, besides ``text``: an OpenAI ``request`` body (chat or
    completion), or a caller's ``key`` (exact-only entries); ``params`` (model and sampling
    parameters of a ``text``) and ``vector`` (for namespaces that take supplied vectors)."""

    request: Mapping[str, Any]
    key: str
    params: Mapping[str, Any]
    window: int
    vector: Sequence[float]
    namespace: str
    tenant: str


class LookupOptions(Selector, total=False):
    threshold: float
    top_k: int
    consistency: Consistency
    min_index: int
    max_staleness_ms: float
    exact_only: bool


class StoreOptions(Selector, total=False):
    content_type: str
    ttl_s: int
    tags: Sequence[str]
    usage: Mapping[str, int]
    meta: Mapping[str, str]
    request_id: str
    wait: Wait


def _body(tenant: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    body = {k: _plain(v) for k, v in fields.items() if v is not None}
    if tenant is not None:
        body.setdefault("tenant", tenant)
    return body


def _plain(value: Any) -> Any:
    """Sequences and numpy arrays as lists (JSON and msgpack carry those)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _tenant_query(tenant: str | None) -> dict[str, str]:
    return {"tenant": tenant} if tenant else {}


def lookup(tenant: str | None, text: str | None, options: LookupOptions) -> Call[LookupResult]:
    body = _body(tenant, {"text": text, **options})
    return Call("POST", "/v1/cache/lookup", LookupResult.parse, body)


def store(
    tenant: str | None, text: str | None, response: Any, options: StoreOptions
) -> Call[StoreResult]:
    request_id = options.get("request_id") or uuid.uuid4().hex
    body = _body(tenant, {"text": text, **options, "response": response, "request_id": request_id})
    return Call(
        "POST", "/v1/cache/store", StoreResult.parse, body, write=True, request_id=request_id
    )


def invalidate(
    tenant: str | None,
    *,
    namespace: str | None,
    tags: Sequence[str] | None,
    key_prefix: str | None,
    ids: Sequence[int] | None,
    wait: Wait,
) -> Call[WriteResult]:
    request_id = uuid.uuid4().hex
    fields = {"namespace": namespace, "tags": tags, "key_prefix": key_prefix, "ids": ids}
    body = _body(tenant, {**fields, "wait": wait, "request_id": request_id})
    return Call(
        "POST", "/v1/cache/invalidate", WriteResult.parse, body, write=True, request_id=request_id
    )


def entries(
    tenant: str | None,
    *,
    namespace: str | None,
    tag: str | None,
    kind: str | None,
    limit: int,
    cursor: int,
    full: bool,
) -> Call[EntryPage]:
    query = {"namespace": namespace, "tag": tag, "kind": kind, "tenant": tenant}
    params = {k: v for k, v in query.items() if v}
    params.update(limit=str(limit), cursor=str(cursor))
    if full:
        params["full"] = "1"
    return Call("GET", "/v1/cache/entries", EntryPage.parse, query=params)


def get_entry(tenant: str | None, entry_id: int) -> Call[Entry]:
    return Call(
        "GET",
        f"/v1/cache/entries/{int(entry_id)}",
        lambda body, _: Entry.parse(body),
        query=_tenant_query(tenant),
    )


def delete_entry(tenant: str | None, entry_id: int, wait: Wait) -> Call[WriteResult]:
    query = {**_tenant_query(tenant), "wait": wait}
    path = f"/v1/cache/entries/{int(entry_id)}"
    return Call("DELETE", path, WriteResult.parse, query=query, write=True)


def feedback(
    tenant: str | None,
    entry_id: int,
    label: Literal["correct", "wrong"],
    similarity: float | None,
    query: str | None,
) -> Call[int]:
    request_id = uuid.uuid4().hex
    fields = {"entry_id": entry_id, "label": label, "similarity": similarity, "query": query}
    body = _body(tenant, {**fields, "request_id": request_id})
    return Call("POST", "/v1/cache/feedback", _index, body, write=True, request_id=request_id)


def import_entries(
    tenant: str | None, records: Sequence[Mapping[str, Any]], wait: Wait
) -> Call[dict[str, Any]]:
    body = _body(tenant, {"entries": list(records), "wait": wait})
    return Call("POST", "/v1/cache/import", _dict, body, write=True)


# -- tenants and cluster -----------------------------------------------------------------------


def upsert_tenant(name: str, config: Mapping[str, Any] | None) -> Call[dict[str, Any]]:
    request_id = uuid.uuid4().hex
    body = {"tenant": name, "config": dict(config or {}), "request_id": request_id}
    return Call("POST", "/v1/tenants", _dict, body, write=True, request_id=request_id)


def list_tenants() -> Call[list[dict[str, Any]]]:
    return Call("GET", "/v1/tenants", lambda body, _: list(body["tenants"]))


def get_tenant(name: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/tenants/{_segment(name)}", _dict)


def delete_tenant(name: str) -> Call[WriteResult]:
    return Call("DELETE", f"/v1/tenants/{_segment(name)}", WriteResult.parse, write=True)


def create_token(tenant: str, role: Literal["reader", "writer", "admin"]) -> Call[Token]:
    path = f"/v1/tenants/{_segment(tenant)}/tokens"
    return Call("POST", path, Token.parse, {"role": role}, write=True)


def revoke_token(tenant: str, token_id: str) -> Call[dict[str, Any]]:
    path = f"/v1/tenants/{_segment(tenant)}/tokens/{_segment(token_id)}"
    return Call("DELETE", path, _dict, write=True)


def set_settings(
    tenant: str, values: Mapping[str, Any], namespace: str | None
) -> Call[dict[str, Any]]:
    request_id = uuid.uuid4().hex
    body = {"values": dict(values), "namespace": namespace or "", "request_id": request_id}
    path = f"/v1/tenants/{_segment(tenant)}/settings"
    return Call("PUT", path, _dict, body, write=True, request_id=request_id)


def cluster_status() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/cluster/status", _dict)


def openapi() -> Call[dict[str, Any]]:
    return Call("GET", "/openapi.json", _dict)


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _dict(body: Any, headers: Mapping[str, str]) -> dict[str, Any]:
    return dict(body)


def _index(body: Any, headers: Mapping[str, str]) -> int:
    return int(body["index"])
