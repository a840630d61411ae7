"""The deployment files checked by the strongest means available without Docker or Kubernetes:
Kubernetes' own schemas, the Compose specification's schema, yamllint, a Dockerfile parser, and
the consistency of every name and port the files share. tests/test_deploy_run.py runs them."""

from __future__ import annotations

import asyncio
import copy
import importlib.resources
import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from llmcache.cluster import raft_core
from llmcache.node import main
from llmcache.node.config import ConfigError, NodeConfig, load_config
from tests import deploy_render as render
from tests.deploy_render import ROOT, one

K8S_VERSION = "1.37.0"
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "llmcache.json"
SECRETS = {
    "LLMCACHE_RAFT_PASSWORD": "raft-secret",
    "LLMCACHE_ADMIN_TOKEN": "admin-secret",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret",
}


def compose_spec() -> dict[str, Any]:
    """The Compose specification JSON schema, as check-jsonschema ships it (with its licence)."""
    vendor = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def example_env() -> dict[str, str | None]:
    return {**render.dotenv(ROOT / ".env.example"), **SECRETS}


# -- kubernetes -----------------------------------------------------------------------------


def test_every_k8s_manifest_passes_kubernetes_schemas() -> None:
    files = sorted(p for p in (ROOT / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    rendered = render.k8s_resources()
    template = render.k8s_resources([ROOT / "k8s" / "secret.template.yaml"])
    # Every manifest is either in the base or the Secret template (kept out on purpose).
    assert len(render.k8s_resources(files)) == len(rendered) + len(template)
    for doc in rendered + template:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = copy.deepcopy(one(rendered, "StatefulSet"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_statefulset_is_what_the_issue_asks() -> None:
    resources = render.k8s_resources()
    sts, config = one(resources, "StatefulSet"), one(resources, "ConfigMap")["data"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == int(config["LLMCACHE_REPLICAS"]) == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    assert any(m["name"] == "data" and m["mountPath"] == "/data" for m in container["volumeMounts"])
    assert pod["affinity"]["podAntiAffinity"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Service links would add LLMCACHE_PORT=tcp://… and the like to every pod's environment.
    assert pod["enableServiceLinks"] is False
    prestop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    prestop_s = sum(int(t) for t in re.findall(r"timeout=(\d+)", prestop))
    assert "transfer-leader" in prestop and prestop_s > 0
    node_stop_s = main.WORKER_STOP_TIMEOUT_S + main.CORE_STOP_TIMEOUT_S
    assert pod["terminationGracePeriodSeconds"] >= prestop_s + node_stop_s
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": int(config["LLMCACHE_PORT"]),
        "raft": int(config["LLMCACHE_RAFT_PORT"]),
    }
    assert annotations["prometheus.io/port"] == str(ports["http"])

    services = {s["metadata"]["name"]: s["spec"] for s in resources if s["kind"] == "Service"}
    headless = services[spec["serviceName"]]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["selector"].items() <= labels.items()
    assert one(resources, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1

    policy = one(resources, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    for rule in policy["ingress"]:
        opened = {p["port"] for p in rule["ports"]}
        if ports["raft"] in opened:  # the Raft port: only from pods of the set
            (source,) = rule["from"]
            assert source["podSelector"]["matchLabels"].items() <= labels.items()


def test_unfilled_secret_template_is_refused() -> None:
    resources = render.k8s_resources()
    secret = one(render.k8s_resources([ROOT / "k8s" / "secret.template.yaml"]), "Secret")
    config = one(resources, "ConfigMap")
    (container,) = one(resources, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    pod = {"metadata.name": "llmcache-0", "metadata.namespace": "default"}
    env = render.pod_env(
        container,
        pod,
        {config["metadata"]["name"]: config["data"]},
        {secret["metadata"]["name"]: secret["stringData"]},
    )
    with pytest.raises(ConfigError, match="raft_password: required"):
        load_config(env=env, hostname="llmcache-0")
    filled = {**env, "LLMCACHE_RAFT_PASSWORD": "p", "LLMCACHE_ADMIN_TOKEN": "t"}
    cfg = load_config(env=filled, hostname="llmcache-1")
    domain = "llmcache-headless.default.svc.cluster.local"
    assert cfg.raft_address == f"llmcache-1.{domain}:7000"
    assert [p.raft_address for p in cfg.peers] == [
        f"llmcache-0.{domain}:7000",
        f"llmcache-2.{domain}:7000",
    ]


# -- compose --------------------------------------------------------------------------------


def test_compose_file_passes_the_compose_specification() -> None:
    schema = compose_spec()
    validator = jsonschema.validators.validator_for(schema)(schema)
    rendered = render.compose(example_env())
    errors = [e.message for e in validator.iter_errors(rendered)]
    assert errors == []
    rendered["services"]["llmcache-0"]["hostnme"] = "typo"
    assert not validator.is_valid(rendered)
    # Secrets left blank: compose refuses to start, naming the variable.
    with pytest.raises(render.MissingVariable, match="LLMCACHE_RAFT_PASSWORD"):
        render.compose(render.dotenv(ROOT / ".env.example"))


def test_compose_nodes_form_one_group_of_three() -> None:
    services = render.compose(example_env())["services"]
    nodes = {name: s for name, s in services.items() if "profiles" not in s}
    assert sorted(nodes) == ["llmcache-0", "llmcache-1", "llmcache-2"]
    addresses = {}
    for name, service in nodes.items():
        assert service["hostname"] == name
        assert service["healthcheck"]["test"][-1].count("/readyz") == 1
        assert service["restart"] == "unless-stopped"
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace >= main.WORKER_STOP_TIMEOUT_S + main.CORE_STOP_TIMEOUT_S
        (volume,) = service["volumes"]
        assert volume.split(":")[0] in render.compose(example_env())["volumes"]
        cfg = load_config(env=render.service_env(service))
        addresses[name] = cfg.raft_address
        assert cfg.node_name == name
    for name, service in nodes.items():
        cfg = load_config(env=render.service_env(service))
        assert {p.raft_address for p in cfg.peers} == set(addresses.values()) - {addresses[name]}


def test_prometheus_and_grafana_are_wired_to_the_cluster() -> None:
    services = render.compose(example_env())["services"]
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (static,) = job["static_configs"]
    nodes = [name for name, s in services.items() if "profiles" not in s]
    ports = {load_config(env=render.service_env(services[n])).port for n in nodes}
    assert sorted(static["targets"]) == sorted(f"{n}:{p}" for n in nodes for p in ports)
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]

    provisioning = MONITORING / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "llmcache.yml").read_text())[
        "providers"
    ]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


def dashboard_metric_names() -> set[str]:
    """Every llmcache_* series name the dashboard's queries read."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {name for e in exprs for name in re.findall(r"\bllmcache_[a-z0-9_]+", e)}


def test_dashboard_covers_the_issue() -> None:
    names = dashboard_metric_names()
    wanted = {
        "llmcache_lookups_total",  # hit ratio exact / semantic, lookups/s
        "llmcache_stage_seconds_bucket",  # latency percentiles by stage
        "llmcache_tokens_saved_total",
        "llmcache_cost_saved_usd_total",
        "llmcache_entries",
        "llmcache_entry_bytes",
        "llmcache_evictions",
        "llmcache_raft_term",
        "llmcache_raft_is_leader",
        "llmcache_apply_lag",
        "llmcache_upstream_errors_total",
    }
    assert wanted <= names


# -- yaml, dockerfile -----------------------------------------------------------------------


def test_yaml_is_lint_clean() -> None:
    conf = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    files = [
        ROOT / "docker-compose.cluster.yml",
        ROOT / ".yamllint.yaml",
        *sorted((ROOT / "k8s").glob("*.yaml")),
        *sorted(MONITORING.rglob("*.yml")),
    ]
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}: {p.desc}"
        for path in files
        for p in linter.run(path.read_text(), conf, str(path))
    ]
    assert problems == []
    assert list(linter.run("a: 1\na: 2\n", conf))  # the linter does report problems


def test_dockerfile() -> None:
    image = render.image()
    structure = image.parser.structure
    froms = [ins["value"].split()[0] for ins in structure if ins["instruction"] == "FROM"]
    assert len(froms) >= 2, "multi-stage: wheels are built in a stage of their own"
    args = {
        k: v
        for k, _, v in (i["value"].partition("=") for i in structure if i["instruction"] == "ARG")
    }
    for base in froms:
        name = args.get(base.strip("${}"), base) if base.startswith("$") else base
        repo, _, tag = name.partition(":")
        assert repo == "python" and re.match(r"3\.11\.\d+-slim", tag), name  # patch-pinned
    last = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    final = structure[last:]
    user = [ins["value"] for ins in final if ins["instruction"] == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    (health,) = [ins["value"] for ins in final if ins["instruction"] == "HEALTHCHECK"]
    assert "/livez" in health
    exposed = {
        int(p) for ins in final if ins["instruction"] == "EXPOSE" for p in ins["value"].split()
    }
    defaults = NodeConfig.model_fields
    assert exposed == {defaults["port"].default, defaults["raft_port"].default}
    assert any('"/data"' in ins["value"] for ins in final if ins["instruction"] == "VOLUME")
    assert image.entrypoint == ["llmcache-node"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'llmcache-node = "llmcache.node.main:main"' in pyproject
    # No secret baked in: no secret-looking ENV or ARG, and .env never in the build context.
    secretish = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY", re.I)
    assert not [k for k in {**image.env, **args} if secretish.search(k)]
    ignore = (ROOT / ".dockerignore").read_text().split("\n")
    assert ignore[[line.strip() for line in ignore].index("*")] == "*"
    assert not [line for line in ignore if line.startswith("!") and ".env" in line]
    assert not [
        i for i in structure if i["instruction"] in ("COPY", "ADD") and ".env" in i["value"]
    ]


# -- raft-core and DNS ----------------------------------------------------------------------


def test_raft_core_waits_for_its_own_name() -> None:
    assert asyncio.run(raft_core._resolvable("localhost", 0))
    assert not asyncio.run(raft_core._resolvable("llmcache-0.invalid", 0))
