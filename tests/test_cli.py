"""``llmcache-cli``: usage and output shapes in-process (click's CliRunner), then a real
``dev-cluster --nodes 3`` subprocess operated through the CLI and the cluster HTTP routes."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from llmcache.client.cli import assess, call, main, seed_urls
from tests.node_process import NodeProcess, free_port

DEADLINE_S = 90.0


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner(env=env).invoke(main, list(args))


def view(
    node: str, role: str, term: int, leader: str | None, commit: int, applied: int
) -> dict[str, Any]:
    return {
        "node_id": node, "role": role, "term": term, "leader": leader, "commit_index": commit,
        "applied_index": applied, "has_quorum": True, "ready": True, "peers": {},
    }  # fmt: skip


# -- in-process: usage, shapes, the health rules ------------------------------------------------


def test_usage_errors_exit_2() -> None:
    assert run("cluster", "add").exit_code == 2  # missing ADDRESS
    assert run("cluster", "status", "--interval", "-1").exit_code == 2
    assert run("dev-cluster", "--nodes", "0").exit_code == 2
    assert run("nonsense").exit_code == 2


def test_no_reachable_node_exits_2_with_json() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run("cluster", "status", "--url", url, "--json", "--interval", "0")
    assert result.exit_code == 2
    body = json.loads(result.stdout)
    assert body["healthy"] is False and body["nodes"] == []
    assert len(body["problems"]) == 1 and body["problems"][0].startswith(url + ": ")
    assert run("cluster", "transfer-leader", "--url", url).exit_code == 2


def test_seed_urls_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMCACHE_URL", raising=False)
    monkeypatch.delenv("LLMCACHE_DEV_STATE", raising=False)
    assert seed_urls([]) == ["http://127.0.0.1:8080"]
    (tmp_path / "llmcache-dev").mkdir()
    state = {"nodes": [{"url": "http://127.0.0.1:1"}, {"url": "http://127.0.0.1:2"}]}
    (tmp_path / "llmcache-dev" / "dev-cluster.json").write_text(json.dumps(state))
    assert seed_urls([]) == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    monkeypatch.setenv("LLMCACHE_URL", "http://h:3/")
    assert seed_urls([]) == ["http://h:3"]
    assert seed_urls(["http://x:4"]) == ["http://x:4"]


def test_assess_flags_two_leaders_disagreement_and_a_stall() -> None:
    healthy = {
        "a": view("A", "leader", 2, "A", 10, 9),
        "b": view("B", "follower", 2, "A", 10, 9),
    }
    rows, problems = assess(healthy, healthy)
    assert problems == [] and [r["lag"] for r in rows] == [1, 1]

    split = {"a": view("A", "leader", 3, "A", 10, 9), "b": view("B", "leader", 3, "B", 10, 9)}
    _, problems = assess(split, split)
    assert any("2 nodes claim leadership in term 3" in p for p in problems)
    assert any("different leaders" in p for p in problems)

    before = {"a": view("A", "leader", 2, "A", 10, 10), "b": view("B", "follower", 2, "A", 10, 4)}
    after = {"a": view("A", "leader", 2, "A", 20, 20), "b": view("B", "follower", 2, "A", 20, 4)}
    rows, problems = assess(before, after)
    assert problems == ["B (b): applied index stalled at 4 (lag 16)"]
    assert rows[1]["applied_moved"] is False and rows[0]["applied_moved"] is True

    silent = {**healthy, "b": {**healthy["b"], "leader_contact_ms": 4000}}
    _, problems = assess(silent, silent)
    assert problems == ["B (b) has not heard the leader for 4000 ms"]

    gone = {**after, "c": {"error": "c: refused"}}
    _, problems = assess(gone, gone)
    assert "c is unreachable (c: refused)" in problems


# -- real processes ----------------------------------------------------------------------------


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(nodes: int) -> int:
    """A base port whose HTTP (base+i) and Raft (base+100+i) ports are all free now."""
    for _ in range(200):
        base = random.randrange(20_000, 60_000)
        if all(_free(base + i) and _free(base + 100 + i) for i in range(nodes)):
            return base
    raise AssertionError("no free port range")


@dataclass
class DevCluster:
    proc: subprocess.Popen[bytes]
    state_path: Path
    password: str
    log: Path

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def cli(self, *args: str) -> Result:
        return run(*args, env={"LLMCACHE_DEV_STATE": str(self.state_path), "LLMCACHE_URL": None})

    def status(self) -> tuple[int, dict[str, Any]]:
        result = self.cli("cluster", "status", "--json")
        return result.exit_code, json.loads(result.stdout)

    def healthy(self) -> dict[str, Any]:
        """The status once it is healthy (elections may still run), within DEADLINE_S."""
        deadline = time.monotonic() + DEADLINE_S
        code, body = self.status()
        while code != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            code, body = self.status()
        assert code == 0, body
        return body


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    root = tmp_path_factory.mktemp("dev")
    password = secrets.token_urlsafe(16)
    cli = Path(sys.executable).parent / "llmcache-cli"
    args = [str(cli), "dev-cluster", "--nodes", "3", "--embedder", "none"]
    args += ["--base-port", str(free_base_port(3)), "--data-dir", str(root / "data")]
    env = {**os.environ, "LLMCACHE_RAFT_PASSWORD": password}
    env.pop("LLMCACHE_DEV_STATE", None)
    log = root / "dev-cluster.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    cluster = DevCluster(proc, root / "data" / "dev-cluster.json", password, log)
    try:
        deadline = time.monotonic() + DEADLINE_S + 30
        while not cluster.state_path.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert cluster.state_path.exists(), log.read_text()
        yield cluster
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                _kill_orphans(cluster)


def _kill_orphans(cluster: DevCluster) -> None:
    """SIGKILL the nodes of a dev-cluster that could not stop them, by PID, each checked to
    still be a node of this cluster (its command line names this cluster's data dir)."""
    if not cluster.state_path.exists():
        return
    for node in cluster.state()["nodes"]:
        try:
            cmdline = Path(f"/proc/{node['pid']}/cmdline").read_bytes()
            if node["data_dir"].encode() in cmdline:
                os.kill(node["pid"], signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def leader_url(body: dict[str, Any]) -> tuple[str, str]:
    (leader,) = [n for n in body["nodes"] if n["role"] == "leader"]
    return leader["node_id"], leader["url"]


def test_status_and_transfer_leader(dev: DevCluster) -> None:
    body = dev.healthy()
    assert body["healthy"] is True and body["problems"] == []
    nodes = body["nodes"]
    assert len(nodes) == 3 and all(n["ready"] and n["reachable"] for n in nodes)
    assert sorted(n["role"] for n in nodes) == ["follower", "follower", "leader"]
    contacts = {n["role"]: n["leader_contact_ms"] for n in nodes}
    assert contacts["leader"] == 0 and 0 <= contacts["follower"] < 1500
    old, _ = leader_url(body)
    assert {n["leader"] for n in nodes} == {old}

    human = dev.cli("cluster", "status", "--interval", "0")
    assert human.exit_code == 0 and "healthy" in human.stdout and old in human.stdout

    target = next(n["node_id"] for n in nodes if n["node_id"] != old)
    follower_url = next(n["url"] for n in nodes if n["node_id"] == target)
    # Asked on a follower: the route passes the request on to the leader.
    result = dev.cli("cluster", "transfer-leader", "--to", target, "--url", follower_url, "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"leader"}
    deadline = time.monotonic() + DEADLINE_S
    new = old
    while new != target and time.monotonic() < deadline:
        time.sleep(0.3)
        new = leader_url(dev.healthy())[0]
    assert new == target


def store(url: str, key: str, request_id: str) -> int:
    try:
        body = {"key": key, "response": f"value of {key}", "request_id": request_id}
        return int(call(url, "POST", "/v1/cache/store", body, timeout=30.0).status)
    except Exception:
        return 0


def advertised(url: str, address: str) -> str | None:
    members = call(url, "GET", "/v1/cluster/members").body["members"]
    return next((m["url"] for m in members if m["address"] == address), None)


def readable(url: str, key: str) -> bool:
    answer = call(url, "POST", "/v1/cache/lookup", {"key": key}, timeout=10.0)
    return answer.ok and bool(answer.body["status"] == "HIT")


def test_membership_add_and_remove_while_writing(dev: DevCluster, tmp_path: Path) -> None:
    body = dev.healthy()
    urls = [n["url"] for n in body["nodes"]]
    peers = ",".join(f"{n['raft']}|{n['url']}" for n in dev.state()["nodes"])
    fourth = NodeProcess(
        tmp_path / "n4",
        env={
            "LLMCACHE_PEERS": peers,
            "LLMCACHE_RAFT_PASSWORD": dev.password,
            "LLMCACHE_EMBEDDER": "none",
        },
    )
    address = f"127.0.0.1:{fourth.raft_port}"
    stored: list[str] = []
    stop = threading.Event()

    def writer() -> None:  # one store at a time, each retried with its request id until 201
        for i in range(200):
            key, request_id = f"m-{i}", uuid.uuid4().hex
            deadline = time.monotonic() + DEADLINE_S
            while store(urls[i % 3], key, request_id) != 201:
                assert time.monotonic() < deadline, f"store {key} never succeeded"
                time.sleep(0.2)
            stored.append(key)
            if stop.wait(0.1):
                return

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        fourth.start(wait=False)
        added = dev.cli("cluster", "add", address, "--json")
        assert added.exit_code == 0, added.output
        assert json.loads(added.stdout) == {"added": address}
        fourth.wait_ready()
        members = call(urls[0], "GET", "/v1/cluster/members").body
        assert address in {m["address"] for m in members["members"]}
        # The new node knows the others' URLs, so status from it finds all four.
        result = dev.cli("cluster", "status", "--json", "--url", fourth.url)
        assert len(json.loads(result.stdout)["nodes"]) == 4, result.stdout
        # The old nodes learn its URL through the log (no config lists it) ...
        deadline = time.monotonic() + DEADLINE_S
        while advertised(urls[0], address) != fourth.url:
            assert time.monotonic() < deadline, call(urls[0], "GET", "/v1/cluster/members").body
            time.sleep(0.3)
        # ... so they forward writes to it when it leads.
        moved = dev.cli("cluster", "transfer-leader", "--to", address, "--url", urls[0])
        assert moved.exit_code == 0, moved.output
        assert store(urls[0], "to-the-fourth", uuid.uuid4().hex) == 201
        assert readable(fourth.url, "to-the-fourth")
        away = dev.cli("cluster", "transfer-leader", "--url", fourth.url)
        assert away.exit_code == 0, away.output

        removed = dev.cli("cluster", "remove", address, "--url", urls[1])
        assert removed.exit_code == 0 and f"removed {address}" in removed.stdout, removed.output
        members = call(urls[2], "GET", "/v1/cluster/members").body
        assert address not in {m["address"] for m in members["members"]}
    finally:
        stop.set()
        thread.join(DEADLINE_S)
        fourth.stop()
    assert len(stored) >= 3
    deadline = time.monotonic() + DEADLINE_S
    for url in urls:
        for key in stored:
            while not readable(url, key):
                assert time.monotonic() < deadline, f"{key} not readable on {url}"
                time.sleep(0.2)
    assert dev.healthy()["healthy"] is True


def test_a_stopped_node_is_unhealthy_and_sigterm_stops_all(dev: DevCluster) -> None:
    body = dev.healthy()
    leader = leader_url(body)[0]
    state = dev.state()
    victim = next(n for n in state["nodes"] if n["raft"] != leader)
    os.kill(victim["pid"], signal.SIGTERM)
    deadline = time.monotonic() + DEADLINE_S
    code, body = dev.status()
    while victim["url"] + " is unreachable" not in " ".join(body["problems"]):
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
        code, body = dev.status()
    assert code == 1 and body["healthy"] is False
    human = dev.cli("cluster", "status", "--interval", "0")
    assert human.exit_code == 1 and "UNHEALTHY" in human.stdout and "unreachable" in human.stdout

    dev.proc.send_signal(signal.SIGTERM)
    assert dev.proc.wait(90) == 0, dev.log.read_text()
    for node in state["nodes"]:
        with pytest.raises(ProcessLookupError):
            os.kill(node["pid"], 0)
    assert not dev.state_path.exists()


def test_cluster_routes_need_the_admin_token(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "solo", env={"LLMCACHE_ADMIN_TOKEN": "lc_admin-secret"})
    node.start()
    try:
        assert node.request("GET", "/v1/cluster/members")[0] == 401
        refused = run("cluster", "status", "--url", node.url, "--interval", "0")
        assert refused.exit_code == 2 and "unauthorized" in refused.stderr
        assert run("cluster", "add", "127.0.0.1:9", "--url", node.url).exit_code == 1

        env: dict[str, str | None] = {"LLMCACHE_TOKEN": "lc_admin-secret"}
        result = run("cluster", "status", "--url", node.url, "--json", "--interval", "0", env=env)
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.stdout)["nodes"]
        assert row["role"] == "leader" and row["lag"] >= 0 and row["ready"] is True
        bad = run("cluster", "add", "no-port", "--url", node.url, env=env)
        assert bad.exit_code == 1 and "invalid_request" in bad.stderr
    finally:
        node.stop()
