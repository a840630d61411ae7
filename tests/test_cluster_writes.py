"""Writes on any node and read consistency levels, on three real ``llmcache-node`` processes.

One Raft group serves the whole module (starting it dominates the cost); the last test kills
the leader, so it runs last.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from llmcache.cluster import commands
from llmcache.node import forwarding
from llmcache.node.consistency import Reads
from llmcache.node.local import LocalCache
from llmcache.node.proposer import LocalProposer
from tests.cluster_process import ClusterProcess, running_cluster
from tests.node_process import NodeProcess

POLL_DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    with running_cluster(Path(tmp_path_factory.mktemp("cluster"))) as group:
        yield group


def store(
    node: NodeProcess, key: str, response: str, **extra: Any
) -> tuple[int, dict[str, str], Any]:
    return node.request("POST", "/v1/cache/store", {"key": key, "response": response, **extra})


def lookup(node: NodeProcess, key: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    return node.request("POST", "/v1/cache/lookup", {"key": key, **extra})


def kv_entries(node: NodeProcess, key: str) -> list[dict[str, Any]]:
    code, _, body = node.request("GET", "/v1/cache/entries?kind=kv&limit=1000")
    assert code == 200, body
    return [e for e in body["entries"] if e["key"] == key]


def test_a_write_on_a_follower_is_readable_on_all_three(cluster: ClusterProcess) -> None:
    leader = cluster.leader()
    writer, other = cluster.followers()
    code, headers, body = store(writer, "k-follower", "from a follower")
    assert code == 201, body
    assert headers["X-LLMCache-Leader"] == cluster.raft_address(leader)
    assert (
        headers["X-LLMCache-Index"] == str(body["index"]) and int(headers["X-LLMCache-Term"]) >= 1
    )
    # wait="applied" on the node written to: read-your-writes there, no polling.
    code, headers, found = lookup(writer, "k-follower")
    assert found["status"] == "HIT" and found["entry"]["response"] == "from a follower"
    assert int(headers["X-LLMCache-Index"]) >= body["index"]
    # Linearizable on another node sees the acknowledged write at once.
    code, _, found = lookup(other, "k-follower", consistency="linearizable")
    assert code == 200 and found["status"] == "HIT", found
    # Stale reads converge everywhere.
    deadline = time.monotonic() + POLL_DEADLINE_S
    pending = set(cluster.nodes)
    while pending and time.monotonic() < deadline:
        pending = {n for n in pending if lookup(n, "k-follower")[2]["status"] != "HIT"}
        time.sleep(0.1)
    assert not pending


def test_large_entries_replicate_whole(cluster: ClusterProcess) -> None:
    """Entries of 64 KB and more travel in chunks. An entry ending a few bytes short of a
    chunk boundary has the end of its pickle in one chunk more, which pysyncobj does not send
    as the last one (raft-core works around it: RaftCore._whole_large_entry). The largest
    response the API takes is 4 MB."""
    leader = cluster.leader()
    # A 128 KB response is a command a few hundred bytes longer: sweep past that in steps
    # smaller than the pickle's overhead (~30 bytes), so some command ends just under 128 KB.
    sizes = [70_000, 4 * 1024 * 1024 - 64] + [131_072 - k for k in range(0, 640, 8)]
    for i, size in enumerate(sizes):
        code, _, body = store(leader, f"large-{i}", "x" * size)
        assert code == 201, body
    for i, size in enumerate(sizes):
        code, _, found = lookup(leader, f"large-{i}", consistency="linearizable")
        assert len(found["entry"]["response"]) == size
    deadline = time.monotonic() + POLL_DEADLINE_S
    states = [cluster.store_state(n) for n in cluster.nodes]
    while len(set(states)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        states = [cluster.store_state(n) for n in cluster.nodes]
    assert len(set(states)) == 1, states
    assert not [n for n in cluster.nodes if "pickle data was truncated" in n.log()]


def test_redirect_gives_307_to_the_leader(cluster: ClusterProcess) -> None:
    leader = cluster.leader()
    follower = cluster.followers()[0]
    path = "/v1/cache/store?redirect=1"
    code, headers, _ = follower.request("POST", path, {"key": "k-redirect", "response": "r"})
    assert code == 307
    assert headers["Location"] == leader.url + path
    assert headers["X-LLMCache-Leader"] == cluster.raft_address(leader)
    assert kv_entries(leader, "k-redirect") == []  # the follower proposed nothing
    code, _, body = leader.request("POST", path, {"key": "k-redirect", "response": "r"})
    assert code == 201, body  # the leader takes ?redirect=1 writes itself

    code, headers, _ = follower.request(
        "POST", "/v1/cache/lookup?redirect=1", {"key": "k-redirect", "consistency": "leader"}
    )
    assert code == 307 and headers["Location"] == leader.url + "/v1/cache/lookup?redirect=1"
    # Without redirect a leader read is forwarded, whatever this follower has applied.
    code, headers, found = lookup(follower, "k-redirect", consistency="leader")
    assert code == 200 and found["status"] == "HIT", found
    assert headers["X-LLMCache-Leader"] == cluster.raft_address(leader)


def test_a_retried_request_id_makes_one_entry(cluster: ClusterProcess) -> None:
    leader = cluster.leader()
    follower = cluster.followers()[0]
    request_id = uuid.uuid4().hex
    answers = [
        store(node, "k-retry", "once", request_id=request_id)
        for node in (follower, follower, leader)
    ]
    assert {a[0] for a in answers} == {201}, answers
    assert len({a[2]["id"] for a in answers}) == 1
    assert len(kv_entries(leader, "k-retry")) == 1
    code, _, _ = lookup(follower, "k-retry", consistency="linearizable")
    assert code == 200
    assert len(kv_entries(follower, "k-retry")) == 1


def test_a_follower_takes_writes_for_a_tenant_it_has_not_applied_yet(
    cluster: ClusterProcess,
) -> None:
    leader, follower = cluster.leader(), cluster.followers()[0]
    match = re.search(r"started raft-core \(pid (\d+)\)", follower.log())
    assert match, follower.log()
    core = int(match[1])  # the follower's raft-core, started by our node
    os.kill(core, signal.SIGSTOP)  # the follower cannot learn of the new tenant
    try:
        code, _, body = leader.request("POST", "/v1/tenants", {"tenant": "fresh"})
        assert code in (200, 201), body
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(store, follower, "k-fresh", "r", tenant="fresh")
            time.sleep(0.5)  # the request is in the follower, which does not know "fresh"
            os.kill(core, signal.SIGCONT)
            code, _, body = answer.result(timeout=60)
    finally:
        os.kill(core, signal.SIGCONT)
    assert code == 201, body
    code, _, body = store(follower, "k-none", "r", tenant="never-created")
    assert code == 404 and body["error"]["code"] == "unknown_tenant"


def test_min_index_reads_your_writes_across_nodes(cluster: ClusterProcess) -> None:
    writer, reader = cluster.followers()
    code, headers, body = store(writer, "k-min", "mine", wait="committed")
    assert code == 201, body
    index = int(headers["X-LLMCache-Index"])
    code, headers, found = lookup(reader, "k-min", min_index=index)
    assert code == 200 and found["status"] == "HIT", found
    assert int(headers["X-LLMCache-Index"]) >= index
    code, _, error = lookup(reader, "k-min", min_index=index + 10**9)
    assert code == 503 and error["error"]["code"] == "stale_read"
    assert error["error"]["field"] == "min_index"


def test_concurrent_linearizable_reads_share_barriers(cluster: ClusterProcess) -> None:
    follower = cluster.followers()[0]
    readers = 24
    before = cluster.status(follower)["commit_index"]
    with concurrent.futures.ThreadPoolExecutor(readers) as pool:
        answers = list(
            pool.map(
                lambda _: lookup(follower, "k-none", consistency="linearizable"), range(readers)
            )
        )
    assert {a[0] for a in answers} == {200}
    barriers = int(answers[-1][1]["X-LLMCache-Index"]) - before
    assert 1 <= barriers < readers


def test_peer_auth_refuses_forged_internal_requests(cluster: ClusterProcess) -> None:
    leader = cluster.leader()
    key = forwarding.peer_key(cluster.password)
    noop = commands.encode(commands.Noop())
    fresh = _internal_body(noop, time.time())
    assert _post_raw(leader, fresh, None) == 401
    assert _post_raw(leader, fresh, "00" * 32) == 401
    assert _post_raw(leader, fresh, forwarding.sign(forwarding.peer_key("wrong"), fresh)) == 401
    tampered = _internal_body(noop, time.time() + 1)
    assert _post_raw(leader, tampered, forwarding.sign(key, fresh)) == 401
    old = _internal_body(noop, time.time() - 3600)
    assert _post_raw(leader, old, forwarding.sign(key, old)) == 403
    assert _post_raw(leader, fresh, forwarding.sign(key, fresh)) == 200
    # The route is internal: not in the public API document.
    _, _, document = leader.request("GET", "/openapi.json")
    assert forwarding.INTERNAL_PROPOSE not in document["paths"]


def _internal_body(data: bytes, ts: float) -> bytes:
    message = {"data": data, "wait": "applied", "timeout": 10.0, "ts_ms": int(ts * 1000)}
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def _post_raw(node: NodeProcess, body: bytes, mac: str | None) -> int:
    req = urllib.request.Request(node.url + forwarding.INTERNAL_PROPOSE, data=body, method="POST")
    req.add_header("Content-Type", "application/msgpack")
    if mac is not None:
        req.add_header(forwarding.AUTH_HEADER, mac)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status: int = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    return status


def test_max_staleness_refuses_once_the_leader_is_gone(cluster: ClusterProcess) -> None:
    """Runs last: it kills the leader."""
    follower = cluster.followers()[0]
    code, _, found = lookup(follower, "k-follower", max_staleness_ms=60_000)
    assert code == 200 and found["status"] == "HIT", found
    cluster.leader().kill()
    # With the leader gone this follower is not caught up; the bound it last met is behind it.
    deadline = time.monotonic() + POLL_DEADLINE_S
    refused: dict[str, Any] = {}
    while time.monotonic() < deadline and not refused:
        code, _, answer = lookup(follower, "k-follower", max_staleness_ms=0)
        refused = answer if code == 503 else {}
        time.sleep(0.05)
    assert refused["error"]["code"] == "stale_read", refused
    assert refused["error"]["field"] == "max_staleness_ms"
    # Writes resume under a new leader; retrying 503s with one request id makes one entry.
    request_id = uuid.uuid4().hex
    deadline = time.monotonic() + POLL_DEADLINE_S
    answers: list[tuple[int, dict[str, str], Any]] = []
    while time.monotonic() < deadline and not (answers and answers[-1][0] == 201):
        answers.append(store(follower, "k-failover", "after", request_id=request_id))
        assert answers[-1][0] in (201, 503), answers[-1]
        if answers[-1][0] == 503:
            assert answers[-1][1]["Retry-After"]
            time.sleep(0.2)
    assert answers[-1][0] == 201, answers[-1]
    again = store(follower, "k-failover", "after", request_id=request_id)
    assert again[0] == 201 and again[2]["id"] == answers[-1][2]["id"]
    assert len(kv_entries(follower, "k-failover")) == 1


def test_a_reader_arriving_during_a_barrier_waits_for_the_next_one(tmp_path: Path) -> None:
    """In process, over a real LocalCache: deterministic about which barrier a reader gets."""

    async def scenario(cache: LocalCache) -> None:
        reads = Reads(LocalProposer(cache), cache.store)
        first = asyncio.create_task(reads.linearizable())
        await asyncio.sleep(0)  # its barrier is now in flight
        later = [asyncio.create_task(reads.linearizable()) for _ in range(5)]
        first_index, later_indexes = await first, await asyncio.gather(*later)
        assert len(set(later_indexes)) == 1 and later_indexes[0] > first_index
        assert reads.barrier.rounds == 2
        assert await reads.linearizable() > later_indexes[0]  # idle: a fresh barrier

    with LocalCache(tmp_path / "cache", embedders={}) as cache:
        asyncio.run(scenario(cache))
