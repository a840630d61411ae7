"""Learned thresholds are replicated: feedback sent to any node of a real 3-node Raft group
teaches every node the same threshold (the label histogram travels in the log)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cluster_process import ClusterProcess, running_cluster
from tests.conftest import unit_vector
from tests.node_process import NodeProcess


def at_similarity(seed: str, s: float) -> list[float]:
    v = unit_vector(seed)
    u = unit_vector(seed + "/other")
    u = u - float(np.dot(u, v)) * v
    u /= np.linalg.norm(u)
    return [float(x) for x in s * v + np.sqrt(1 - s * s) * u]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    with running_cluster(Path(tmp_path_factory.mktemp("quality-cluster"))) as group:
        yield group


def call(node: NodeProcess, method: str, path: str, body: Any) -> Any:
    code, _, answer = node.request(method, path, body)
    assert 200 <= code < 300, (code, answer)
    return answer


def test_feedback_on_any_node_teaches_every_node(cluster: ClusterProcess) -> None:
    nodes = cluster.nodes
    settings = {
        "embedder": "supplied",
        "threshold": 0.97,
        "adaptive_delta": 0.1,
        "adaptive_bound": "hits",
    }
    call(nodes[1], "PUT", "/v1/tenants/default/settings", {"namespace": "q", "values": settings})
    entry = call(
        nodes[1],
        "POST",
        "/v1/cache/store",
        {
            "namespace": "q",
            "text": "reset password",
            "vector": [float(x) for x in unit_vector("pw")],
            "response": "ok",
            "wait": "applied",
        },
    )
    query = {"namespace": "q", "text": "password reset", "vector": at_similarity("pw", 0.93)}
    before = call(nodes[2], "POST", "/v1/cache/lookup", {**query, "min_index": entry["index"]})
    assert before["status"] == "MISS" and before["threshold"] == 0.97
    index = 0
    for i in range(40):  # judged correct between 0.92 and 0.96, sent to every node in turn
        answer = call(
            nodes[i % 3],
            "POST",
            "/v1/cache/feedback",
            {
                "entry_id": entry["id"],
                "label": "correct",
                "similarity": 0.92 + 0.001 * i,
                "wait": "applied",
            },
        )
        index = max(index, answer["index"])
    for node in nodes:
        after = call(node, "POST", "/v1/cache/lookup", {**query, "min_index": index})
        assert after["status"] == "SEMANTIC_HIT", node.url
        assert after["threshold"] == pytest.approx(0.92)
