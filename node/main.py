"""``llmcache-node``: the supervisor of one node (DESIGN.md §2).

It starts one raft-core process (pysyncobj, the only LMDB writer) and, once raft-core's socket
answers, ``--workers`` server workers sharing the HTTP port. Children run in their own process
groups so a terminal's Ctrl-C reaches only the supervisor, which then stops them in order:

- SIGTERM / SIGINT: workers first (they stop accepting, finish in-flight requests and checkpoint
  their indexes), then raft-core (which hands leadership over first when it leads a group); exit
  0.
- A child that dies on its own: the supervisor says which and with what code, stops the others
  and exits 1, so the orchestrator restarts the whole node.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import click

from llmcache.cluster.raft_core import RaftCoreOptions
from llmcache.cluster.raft_core import run as run_raft_core
from llmcache.node import worker
from llmcache.node.config import ConfigError, NodeConfig, load_config, render_config

log = logging.getLogger("llmcache.node")
STARTUP_TIMEOUT_S = 120.0
WORKER_STOP_TIMEOUT_S = worker.SHUTDOWN_GRACE_S + 10
CORE_STOP_TIMEOUT_S = 30.0
POLL_S = 0.2


def raft_options(cfg: NodeConfig) -> RaftCoreOptions:
    password = cfg.raft_password.get_secret_value() if cfg.raft_password else None
    return RaftCoreOptions(
        data_dir=Path(cfg.data_dir),
        socket_path=worker.socket_path(cfg),
        self_address=cfg.raft_address,
        peers=[p.raft_address for p in cfg.peers],
        password=password,
        journal=cfg.journal,
        full_dump=cfg.full_dump,
        raft_min_timeout_s=cfg.raft_min_timeout_s,
        raft_max_timeout_s=cfg.raft_max_timeout_s,
        leader_fallback_timeout_s=cfg.leader_fallback_timeout_s,
        log_compaction_min_entries=cfg.log_compaction_min_entries,
        log_compaction_min_time_s=cfg.log_compaction_min_time_s,
        durable=cfg.durable,
        max_map_size=cfg.max_map_size,
        maintenance_period_s=cfg.maintenance_period_s,
        http_url=cfg.public_url,
    )


def _in_own_group(target: Callable[..., Any], *args: Any) -> None:
    os.setpgrp()  # a terminal's Ctrl-C goes to the supervisor only; it stops us in order
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    result = target(*args)
    sys.exit(result if isinstance(result, int) else 0)


def _stop_when_orphaned(parent: int) -> None:
    """A supervisor killed with SIGKILL cannot stop its children: they notice and stop."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _socket_ready(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Supervisor:
    """Starts, watches and stops the children of one node."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.ctx = multiprocessing.get_context("spawn")
        self.core: BaseProcess | None = None
        self.workers: list[BaseProcess] = []
        self.stopping = False

    def _start(self, name: str, target: Callable[..., Any], *args: Any) -> BaseProcess:
        process = self.ctx.Process(target=_in_own_group, args=(target, *args), name=name)
        process.start()
        log.info("started %s (pid %s)", name, process.pid)
        return process

    def run(self) -> int:
        cfg = self.cfg
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        metrics_dir = Path(cfg.data_dir) / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)  # values of a previous run are stale
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

        self.core = self._start("raft-core", run_raft_core, raft_options(cfg))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _socket_ready(worker.socket_path(cfg)):
            if self.stopping:
                return self._stop(0)
            if not self.core.is_alive():
                log.error("raft-core exited with code %s during start-up", self.core.exitcode)
                return self._stop(1)
            if time.monotonic() > deadline:
                log.error("raft-core did not open its socket within %.0f s", STARTUP_TIMEOUT_S)
                return self._stop(1)
            time.sleep(POLL_S)

        self.workers = [self._start(f"worker-{i}", worker.run, cfg, i) for i in range(cfg.workers)]
        scheme = "https" if cfg.tls_cert else "http"
        log.info("serving on %s://%s:%d (node %s)", scheme, cfg.host, cfg.port, cfg.node_name)
        while not self.stopping:
            for child in (self.core, *self.workers):
                if not child.is_alive():
                    log.error(
                        "%s exited with code %s; stopping the node", child.name, child.exitcode
                    )
                    return self._stop(1)
            time.sleep(POLL_S)
        return self._stop(0)

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        self.stopping = True

    def _stop(self, code: int) -> int:
        _terminate(self.workers, WORKER_STOP_TIMEOUT_S)
        if self.core is not None:
            _terminate([self.core], CORE_STOP_TIMEOUT_S)
        bad = [
            c.name
            for c in (*self.workers, self.core)
            if c is not None and c.exitcode not in (0, None)
        ]
        if code == 0 and bad:
            log.warning("children that did not stop cleanly: %s", ", ".join(bad))
        return code


def _terminate(children: list[BaseProcess], timeout: float) -> None:
    for child in children:
        if child.is_alive():
            child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.error("%s did not stop within %.0f s; killing it", child.name, timeout)
            child.kill()
            child.join()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML or TOML file.")
@click.option("--host", help="HTTP bind address (default 127.0.0.1).")
@click.option("--port", type=int, help="HTTP port (default 8080).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Default ./llmcache-data.")
@click.option("--workers", type=int, help="HTTP worker processes (default 1).")
@click.option("--node-id", help="This node's name (default: its Raft address).")
@click.option("--raft-port", type=int, help="Raft TCP port (default 7000).")
@click.option("--peers", help="Other members: host:raftport[|http://host:port],...")
@click.option("--insecure", is_flag=True, default=None, help="Allow a public bind without tokens.")
@click.option("--print-config", is_flag=True, help="Print the effective settings and exit.")
def main(config_file: Path | None, print_config: bool, **flags: Any) -> None:
    """Run one LLM-Cache node. Every setting is also LLMCACHE_<NAME> in the environment."""
    try:
        cfg = load_config(config_file, flags={k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if print_config:
        click.echo(render_config(cfg))
        return
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(Supervisor(cfg).run())


if __name__ == "__main__":
    main()
