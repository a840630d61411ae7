"""Run what the deployment files describe, with processes instead of containers.

Each compose service / StatefulSet pod runs the image's entrypoint with exactly the environment
Docker or the kubelet would give it (tests/deploy_render.py) on a host of its own
(tests/deploy_hosts.py: a network namespace, its hostname, its /etc/hosts). Two substitutions,
both unavoidable without a container runtime: a volume's mount path in a value becomes the
host directory standing in for the volume, and PATH leads to this virtualenv. In loopback mode
(no namespaces) a wildcard bind address, and 127.0.0.1 in commands run inside a container, also
become the host's own address.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import deploy_render as render
from tests.deploy_hosts import Host, Hosts
from tests.deploy_render import ROOT, one
from tests.fake_llm import FakeLLM
from tests.test_deploy_files import dashboard_metric_names

BIN = Path(sys.executable).parent
DEADLINE_S = 150.0
QUESTION, PARAPHRASE = "How do I reset my password?", "how can i reset my password"


@dataclass
class Container:
    host: Host
    argv: list[str]
    env: dict[str, str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{self.port}"


def http(
    url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def localize(env: dict[str, str], host: Host, volumes: dict[str, Path], loopback: bool) -> None:
    """The two (three in loopback mode) substitutions of the module docstring, in place."""
    for name, value in env.items():
        if value in volumes:
            env[name] = str(volumes[value])
        if loopback and name == "LLMCACHE_HOST" and value in ("0.0.0.0", "::"):
            env[name] = host.ip
    env["PATH"] = f"{BIN}:/usr/local/bin:/usr/bin:/bin"


def exec_in(hosts: Hosts, c: Container, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``argv`` run inside the container (``docker compose exec`` / ``kubectl exec``). In
    loopback mode the container's own 127.0.0.1 is its host's address."""
    env = dict(c.env)
    if hosts.loopback:
        argv = [arg.replace("127.0.0.1", c.host.ip) for arg in argv]
        env["LLMCACHE_URL"] = c.url  # the CLI's default is http://127.0.0.1:8080
    return hosts.run(c.host, argv, env)


def start(hosts: Hosts, c: Container) -> None:
    hosts.start(c.host, c.argv, c.env, c.log)


def wait_ready(containers: list[Container], path: str = "/readyz") -> None:
    deadline = time.monotonic() + DEADLINE_S
    waiting = list(containers)
    while waiting and time.monotonic() < deadline:
        for c in list(waiting):
            proc = c.host.procs[-1]
            if proc.poll() is not None:
                raise AssertionError(
                    f"{c.host.name} exited {proc.returncode}:\n{c.log.read_text()}"
                )
            try:
                if http(c.url + path)[0] == 200:
                    waiting.remove(c)
            except OSError:
                pass
        time.sleep(0.5)
    logs = "\n".join(f"== {c.host.name}\n{c.log.read_text()[-3000:]}" for c in waiting)
    assert not waiting, f"not ready within {DEADLINE_S} s:\n{logs}"


def serves(a: Container, b: Container, token: str) -> None:
    """A store on ``a`` is a semantic hit on ``b`` (a linearizable read)."""
    auth = {"X-LLMCache-Token": token}
    code, _, body = http(a.url + "/v1/cache/store", {"text": QUESTION, "response": "42"}, auth)
    assert code == 201, body
    lookup = {"text": PARAPHRASE, "consistency": "linearizable"}
    code, headers, body = http(b.url + "/v1/cache/lookup", lookup, auth)
    assert (code, headers["X-LLMCache-Status"]) == (200, "SEMANTIC_HIT"), body


def cli_status(hosts: Hosts, c: Container) -> None:
    """``llmcache-cli cluster status`` inside the container (docker compose / kubectl exec)."""
    done = exec_in(hosts, c, ["llmcache-cli", "cluster", "status"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "healthy" in done.stdout and done.stdout.count(" leader ") == 1, done.stdout


def leader_of(c: Container, token: str) -> str:
    code, _, body = http(c.url + "/v1/cluster/members", headers={"X-LLMCache-Token": token})
    assert code == 200, body
    leader: str = json.loads(body)["leader"]
    return leader


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with Hosts(tmp_path) as made:
        yield made


# -- docker compose -------------------------------------------------------------------------


def test_compose_cluster_forms_serves_and_exports_the_dashboards_metrics(
    hosts: Hosts, tmp_path: Path
) -> None:
    image = render.image()
    with FakeLLM(host=hosts.gateway) as llm:
        dotenv = render.dotenv(ROOT / ".env.example")
        token = secrets.token_hex(16)
        dotenv |= {
            "LLMCACHE_RAFT_PASSWORD": secrets.token_hex(16),
            "LLMCACHE_ADMIN_TOKEN": token,
            "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16),
            "LLMCACHE_UPSTREAM_BASE_URL": llm.base_url,
        }
        services = render.compose(dotenv)["services"]
        nodes = {name: s for name, s in services.items() if "profiles" not in s}
        containers = [
            Container(
                hosts.add(s["hostname"]),
                [*s.get("entrypoint", image.entrypoint), *s.get("command", image.cmd)],
                render.service_env(s),
                int(s["ports"][0].split(":")[-1]),
                tmp_path / f"{name}.log",
            )
            for name, s in nodes.items()
        ]
        # Compose's DNS resolves every service name on the project network.
        records = {c.host.ip: [name] for name, c in zip(nodes, containers, strict=True)}
        for (name, service), c in zip(nodes.items(), containers, strict=True):
            hosts.set_records(c.host, records)
            volumes = {
                v.split(":")[1]: tmp_path / name / v.split(":")[0] for v in service["volumes"]
            }
            localize(c.env, c.host, volumes, hosts.loopback)
            start(hosts, c)
        wait_ready(containers)

        first, *_, last = containers
        serves(first, last, token)
        for (name, service), c in zip(nodes.items(), containers, strict=True):
            check = service["healthcheck"]["test"]
            assert check[0] == "CMD"
            done = exec_in(hosts, c, check[1:])
            assert done.returncode == 0, f"{name} healthcheck: {done.stderr}"
        cli_status(hosts, first)

        # Traffic that makes every series the dashboard reads exist on the first node.
        auth = {"X-LLMCache-Token": token, "Authorization": "Bearer sk-test"}
        chat = {
            "model": "gpt-4o-mini",
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        proxy = first.url + "/v1/chat/completions"
        assert http(proxy, chat, auth)[1]["X-LLMCache-Status"] == "MISS"
        deadline = time.monotonic() + 30  # the proxy stores a miss asynchronously
        while http(proxy, chat, auth)[1]["X-LLMCache-Status"] != "HIT":
            assert time.monotonic() < deadline, "the proxied answer was never cached"
            time.sleep(0.5)
        llm.fail_next(1)
        other = chat | {"messages": [{"role": "user", "content": "And of Spain?"}]}
        assert http(proxy, other, auth)[0] >= 500
        lookup = {"text": PARAPHRASE}
        assert http(first.url + "/v1/cache/lookup", lookup, auth)[1]["X-LLMCache-Status"] == (
            "SEMANTIC_HIT"
        )

        wanted = dashboard_metric_names()
        deadline = time.monotonic() + 30  # gauges are refreshed by the workers periodically
        while True:
            text = http(first.url + "/metrics")[2].decode()
            exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
            if wanted <= exported or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert wanted - exported == set()


# -- kubernetes -----------------------------------------------------------------------------


def test_statefulset_pods_form_a_group_survive_a_new_address_and_scale(
    hosts: Hosts, tmp_path: Path
) -> None:
    image = render.image()
    resources = render.k8s_resources()
    sts = one(resources, "StatefulSet")
    config = one(resources, "ConfigMap")
    secret = one(render.k8s_resources([ROOT / "k8s" / "secret.template.yaml"]), "Secret")
    token = secrets.token_hex(16)
    values = {"raft-password": secrets.token_hex(16), "admin-token": token}
    assert values.keys() == secret["stringData"].keys()
    namespace = "default"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    domain = f"{sts['spec']['serviceName']}.{namespace}.svc.cluster.local"
    port = render.named_port(container, container["readinessProbe"]["httpGet"]["port"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    def make_pod(i: int) -> Container:
        name = f"{sts['metadata']['name']}-{i}"
        env = render.pod_env(
            container,
            {"metadata.name": name, "metadata.namespace": namespace},
            {config["metadata"]["name"]: config["data"]},
            {secret["metadata"]["name"]: values},
        )
        host = hosts.add(name)
        # The kubelet's /etc/hosts: the pod's own FQDN. Its peers are not resolvable yet.
        hosts.set_records(host, {host.ip: [f"{name}.{domain}", name]})
        localize(env, host, {p: tmp_path / name / v for p, v in mounts.items()}, hosts.loopback)
        argv = [*container.get("command", image.entrypoint), *container.get("args", image.cmd)]
        return Container(host, argv, env, port, tmp_path / f"{name}.log")

    pods = [make_pod(i) for i in range(sts["spec"]["replicas"])]
    policy = one(resources, "NetworkPolicy")

    def enforce() -> None:
        """The NetworkPolicy as each pod's firewall (needs namespaces)."""
        if not hosts.loopback:
            for pod in pods:
                allowed = render.ingress(policy, container, [p.host.ip for p in pods])
                hosts.firewall(pod.host, allowed)

    enforce()
    for pod in pods:  # podManagementPolicy: Parallel
        start(hosts, pod)

    def publish() -> None:
        """The headless Service's records appear (publishNotReadyAddresses: before ready)."""
        records = {p.host.ip: [f"{p.host.name}.{domain}", p.host.name] for p in pods}
        for pod in pods:
            hosts.set_records(pod.host, records)

    # The highest pod dials the others (pysyncobj: the higher address connects). Once it has
    # failed to resolve them, their records appear.
    deadline = time.monotonic() + DEADLINE_S
    while "failed to resolve host" not in pods[-1].log.read_text():
        assert time.monotonic() < deadline, pods[-1].log.read_text()
        time.sleep(0.5)
    publish()
    wait_ready(pods)
    serves(pods[0], pods[-1], token)
    cli_status(hosts, pods[0])
    raft_port = int(pods[0].env["LLMCACHE_RAFT_PORT"])
    if not hosts.loopback:  # from outside the set, the Raft port is closed, HTTP is open
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((pods[0].host.ip, raft_port), timeout=10).close()
        socket.create_connection((pods[0].host.ip, pods[0].port), timeout=10).close()

    # preStop on a follower changes nothing; on the leader it hands leadership over.
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    leader = leader_of(pods[0], token)
    by_address = {f"{p.host.name}.{domain}:{p.env['LLMCACHE_RAFT_PORT']}": p for p in pods}
    follower = next(p for a, p in by_address.items() if a != leader)
    done = exec_in(hosts, follower, prestop)
    assert done.returncode == 0, done.stderr
    assert leader_of(follower, token) == leader
    done = exec_in(hosts, by_address[leader], prestop)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30
    while leader_of(follower, token) in (leader, None):
        assert time.monotonic() < deadline, "leadership was not handed over"
        time.sleep(0.5)

    # The lowest pod is dialled by its peers (pysyncobj: the higher address connects): after a
    # restart under a new address they must re-resolve its name, not keep the old address.
    lowest = pods[0]
    hosts.stop(lowest.host)
    hosts.readdress(lowest.host)
    if hosts.loopback:
        lowest.env["LLMCACHE_HOST"] = lowest.host.ip
    publish()
    enforce()
    start(hosts, lowest)
    wait_ready(pods)
    serves(pods[-1], lowest, token)
    cli_status(hosts, pods[1])

    # Scaling as the README says: LLMCACHE_REPLICAS=4 in the ConfigMap, a fourth pod, then
    # `cluster add` of its Raft address.
    config["data"]["LLMCACHE_REPLICAS"] = "4"
    pods.append(make_pod(3))
    publish()
    enforce()
    start(hosts, pods[-1])
    added = f"{pods[-1].host.name}.{domain}:{raft_port}"
    done = exec_in(hosts, pods[1], ["llmcache-cli", "cluster", "add", added])
    assert done.returncode == 0, done.stdout + done.stderr
    wait_ready(pods)
    serves(pods[1], pods[-1], token)
    cli_status(hosts, pods[-1])
