"""``CacheClient`` against a real 3-node Raft group: writes learn the leader from a 307 and go
there; a write retried across a killed leader, with its request id, is applied exactly once."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmcache.client import CacheClient, RetryPolicy, StoreResult
from tests.cluster_process import ClusterProcess, running_cluster

# Enough to ride out an election (timeouts of 2-4 s) and a forwarded write's unknown outcome.
PATIENT = RetryPolicy(attempts=40, base_s=0.05, cap_s=1.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    with running_cluster(Path(tmp_path_factory.mktemp("client-cluster"))) as group:
        yield group


def test_writes_follow_the_leader_hint(cluster: ClusterProcess) -> None:
    leader = cluster.leader()
    follower = cluster.followers()[0]
    with CacheClient([follower.url], retry=PATIENT) as client:
        stored = client.store(key="hinted", response="v")
        assert stored.id is not None
        assert client.protocol.nodes.leader == leader.url  # learnt from the 307
        found = client.lookup(key="hinted", consistency="linearizable")
        assert found.entry is not None and found.entry.id == stored.id


def test_writes_across_a_killed_leader_apply_exactly_once(cluster: ClusterProcess) -> None:
    leader = cluster.leader()
    survivors = [n for n in cluster.nodes if n is not leader]
    ns = f"kill-{uuid.uuid4().hex[:8]}"
    results: list[StoreResult] = []
    failures: list[BaseException] = []
    started = threading.Event()

    def writer() -> None:
        urls = [leader.url] + [n.url for n in survivors]
        with CacheClient(urls, retry=PATIENT, timeout=5.0) as client:
            try:
                for i in range(30):
                    results.append(client.store(key=f"w{i}", response=str(i), namespace=ns))
                    if i == 4:
                        started.set()
            except BaseException as exc:  # reported by the test thread
                failures.append(exc)
                started.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert started.wait(60)
    cluster.crash(leader)
    thread.join(120)
    assert not thread.is_alive() and not failures, failures
    assert len(results) == 30 and all(r.replaced is None for r in results)

    # A write whose answer was lost, retried with its request id on the new leader.
    with CacheClient([n.url for n in survivors], retry=PATIENT) as client:
        again = client.store(key="w7", response="7", namespace=ns, request_id=results[7].request_id)
        assert again.duplicate and again.id == results[7].id
        deadline = time.monotonic() + 30
        listed = []
        while time.monotonic() < deadline:
            listed = list(client.iter_entries(namespace=ns))
            if len(listed) == 30:
                break
            time.sleep(0.2)
    ids = sorted(e.id for e in listed)
    # One entry per key, each the one its writer was told about, and no id skipped: a write
    # applied twice would have drawn a second id and replaced the first.
    assert {e.key: e.id for e in listed} == {f"w{i}": r.id for i, r in enumerate(results)}
    assert ids == list(range(ids[0], ids[0] + 30))
