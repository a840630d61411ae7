"""``llmcache-node`` as a real child process on a free loopback port, for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

STARTUP_DEADLINE_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NodeProcess:
    """One node: its data dir, ports, environment and log; stopped by PID at teardown."""

    def __init__(self, root: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.raft_port = free_port()
        self.workers = workers
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        scheme = "https" if "LLMCACHE_TLS_CERT" in self.env else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, wait: bool = True) -> NodeProcess:
        args = [
            sys.executable, "-m", "llmcache.node.main",
            "--port", str(self.port), "--raft-port", str(self.raft_port),
            "--data-dir", str(self.data_dir), "--workers", str(self.workers),
        ]  # fmt: skip
        env = {**os.environ, **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, within_s: float = STARTUP_DEADLINE_S) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, _ = self.request("GET", "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"node not ready within {within_s} s:\n{self.log()}")

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """One request on a new connection (so the kernel may pick any worker)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        context = None
        if "LLMCACHE_TLS_CERT" in self.env:
            context = ssl.create_default_context(cafile=self.env["LLMCACHE_TLS_CERT"])
            context.check_hostname = False
        try:
            with urllib.request.urlopen(req, timeout=30, context=context) as resp:
                raw = resp.read()
                status, answer_headers = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            raw, status, answer_headers = err.read(), err.code, dict(err.headers)
        ctype = answer_headers.get("Content-Type", "")
        return status, answer_headers, json.loads(raw) if "json" in ctype else raw

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
