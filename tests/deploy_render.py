"""What the deployment files describe, rendered the way Docker, Compose and Kubernetes would:
the image's entrypoint and environment, compose services after interpolation, kustomize
resources, and a StatefulSet pod's environment. Tests start these as processes
(tests/deploy_hosts.py) instead of containers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.cluster.yml"
K8S_DIR = ROOT / "k8s"
# Compose: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a "$".
_COMPOSE_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")
_K8S_VAR = re.compile(r"\$\$|\$\((\w+)\)")


@dataclass
class Image:
    """The runtime stage of the Dockerfile: what a container of it starts with."""

    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    parser: DockerfileParser


def image() -> Image:
    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    last_from = max(i for i, ins in enumerate(parser.structure) if ins["instruction"] == "FROM")
    final = parser.structure[last_from:]

    def exec_form(name: str) -> list[str]:
        values = [ins["value"] for ins in final if ins["instruction"] == name]
        return list(yaml.safe_load(values[-1])) if values else []  # a JSON array is YAML

    return Image(exec_form("ENTRYPOINT"), exec_form("CMD"), dict(parser.envs), parser)


# -- compose --------------------------------------------------------------------------------


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` whose variable is unset (compose refuses to start)."""


def interpolate(value: Any, env: Mapping[str, str | None]) -> Any:
    """``value`` (parsed YAML) with compose variables substituted in every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, colon, op, arg = match.groups()
        current = env.get(name)
        missing = current is None or (colon == ":" and current == "")
        if op == "-" and missing:
            return str(arg)
        if op == "?" and missing:
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _COMPOSE_VAR.sub(substitute, value)


def compose(env: Mapping[str, str | None]) -> dict[str, Any]:
    """docker-compose.cluster.yml as compose sees it with ``env`` (a .env file's values)."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())  # resolves anchors and << merges
    result: dict[str, Any] = interpolate(loaded, env)
    return result


def dotenv(path: Path) -> dict[str, str | None]:
    return dict(dotenv_values(path))


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """The environment of a service's container: the image's, then the service's."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {**image().env, **{k: str(v) for k, v in environment.items() if v is not None}}


# -- kubernetes -----------------------------------------------------------------------------


def k8s_resources(files: list[Path] | None = None) -> list[dict[str, Any]]:
    """The kustomize base rendered: its ``resources`` files, in order, every document."""
    if files is None:
        kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
        files = [K8S_DIR / name for name in kustomization["resources"]]
    docs: list[dict[str, Any]] = []
    for path in files:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_env(
    container: Mapping[str, Any],
    pod: Mapping[str, str],
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    """A container's environment as the kubelet builds it (service links disabled): the
    image's, then ``envFrom``, then ``env`` in order with ``$(VAR)`` expanded from what came
    before. ``pod`` holds the ``metadata.*`` fields the downward API may read."""
    env = {**image().env, "HOSTNAME": pod["metadata.name"]}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:

            def expand(match: re.Match[str]) -> str:
                if match[0] == "$$":
                    return "$"
                return env.get(match[1], match[0])

            env[item["name"]] = _K8S_VAR.sub(expand, item["value"])
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[item["name"]] = pod[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            ref = source["configMapKeyRef"]
            env[item["name"]] = config_maps[ref["name"]][ref["key"]]
    return env


def named_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p.get("name") == port))


def ingress(
    policy: Mapping[str, Any], container: Mapping[str, Any], set_ips: list[str]
) -> list[tuple[int, list[str] | None]]:
    """A NetworkPolicy's ingress rules for a pod of the set as ``(port, sources)``: sources are
    the set's pod IPs for a ``podSelector`` peer (the policy selects the set's own labels; the
    test checks that), None when a rule has no ``from``."""
    allowed: list[tuple[int, list[str] | None]] = []
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from")
        assert peers is None or all(set(p) == {"podSelector"} for p in peers)
        for port in rule["ports"]:
            allowed.append(
                (named_port(container, port["port"]), None if peers is None else set_ips)
            )
    return allowed
