"""Clock skew for one node: put this directory on ``PYTHONPATH`` with ``LCJ_CLOCK_OFFSET_S``
set, and every Python process of the node (the supervisor and its spawned raft-core and
workers) sees ``time.time()``/``time.time_ns()`` shifted by that many seconds from its start.

Monotonic time stays real, as a skewed machine's would. libfaketime would be the usual tool,
but the 0.9.10 in Debian 12 breaks Python 3.11's ``time.sleep`` (``clock_nanosleep`` with
``TIMER_ABSTIME``: EINVAL with ``--exclude-monotonic``, a hang without it; libfaketime issues
426 and 390). This runs before any module binds ``time.time`` (e.g. as a default argument).
"""

import os
import time

_OFFSET_S = float(os.environ.get("LCJ_CLOCK_OFFSET_S", "0") or 0)
if _OFFSET_S:
    _real_time, _real_time_ns = time.time, time.time_ns
    _offset_ns = int(_OFFSET_S * 1e9)

    def _time() -> float:
        return _real_time() + _OFFSET_S

    def _time_ns() -> int:
        return _real_time_ns() + _offset_ns

    time.time = _time
    time.time_ns = _time_ns
