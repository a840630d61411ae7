"""Stand-in machines for the deployment tests: named hosts with their own address, hostname and
``/etc/hosts``, so that a compose service or a StatefulSet pod runs as itself.

Two modes, chosen once per :class:`Hosts`:

- ``netns`` (root, with ``ip`` and ``iptables``): each host is a network namespace with a veth
  on a bridge the test owns (10.213.K.0/24, the test process at .1); ``ip netns exec`` mounts
  ``/etc/netns/<ns>/hosts`` over ``/etc/hosts``, each process gets its own UTS namespace for
  its hostname, and :meth:`Hosts.firewall` can stand in for a NetworkPolicy.
- ``loopback`` (namespaces unavailable, or ``LLMCACHE_TEST_NETNS=0``): each host is an address
  127.213.K.N on the shared loopback, and ``unshare --mount --uts`` gives each process its own
  ``/etc/hosts`` and hostname. Listening on the wildcard address would collide between hosts
  there, so callers bind the host's own address instead (:attr:`Hosts.loopback`).

Every process started is stopped by PID (SIGTERM, then SIGKILL of its whole tree) and every
namespace, link and file made is removed by :meth:`Hosts.close`, also after a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

IP = shutil.which("ip")
UNSHARE = shutil.which("unshare")
IPTABLES = shutil.which("iptables")
# Inside the new UTS namespace: set the hostname, then become the program.
_SET_HOSTNAME = 'hostname "$1" && shift && exec "$@"'
_MOUNT_HOSTS = 'mount --bind "$2" /etc/hosts && hostname "$1" && shift 2 && exec "$@"'


@dataclass
class Host:
    name: str
    ip: str
    hosts_file: Path
    ns: str | None = None
    dev: str | None = None
    """Its interface inside the namespace (netns mode)."""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc``), descendants first."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            for child in (task / "children").read_text().split():
                found += _tree(int(child))
    return [*found, pid]


def _free_octet(prefix: str) -> int:
    """A K in 1..250 such that no address or route of this machine uses ``prefix``.K."""
    used = subprocess.run(
        [IP or "ip", "-o", "addr"], capture_output=True, text=True, timeout=30
    ).stdout
    used += subprocess.run([IP or "ip", "route"], capture_output=True, text=True, timeout=30).stdout
    start = os.getpid() % 250
    for step in range(250):
        k = (start + step) % 250 + 1
        if f"{prefix}.{k}." not in used:
            return k
    raise RuntimeError(f"no free {prefix}.K.0/24 subnet")


class Hosts:
    """Named hosts (see the module docstring). Use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hosts: dict[str, Host] = {}
        self._last_n = 9  # hosts are .10, .11, ...
        self.tag = f"lcd{os.getpid()}"
        self.mode = "netns" if self._netns_available() else "loopback"
        self.bridge = f"{self.tag}b"
        if self.mode == "netns":
            self.k = _free_octet("10.213")
            self.gateway = f"10.213.{self.k}.1"
            try:
                _run(IP or "ip", "link", "add", self.bridge, "type", "bridge")
                _run(IP or "ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                _run(IP or "ip", "link", "set", self.bridge, "up")
            except BaseException:
                self.close()
                raise
        else:
            self.k = _free_octet("127.213")
            self.gateway = "127.0.0.1"
        print(f"deployment hosts: {self.mode} mode")  # shown by pytest -s / on failure
        if self.loopback:
            warnings.warn(
                "deployment tests ran on 127.x addresses, without namespaces", stacklevel=2
            )

    @staticmethod
    def _netns_available() -> bool:
        if os.environ.get("LLMCACHE_TEST_NETNS") == "0":  # to exercise the fallback
            return False
        if IP is None or UNSHARE is None or IPTABLES is None or os.geteuid() != 0:
            return False
        probe = f"lcdprobe{os.getpid()}"
        try:
            _run(IP, "netns", "add", probe)
        except (subprocess.SubprocessError, OSError):
            return False
        _run(IP, "netns", "del", probe)
        return True

    @property
    def loopback(self) -> bool:
        return self.mode == "loopback"

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_n(self) -> int:
        self._last_n += 1
        return self._last_n

    def add(self, name: str) -> Host:
        """A new host called ``name`` whose ``/etc/hosts`` knows only itself and localhost."""
        n = self._next_n()
        if self.mode == "netns":
            ns, ip = f"{self.tag}h{n}", f"10.213.{self.k}.{n}"
            outside, inside = f"{self.tag}v{n}", f"{self.tag}p{n}"
            run = IP or "ip"
            _run(run, "netns", "add", ns)
            host = Host(name, ip, Path("/etc/netns") / ns / "hosts", ns, inside)
            self.hosts[name] = host  # from here on, close() removes it
            _run(run, "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run(run, "link", "set", inside, "netns", ns)
            _run(run, "link", "set", outside, "master", self.bridge, "up")
            _run(run, "-n", ns, "link", "set", "lo", "up")
            _run(run, "-n", ns, "addr", "add", f"{ip}/24", "dev", inside)
            _run(run, "-n", ns, "link", "set", inside, "up")
        else:
            host = Host(name, f"127.213.{self.k}.{n}", self.root / f"{name}.hosts")
            self.hosts[name] = host
        host.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        self.set_records(host, {host.ip: [name]})
        return host

    def readdress(self, host: Host) -> None:
        """Give ``host`` a new address, as a pod gets when it is recreated (records unchanged)."""
        old, n = host.ip, self._next_n()
        host.ip = f"{old.rsplit('.', 1)[0]}.{n}"
        if host.ns is not None and host.dev is not None:
            _run(IP or "ip", "-n", host.ns, "addr", "del", f"{old}/24", "dev", host.dev)
            _run(IP or "ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", host.dev)

    def firewall(self, host: Host, allowed: list[tuple[int, list[str] | None]]) -> None:
        """Admit TCP to ``host`` only on ``(port, sources)`` (None: from anywhere), plus replies
        and loopback; reject the rest (netns mode only). Replaces earlier rules."""
        assert host.ns is not None and IPTABLES is not None, "needs netns mode"
        rules = [["-i", "lo"], ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"]]
        for port, sources in allowed:
            match = ["-p", "tcp", "--dport", str(port)]
            rules += [match] if sources is None else [[*match, "-s", ip] for ip in sources]
        iptables = [IP or "ip", "netns", "exec", host.ns, IPTABLES]
        _run(*iptables, "-F", "INPUT")
        for rule in rules:
            _run(*iptables, "-A", "INPUT", *rule, "-j", "ACCEPT")
        _run(*iptables, "-A", "INPUT", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")

    def set_records(self, host: Host, records: dict[str, list[str]]) -> None:
        """Replace ``host``'s ``/etc/hosts`` (in place: running processes see the change)."""
        lines = ["127.0.0.1 localhost", *(f"{ip} {' '.join(n)}" for ip, n in records.items())]
        with host.hosts_file.open("w") as out:  # same inode: it stays mounted where it is
            out.write("\n".join(lines) + "\n")

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` as run on ``host``: its network, hosts file and hostname."""
        assert UNSHARE is not None
        if host.ns is not None:
            prefix = [IP or "ip", "netns", "exec", host.ns, UNSHARE, "--uts", "--"]
            return [*prefix, "sh", "-c", _SET_HOSTNAME, "sh", host.name, *argv]
        root = [] if os.geteuid() == 0 else ["--map-root-user"]
        prefix = [UNSHARE, "--mount", "--uts", *root, "--"]
        return [*prefix, "sh", "-c", _MOUNT_HOSTS, "sh", host.name, str(host.hosts_file), *argv]

    def start(self, host: Host, argv: list[str], env: dict[str, str], log: Path) -> None:
        """Start ``argv`` on ``host`` with exactly ``env``; output goes to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                self.command(host, argv), env=env, stdout=out, stderr=subprocess.STDOUT
            )
        host.procs.append(proc)

    def run(
        self, host: Host, argv: list[str], env: dict[str, str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(host, argv), env=env, capture_output=True, text=True, timeout=timeout
        )

    def stop(self, host: Host, timeout: float = 60) -> None:
        """SIGTERM ``host``'s processes; whatever is left after ``timeout`` s is SIGKILLed."""
        for proc in host.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in host.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                for pid in _tree(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(30)
        host.procs.clear()

    def close(self) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                self.stop(host, timeout=30)
        for host in self.hosts.values():
            if host.ns is not None:
                # Deleting the namespace deletes its veth end, and with it the peer on the bridge.
                subprocess.run([IP or "ip", "netns", "del", host.ns], capture_output=True)
                shutil.rmtree(host.hosts_file.parent, ignore_errors=True)
        if self.mode == "netns":
            subprocess.run([IP or "ip", "link", "del", self.bridge], capture_output=True)
        self.hosts.clear()
