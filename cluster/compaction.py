"""Hold pysyncobj's log compaction while a snapshot is on its way to a follower.

pysyncobj (0.3.17) compacts the log whenever its rule fires (``logCompactionMinEntries``
entries or ``logCompactionMinTime`` seconds), whatever a follower still needs: it writes a new
snapshot at ``raftLastApplied`` and drops the log before it. A follower that is being sent a
snapshot gets the *old* file (the transfer keeps the file it opened), and when it ends the
leader points the follower's next index past the *new* snapshot: the follower lacks the entries
in between, fails the next append entries and is sent a snapshot again. Whenever transferring
and installing takes longer than the compaction interval (a wiped follower of a 100k-entry
group under steady writes) it chases snapshots forever.

:class:`CompactionHold`, ticked once per pysyncobj tick by raft-core, pushes compaction back
while a transfer is in flight and until its follower has confirmed the log tail after it:

- **Leader**: a transfer is in flight while pysyncobj's serializer has a transmission for the
  follower. When it ends (last chunk sent, or cancelled because the follower disconnected) the
  follower still has to install the snapshot and accept the entries after it; it stays
  *pending* until the leader's match index for it reaches the commit index of that moment, or
  ``grace_s`` passed. (The match index never goes down in pysyncobj, so a wiped follower may
  start with its old, higher one: then it stays pending until it passes that, which under
  writes is soon after it caught up.)
  A transfer that pysyncobj completes within one tick (it sends chunks for up to
  ``appendEntriesPeriod``, 0.1 s, per tick: a small store) is never seen here; resending one
  is cheap.
- **Follower**: while a snapshot is arriving (pysyncobj's incoming file is open and grew in
  the last ``grace_s``) its own compaction waits too: the received file and our own snapshot
  share ``raft/snapshot``, and our writer finishing last would replace the received one (Raft
  would then send it all again).
- **How**: while held, pysyncobj's thresholds are raised (``logCompactionMinTime`` to infinity,
  ``logCompactionMinEntries`` to the entry cap) and restored when the hold ends, so compaction
  fires on the next tick if it is due. The thresholds are read by pysyncobj's
  ``__tryLogCompaction`` on every tick, before the tick callbacks.
- **Bounded**: a hold lasts at most ``max_hold_s`` (then compaction runs once, with a warning,
  and the hold may start again after it), and pysyncobj itself compacts when the log passes
  ``max(entries_factor x logCompactionMinEntries, min_entries_cap)`` entries (also warned).
- **A compaction that starts during a transfer anyway** (a cap, or a transfer that began in
  the very tick compaction fired, before this object saw it) makes the transfer useless: it
  is cancelled, and pysyncobj restarts it from the new snapshot once that is written
  (it sends nothing while a snapshot is being written anyway).

Everything here reads pysyncobj's private state through its mangled names, on the tick thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("llmcache.raft")

MAX_HOLD_S = 600.0
"""Longest hold: a transfer stuck longer than this (or far slower than the writes) lets the
log be compacted anyway; a 100k-entry (~500 MB) transfer and install takes ~2 min here."""
ENTRIES_FACTOR = 10
MIN_ENTRIES_CAP = 50_000
"""While held, the log may grow to max(ENTRIES_FACTOR x logCompactionMinEntries,
MIN_ENTRIES_CAP) entries before pysyncobj compacts anyway (with a small compaction setting the
factor alone would be a few seconds of writes)."""
GRACE_S = 60.0
"""How long after its transfer ended a follower may take to install the snapshot and confirm
the log tail before the hold lets go of it; also how long a stalled incoming transfer counts."""


class CompactionHold:
    """See the module docstring. ``tick()`` runs on pysyncobj's tick thread (a tick callback)."""

    def __init__(
        self,
        core: Any,
        *,
        max_hold_s: float = MAX_HOLD_S,
        entries_factor: int = ENTRIES_FACTOR,
        min_entries_cap: int = MIN_ENTRIES_CAP,
        grace_s: float = GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.conf = core._SyncObj__conf
        self.serializer = core._SyncObj__serializer
        self.min_entries = int(self.conf.logCompactionMinEntries)
        self.min_time = float(self.conf.logCompactionMinTime)
        self.max_entries = max(entries_factor * self.min_entries, min_entries_cap)
        self.max_hold_s = max_hold_s
        self.grace_s = grace_s
        self.clock = clock
        self.holding = False
        self.capped = False  # the time cap let go: no new hold until a compaction starts
        self.since: float | None = None  # start of this hold (or of its last compaction)
        self._sending: set[Any] = set()  # followers with a transmission at the last tick
        self._pending: dict[Any, tuple[int, float]] = {}  # follower -> (target, deadline)
        self._incoming: tuple[int, float] | None = None  # (bytes received, when it last grew)
        self._serializing = False
        self._held_at = 0.0

    def tick(self) -> None:
        now = self.clock()
        sending = self._track_outgoing(now)
        receiving = self._track_incoming(now)
        serializing = self._serializer_busy()
        if serializing and not self._serializing:  # a compaction started in this tick
            if self.holding:  # pysyncobj's own rule, at the entry cap
                log.warning(
                    "log compaction ran during a snapshot transfer: the log reached %d entries, "
                    "the cap while holding",
                    self.max_entries,
                )
                self.since = now
            self._cancel_transfers(sending)
            sending = set()
            self.capped = False
        self._serializing = serializing
        if not (sending or self._pending or receiving):
            self.capped = False
            self._release(now)
        elif not self.capped:
            if not self.holding:
                self._hold(now, sending)
            elif self.since is not None and now - self.since > self.max_hold_s:
                log.warning(
                    "log compaction held for %.0f s by a snapshot transfer; compacting anyway "
                    "(its follower will need a newer snapshot)",
                    now - self.since,
                )
                self.capped = True
                self._release(now)

    # -- what is in flight --------------------------------------------------------------------

    def _track_outgoing(self, now: float) -> set[Any]:
        """Followers being sent a snapshot; updates the pending ones (leader only)."""
        transmissions = self.serializer._Serializer__transmissions
        if not self.core._isLeader():
            # A transfer left over from when this node led would resume mid-file, spliced
            # onto whatever the follower receives then, if this node leads again: drop it.
            for node in list(transmissions):
                self.serializer.cancelTransmisstion(node)
            self._sending.clear()
            self._pending.clear()
            return set()
        sending = set(transmissions)
        match = self.core._SyncObj__raftMatchIndex
        commit = self.core.raftCommitIndex
        for node in self._sending - sending:  # its transfer ended (or was cancelled)
            self._pending[node] = (max(commit, match.get(node, 0) + 1), now + self.grace_s)
        self._sending = sending
        self._pending = {
            node: (target, deadline)
            for node, (target, deadline) in self._pending.items()
            if node not in sending and now < deadline and match.get(node, 0) < target
        }
        return sending

    def _track_incoming(self, now: float) -> bool:
        """True while a snapshot is arriving here (the file grew within ``grace_s``)."""
        incoming = self.serializer._Serializer__incomingTransmissionFile
        if incoming is None or incoming.closed:
            self._incoming = None
            return False
        size = incoming.tell()
        if self._incoming is None or self._incoming[0] != size:
            self._incoming = (size, now)
        return now - self._incoming[1] < self.grace_s

    def _serializer_busy(self) -> bool:
        # pysyncobj's Serializer keeps a non-zero "pid" from serialize() until checkSerializing
        # reports the end (raft-core writes in a thread: -2 then), and sends no chunk meanwhile.
        return bool(self.serializer._Serializer__pid)

    def _cancel_transfers(self, sending: set[Any]) -> None:
        for node in sending:
            log.info(
                "log compaction started during a snapshot transfer to %s: restarting the "
                "transfer from the new snapshot",
                getattr(node, "id", node),
            )
            self.serializer.cancelTransmisstion(node)
        self._sending -= sending

    # -- the knobs ----------------------------------------------------------------------------

    def _hold(self, now: float, sending: set[Any]) -> None:
        self.holding = True
        self.since = self._held_at = now
        self.conf.logCompactionMinTime = math.inf
        self.conf.logCompactionMinEntries = self.max_entries
        who = sorted(str(getattr(n, "id", n)) for n in sending | set(self._pending))
        log.info(
            "holding log compaction: snapshot transfer %s",
            f"to {', '.join(who)}" if who else "arriving",
        )

    def _release(self, now: float) -> None:
        if not self.holding:
            return
        self.holding = False
        self.conf.logCompactionMinTime = self.min_time
        self.conf.logCompactionMinEntries = self.min_entries
        self.since = None
        log.info("log compaction resumes (held %.1f s)", now - self._held_at)
