"""Benchmark of a 3-node ``llmcache-node`` Raft group on loopback (not collected by pytest).

    python tests/bench/bench_cluster.py [--puts 6000] [--concurrency 32] [--entries 20000]
                                        [--failovers 3] [--catch-up-writes R]
                                        [--catch-up-write-s S] [--json out.json] [--commit REV]
                                        [--msgpack]

Starts three nodes (one worker each, ``LLMCACHE_EMBEDDER=none``) in a temporary directory on
free 127.0.0.1 ports, with namespace ``vec`` of tenant ``default`` set to embedder
``supplied``, then measures:

1. **Replicated puts/s**: ``--puts`` ``POST /v1/cache/store`` of a distinct text with a 384-d
   unit vector and a 1 KB response (``wait`` applied, the default), sent to the leader by an
   aiohttp client over ``--concurrency`` keep-alive connections; bodies are encoded before the
   clock starts (JSON, or msgpack with ``--msgpack``, as ``llmcache.client`` sends). Latency
   p50/p99 per request (client side: send to full answer), and the CPU time per put of every
   process of the group and of this client, from ``/proc/PID/stat`` (steadier than puts/s on a
   shared machine).
2. **Leader failover** (``--failovers`` times): a writer posts kv entries to a follower one at
   a time; the leader's whole node is killed with SIGKILL; the gap is the time from the kill to
   the first acknowledged write after it (the writer retries 503s and connection errors with
   the same request id every 50 ms). The time until the survivors agree on a new leader is also
   printed. The killed node is restarted (and waited ready) before the next round.
3. **Snapshot catch-up**: the group is filled up to ``--entries`` vector entries (16 concurrent
   writers), a follower is killed, its data directory deleted and the node restarted; the rate
   is entries / time from the restart until ``/readyz`` answers 200 (which requires the
   snapshot installed and the log tail applied to within 100 entries) and its LMDB reaches the
   leader's applied index. Log compaction runs every 1,000 entries or 5 s, so the leader has a
   snapshot. ``--catch-up-writes R`` keeps a writer storing R kv entries/s (1 KB each) on the
   leader from the restart until the follower is ready, for at most ``--catch-up-write-s``
   seconds: under writes the leader keeps compacting, and without the compaction hold
   (cluster/compaction.py) a transfer longer than the compaction interval made the follower
   chase snapshots (``snapshots_installed`` counts the follower's installs).

``--commit REV`` runs that commit's node code (exported as in bench_http.py), so changes to
the working tree during a long run cannot mix versions (a node restarted mid-run would load
them). Prints the load average before and after. Targets (printed, not asserted): ≥ 1,500 puts/s,
failover gap ≤ 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import code_under_test

from tests.cluster_process import ClusterProcess
from tests.node_process import NodeProcess

DIM = 384
RESPONSE_BYTES = 1024
NAMESPACE = "vec"


CONTENT_TYPE = "application/json"  # --msgpack: "application/msgpack", as llmcache.client sends


def body(i: int, rng: np.random.Generator) -> bytes:
    v = rng.standard_normal(DIM).astype(np.float32)
    v /= np.linalg.norm(v)
    item = {
        "namespace": NAMESPACE,
        "text": f"bench text {i} {uuid.uuid4().hex}",
        "vector": [round(float(x), 6) for x in v],
        "response": (f"response {i} " * 200)[:RESPONSE_BYTES],
    }
    if CONTENT_TYPE == "application/msgpack":
        return bytes(msgpack.packb(item))
    return json.dumps(item).encode()


async def post_many(
    url: str, bodies: list[bytes], concurrency: int
) -> tuple[float, list[float], int]:
    """Send every body; (elapsed s, per-request latencies in s, non-201 answers)."""
    latencies: list[float] = []
    failures = 0
    queue = iter(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": CONTENT_TYPE}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            for data in queue:
                start = time.perf_counter()
                async with session.post(url, data=data, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 201:
                        failures += 1
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began, latencies, failures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(cluster: ClusterProcess) -> dict[str, float]:
    """CPU time (user + system) so far of every process of the group, as ``role name``
    (names from the supervisor's "started NAME (pid N)" log lines), and of this benchmark
    (``client``): steadier than puts/s on a shared machine."""
    tick = os.sysconf("SC_CLK_TCK")
    leader = cluster.leader()
    out: dict[str, float] = {"client": sum(os.times()[:2])}
    for i, node in enumerate(cluster.nodes):
        who = "leader" if node is leader else f"follower{i}"
        assert node.proc is not None
        pids = {"supervisor": node.proc.pid}
        pids |= {m[1]: int(m[2]) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", node.log())}
        for name, pid in pids.items():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            out[f"{who} {name}"] = (int(stat[11]) + int(stat[12])) / tick
    return out


def puts(cluster: ClusterProcess, n: int, concurrency: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    bodies = [body(seed * 10_000_000 + i, rng) for i in range(n)]
    leader = cluster.leader()
    before = cpu_seconds(cluster)
    took, lat, failures = asyncio.run(
        post_many(leader.url + "/v1/cache/store", bodies, concurrency)
    )
    after = cpu_seconds(cluster)
    per_put = {k: round((after[k] - before.get(k, 0.0)) / n * 1e6) for k in after}
    return {
        "puts": n,
        "concurrency": concurrency,
        "puts_per_s": round(n / took, 1),
        "p50_ms": round(percentile(lat, 0.5) * 1000, 2),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
        "failures": failures,
        "cpu_us_per_put": {k: v for k, v in per_put.items() if v},
        "cpu_us_per_put_total": sum(per_put.values()),
    }


def failover(cluster: ClusterProcess) -> dict[str, float]:
    leader = cluster.leader()
    writer = next(n for n in cluster.nodes if n is not leader)
    survivors = [n for n in cluster.nodes if n is not leader]
    request_id = uuid.uuid4().hex
    code, _, _ = writer.request("POST", "/v1/cache/store", {"key": "warm", "response": "x"})
    assert code == 201
    killed_at = time.monotonic()
    cluster.crash(leader)
    gap = None
    deadline = killed_at + 120
    while gap is None and time.monotonic() < deadline:
        try:
            code, _, _ = writer.request(
                "POST",
                "/v1/cache/store",
                {"key": f"failover-{request_id}", "response": "x", "request_id": request_id},
            )
        except OSError:
            code = 0
        if code == 201:
            gap = time.monotonic() - killed_at
        else:
            time.sleep(0.05)
    elected = cluster.leader(among=survivors)
    elected_s = time.monotonic() - killed_at  # an upper bound: measured after the write
    assert gap is not None, "no write succeeded within 120 s of the kill"
    assert elected is not leader
    leader.start(wait=False)
    leader.wait_ready()
    return {"write_gap_s": round(gap, 2), "agreed_leader_by_s": round(elected_s, 2)}


def fill(cluster: ClusterProcess, entries: int) -> int:
    leader = cluster.leader()
    missing = max(0, entries - count_entries(leader))
    rng = np.random.default_rng(7)
    done = 0
    while done < missing:
        chunk = min(5000, missing - done)
        bodies = [body(50_000_000 + done + i, rng) for i in range(chunk)]
        asyncio.run(post_many(leader.url + "/v1/cache/store", bodies, 16))
        done += chunk
    return count_entries(leader)


def count_entries(node: NodeProcess) -> int:
    code, _, found = node.request("GET", "/v1/tenants/default")
    assert code == 200, found
    stats: dict[str, Any] = found.get("stats", {})
    return int(stats.get("entries", 0))


class SteadyWriter:
    """A thread storing ``rate`` kv entries/s (1 KB responses) on ``node`` until stopped; a
    failed write (503 under an election, connection error) is retried after 50 ms."""

    def __init__(self, node: NodeProcess, rate: float) -> None:
        self.node = node
        self.rate = rate
        self.acked = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyWriter:
        if self.rate > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(60)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            request = {"key": f"steady-{uuid.uuid4().hex}", "response": "x" * RESPONSE_BYTES}
            try:
                code, _, _ = self.node.request("POST", "/v1/cache/store", request)
            except OSError:
                code = 0
            if code != 201:
                time.sleep(0.05)
                continue
            self.acked += 1
            next_at += 1 / self.rate
            time.sleep(max(0.0, next_at - time.monotonic()))


def catch_up(
    cluster: ClusterProcess, writes_per_s: float = 0.0, write_s: float = 300.0
) -> dict[str, Any]:
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    cluster.crash(follower)
    shutil.rmtree(follower.data_dir)
    seen, seen_leader = len(follower.log()), len(leader.log())
    started = time.monotonic()
    with SteadyWriter(leader, writes_per_s) as writer:
        follower.start(wait=False)
        if writes_per_s > 0:  # writes go on until the follower is ready, or for write_s
            with contextlib.suppress(AssertionError):  # not ready yet: the writes stop
                follower.wait_ready(within_s=write_s)
        writes_s = time.monotonic() - started
    follower.wait_ready(within_s=1800)
    ready_s = time.monotonic() - started
    # The leader's LMDB, not its commit index: a leader change during the catch-up ends the log
    # with pysyncobj's own no-op, which never reaches the store (the wait ran to its deadline).
    target, _ = cluster.store_state(leader)
    deadline = started + 1800
    applied = 0
    while applied < target and time.monotonic() < deadline:
        applied, _ = cluster.store_state(follower)
        time.sleep(0.2)
    applied_s = time.monotonic() - started
    snapshot_bytes = sum(
        p.stat().st_size for p in (leader.data_dir / "raft").rglob("*") if p.is_file()
    )
    installed = follower.log()[seen:].count("installed snapshot at applied index")
    # A follower that campaigns during its catch-up deposes the leader (a higher term).
    campaigns = follower.log()[seen:].count("-> candidate")
    leader_stepped_down = leader.log()[seen_leader:].count("raft role leader ->")
    return {
        "entries": count_entries(leader),
        "ready_s": round(ready_s, 2),
        "applied_s": round(applied_s, 2),
        "entries_per_s": round(count_entries(leader) / applied_s, 1),
        "by_snapshot": installed > 0,
        "snapshots_installed": installed,
        "follower_campaigns": campaigns,
        "leader_stepped_down": leader_stepped_down,
        "writes_during": writer.acked,
        "writes_for_s": round(writes_s, 1),
        "ready_while_writing": writes_per_s > 0 and ready_s <= writes_s + 1,
        "leader_raft_dir_mb": round(snapshot_bytes / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument(
        "--catch-up-writes", type=float, default=0.0, help="kv writes/s during the catch-up"
    )
    parser.add_argument(
        "--catch-up-write-s", type=float, default=300.0, help="longest the writes go on"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--commit", help="run the node code of this git commit (exported)")
    parser.add_argument("--msgpack", action="store_true", help="send msgpack bodies, not JSON")
    args = parser.parse_args()
    if args.msgpack:
        global CONTENT_TYPE
        CONTENT_TYPE = "application/msgpack"
    results: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    env = {
        "LLMCACHE_LOG_COMPACTION_MIN_ENTRIES": "1000",
        "LLMCACHE_LOG_COMPACTION_MIN_TIME_S": "5",
    }
    source, results["code"] = code_under_test(args.commit, root)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(source), os.environ.get("PYTHONPATH")) if p
        )
    print("code:", results["code"], flush=True)
    cluster = ClusterProcess(root, env=env)
    try:
        cluster.start()
        leader = cluster.leader()
        code, _, answer = leader.request(
            "PUT",
            "/v1/tenants/default/settings",
            {"namespace": NAMESPACE, "values": {"embedder": "supplied"}},
        )
        assert code == 200, answer
        puts(cluster, 200, args.concurrency, seed=1)  # warm-up: connections, first scope
        results["puts"] = puts(cluster, args.puts, args.concurrency, seed=2)
        print("replicated puts:", results["puts"], flush=True)
        results["failover"] = [failover(cluster) for _ in range(args.failovers)]
        print("failover:", results["failover"], flush=True)
        if args.entries:
            fill(cluster, args.entries)
            results["catch_up"] = catch_up(cluster, args.catch_up_writes, args.catch_up_write_s)
            print("snapshot catch-up:", results["catch_up"], flush=True)
    finally:
        for node in cluster.nodes:
            cluster.crash(node)
        shutil.rmtree(root, ignore_errors=True)
    results["loadavg_after"] = os.getloadavg()
    gaps = [f["write_gap_s"] for f in results["failover"]] or [float("nan")]
    print(f"load average before {results['loadavg_before']}, after {results['loadavg_after']}")
    print(
        f"targets: puts/s {results['puts']['puts_per_s']:,.0f} (target >= 1,500); failover "
        f"write gap median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s (target <= 5 s)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
