"""Where nodes run: one network namespace per node on a private bridge, or loopback addresses.

``NetnsHosts`` creates, for a run id ``R``: a bridge ``lcjR`` holding ``10.77.S.1/24`` in the
root namespace (so the harness, the clients, reach every node), and per node ``i`` a namespace
``lcjR-i`` joined to the bridge by a veth pair (``lcjRhI`` on the bridge, ``eth0`` inside) with
address ``10.77.S.(10+i)``. There is no uplink and no route out. ``S`` is drawn per run so two
runs never share a subnet. Everything is named with the ``lcj`` prefix, so :func:`cleanup`
can remove what a crashed run left behind.

``LoopbackHosts`` gives each node its own ``127.77.S.(10+i)`` address in the root namespace: no
network faults are possible there (:class:`Unsupported`), only process faults.

Network faults (iptables, tc) are applied inside a node's namespace with ``ip netns exec``, so
they touch nothing outside the run.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREFIX = "lcj"


class Unsupported(Exception):
    """A fault these hosts cannot inject (e.g. a partition on loopback hosts)."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its stderr when ``check`` and it failed."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


@dataclass(frozen=True)
class Host:
    """One node's place: its address and, with namespaces, the namespace it lives in."""

    index: int
    ip: str
    netns: str | None
    veth: str | None
    http_port: int = 8080
    raft_port: int = 7000

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.http_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.ip}:{self.raft_port}"

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside this host's namespace (unchanged on loopback)."""
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd


def netns_available() -> bool:
    """True when this process may create namespaces and has ``ip`` and ``iptables``."""
    if not (shutil.which("ip") and shutil.which("iptables") and shutil.which("tc")):
        return False
    probe = f"{PREFIX}probe{random.randrange(16**6):06x}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return False
    sh("ip", "netns", "del", probe, check=False)
    return True


class Hosts:
    """A set of hosts for one run; :meth:`close` removes everything :meth:`open` made."""

    kind = "abstract"

    def __init__(self, run_id: str, size: int) -> None:
        self.run_id = run_id
        self.subnet = random.randrange(1, 255)
        self.hosts: list[Host] = []
        self.size = size

    def open(self) -> list[Host]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- network faults (namespaces only) --

    def drop(self, host: Host, peers: list[Host], probability: float | None = None) -> None:
        """Drop traffic between ``host`` and ``peers`` (both ways, at ``host``'s end), all of
        it or a random ``probability`` of packets."""
        raise Unsupported(f"{self.kind} hosts cannot drop packets")

    def heal(self) -> None:
        """Remove every packet filter and link shaping of the run."""

    def slow(self, host: Host, rate: str) -> None:
        """Shape ``host``'s link both ways with a token bucket (``tc tbf``) of ``rate``."""
        raise Unsupported(f"{self.kind} hosts cannot shape links")


class LoopbackHosts(Hosts):
    kind = "loopback"

    def open(self) -> list[Host]:
        self.hosts = [
            Host(i, f"127.77.{self.subnet}.{10 + i}", None, None) for i in range(self.size)
        ]
        return self.hosts

    def close(self) -> None:
        pass


class NetnsHosts(Hosts):
    kind = "netns"

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.run_id}"

    def open(self) -> list[Host]:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"10.77.{self.subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.size):
            ns, veth = f"{PREFIX}{self.run_id}-{i}", f"{PREFIX}{self.run_id}h{i}"
            ip = f"10.77.{self.subnet}.{10 + i}"
            self.hosts.append(Host(i, ip, ns, veth))
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            sh("ip", "link", "set", f"{veth}p", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            inside = ["ip", "netns", "exec", ns]
            sh(*inside, "ip", "link", "set", f"{veth}p", "name", "eth0")
            sh(*inside, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            sh(*inside, "ip", "link", "set", "eth0", "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
        return self.hosts

    def close(self) -> None:
        for host in self.hosts:
            assert host.netns is not None and host.veth is not None
            sh("ip", "link", "del", host.veth, check=False)
            sh("ip", "netns", "del", host.netns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        self.hosts = []

    def drop(self, host: Host, peers: list[Host], probability: float | None = None) -> None:
        assert host.netns is not None
        sample = [] if probability is None else ["-m", "statistic", "--mode", "random"]
        sample += [] if probability is None else ["--probability", f"{probability:.3f}"]
        for peer in peers:
            for chain, side in (("INPUT", "-s"), ("OUTPUT", "-d")):
                sh(*host.wrap(["iptables", "-A", chain, side, peer.ip, *sample, "-j", "DROP"]))

    def heal(self) -> None:
        for host in self.hosts:
            sh(*host.wrap(["iptables", "-F"]), check=False)
            sh(*host.wrap(["tc", "qdisc", "del", "dev", "eth0", "root"]), check=False)
            if host.veth:
                sh("tc", "qdisc", "del", "dev", host.veth, "root", check=False)

    def slow(self, host: Host, rate: str) -> None:
        assert host.veth is not None
        tbf = ["root", "tbf", "rate", rate, "burst", "4kb", "latency", "200ms"]
        sh("tc", "qdisc", "replace", "dev", host.veth, *tbf)
        sh(*host.wrap(["tc", "qdisc", "replace", "dev", "eth0", *tbf]))


def make_hosts(run_id: str, size: int, kind: str = "auto") -> Hosts:
    """``netns`` when asked for or available (``auto``), else ``loopback``."""
    if kind == "netns" or (kind == "auto" and netns_available()):
        return NetnsHosts(run_id, size)
    return LoopbackHosts(run_id, size)


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace, link and data dir (``$TMPDIR/<prefix>data-*``) whose name
    starts with ``prefix`` (leftovers of crashed runs); the names removed. Processes are not
    touched here: a run kills its own by PID, and a node whose namespace is gone has no
    network left."""
    removed: list[str] = []
    for leftover in Path(tempfile.gettempdir()).glob(f"{prefix}data-*"):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(str(leftover))
    if not shutil.which("ip"):
        return removed
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            with contextlib.suppress(RuntimeError):
                sh("ip", "netns", "del", name)
                removed.append(name)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(prefix):
            with contextlib.suppress(RuntimeError):
                sh("ip", "link", "del", name)
                removed.append(name)
    return removed
