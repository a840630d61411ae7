"""Where the CLI's commands find their nodes, and how they end: shared by ``cli`` (cluster
commands) and ``commands`` (cache, tenant, export/import, bench).

Exit codes: 0 ok; 1 the server refused (or the cluster is unhealthy); 2 a usage error or no node
could be reached; 3 ``cache lookup`` missed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import click

DEFAULT_URL = "http://127.0.0.1:8080"
DEV_STATE_NAME = "dev-cluster.json"
DEFAULT_DEV_DIR = Path("llmcache-dev")
EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, EXIT_MISS = 0, 1, 2, 3


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def dev_state_path() -> Path:
    return Path(os.environ.get("LLMCACHE_DEV_STATE") or DEFAULT_DEV_DIR / DEV_STATE_NAME)


def seed_urls(urls: Iterable[str]) -> list[str]:
    """The nodes to start from (see the module docstring for the order of sources)."""
    given = [u.rstrip("/") for u in urls]
    if given:
        return given
    if os.environ.get("LLMCACHE_URL"):
        return [os.environ["LLMCACHE_URL"].rstrip("/")]
    try:
        state = json.loads(dev_state_path().read_text())
        return [str(node["url"]) for node in state["nodes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [DEFAULT_URL]
