"""Answer quality over HTTP: guards and a learned threshold through the real aiohttp app, with
settings and feedback sent to the API and the quality metrics read back from /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmcache.node.local import LocalCache
from tests.conftest import unit_vector
from tests.test_api import Served, _vector_cache, metric, store_text


def at_similarity(seed: str, s: float) -> list[float]:
    v = unit_vector(seed)
    u = unit_vector(seed + "/other")
    u = u - float(np.dot(u, v)) * v
    u /= np.linalg.norm(u)
    return [float(x) for x in s * v + np.sqrt(1 - s * s) * u]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Served]:
    cache: LocalCache = _vector_cache(tmp_path / "cache")
    with Served(cache) as served:
        yield served
    cache.close(checkpoint=False)


def lookup(node: Served, text: str, vector: list[float]) -> dict[str, object]:
    reply = node.call(
        "POST", "/v1/cache/lookup", {"namespace": "q", "text": text, "vector": vector}
    )
    assert reply.status == 200, reply.body
    body: dict[str, object] = reply.body
    return body


def test_guard_vetoes_a_look_alike_and_counts_it(node: Served) -> None:
    entry = store_text(
        node, "How do I enable 2FA?", [float(x) for x in unit_vector("2fa")], namespace="q"
    )
    before = metric(node, "llmcache_guard_rejections_total", tenant="default", guard="negation")
    body = lookup(node, "How do I disable 2FA?", at_similarity("2fa", 0.98))
    assert body["status"] == "MISS" and body["similarity"] == pytest.approx(0.98, abs=1e-4)
    assert body["rejected"] == [{"id": entry["id"], "guard": "negation"}]
    assert body["probe"] is None
    after = metric(node, "llmcache_guard_rejections_total", tenant="default", guard="negation")
    assert after == before + 1


def test_feedback_teaches_an_adaptive_namespace_its_threshold(node: Served) -> None:
    settings = {"namespace": "q", "values": {"threshold": 0.97, "adaptive_delta": 0.1}}
    assert node.call("PUT", "/v1/tenants/default/settings", settings).status == 200
    bad = node.call(
        "PUT", "/v1/tenants/default/settings", {"namespace": "q", "values": {"guards": "x"}}
    )
    assert bad.status == 400 and bad.error["field"] == "values.guards"
    entry = store_text(node, "reset password", [float(x) for x in unit_vector("pw")], namespace="q")
    query = at_similarity("pw", 0.93)
    first = lookup(node, "password reset", query)
    assert first["status"] == "MISS" and first["threshold"] == 0.97
    assert first["probe"] == {"id": entry["id"], "similarity": pytest.approx(0.93, abs=1e-4)}
    for i in range(40):  # judged correct between 0.92 and 0.96, wrong between 0.4 and 0.8
        for label, similarity in (("correct", 0.92 + 0.001 * i), ("wrong", 0.4 + 0.01 * i)):
            reply = node.call(
                "POST",
                "/v1/cache/feedback",
                {"entry_id": entry["id"], "label": label, "similarity": similarity},
            )
            assert reply.status == 202
    learned = lookup(node, "password reset", query)
    assert learned["status"] == "SEMANTIC_HIT" and learned["threshold"] == pytest.approx(0.92)
    assert metric(node, "llmcache_estimated_precision", tenant="default", namespace="q") == 1.0
    bad = node.call(
        "PUT",
        "/v1/tenants/default/settings",
        {"namespace": "q", "values": {"adaptive_bound": "lookups"}},
    )
    assert bad.status == 400 and bad.error["field"] == "values.adaptive_bound"


def test_a_verifier_setting_is_checked_and_applied_over_http(node: Served) -> None:
    bad = node.call(
        "PUT",
        "/v1/tenants/default/settings",
        {"namespace": "q", "values": {"verifier": '{"format": 1, "weights": {}, "bias": 0}'}},
    )
    assert bad.status == 400 and bad.error["field"] == "values.verifier"
    # Accepts only pairs whose words overlap, whatever the cosine.
    overlap = '{"format":1,"weights":{"word_jaccard":40.0},"bias":-20.0,"cut":0.5}'
    settings = {"namespace": "q", "values": {"threshold": 0.8, "verifier": overlap}}
    assert node.call("PUT", "/v1/tenants/default/settings", settings).status == 200
    entry = store_text(
        node, "reset my password", [float(x) for x in unit_vector("v")], namespace="q"
    )
    hit = lookup(node, "reset my password now", at_similarity("v", 0.9))
    assert hit["status"] == "SEMANTIC_HIT"
    miss = lookup(node, "bake a chocolate cake", at_similarity("v", 0.9))
    assert miss["status"] == "MISS" and miss["rejected"] == [
        {"id": entry["id"], "guard": "verifier"}
    ]
