"""Hypothesis strategies for log commands, shared by the codec and state-machine tests."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import strategies as st

from llmcache.cluster import commands as c

DIM = 4
TENANTS = st.sampled_from(["t1", "t2"])
NAMESPACES = st.sampled_from(["ns1", "ns2"])
TAGS = st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True).map(tuple)
IDS = st.lists(st.integers(1, 40), max_size=5).map(tuple)
TEXT = st.text(min_size=1, max_size=20)


@st.composite
def vectors(draw: st.DrawFn) -> bytes:
    raw = draw(st.lists(st.integers(-8, 8), min_size=DIM, max_size=DIM).filter(any))
    v = np.array(raw, dtype=np.float32)
    return (v / np.linalg.norm(v)).astype("<f4").tobytes()


@st.composite
def puts(draw: st.DrawFn) -> c.Put:
    kind = draw(st.sampled_from(["prompt", "kv"]))
    text = draw(st.sampled_from(["q1", "q2", "q3", "q4"]))
    tenant, namespace = draw(TENANTS), draw(NAMESPACES)
    common = {
        "tenant": tenant,
        "namespace": namespace,
        "exact_key": hashlib.sha256(f"{tenant}{namespace}{kind}{text}".encode()).digest(),
        "response": draw(st.binary(max_size=16)),
        "created_at_ms": 1_000,
        "expires_at_ms": draw(st.sampled_from([0, 500, 5_000])),
        "tags": draw(TAGS),
        "request_id": draw(st.sampled_from(["", "", "r1", "r2", "r3"])),
        "ts_ms": 1_000,
    }
    if kind == "kv":
        return c.Put(kind="kv", scope="kv", key=f"k/{text}", **common)
    return c.Put(
        kind="prompt",
        scope=draw(st.sampled_from(["s1", "s2"])),
        text=text,
        prompt=text,
        vector=draw(vectors()),
        embedder="e",
        dim=DIM,
        usage={"total_tokens": draw(st.integers(0, 100))},
        **common,
    )


@st.composite
def invalidations(draw: st.DrawFn) -> c.Invalidate:
    cmd = c.Invalidate(
        tenant=draw(TENANTS),
        namespace=draw(st.sampled_from(["", "ns1", "ns2"])),
        tags=draw(TAGS),
        key_prefix=draw(st.sampled_from(["", "k/", "k/q1"])),
        ids=draw(IDS),
    )
    return cmd if not cmd.is_empty() else c.Invalidate(tenant=cmd.tenant, namespace="ns1")


@st.composite
def touches(draw: st.DrawFn) -> c.Touch:
    rows = draw(
        st.lists(
            st.tuples(st.integers(1, 40), st.integers(0, 3), st.sampled_from([0, 900, 2_000])),
            max_size=5,
        )
    )
    return c.Touch(
        ids=tuple(r[0] for r in rows),
        hits=tuple(r[1] for r in rows),
        last_hit_ms=tuple(r[2] for r in rows),
        request_id=draw(st.sampled_from(["", "t1"])),
    )


COMMANDS: st.SearchStrategy[c.Command] = st.one_of(
    puts(),
    puts(),
    puts(),
    invalidations(),
    st.builds(c.Delete, tenant=TENANTS, ids=IDS),
    st.builds(c.Expire, ids=IDS, ts_ms=st.sampled_from([0, 1_000, 10_000])),
    st.builds(c.Evict, ids=IDS),
    st.builds(c.TenantUpsert, tenant=TENANTS, config=st.just({"max_entries": 10})),
    st.builds(c.TenantDelete, tenant=TENANTS),
    st.builds(
        c.ConfigSet,
        tenant=st.sampled_from(["", "t1"]),
        values=st.dictionaries(
            st.sampled_from(["threshold", "ttl_s"]), st.none() | st.integers(0, 1), max_size=2
        ),
    ),
    st.builds(c.Noop),
    touches(),
    st.builds(
        c.Advertise,
        address=st.sampled_from(["10.0.0.1:7000", "10.0.0.2:7000"]),
        http_url=st.sampled_from(["http://a:8080", "https://b:8443"]),
    ),
    st.builds(
        c.Feedback,
        tenant=TENANTS,
        entry_id=st.integers(1, 40),
        label=st.sampled_from(["correct", "wrong"]),
        similarity=st.sampled_from([-1.0, 0.5, 0.93]),
        query=TEXT,
    ),
)
