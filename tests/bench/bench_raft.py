"""Replicated proposals through raft-core's IPC: proposals/s and latency, 1 or 3 nodes.

    python tests/bench/bench_raft.py [--nodes 3] [--n 3000] [--concurrency 64] [--no-fsync]

Starts its own raft-core processes (``python -m llmcache.cluster.raft_core``) on free loopback
ports in a temporary directory, proposes ``--n`` 1 KB exact-only ``Put`` commands to the leader
through :class:`~llmcache.cluster.ipc.IpcProposer` with ``wait="applied"``, and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmcache.cluster import commands as c
from llmcache.cluster.ipc import IpcProposer

PASSWORD_ENV = "LLMCACHE_BENCH_RAFT_PASSWORD"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def leader_socket(sockets: list[Path], deadline: float) -> Path:
    while time.monotonic() < deadline:
        for path in sockets:
            try:
                proposer = IpcProposer(path)
                status = await proposer.status()
                await proposer.close()
            except Exception:
                continue
            if status.role == "leader" and status.ready:
                return path
        await asyncio.sleep(0.2)
    raise SystemExit("no ready leader")


async def run(args: argparse.Namespace, root: Path) -> dict[str, float]:
    ports = free_ports(args.nodes)
    procs, sockets = [], []
    env = {**os.environ, PASSWORD_ENV: "bench-secret"}
    for i, port in enumerate(ports):
        sock = root / f"n{i}.sock"
        cmd = [
            sys.executable,
            "-m",
            "llmcache.cluster.raft_core",
            "--data-dir",
            str(root / f"n{i}"),
            "--socket",
            str(sock),
            "--self",
            f"127.0.0.1:{port}",
            "--password-env",
            PASSWORD_ENV,
        ]
        cmd += [a for p in ports if p != port for a in ("--peer", f"127.0.0.1:{p}")]
        if args.no_fsync:
            cmd.append("--no-fsync")
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL))
        sockets.append(sock)
    try:
        proposer = IpcProposer(await leader_socket(sockets, time.monotonic() + 60))
        latencies: list[float] = []
        queue = list(range(args.n))

        async def client() -> None:
            while queue:
                i = queue.pop()
                put = c.Put(
                    tenant="default",
                    namespace="bench",
                    scope="kv",
                    kind="kv",
                    key=f"k{i}",
                    exact_key=hashlib.sha256(b"%d" % i).digest(),
                    response=os.urandom(512).hex().encode(),
                    request_id=f"b{i}",
                )
                started = time.perf_counter()
                await proposer.propose(put, wait="applied")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        await proposer.close()
        latencies.sort()
        return {
            "proposals_per_s": args.n / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        }
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    load = os.getloadavg()
    print(
        f"nodes={args.nodes} fsync={not args.no_fsync} n={args.n} concurrency={args.concurrency}: "
        f"{result['proposals_per_s']:,.0f} proposals/s, p50 {result['p50_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms (load {load[0]:.1f})"
    )


if __name__ == "__main__":
    main()
