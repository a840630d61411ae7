"""The standard suite (issue 6): twelve tests, each passing or asserting its known weakness.

``short=True`` is the CI form: items 1, 3, 4 and 6 with shorter time limits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jepsen_like.runner import Spec

FALLBACK_S = 4.0
"""The node's default ``leader_fallback_timeout_s``: how long an isolated leader serves."""

SNAPSHOTS = {"LLMCACHE_LOG_COMPACTION_MIN_ENTRIES": "50", "LLMCACHE_LOG_COMPACTION_MIN_TIME_S": "1"}


def standard(time_limit: float = 40.0) -> dict[int, Spec]:
    t = time_limit
    return {
        1: Spec("01-isolated-leader-stale", nemesis=["partition-leader"], consistency="stale",
                time_limit=t, stale_bound_s=0.0, expect_invalid=["linearizable", "stale_reads"]),
        2: Spec("02-isolated-leader-leader-reads", nemesis=["partition-leader"],
                consistency="leader", time_limit=t, stale_bound_s=FALLBACK_S + 1.0),
        3: Spec("03-isolated-leader-linearizable", nemesis=["partition-leader"],
                consistency="linearizable", time_limit=t),
        4: Spec("04-kill-leader", nemesis=["kill-leader"], workload="set", time_limit=t),
        5: Spec("05-kill-all", nemesis=["kill-all"], workload="set", time_limit=t),
        6: Spec("06-wipe-follower", nemesis=["wipe-follower"], workload="set", time_limit=t,
                env=SNAPSHOTS, expect_log="installed snapshot"),
        7: Spec("07-pause-leader", nemesis=["pause-leader"], consistency="linearizable",
                time_limit=t, interval_s=5.0, schedule="alternating",
                expect_log="raft role leader -> follower"),
        8: Spec("08-bridge-5", nodes=5, nemesis=["partition-bridge"], time_limit=t),
        9: Spec("09-clock-skew", nemesis=["skew"], workload="cache", time_limit=t),
        10: Spec("10-rolling-restart", nemesis=["rolling-restart"], workload="set",
                 time_limit=max(t, 60.0), max_write_gap_s=2.0),
        11: Spec("11-membership", nemesis=["membership"], workload="set", time_limit=t),
    }  # fmt: skip


def short() -> dict[int, Spec]:
    specs = standard(time_limit=25.0)
    return {i: specs[i] for i in (1, 3, 4, 6)}


def bad_config(workdir: Path | None = None) -> dict[str, Any]:
    """Item 12: a node with a journal but no full dump must refuse to start, saying why."""
    with tempfile.TemporaryDirectory(prefix="lcj-") as tmp:
        data = Path(workdir or tmp) / "data"
        env = {**os.environ, "LLMCACHE_JOURNAL": "true", "LLMCACHE_FULL_DUMP": "false"}
        cmd = [sys.executable, "-m", "llmcache.node.main", "--data-dir", str(data), "--port", "1"]
        started = time.monotonic()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    said = "journal without full_dump" in done.stderr + done.stdout
    return {
        "valid": done.returncode != 0 and said,
        "exit_code": done.returncode,
        "message": (done.stderr or done.stdout).strip()[-400:],
        "took_s": round(time.monotonic() - started, 2),
    }
