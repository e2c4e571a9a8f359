"""Short fork stays the store's writer holds for the usage row that carries them.

A process that joined its job at its fork and left it at its exit within
``elsa.core.attribution.CARRIED_STAY_S`` needs no member row once a usage row with a start
in ticks (taskstats') naming the same job and process is committed: that row is its
history (docs/accounting.md, "Attribution"). The writer hands each batch's member rows
and usage rows to :meth:`HeldStays.sort`, which holds such closed stays until their
carrier comes (then they are dropped in its transaction) or ``wait`` seconds pass
(then they are written). Only the writer thread touches a HeldStays.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from elsa.core.attribution import CARRIED_STAY_S, TASKSTATS_TOLERANCE_TICKS
from elsa.core.usage import JID, PID, START_TICKS

#: Seconds a closed short fork stay waits for its carrier before its member row is
#: written anyway: the taskstats record follows the exit within the source's read
#: window, or after a burst hold (burst_hold, 5 s by default) ends.
CARRY_WAIT_S = 6.0
#: Short stays are held only while rows that could carry them (a start in ticks) come:
#: with none for this long (taskstats off) they are written at once. Longer than any
#: burst hold, so a burst after a quiet spell is held too.
CARRIER_GONE_S = 60.0

#: Positions in a member row (elsa.core.store.MEMBER_COLUMNS).
M_PID, M_START, M_JID, M_JOINED, M_HOW, M_LEFT, M_DETACHED = 1, 2, 3, 4, 5, 6, 8

MemberRow = List[Any]
UsageRows = Sequence[Sequence[Any]]


def is_short_stay(m: MemberRow) -> bool:
    """A closed stay that began at the process's fork, ended at its exit (not
    detached) and lasted at most CARRIED_STAY_S: a usage row can carry it."""
    left = m[M_LEFT]
    return (left is not None and m[M_HOW] == "fork" and not m[M_DETACHED]
            and left - m[M_JOINED] <= CARRIED_STAY_S)


def carriers(rows: Iterable[Sequence[Any]]) -> Dict[Tuple[int, int], int]:
    """(pid, jid) -> start ticks of the usage *rows* (elsa.core.usage.ROW_FIELDS
    order) that can carry a short fork stay: a job and a start in ticks."""
    return {(r[PID], r[JID]): r[START_TICKS] for r in rows
            if r[JID] is not None and r[START_TICKS] is not None}


class HeldStays:
    """The closed short stays waiting for their carrier, by (pid, jid), oldest first."""

    def __init__(self, wait: float = CARRY_WAIT_S) -> None:
        self.wait = wait
        self._held: collections.OrderedDict[Tuple[int, int], MemberRow] = (
            collections.OrderedDict())
        self._carriers_seen = float("-inf")  # when a batch last held a row with start ticks

    def __len__(self) -> int:
        return len(self._held)

    def due(self) -> Optional[float]:
        """Seconds until the oldest held stay must be written (None: none is held)."""
        for m in self._held.values():
            return m[M_LEFT] + self.wait - time.time()
        return None

    def sort(self, members: Iterable[MemberRow], usage: Sequence[UsageRows], final: bool
             ) -> Tuple[List[MemberRow], List[MemberRow], int]:
        """The member rows to insert with a batch of *members* and the *usage* row
        lists (INSERT_PROC entries) committed with them: (rows to insert, rows taken
        from the held stays, how many of those a usage row carried). *final*: none is
        held any more (the store stops)."""
        held = self._held
        rows: List[MemberRow] = []
        taken: List[MemberRow] = []
        stays: List[MemberRow] = []
        for m in members:
            (stays if is_short_stay(m) else rows).append(m)
        now = time.time()
        # One row per entry: a source's rows all have a start in ticks, or none do.
        if any(entry[0][START_TICKS] is not None for entry in usage):
            self._carriers_seen = now
        if now - self._carriers_seen > CARRIER_GONE_S:
            # No source that could carry a stay has written a row for a while (taskstats
            # off): holding the stays would only delay their rows.
            rows.extend(stays)
        else:
            for m in stays:
                old = held.pop((m[M_PID], m[M_JID]), None)
                if old is not None:  # the pid came back in the job: the first stay is written
                    rows.append(old)
                    taken.append(old)
                held[m[M_PID], m[M_JID]] = m
        carried = 0
        if held:
            carry: Dict[Tuple[int, int], int] = carriers(r for entry in usage for r in entry)
            for key, start in carry.items():
                m = held.get(key)
                if m is not None and abs(m[M_START] - start) <= TASKSTATS_TOLERANCE_TICKS:
                    del held[key]
                    taken.append(m)
                    carried += 1
        expired = float("inf") if final else now - self.wait
        while held:
            m = next(iter(held.values()))
            if m[M_LEFT] > expired:
                break
            held.popitem(last=False)
            rows.append(m)
            taken.append(m)
        return rows, taken, carried

    def put_back(self, members: Iterable[MemberRow]) -> None:
        """A commit failed: release the stays that *members*, its batch's rows, put to
        wait (they come back with the batch, as the rows it took do)."""
        for m in members:
            if self._held.get((m[M_PID], m[M_JID])) is m:
                del self._held[m[M_PID], m[M_JID]]
