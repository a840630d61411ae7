"""The node's configuration: one validated settings model and the layers it is loaded from.

Layers, each beating the ones before it: defaults < a YAML or TOML file < ``LLMCACHE_*``
environment variables < command-line flags. :func:`load_config` either returns a
:class:`NodeConfig` that passed every check below, or raises :class:`ConfigError` listing every
problem it found, each line starting with the setting at fault. Secrets are ``SecretStr``:
their values never appear in ``repr``, error messages or :func:`render_config`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

MASK = "********"
"""What :func:`render_config` shows in place of a secret that is set."""

_ORDINAL = re.compile(r"^(.*)-(\d+)$")


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


def _non_empty(secret: SecretStr) -> SecretStr:
    # An empty token or password would "authenticate" anyone: treat it as a mistake, not a value.
    if not secret.get_secret_value():
        raise ValueError("must not be empty")
    return secret


Port = Annotated[int, Field(ge=1, le=65535)]
HttpURL = Annotated[str, AfterValidator(_http_url)]
Secret = Annotated[SecretStr, AfterValidator(_non_empty)]


def _url_host(host: str) -> str:
    """``host`` as it must appear in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ConfigError(Exception):
    """An invalid configuration. ``problems`` holds one line per problem, ``"<setting>: <why>"``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class Peer(BaseModel):
    """Another member of this node's Raft group.

    ``host`` is kept exactly as written, never resolved: in Kubernetes a peer's DNS name may
    exist only after this node has started.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(min_length=1)
    raft_port: Port
    http_url: HttpURL
    """Its HTTP front door, where writes received by a follower are forwarded."""

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    def __str__(self) -> str:
        """The env/flag form, ``host:raft_port|http_url``, which parses back to this peer."""
        return f"{self.raft_address}|{self.http_url}"


def _peer_input(item: Any, scheme: str, port: int) -> Any:
    """One peer as written (``"host:raft_port[|url]"`` or a mapping) → Peer fields.

    A missing URL defaults to ``<scheme>://host:<this node's port>``: nodes of one group are
    deployed alike.
    """
    if isinstance(item, str):
        address, _, url = item.strip().partition("|")
        host, colon, raft_port = address.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{item!r} is not host:raft_port or host:raft_port|http://host:port")
        item = {"host": host, "raft_port": raft_port} | ({"http_url": url} if url else {})
    if isinstance(item, dict) and isinstance(item.get("host"), str) and "http_url" not in item:
        item = item | {"http_url": f"{scheme}://{_url_host(item['host'])}:{port}"}
    return item


class NodeConfig(BaseSettings):
    """Everything one ``llmcache-node`` needs to start; valid by construction.

    Build it with :func:`load_config`. Constructing it directly also validates, but reads only
    keyword arguments and ``os.environ``, with no file and no hostname-ordinal derivation.
    """

    model_config = SettingsConfigDict(
        env_prefix="LLMCACHE_",
        extra="forbid",
        # Deployment tools often export "unset" as an empty string.
        env_ignore_empty=True,
        use_attribute_docstrings=True,
    )

    host: str = "127.0.0.1"
    """HTTP bind address. Anything but loopback needs admin_token or insecure (check_exposure)."""
    port: Port = 8080
    workers: int = Field(1, ge=1, le=64)
    """HTTP worker processes sharing the port (SO_REUSEPORT)."""
    # Before peers: a peer's default URL takes this node's scheme, read from validated tls_cert.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    data_dir: Path = Path("./llmcache-data")
    node_id: str | None = None
    """Defaults to raft_address (see node_name)."""
    raft_host: str | None = None
    """This node's Raft address as its peers know it; filled with host when not given."""
    raft_port: Port = 7000
    advertise_url: HttpURL | None = None
    """The HTTP URL peers reach this node at, replicated to the group (``Advertise``) so a node
    added at run time can be forwarded to. Default: http_url, with raft_host in place of a
    wildcard bind address."""
    peers: Annotated[list[Peer], NoDecode] = []
    """The other members. From env/flags: comma-separated ``host:raft_port[|http_url]``."""
    raft_password: Secret | None = None
    """Mandatory with peers: the Raft port unpickles what it receives."""
    journal: bool = True
    full_dump: bool = True
    raft_min_timeout_s: float = Field(1.5, gt=0)
    raft_max_timeout_s: float = Field(3.0, gt=0)
    leader_fallback_timeout_s: float = Field(3.0, gt=0)
    log_compaction_min_entries: int = Field(5000, ge=1)
    log_compaction_min_time_s: float = Field(300.0, gt=0)
    durable: bool = True
    """fsync every LMDB write transaction."""
    max_map_size: int = Field(64 << 30, ge=1 << 20)
    maintenance_period_s: float = Field(5.0, gt=0)
    """raft-core: access reports into the log; on the leader, TTL purge and eviction."""
    access_report_period_s: float = Field(5.0, gt=0)
    """How often a worker reports its entries' hits to raft-core (input of eviction)."""
    embedder: Literal["default", "remote", "none"] = "default"
    """default: offline MiniLM; remote: OpenAI-compatible /embeddings; none: caller sends vectors"""
    remote_embedder_url: HttpURL | None = None
    remote_embedder_model: str | None = None
    remote_embedder_dim: int | None = Field(None, ge=1)
    remote_embedder_api_key: Secret | None = None
    embedding_cache_bytes: int = Field(256 << 20, ge=0)
    models_dir: Path | None = None
    """Where tenant cross-encoders are installed (``llmcache-cli models install``), one
    subdirectory per digest; default ``<data_dir>/models``."""
    hnsw_m: int = Field(16, ge=2)
    hnsw_ef_construction: int = Field(200, ge=1)
    hnsw_ef_search: int = Field(64, ge=1)
    upstream_base_url: HttpURL = "https://api.openai.com/v1"
    upstream_timeout_s: float = Field(120.0, gt=0)
    upstream_api_key: Secret | None = None
    admin_token: Secret | None = None
    enabled: bool = True
    """False (LLMCACHE_ENABLED=false) is the kill switch: the proxy only passes through."""
    insecure: bool = False
    """Allow a non-loopback host without admin_token."""
    max_body_bytes: int = Field(8 << 20, ge=1)
    prices: dict[str, dict[Literal["prompt", "completion"], Annotated[float, Field(ge=0)]]] = {}
    """model → {"prompt": USD per 1M tokens, "completion": USD per 1M tokens}."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    hostname_ordinal: bool = False
    """Kubernetes StatefulSet: node_id, raft_host and peers from the pod hostname <name>-<N>."""
    replicas: int = Field(1, ge=1)
    peer_domain: str = ""
    """Appended to pod names in peer addresses, e.g. llmcache-headless.default.svc.cluster.local"""

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("peers", mode="before")
    @classmethod
    def _parse_peers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = [item for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            return value  # pydantic reports the type error
        scheme = "https" if info.data.get("tls_cert") else "http"
        return [_peer_input(item, scheme, info.data.get("port", 8080)) for item in value]

    @model_validator(mode="after")
    def _check(self) -> Self:
        """Cross-setting rules; raises one ValueError with every broken rule, one per line."""
        if self.raft_host is None:
            self.raft_host = self.host
        problems: list[str] = []
        if self.journal != self.full_dump:
            on, off = ("journal", "full_dump") if self.journal else ("full_dump", "journal")
            problems.append(
                f"{on}: {on} without {off} loses a restarted node for good; enable both or neither"
            )
        if self.peers and self.raft_password is None:
            problems.append(
                "raft_password: required when peers are set "
                "(the Raft port unpickles what it receives)"
            )
        if self.raft_address in {p.raft_address for p in self.peers}:
            problems.append(f"peers: lists this node itself ({self.raft_address}); list the others")
        if self.embedder == "remote":
            for name in ("remote_embedder_url", "remote_embedder_model", "remote_embedder_dim"):
                if getattr(self, name) is None:
                    problems.append(f"{name}: required when embedder is 'remote'")
        wildcards = {"0.0.0.0", "::", ""}
        if self.port == self.raft_port and (
            self.raft_host == self.host or {self.host, self.raft_host} & wildcards
        ):
            problems.append(f"raft_port: {self.raft_port} is also the HTTP port on the same host")
        for name, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
            path: Path | None = getattr(self, name)
            if path is None and getattr(self, other) is not None:
                problems.append(f"{name}: required when {other} is set")
            elif path is not None and not path.is_file():
                problems.append(f"{name}: no such file: {path}")
        addresses = [p.raft_address for p in self.peers]
        if len(set(addresses)) != len(addresses):
            problems.append("peers: the same peer is listed twice")
        if self.raft_min_timeout_s >= self.raft_max_timeout_s:
            problems.append(
                f"raft_min_timeout_s: must be below raft_max_timeout_s "
                f"({self.raft_min_timeout_s} >= {self.raft_max_timeout_s})"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def raft_address(self) -> str:
        """``raft_host:raft_port``: this node's identity in the Raft group."""
        return f"{self.raft_host or self.host}:{self.raft_port}"

    @property
    def node_name(self) -> str:
        """node_id when set, else raft_address."""
        return self.node_id or self.raft_address

    @property
    def open_access(self) -> bool:
        """No admin_token and bound to loopback: token-less requests are allowed."""
        return self.admin_token is None and _is_loopback(self.host)

    @property
    def public_url(self) -> str:
        """advertise_url, else http_url with a wildcard host replaced by raft_host."""
        if self.advertise_url:
            return str(self.advertise_url)
        if self.host in ("0.0.0.0", "::", "") and self.raft_host:
            scheme = "https" if self.tls_cert else "http"
            return f"{scheme}://{_url_host(self.raft_host)}:{self.port}"
        return self.http_url

    @property
    def http_url(self) -> str:
        """``http(s)://host:port``, https when tls_cert is set."""
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{_url_host(self.host)}:{self.port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def check_exposure(cfg: NodeConfig) -> None:
    """Refuse a non-loopback host with no admin_token unless ``insecure`` is set.

    Loopback is 127.0.0.0/8, ::1 and ``localhost``; any other name or address, resolved or
    not, counts as reachable from other machines.
    """
    problems = []
    if cfg.admin_token is None and not cfg.insecure and not _is_loopback(cfg.host):
        problems.append(
            f"host: {cfg.host} is reachable from other machines and no admin_token is set; "
            "set admin_token, bind 127.0.0.1, or set insecure=true to serve it open"
        )
    raft_host = cfg.raft_host or cfg.host
    if cfg.raft_password is None and not cfg.insecure and not _is_loopback(raft_host):
        # The Raft port unpickles what it receives: never open it unauthenticated.
        problems.append(
            f"raft_password: required when the Raft port listens on {raft_host}, which is "
            "reachable from other machines (or set insecure=true)"
        )
    if problems:
        raise ConfigError(problems)


def _read_file(path: Path) -> dict[str, Any]:
    """The settings in a .yaml/.yml/.toml file; every failure names the file."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError([f"config file {path}: expected a .yaml, .yml or .toml file"])
    except OSError as err:
        raise ConfigError([f"config file {path}: {err.strerror}"]) from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"config file {path}: cannot parse: {err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path}: expected a mapping of settings"])
    unknown = sorted(map(str, data.keys() - NodeConfig.model_fields.keys()))
    if unknown:
        raise ConfigError([f"{key}: unknown setting in {path}" for key in unknown])
    return data


def _problems(error: ValidationError) -> list[str]:
    """One ``"<setting>: <why>"`` line per error. Inputs are never echoed: one may be a secret."""
    lines: list[str] = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"] if part != "[key]")
        if err["type"] == "extra_forbidden":
            why = "unknown setting"
        elif err["type"] == "value_error":
            why = str(err["ctx"]["error"])
        else:
            why = err["msg"]
        # A model-level error (no loc) already holds "<setting>: <why>" lines.
        lines.extend(f"{field}: {why}".splitlines() if field else why.splitlines())
    return lines


def _build(layers: Sequence[Mapping[str, Any]], env: Mapping[str, str]) -> NodeConfig:
    """NodeConfig from ``layers[0]`` (flags) > ``env`` > ``layers[1:]`` in that order."""
    env_source = EnvSettingsSource(NodeConfig)
    # The given env instead of os.environ, filtered as env_ignore_empty would have done.
    env_source.env_vars = {k.lower(): v for k, v in env.items() if v != ""}
    first, *rest = (InitSettingsSource(NodeConfig, dict(layer)) for layer in layers)
    try:
        # BaseSettings.__init__ takes _build_sources; dataclass_transform hides it from mypy.
        return NodeConfig(_build_sources=((first, env_source, *rest), {}))  # type: ignore[call-arg]
    except ValidationError as err:
        raise ConfigError(_problems(err)) from None
    except SettingsError as err:  # e.g. LLMCACHE_PRICES that is not JSON
        raise ConfigError([str(err)]) from None


def _ordinal_values(cfg: NodeConfig, hostname: str) -> dict[str, Any]:
    """node_id, raft_host and peers of StatefulSet pod ``hostname`` (``<name>-<N>``)."""
    match = _ORDINAL.match(hostname)
    if match is None:
        raise ConfigError([f"hostname_ordinal: hostname {hostname!r} is not <name>-<ordinal>"])
    name, me = match[1], int(match[2])
    if me >= cfg.replicas:
        raise ConfigError([f"replicas: {cfg.replicas}, but this pod's ordinal is {me}"])
    if cfg.replicas > 1 and not cfg.peer_domain:
        raise ConfigError(
            ["peer_domain: required with replicas > 1 (the headless Service's DNS domain)"]
        )
    domain = f".{cfg.peer_domain}" if cfg.peer_domain else ""
    return {
        "node_id": hostname,
        # Peers know this node by the same name it gives them, or Raft would not recognise it.
        "raft_host": f"{hostname}{domain}",
        "peers": [f"{name}-{i}{domain}:{cfg.raft_port}" for i in range(cfg.replicas) if i != me],
    }


def load_config(
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> NodeConfig:
    """Load, validate and return the node configuration, or raise :class:`ConfigError`.

    ``flags`` holds only the options the user passed (``None`` values are ignored); ``env``
    defaults to ``os.environ``. The file is ``config_file``, else ``LLMCACHE_CONFIG``, else
    none. With ``hostname_ordinal``, node_id, raft_host and peers derived from ``hostname``
    (default: this machine's) fill whatever no layer set. :func:`check_exposure` runs last.
    """
    env = os.environ if env is None else env
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    path = config_file or (Path(env["LLMCACHE_CONFIG"]) if env.get("LLMCACHE_CONFIG") else None)
    file_values = _read_file(path) if path else {}
    cfg = _build([given, file_values], env)
    if cfg.hostname_ordinal:
        # Derived values depend on replicas, peer_domain and raft_port from any layer: a second
        # pass puts them below every layer so an explicit setting still wins.
        derived = _ordinal_values(cfg, hostname or socket.gethostname())
        cfg = _build([given, file_values, derived], env)
    check_exposure(cfg)
    return cfg


def render_config(cfg: NodeConfig) -> str:
    """The effective settings as YAML (for ``--print-config``), every set secret as ``MASK``.

    Peers appear in their env/flag form and node_id as :attr:`NodeConfig.node_name`; with no
    secrets set, the output loads back as a config file to an equal configuration.
    """
    data = cfg.model_dump(mode="json")
    for name, value in cfg:
        if isinstance(value, SecretStr):
            data[name] = MASK
    data["peers"] = [str(peer) for peer in cfg.peers]
    data["node_id"] = cfg.node_name
    return yaml.safe_dump(data, sort_keys=False)
