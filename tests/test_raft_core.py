"""raft-core as real processes on 127.0.0.1: a group of one, restarts, a 3-node group, snapshots.

The helpers here (:class:`RaftProcess`, the ``spawn`` fixture) are shared with test_ipc.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import lmdb
import pytest

from llmcache.cluster import commands as c
from llmcache.cluster import snapshot
from llmcache.cluster.fsm import StateMachine
from llmcache.cluster.ipc import IpcProposer
from llmcache.cluster.raft_core import RaftCipher, RaftCore, RaftCoreOptions
from llmcache.node.errors import RaftUnavailable
from llmcache.node.proposer import NotLeader, RaftStatus
from llmcache.node.store import Store
from tests.test_snapshot import RAFT_STATE, filled_store

PASSWORD_ENV = "LLMCACHE_TEST_RAFT_PASSWORD"
DEADLINE_S = 40.0
T = TypeVar("T")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RaftProcess:
    """One ``python -m llmcache.cluster.raft_core`` child with its own dir, port and socket."""

    def __init__(self, root: Path, port: int, peers: list[int], extra: list[str]) -> None:
        self.password = "test-cluster-secret"
        self.root = root
        self.port = port
        self.peers = peers
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sock(self) -> Path:
        return self.root / "raft.sock"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "stderr.log"

    def start(self) -> RaftProcess:
        assert self.proc is None or self.proc.poll() is not None
        args = [sys.executable, "-m", "llmcache.cluster.raft_core"]
        args += ["--data-dir", str(self.data), "--socket", str(self.sock), "--self", self.address]
        for peer in self.peers:
            args += ["--peer", f"127.0.0.1:{peer}"]
        if self.peers:
            args += ["--password-env", PASSWORD_ENV]
        timeouts = ["1.0", "2.0"] if self.peers else ["0.4", "0.8"]
        args += ["--election-timeout", *timeouts, "--no-fsync", *self.extra]
        env = {**os.environ, PASSWORD_ENV: self.password}
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(args, stderr=err, env=env)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def store_state(self) -> tuple[int, str] | None:
        """(applied index, digest) of this node's LMDB, or None while it cannot be opened."""
        try:
            with Store(self.data / "store", readonly=True) as store:
                return store.applied_index(), store.digest()
        except lmdb.Error:
            return None

    def has_tenant(self, tenant: str) -> bool:
        try:
            with Store(self.data / "store", readonly=True) as store, store.read() as txn:
                return store.tenant(txn, tenant) is not None
        except lmdb.Error:
            return False


@pytest.fixture(name="spawn")
def spawn_fixture(tmp_path: Path) -> Iterator[Callable[..., list[RaftProcess]]]:
    """``spawn(n, extra=[...])`` starts a group of ``n`` raft-core processes; all are killed at
    teardown (by their own PIDs)."""
    started: list[RaftProcess] = []

    def make(
        n: int, extra: list[str] | None = None, passwords: list[str] | None = None
    ) -> list[RaftProcess]:
        ports = free_ports(n)
        nodes = [
            RaftProcess(tmp_path / f"n{i}", port, [p for p in ports if p != port], extra or [])
            for i, port in enumerate(ports)
        ]
        for node, password in zip(nodes, passwords or [], strict=False):
            node.password = password
        started.extend(nodes)
        return [node.start() for node in nodes]

    yield make
    for node in started:
        node.kill()


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll ``check`` until it returns something other than None/False (bounded)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = await check()
        if value is not None and value is not False:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_leader(nodes: list[RaftProcess]) -> tuple[RaftProcess, list[RaftStatus]]:
    """The node every one of ``nodes`` names as leader, once all are ready."""
    proposers = [IpcProposer(n.sock, connect_timeout=2.0) for n in nodes]

    async def agreed() -> tuple[RaftProcess, list[RaftStatus]] | None:
        try:
            statuses = [await p.status() for p in proposers]
        except RaftUnavailable:
            return None
        leaders = {s.leader for s in statuses}
        if len(leaders) != 1 or not all(s.ready for s in statuses):
            return None
        leader = next(n for n in nodes if n.address in leaders)
        return leader, statuses

    try:
        return await eventually(agreed, "an agreed leader")
    finally:
        for p in proposers:
            await p.close()


def kv_put(i: int, tenant: str = "default") -> c.Put:
    return c.Put(
        tenant=tenant,
        namespace="ns",
        scope="s",
        exact_key=hashlib.sha256(f"key{i}".encode()).digest(),
        kind="kv",
        key=f"key{i}",
        response=f"value {i}".encode(),
        request_id=f"req-{i}",
    )


async def wait_default_tenant(node: RaftProcess) -> None:
    async def present() -> bool:
        return node.has_tenant("default")

    await eventually(present, "the bootstrapped default tenant")


async def converged(nodes: list[RaftProcess]) -> tuple[int, str]:
    """Wait until every node's LMDB has the same digest; returns (applied, digest)."""

    async def same() -> tuple[int, str] | None:
        states = {n.store_state() for n in nodes}
        if len(states) == 1 and None not in states:
            return states.pop()
        return None

    return await eventually(same, "equal store digests")


# -- a group of one ----------------------------------------------------------------------------


def test_single_node_applies_proposals_and_a_restart_does_not_reapply(
    spawn: Callable[..., list[RaftProcess]],
) -> None:
    (node,) = spawn(1)

    async def first_run() -> int:
        await wait_leader([node])
        await wait_default_tenant(node)
        proposer = IpcProposer(node.sock)
        try:
            applied = [await proposer.propose(kv_put(i)) for i in range(10)]
            committed = await proposer.propose(kv_put(10), wait="committed")
            queued = await proposer.propose(kv_put(11), wait="none")
            status = await proposer.status()
        finally:
            await proposer.close()
        assert all(p.result is not None and p.result.ok for p in applied)
        assert [p.index for p in applied] == sorted({p.index for p in applied})
        assert committed.result is None and committed.index > applied[-1].index
        assert queued.index == 0  # handed to the log; its index is not known yet
        assert status.role == "leader" and status.leader == node.address and status.has_quorum
        return committed.index

    last = asyncio.run(first_run())
    (port,) = free_ports(1)
    twin_args = ["--data-dir", str(node.data), "--socket", str(node.root / "twin.sock")]
    twin = run_cli([*twin_args, "--self", f"127.0.0.1:{port}"])
    assert twin.returncode == 1 and "another raft-core holds" in twin.stderr

    async def all_applied() -> bool:
        state = node.store_state()
        return state is not None and state[0] > last

    asyncio.run(eventually(all_applied, "the wait=none proposal applied"))
    with Store(node.data / "store", readonly=True) as store, store.read() as txn:
        ids = [store.key_id(txn, "default", "ns", f"key{i}") for i in range(12)]
        assert None not in ids
        entry = store.entry(txn, ids[3])  # type: ignore[arg-type]
        assert entry is not None and entry.response == b"value 3"

    assert node.stop() == 0
    before = node.store_state()
    assert before is not None
    node.start()

    async def second_run() -> None:
        _, (status,) = await wait_leader([node])
        # Replaying the journal after the restart changed nothing in the store.
        assert status.applied_index == before[0]
        assert node.store_state() == before
        proposer = IpcProposer(node.sock)
        try:
            again = await proposer.propose(kv_put(0))  # same request id: answered, not re-applied
            fresh = await proposer.propose(kv_put(100))
        finally:
            await proposer.close()
        assert again.result is not None and "duplicate_of" in again.result.value
        assert fresh.index > before[0]

    asyncio.run(second_run())
    assert node.stop() == 0


# -- a group of three -------------------------------------------------------------------------


def test_three_nodes_replicate_redirect_and_hand_over_on_sigterm(
    spawn: Callable[..., list[RaftProcess]],
) -> None:
    nodes = spawn(3)

    async def scenario() -> RaftProcess:
        leader, statuses = await wait_leader(nodes)
        assert all(s.has_quorum for s in statuses)
        leader_status = next(s for s in statuses if s.node_id == leader.address)
        assert leader_status.leader_contact_ms == 0
        # Followers hear the leader's heartbeats every 0.1 s: far below an election timeout.
        contacts = [s.leader_contact_ms for s in statuses if s is not leader_status]
        assert all(c is not None and c < 1500 for c in contacts), contacts
        assert set(leader_status.peers) == {n.address for n in nodes if n is not leader}
        assert all(p["connected"] for p in leader_status.peers.values())
        await wait_default_tenant(leader)
        proposer = IpcProposer(leader.sock)
        try:
            results = await asyncio.gather(*(proposer.propose(kv_put(i)) for i in range(30)))
        finally:
            await proposer.close()
        assert all(p.result is not None and p.result.ok for p in results)
        assert len({p.index for p in results}) == 30

        follower = next(n for n in nodes if n is not leader)
        via_follower = IpcProposer(follower.sock)
        try:
            with pytest.raises(NotLeader) as info:
                await via_follower.propose(kv_put(99))
        finally:
            await via_follower.close()
        assert info.value.leader == leader.address
        await converged(nodes)
        return leader

    leader = asyncio.run(scenario())

    assert leader.stop() == 0
    assert "handed leadership to" in leader.stderr()
    rest = [n for n in nodes if n is not leader]

    async def after() -> None:
        new_leader, _ = await wait_leader(rest)
        assert new_leader is not leader
        proposer = IpcProposer(new_leader.sock)
        try:
            p = await proposer.propose(kv_put(200))
        finally:
            await proposer.close()
        assert p.result is not None and p.result.ok
        await converged(rest)

    asyncio.run(after())


def test_a_wiped_follower_catches_up_through_a_snapshot(
    spawn: Callable[..., list[RaftProcess]],
) -> None:
    nodes = spawn(3, ["--log-compaction-min-entries", "20"])

    async def fill() -> RaftProcess:
        leader, _ = await wait_leader(nodes)
        await wait_default_tenant(leader)
        proposer = IpcProposer(leader.sock)
        try:
            for batch in range(3):
                await asyncio.gather(*(proposer.propose(kv_put(batch * 20 + i)) for i in range(20)))
        finally:
            await proposer.close()
        await converged(nodes)
        return leader

    leader = asyncio.run(fill())
    # The log was compacted (the snapshot is written in the background).
    deadline = time.monotonic() + 30
    while not (leader.data / "raft" / "snapshot").exists():
        assert time.monotonic() < deadline, "no snapshot within 30 s"
        time.sleep(0.2)
    follower = next(n for n in nodes if n is not leader)
    assert follower.stop() == 0
    shutil.rmtree(follower.data)
    follower.start()
    applied, _ = asyncio.run(converged(nodes))
    assert applied > 60
    assert "installed snapshot at applied index" in follower.stderr()
    assert (follower.data / "raft" / "snapshot").exists()


def test_a_node_that_installed_a_snapshot_waits_a_full_election_timeout(tmp_path: Path) -> None:
    """In process, on pysyncobj's tick thread as in a transfer: the election deadline has run
    out (its peers do not answer, so it never campaigns), a snapshot is installed, and the node
    must give the leader that sent it a whole election timeout before campaigning (it used to
    campaign on the next tick, deposing the leader once per catch-up of a large store)."""
    source = filled_store(tmp_path / "src")
    snap = tmp_path / "snap"
    snapshot.save(snap, source, RAFT_STATE)
    source.close()
    port, *peers = free_ports(3)
    options = RaftCoreOptions(
        data_dir=tmp_path / "node",
        socket_path=tmp_path / "raft.sock",
        self_address=f"127.0.0.1:{port}",
        peers=[f"127.0.0.1:{p}" for p in peers],
        password="test-cluster-secret",
        raft_min_timeout_s=0.4,  # pysyncobj's least: 3 heartbeat periods
        raft_max_timeout_s=0.6,
        durable=False,
    )
    core = RaftCore(options)
    try:
        time.sleep(0.8)
        assert core._SyncObj__raftElectionDeadline < time.monotonic()
        done: list[float] = []

        def install() -> None:  # what pysyncobj does with the last chunk of a transfer
            core._deserialize(str(snap))
            done.append(core._SyncObj__raftElectionDeadline - time.monotonic())

        core._on_tick_thread(install)
        deadline = time.monotonic() + 10
        while not done:
            assert time.monotonic() < deadline, "the install did not run on the tick thread"
            time.sleep(0.01)
        assert core.store.applied_index() == 42
        assert 0.35 < done[0] <= 0.6  # a full timeout (0.4-0.6 s) from the end of the install
        assert core.status().role == "follower"
    finally:
        core.destroy()
        core.store.close()


def test_a_peer_with_another_password_is_kept_out(
    spawn: Callable[..., list[RaftProcess]],
) -> None:
    nodes = spawn(3, passwords=["right", "right", "wrong"])

    async def scenario() -> None:
        leader, statuses = await wait_leader(nodes[:2])
        assert leader is not nodes[2]
        outsider = IpcProposer(nodes[2].sock)
        try:
            status = await outsider.status()
        finally:
            await outsider.close()
        assert status.leader is None and not status.ready and not status.has_quorum
        assert not any(p["connected"] for p in status.peers.values())
        (leader_status,) = [s for s in statuses if s.node_id == leader.address]
        assert leader_status.peers[nodes[2].address] == {"connected": False}

    asyncio.run(scenario())


def test_the_cipher_encrypts_and_rejects_tampered_and_foreign_frames() -> None:
    sender, receiver = RaftCipher("secret"), RaftCipher("secret")
    other = RaftCipher("other secret")
    payload = b"a cached answer that must not cross the wire in clear " * 4
    token = sender.encrypt_at_time(payload, 1234)
    assert b"cached answer" not in token
    assert receiver.extract_timestamp(token) == 1234 and receiver.decrypt(token) == payload
    # Nonces never repeat: the same payload twice gives two different frames.
    again = sender.encrypt_at_time(payload, 1234)
    assert again != token and receiver.decrypt(again) == payload
    for i in (0, 10, 30, len(token) - 1):  # time, salt, nonce, tag: all authenticated
        tampered = bytearray(token)
        tampered[i] ^= 1
        for bad in (bytes(tampered), token[:-1], token[:20], other.encrypt_at_time(payload, 1)):
            with pytest.raises(ValueError):
                RaftCipher("secret").decrypt(bad)
            with pytest.raises(ValueError):
                receiver.extract_timestamp(bad)


def test_raft_frames_are_stored_not_compressed_and_any_peer_still_reads_them() -> None:
    from pysyncobj import tcp_connection

    frame = b"\x01" + os.urandom(1536) + b"a 1 KB answer " * 70
    sent = tcp_connection.zlib.compress(frame, 3)  # what pysyncobj's send() calls
    assert len(sent) > len(frame)  # stored blocks: framing added, nothing compressed
    assert zlib.decompress(sent) == frame  # a peer with stock pysyncobj reads it
    assert tcp_connection.zlib.decompress(zlib.compress(frame, 3)) == frame  # and the reverse


def test_pysyncobj_pickles_bytes_as_bytes_and_still_reads_protocol_2() -> None:
    from pysyncobj import pickle as pysyncobj_pickle

    entry = (bytes(range(256)) * 10, 7, 3)
    assert len(pysyncobj_pickle.dumps(entry)) < 2600  # protocol 2: latin-1 text, ~3,900 bytes
    old_record = pickle.dumps(entry, 2)  # a journal written before the change
    assert pysyncobj_pickle.loads(old_record) == entry


# -- refusals -----------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmcache.cluster.raft_core", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_a_multi_node_group_without_password_is_refused(tmp_path: Path) -> None:
    base = ["--data-dir", str(tmp_path / "d"), "--socket", str(tmp_path / "s")]
    base += ["--self", "127.0.0.1:1", "--peer", "127.0.0.1:2"]
    done = run_cli(base)
    assert done.returncode == 2 and "needs a password" in done.stderr
    done = run_cli([*base, "--password-env", "LLMCACHE_UNSET_VAR"])
    assert done.returncode == 2 and "LLMCACHE_UNSET_VAR is not set" in done.stderr
    assert not (tmp_path / "d").exists()


def test_journal_without_full_dump_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="journal without full_dump"):
        RaftCoreOptions(tmp_path, tmp_path / "s", "127.0.0.1:1", [], None, full_dump=False)
    with pytest.raises(ValueError, match="both be enabled"):
        RaftCoreOptions(tmp_path, tmp_path / "s", "127.0.0.1:1", [], None, journal=False)


def test_a_store_without_its_raft_log_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "d" / "store") as store:
        StateMachine(store).apply(5, c.encode(c.TenantUpsert(tenant="t1")))
    (port,) = free_ports(1)
    args = ["--data-dir", str(tmp_path / "d"), "--socket", str(tmp_path / "s")]
    done = run_cli([*args, "--self", f"127.0.0.1:{port}"])
    assert done.returncode == 1 and "holds no Raft log" in done.stderr


def test_an_invalid_snapshot_at_start_stops_the_process(tmp_path: Path) -> None:
    raft = tmp_path / "d" / "raft"
    raft.mkdir(parents=True)
    (raft / "snapshot").write_bytes(b"not a snapshot at all, truncated")
    (port,) = free_ports(1)
    done = run_cli(
        [
            "--data-dir",
            str(tmp_path / "d"),
            "--socket",
            str(tmp_path / "s"),
            "--self",
            f"127.0.0.1:{port}",
        ]
    )
    assert done.returncode == 1 and "is invalid" in done.stderr
    assert not (tmp_path / "d" / "store").exists()
