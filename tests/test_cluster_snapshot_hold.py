"""A wiped follower catches up by one snapshot while writes go on (cluster/compaction.py).

Three real ``llmcache-node`` processes that compact their logs every 50 entries or 0.3 s, a
store of ~36 MB of incompressible responses (a transfer spanning several compaction periods),
a follower wiped and restarted while writers keep writing. Without the compaction hold the
leader compacted during every transfer, so each installed snapshot was already behind the
leader's log and the follower chased snapshots for as long as the writes went on (main at
ad04820: 9 snapshots in 40 s, never caught up).
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.cluster_process import running_cluster
from tests.node_process import NodeProcess
from tests.test_cluster_faults import Writers, wait_converged

CATCH_UP_S = 40.0
"""How long the writers keep writing while the follower catches up (a bound, not a target)."""
BIG_ENTRIES = 750
BIG_BYTES = 48 << 10
"""Under pysyncobj's 64 KB append-entries batch: larger entries take its chunked path, which
often fails on followers ("pickle data was truncated") and slows the preload to seconds each."""
INSTALLED = "installed snapshot at applied index"


def ready(node: NodeProcess) -> bool:
    try:
        code, _, _ = node.request("GET", "/readyz")
    except OSError:
        return False
    return code == 200


def test_a_wiped_follower_catches_up_under_writes_without_chasing_snapshots(
    tmp_path: Path,
) -> None:
    env = {
        "LLMCACHE_LOG_COMPACTION_MIN_ENTRIES": "50",
        "LLMCACHE_LOG_COMPACTION_MIN_TIME_S": "0.3",
    }
    with running_cluster(tmp_path, env=env) as cluster:
        leader = cluster.leader()

        def put_big(i: int) -> None:  # random bytes: pysyncobj's zlib cannot shrink them
            data = base64.b64encode(os.urandom(BIG_BYTES)).decode()
            code, _, body = leader.request(
                "POST", "/v1/cache/store", {"key": f"big-{i}", "response_base64": data}
            )
            assert code == 201, body

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put_big, range(BIG_ENTRIES)))
        follower = cluster.followers()[0]
        others = [n for n in cluster.nodes if n is not follower]
        caught_up = False
        with Writers(others, "hold") as writers:
            writers.wait_for(20)
            cluster.crash(follower)
            shutil.rmtree(follower.data_dir)
            seen = len(follower.log())
            follower.start(wait=False)
            deadline = time.monotonic() + CATCH_UP_S
            while time.monotonic() < deadline and not caught_up:
                assert follower.proc is not None and follower.proc.poll() is None, follower.log()
                caught_up = ready(follower)  # snapshot installed and within 100 entries
                time.sleep(0.2)
            if caught_up:
                writers.wait_for(writers.count() + 20)  # and it keeps up with the writes
        assert not writers.errors, writers.errors[:5]
        installs = follower.log()[seen:].count(INSTALLED)
        assert caught_up, (
            f"not caught up while writes went on ({installs} snapshots installed); its log:\n"
            + follower.log()[seen:][-6000:]
        )
        # One snapshot, two at most (a leader change mid-transfer restarts it elsewhere).
        assert 1 <= installs <= 2, installs
        follower.wait_ready()
        applied, _ = wait_converged(cluster)  # every store equal: same index, same digest
        assert applied >= max(index for _, _, index in writers.acked)
