"""Nemeses: faults with a start and a stop (the fault window), and schedules that drive them.

Every nemesis records ``start``/``stop`` events in the history (the shaded windows of the
plots). ``stop`` always leaves the group whole: links healed, every member running.

Network faults need :class:`~jepsen_like.hosts.NetnsHosts`; on loopback hosts they raise
:class:`~jepsen_like.hosts.Unsupported` before the run starts (see :func:`make`).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable

from jepsen_like.history import History
from jepsen_like.hosts import Hosts, Unsupported
from jepsen_like.nodes import Cluster, Node

NETWORK = {
    "partition-leader",
    "partition-majority",
    "partition-bridge",
    "partition-ring",
    "loss",
    "slow",
}


class Nemesis:
    """One kind of fault. ``start`` injects it (returning what it did), ``stop`` heals it."""

    def __init__(
        self, name: str, cluster: Cluster, hosts: Hosts, history: History, seed: int = 0
    ) -> None:
        self.name = name
        self.rng = random.Random(seed)
        """Which node a fault picks: the same for the same seed (and the same leaders)."""
        self.cluster = cluster
        self.hosts = hosts
        self.history = history
        self.active = False
        self.victims: list[Node] = []
        self.at: float | None = None
        """When the fault was injected, once its target was found (see ``leader``)."""

    # -- helpers --

    def leader(self) -> Node:
        leader = self.cluster.leader(deadline_s=30.0)
        if leader is None:
            raise RuntimeError("no agreed leader to target")
        self.at = self.history.now()  # finding the target took a while: the fault starts now
        return leader

    def followers(self) -> list[Node]:
        leader = self.leader()
        return [n for n in self.cluster.members if n is not leader]

    def partition(self, groups: list[list[Node]]) -> None:
        """Nodes talk only within their group(s); a node may be in several (a bridge)."""
        members = self.cluster.members
        for node in members:
            friends = {id(n) for g in groups if node in g for n in g}
            cut = [n.host for n in members if id(n) not in friends]
            if cut:
                self.hosts.drop(node.host, cut)

    def restart_all(self) -> None:
        """Start every member that is down, all before waiting: one alone has no quorum."""
        for node in self.cluster.members:
            if not node.running:
                node.start()
        for node in self.cluster.members:
            node.wait_ready()

    # -- the faults --

    def start(self) -> str:
        members = self.cluster.members
        name = self.name
        if name == "partition-leader":
            leader = self.leader()
            self.partition([[leader], [n for n in members if n is not leader]])
            self.victims = [leader]
        elif name == "partition-majority":
            shuffled = self.rng.sample(members, len(members))
            half = len(members) // 2
            self.partition([shuffled[:half], shuffled[half:]])
            self.victims = shuffled[:half]
        elif name == "partition-bridge":
            # Two halves that each see one bridge node, which sees everyone.
            shuffled = self.rng.sample(members, len(members))
            mid = len(members) // 2
            bridge = shuffled[mid]
            self.partition([shuffled[: mid + 1], shuffled[mid:]])
            self.victims = [bridge]
        elif name == "partition-ring":
            n = len(members)
            self.partition([[members[i], members[(i + 1) % n]] for i in range(n)])
        elif name == "loss":
            for node in members:
                self.hosts.drop(node.host, [n.host for n in members if n is not node], 0.2)
        elif name == "slow":
            for node in members:
                self.hosts.slow(node.host, "256kbit")
        elif name in ("kill-leader", "kill-node", "kill-all", "wipe-follower"):
            targets = {
                "kill-leader": lambda: [self.leader()],
                "kill-node": lambda: [self.rng.choice(members)],
                "kill-all": lambda: list(members),
                "wipe-follower": lambda: [self.rng.choice(self.followers())],
            }[name]()
            for node in targets:
                node.kill()
                if name == "wipe-follower":
                    node.wipe()
            self.victims = targets
        elif name == "pause-leader":
            leader = self.leader()
            leader.signal(signal.SIGSTOP)
            self.victims = [leader]
        elif name == "skew":
            # One follower an hour ahead and (with two or more) another an hour behind.
            skewed = self.rng.sample(self.followers(), min(2, len(members) - 1))
            for node, offset in zip(skewed, (3600.0, -3600.0), strict=False):
                node.kill()  # one at a time: the group keeps its quorum
                node.skew_s = offset
                node.start()
                node.wait_ready()
            self.victims = skewed
        elif name == "rolling-restart":
            # Every member in turn, the leader last: its leadership is transferred first
            # (and a graceful stop would hand it over anyway).
            leader = self.leader()
            for node in [*(n for n in members if n is not leader), leader]:
                if node is leader:
                    node.request("POST", "/v1/cluster/transfer-leader", {}, 20.0)
                node.stop()
                node.start()
                node.wait_ready()
            self.victims = list(members)
        elif name == "transfer-leader":
            leader = self.leader()
            code, _, body = leader.request("POST", "/v1/cluster/transfer-leader", {}, 20.0)
            self.victims = [leader]
            return f"transfer from {leader.name}: {code} {body}"
        elif name == "membership":
            spare = next(n for n in self.cluster.nodes if n not in members)
            spare.wipe()
            spare.start()
            code, _, body = self.leader().request(
                "POST", "/v1/cluster/members", {"address": spare.host.raft_address}, 40.0
            )
            spare.wait_ready()
            self.victims = [spare]
            return f"add {spare.name}: {code} {body}"
        else:
            raise ValueError(f"unknown nemesis {name!r}")
        return " ".join(n.name for n in self.victims)

    def stop(self) -> str:
        name = self.name
        if name in NETWORK:
            self.hosts.heal()
        elif name == "pause-leader":
            for node in self.victims:
                node.signal(signal.SIGCONT)
        elif name == "skew":
            pass  # the skewed clock stays for the final reads: that is when TTLs are compared
        elif name == "membership":
            for spare in self.victims:
                address = spare.host.raft_address
                code, _, body = self.leader().request(
                    "DELETE", f"/v1/cluster/members/{address}", None, 40.0
                )
                spare.kill()
                return f"remove {spare.name}: {code} {body}"
        self.restart_all()
        return " ".join(n.name for n in self.victims)


def check_supported(names: list[str], hosts: Hosts) -> None:
    if hosts.kind != "netns":
        network = sorted(set(names) & NETWORK)
        if network:
            raise Unsupported(
                f"{', '.join(network)} need network namespaces; hosts are {hosts.kind}"
            )


class Schedule:
    """Drives nemeses in a thread: ``single`` (one window in the middle of the run),
    ``alternating`` (fault, heal, fault... every ``interval_s``), ``random`` (a seeded choice
    of nemesis and of durations)."""

    def __init__(
        self,
        nemeses: list[Nemesis],
        kind: str,
        time_limit: float,
        seed: int,
        history: History,
        interval_s: float = 10.0,
        on_error: Callable[[str], None] = print,
    ) -> None:
        self.nemeses = nemeses
        self.kind = kind
        self.time_limit = time_limit
        self.rng = random.Random(seed)
        self.history = history
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.on_error = on_error
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="nemesis", daemon=True)

    def plan(self) -> list[tuple[float, float, Nemesis]]:
        """``(start, duration, nemesis)`` windows in run time."""
        t = self.time_limit
        if not self.nemeses:
            return []
        if self.kind == "single":
            # Long enough for an election and writes after it, then time to recover.
            start = min(4.0, t / 5)
            return [(start, max(1.0, t * 0.6), self.nemeses[0])]
        windows = []
        at, i = min(5.0, t / 4), 0
        while at < t * 0.8 and i < 1000:
            if self.kind == "random":
                duration = self.rng.uniform(self.interval_s / 2, self.interval_s)
                nemesis = self.rng.choice(self.nemeses)
            else:
                duration, nemesis = self.interval_s, self.nemeses[i % len(self.nemeses)]
            duration = min(duration, t * 0.85 - at)
            windows.append((at, duration, nemesis))
            at += duration + (
                self.rng.uniform(3.0, self.interval_s) if self.kind == "random" else self.interval_s
            )
            i += 1
        return windows

    def _run(self) -> None:
        t0 = self.history.t0
        for start, duration, nemesis in self.plan():
            if self.stopping.wait(max(0.0, t0 + start - time.monotonic())):
                return
            self._apply(nemesis, "start")
            if self.stopping.wait(duration):
                return
            self._apply(nemesis, "stop")

    def _apply(self, nemesis: Nemesis, phase: str) -> None:
        at = self.history.now()  # the window begins (ends) when injecting (healing) begins
        nemesis.at = None
        try:
            detail = nemesis.start() if phase == "start" else nemesis.stop()
            nemesis.active = phase == "start"
            self.history.nemesis(phase, nemesis.name, detail, nemesis.at or at)
        except Exception as exc:  # a failed fault is recorded, the run goes on
            message = f"{nemesis.name} {phase}: {type(exc).__name__}: {exc}"
            self.errors.append(message)
            self.history.nemesis(phase, nemesis.name, f"error: {message}")
            self.on_error(message)

    def heal(self) -> None:
        """Stop the schedule and every active fault; restart whatever is down."""
        self.stopping.set()
        self.thread.join(120)
        for nemesis in self.nemeses:
            if nemesis.active:
                self._apply(nemesis, "stop")
        with contextlib.suppress(Exception):
            self.nemeses[0].hosts.heal() if self.nemeses else None
