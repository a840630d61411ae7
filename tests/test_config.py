"""Node configuration: layers, file formats, env parsing, validation, masking, Kubernetes names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmcache.node.config import (
    MASK,
    ConfigError,
    NodeConfig,
    Peer,
    load_config,
    render_config,
)

PW = {"raft_password": "raft-pw"}
HEADLESS = "llmcache-headless.default.svc.cluster.local"


def problems(
    flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, **kw: Any
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(flags=flags, env=env or {}, **kw)
    assert str(info.value).startswith("invalid configuration:")
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_with_nothing_given() -> None:
    cfg = load_config(env={})
    assert cfg.data_dir == Path("./llmcache-data")
    assert (cfg.host, cfg.port, cfg.workers) == ("127.0.0.1", 8080, 1)
    assert cfg.raft_host == "127.0.0.1"  # defaults to host
    assert cfg.raft_address == cfg.node_name == "127.0.0.1:7000"
    assert cfg.http_url == "http://127.0.0.1:8080"
    assert cfg.peers == [] and cfg.embedder == "default" and cfg.enabled
    assert cfg.journal and cfg.full_dump and cfg.durable
    assert cfg.max_map_size == 64 << 30 and cfg.max_body_bytes == 8 << 20
    assert cfg.open_access


def test_env_defaults_to_the_process_environment(tmp_path: Path) -> None:
    file = write(tmp_path / "node.toml", "workers = 4\n")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "LLMCACHE_PORT": "9123",
        "LLMCACHE_CONFIG": str(file),
    }
    code = "from llmcache.node.config import load_config as l; c = l(); print(c.port, c.workers)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert run.stdout.split() == [b"9123", b"4"], run.stderr


def test_each_layer_beats_the_one_below(tmp_path: Path) -> None:
    file = write(tmp_path / "node.yaml", "port: 1001\nworkers: 2\nnode_id: from-file\n")
    env = {"LLMCACHE_PORT": "1002", "LLMCACHE_WORKERS": "3", "LLMCACHE_LOG_LEVEL": "DEBUG"}
    cfg = load_config(file, flags={"port": 1003, "workers": None}, env=env)
    assert cfg.port == 1003  # flag > env
    assert cfg.workers == 3  # env > file; a None flag is "not passed"
    assert cfg.node_id == "from-file"  # file > default
    assert cfg.log_level == "debug"  # env > default, case-insensitive
    assert cfg.hnsw_m == 16  # default


def test_yaml_file(tmp_path: Path) -> None:
    file = write(
        tmp_path / "node.yml",
        """
port: 9000
raft_password: pw
peers:
  - llmcache-1.svc:7000
  - {host: 10.0.0.3, raft_port: 7001, http_url: "https://10.0.0.3:8443"}
prices:
  gpt-4o: {prompt: 2.5, completion: 10}
enabled: false
""",
    )
    cfg = load_config(file, env={})
    assert cfg.peers == [
        Peer(host="llmcache-1.svc", raft_port=7000, http_url="http://llmcache-1.svc:9000"),
        Peer(host="10.0.0.3", raft_port=7001, http_url="https://10.0.0.3:8443"),
    ]
    assert cfg.prices == {"gpt-4o": {"prompt": 2.5, "completion": 10.0}}
    assert cfg.enabled is False


def test_toml_file_named_by_env_and_overridden_by_argument(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "node.toml",
        """
port = 9100
raft_password = "pw"
peers = ["a.svc:7000|http://a.svc:9999"]
[prices."gpt-4o-mini"]
prompt = 0.15
completion = 0.6
""",
    )
    cfg = load_config(env={"LLMCACHE_CONFIG": str(toml)})
    assert cfg.port == 9100
    assert [str(p) for p in cfg.peers] == ["a.svc:7000|http://a.svc:9999"]
    assert cfg.prices["gpt-4o-mini"] == {"prompt": 0.15, "completion": 0.6}
    other = write(tmp_path / "other.yaml", "port: 9200\n")
    assert load_config(other, env={"LLMCACHE_CONFIG": str(toml)}).port == 9200


def test_env_strings_are_parsed() -> None:
    env = {
        "LLMCACHE_PORT": "9000",
        "LLMCACHE_RAFT_PASSWORD": "pw",
        # DNS names that do not resolve here are kept as written.
        "LLMCACHE_PEERS": f"llmcache-1.{HEADLESS}:7000, 10.0.0.2:7001|https://10.0.0.2:8443,",
        "LLMCACHE_ENABLED": "false",
        "LLMCACHE_PRICES": '{"gpt-4o": {"prompt": 2.5, "completion": 10}}',
        "LLMCACHE_ADMIN_TOKEN": "",  # empty means unset
        "LLMCACHE_DATA_DIR": "/var/lib/llmcache",
    }
    cfg = load_config(env=env)
    assert [(p.host, p.raft_port, p.http_url) for p in cfg.peers] == [
        (f"llmcache-1.{HEADLESS}", 7000, f"http://llmcache-1.{HEADLESS}:9000"),
        ("10.0.0.2", 7001, "https://10.0.0.2:8443"),
    ]
    assert [p.raft_address for p in cfg.peers] == [f"llmcache-1.{HEADLESS}:7000", "10.0.0.2:7001"]
    assert cfg.enabled is False
    assert cfg.prices == {"gpt-4o": {"prompt": 2.5, "completion": 10.0}}
    assert cfg.admin_token is None
    assert cfg.data_dir == Path("/var/lib/llmcache")


def test_peer_urls_follow_this_nodes_scheme(tmp_path: Path) -> None:
    cert, key = write(tmp_path / "c.pem", "x"), write(tmp_path / "k.pem", "x")
    flags = {"peers": "b:7000", "tls_cert": cert, "tls_key": key, **PW}
    cfg = load_config(flags=flags, env={})
    assert cfg.peers[0].http_url == "https://b:8080"
    assert cfg.http_url == "https://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("flags", "field", "words"),
    [
        ({"journal": True, "full_dump": False}, "journal", "journal without full_dump loses a"),
        ({"journal": False, "full_dump": True}, "full_dump", "full_dump without journal loses a"),
        ({"peers": "b:7000"}, "raft_password", "required when peers"),
        ({"peers": "b:7000", "raft_password": ""}, "raft_password", "must not be empty"),
        ({"peers": "b", **PW}, "peers", "'b' is not host:raft_port"),
        ({"peers": "b:http", **PW}, "peers.0.raft_port", "integer"),
        ({"peers": "127.0.0.1:7000", **PW}, "peers", "this node itself"),
        ({"embedder": "word2vec"}, "embedder", "'default', 'remote' or 'none'"),
        ({"embedder": "remote"}, "remote_embedder_model", "required when embedder is 'remote'"),
        ({"remote_embedder_url": "ftp://x"}, "remote_embedder_url", "not an http"),
        ({"port": 70000}, "port", "less than or equal to 65535"),
        ({"raft_port": 0}, "raft_port", "greater than or equal to 1"),
        ({"port": 7000}, "raft_port", "also the HTTP port"),
        ({"host": "0.0.0.0", "port": 7000, "insecure": True}, "raft_port", "also the HTTP port"),
        ({"tls_cert": Path(__file__)}, "tls_key", "required when tls_cert"),
        ({"tls_key": Path(__file__)}, "tls_cert", "required when tls_key"),
        ({"tls_cert": Path(__file__), "tls_key": Path("/nonexistent.pem")}, "tls_key", "no such"),
        ({"workers": 0}, "workers", "greater than or equal to 1"),
        ({"workers": 65}, "workers", "less than or equal to 64"),
        ({"raft_min_timeout_s": 4.0}, "raft_min_timeout_s", "below raft_max_timeout_s"),
        ({"hnsw_ef_search": 0}, "hnsw_ef_search", "greater than or equal to 1"),
        ({"prices": {"m": {"prompt": -1}}}, "prices.m.prompt", "greater than or equal to 0"),
        ({"prices": {"m": {"input": 1}}}, "prices.m.input", "'prompt' or 'completion'"),
        ({"log_level": "loud"}, "log_level", "'info'"),
        ({"prot": 1}, "prot", "unknown setting"),
    ],
)
def test_invalid_settings_are_named(flags: dict[str, Any], field: str, words: str) -> None:
    assert any(p.startswith(f"{field}: ") and words in p for p in problems(flags)), problems(flags)


def test_every_problem_is_listed_at_once() -> None:
    found = problems({"embedder": "remote", "peers": "b:7000", "raft_min_timeout_s": 9.0})
    fields = [p.split(":")[0] for p in found]
    assert fields == [
        "raft_password",
        "remote_embedder_url",
        "remote_embedder_model",
        "remote_embedder_dim",
        "raft_min_timeout_s",
    ]
    # Field-level errors too, from every layer.
    found = problems({"port": 0}, env={"LLMCACHE_WORKERS": "many"})
    assert [p.split(":")[0] for p in found] == ["port", "workers"]


def test_remote_embedder_complete_is_valid() -> None:
    flags = {
        "embedder": "remote",
        "remote_embedder_url": "http://127.0.0.1:1/v1",
        "remote_embedder_model": "m",
        "remote_embedder_dim": 384,
    }
    assert load_config(flags=flags, env={}).remote_embedder_dim == 384


def test_bad_env_json_is_a_config_error() -> None:
    assert any("prices" in p for p in problems(env={"LLMCACHE_PRICES": "gpt-4o=2.5"}))


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("bad.yaml", "port: [8080\n", "cannot parse"),
        ("bad.toml", "port = \n", "cannot parse"),
        ("list.yaml", "- port\n", "expected a mapping"),
        ("node.ini", "port=1\n", "expected a .yaml, .yml or .toml"),
    ],
)
def test_unreadable_files_are_named(tmp_path: Path, name: str, text: str, words: str) -> None:
    path = write(tmp_path / name, text)
    [problem] = problems(config_file=path)
    assert problem.startswith(f"config file {path}: ") and words in problem


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problems(config_file=path) == [f"config file {path}: No such file or directory"]
    assert problems(env={"LLMCACHE_CONFIG": str(path)})[0].startswith(f"config file {path}")


def test_unknown_keys_in_a_file_are_named(tmp_path: Path) -> None:
    path = write(tmp_path / "node.toml", 'prot = 1\nhots = "x"\nport = 1\n')
    assert problems(config_file=path) == [
        f"hots: unknown setting in {path}",
        f"prot: unknown setting in {path}",
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1"])
def test_loopback_hosts_may_run_without_tokens(host: str) -> None:
    cfg = load_config(flags={"host": host}, env={})
    assert cfg.open_access


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "llmcache-0.svc"])
def test_exposed_host_needs_a_token_or_insecure(host: str) -> None:
    host_problem, raft_problem = problems({"host": host})
    assert host_problem.startswith(f"host: {host} is reachable") and "admin_token" in host_problem
    # The Raft port would listen there too, and it unpickles what it receives.
    assert raft_problem.startswith("raft_password: required when the Raft port listens")
    with_token = load_config(
        flags={"host": host, "admin_token": "t0ken", "raft_password": "pw"}, env={}
    )
    assert not with_token.open_access
    [problem] = problems({"host": host, "admin_token": "t0ken"})
    assert problem.startswith("raft_password")
    insecure = load_config(flags={"host": host}, env={"LLMCACHE_INSECURE": "true"})
    assert insecure.insecure and not insecure.open_access


def test_ipv6_host_in_urls() -> None:
    assert load_config(flags={"host": "::1"}, env={}).http_url == "http://[::1]:8080"


def test_secrets_are_masked_everywhere(tmp_path: Path) -> None:
    secrets = {
        "raft_password": "s3cret-raft",
        "admin_token": "s3cret-admin",
        "upstream_api_key": "s3cret-upstream",
        "remote_embedder_api_key": "s3cret-embed",
    }
    env = {f"LLMCACHE_{k.upper()}": v for k, v in secrets.items()}
    cfg = load_config(flags={"peers": "b:7000"}, env=env)
    assert cfg.admin_token is not None and cfg.admin_token.get_secret_value() == "s3cret-admin"
    out = render_config(cfg)
    for name, value in secrets.items():
        assert value not in out and value not in repr(cfg)
        assert f"{name}: '{MASK}'" in out
    assert "peers:\n- b:7000|http://b:8080\n" in out
    assert "node_id: 127.0.0.1:7000\n" in out
    # A secret of the wrong type is reported without echoing it.
    bad = write(tmp_path / "node.yaml", "admin_token: 987654321\n")
    found = problems(config_file=bad)
    assert found[0].startswith("admin_token: ") and "987654321" not in "".join(found)


def test_render_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    flags = {"port": 9001, "workers": 2, "prices": {"m": {"prompt": 1.5}}, "tls_cert": None}
    cfg = load_config(flags=flags, env={"LLMCACHE_DATA_DIR": str(tmp_path / "d")})
    again = load_config(write(tmp_path / "printed.yaml", render_config(cfg)), env={})
    assert render_config(again) == render_config(cfg)
    assert again.node_id == cfg.node_name


def k8s(hostname: str, **extra: Any) -> NodeConfig:
    flags = {"hostname_ordinal": True, "replicas": 3, "peer_domain": HEADLESS, **PW, **extra}
    return load_config(flags=flags, env={}, hostname=hostname)


def test_hostname_ordinal_derives_identity_and_peers() -> None:
    cfg = k8s("llmcache-1", raft_port=7100, port=8081)
    assert cfg.node_id == cfg.node_name == "llmcache-1"
    assert cfg.raft_address == f"llmcache-1.{HEADLESS}:7100"
    assert [str(p) for p in cfg.peers] == [
        f"llmcache-0.{HEADLESS}:7100|http://llmcache-0.{HEADLESS}:8081",
        f"llmcache-2.{HEADLESS}:7100|http://llmcache-2.{HEADLESS}:8081",
    ]


def test_hostname_ordinal_yields_to_explicit_settings() -> None:
    cfg = k8s("my-cache-0", node_id="zero", peers="x:7000")
    assert cfg.node_id == "zero"
    assert [p.raft_address for p in cfg.peers] == ["x:7000"]
    assert cfg.raft_host == f"my-cache-0.{HEADLESS}"  # not set explicitly: still derived


def test_hostname_ordinal_errors() -> None:
    with pytest.raises(ConfigError, match="hostname_ordinal: hostname 'web' is not"):
        k8s("web")
    with pytest.raises(ConfigError, match="replicas: 3, but this pod's ordinal is 3"):
        k8s("llmcache-3")
    with pytest.raises(ConfigError, match="raft_password: required when peers"):
        load_config(
            flags={"hostname_ordinal": True, "replicas": 2, "peer_domain": HEADLESS},
            env={},
            hostname="llmcache-0",
        )
    with pytest.raises(ConfigError, match="peer_domain: required with replicas > 1"):
        load_config(flags={"hostname_ordinal": True, "replicas": 2}, env={}, hostname="llmcache-0")
    with pytest.raises(ConfigError, match="peers: the same peer is listed twice"):
        load_config(flags={"peers": "a:7000,a:7000", **PW}, env={})
    single = load_config(flags={"hostname_ordinal": True, **PW}, env={}, hostname="llmcache-0")
    assert single.peers == [] and single.raft_address == "llmcache-0:7000"
