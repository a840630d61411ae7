"""Typed results of the client's calls, parsed from the server's answers (JSON or msgpack)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

HitKind = Literal["exact", "semantic"]


@dataclass(frozen=True)
class Entry:
    """One cached entry. ``response`` is the stored bytes (whatever their content type);
    ``view`` is the server's whole view of it (with ``full=True`` listings: scope, prompt,
    embedder and the vector, which export keeps)."""

    id: int
    namespace: str
    kind: str
    key: str
    text: str
    response: bytes
    content_type: str
    created_at_ms: int
    expires_at_ms: int
    age_s: float
    tags: tuple[str, ...]
    usage: dict[str, int]
    meta: dict[str, str]
    view: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, view: Mapping[str, Any]) -> Entry:
        if view.get("response_base64") is not None:
            response = base64.b64decode(view["response_base64"])
        else:
            response = str(view.get("response", "")).encode()
        return cls(
            id=int(view["id"]),
            namespace=view["namespace"],
            kind=view["kind"],
            key=view.get("key", ""),
            text=view.get("text", ""),
            response=response,
            content_type=view.get("content_type", ""),
            created_at_ms=int(view["created_at_ms"]),
            expires_at_ms=int(view["expires_at_ms"]),
            age_s=float(view.get("age_s", 0.0)),
            tags=tuple(view.get("tags", ())),
            usage=dict(view.get("usage", {})),
            meta=dict(view.get("meta", {})),
            view=dict(view),
        )

    @property
    def response_text(self) -> str:
        return self.response.decode("utf-8")

    def response_json(self) -> Any:
        return json.loads(self.response)


@dataclass(frozen=True)
class Candidate:
    id: int
    similarity: float


@dataclass(frozen=True)
class LookupResult:
    """``status`` is ``HIT`` (exact), ``SEMANTIC_HIT`` or ``MISS``; ``similarity`` is the
    hit's cosine similarity (0..1), or the best candidate's on a miss; ``index`` is the applied
    index the node read at (pass it as ``min_index`` for read-your-writes on another node)."""

    status: str
    similarity: float | None
    entry: Entry | None
    candidates: tuple[Candidate, ...]
    threshold: float
    index: int | None
    probe: Candidate | None = None
    """Adaptive namespaces, on a miss: the candidate to label (compare the fresh answer with
    its entry's) and the similarity to send with the label to :meth:`feedback`."""
    feedback_similarity: float | None = None
    """On a hit: the similarity to send with feedback on it."""

    @property
    def hit(self) -> bool:
        return self.entry is not None

    @property
    def kind(self) -> HitKind | None:
        return {"HIT": "exact", "SEMANTIC_HIT": "semantic"}.get(self.status)  # type: ignore[return-value]

    @property
    def entry_id(self) -> int | None:
        return self.entry.id if self.entry else None

    @property
    def age_s(self) -> float | None:
        return self.entry.age_s if self.entry else None

    @classmethod
    def parse(cls, body: Mapping[str, Any], headers: Mapping[str, str]) -> LookupResult:
        raw_index = headers.get("X-LLMCache-Index")
        return cls(
            status=body["status"],
            similarity=body.get("similarity"),
            entry=Entry.parse(body["entry"]) if body.get("entry") else None,
            candidates=tuple(
                Candidate(int(c["id"]), float(c["similarity"])) for c in body.get("candidates", ())
            ),
            threshold=float(body.get("threshold", 0.0)),
            index=int(raw_index) if raw_index else None,
            probe=Candidate(int(p["id"]), float(p["similarity"]))
            if (p := body.get("probe"))
            else None,
            feedback_similarity=body.get("feedback_similarity"),
        )


@dataclass(frozen=True)
class StoreResult:
    """``id`` of the new entry (``None`` with ``wait="none"``), the log ``index`` that holds it,
    the ``request_id`` it travelled with, and ``duplicate``: this request id had been applied
    before (a retry), so nothing new was written."""

    id: int | None
    index: int
    request_id: str
    replaced: int | None
    duplicate: bool

    @classmethod
    def parse(cls, body: Mapping[str, Any], headers: Mapping[str, str]) -> StoreResult:
        return cls(
            id=body.get("id"),
            index=int(body["index"]),
            request_id=str(body.get("request_id", "")),
            replaced=body.get("replaced"),
            duplicate="duplicate_of" in body,
        )


@dataclass(frozen=True)
class WriteResult:
    """A delete or invalidate: ``deleted`` entries (``None`` unless ``wait="applied"``)."""

    deleted: int | None
    index: int

    @classmethod
    def parse(cls, body: Mapping[str, Any], headers: Mapping[str, str]) -> WriteResult:
        return cls(deleted=body.get("deleted"), index=int(body.get("index", 0)))


@dataclass(frozen=True)
class EntryPage:
    entries: tuple[Entry, ...]
    next_cursor: int | None

    @classmethod
    def parse(cls, body: Mapping[str, Any], headers: Mapping[str, str]) -> EntryPage:
        return cls(tuple(Entry.parse(v) for v in body["entries"]), body.get("next_cursor"))


@dataclass(frozen=True)
class Token:
    """A new tenant token: ``token`` is shown this once (the server keeps only its hash)."""

    token: str
    id: str
    role: str
    tenant: str

    @classmethod
    def parse(cls, body: Mapping[str, Any], headers: Mapping[str, str]) -> Token:
        return cls(body["token"], body["id"], body["role"], body["tenant"])
