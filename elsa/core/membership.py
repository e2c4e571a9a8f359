"""Who is a member of a job: the per-job view on the packed pid index, and the
members that exited recently (elsa/core/manager.py keeps both).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple

from elsa.core.pidindex import PidIndex

#: The index packs a job slot and a start time into one int per process:
#: start ticks fit 40 bits for 348 years of uptime at USER_HZ 100.
SLOT_SHIFT = 40
START_MASK = (1 << SLOT_SHIFT) - 1


class Members:
    """One job's members: a view on the manager's packed index (pid -> slot|start).

    elsad must hold 100,000+ tracked processes in little memory (issue 6: 40 MB).
    One slot of the flat PidIndex per process (24-48 B) instead of a per-job
    dict plus a (jid, start) tuple in a dict index (~280 B). Iteration
    scans the whole index, so it is kept to requests and resyncs, never the
    per-event path; membership tests and counts are O(1).
    """

    __slots__ = ("index", "tag", "count")

    def __init__(self, index: PidIndex, slot: int) -> None:
        self.index = index
        self.tag = slot << SLOT_SHIFT
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __contains__(self, pid: object) -> bool:
        v = self.index.get(pid)
        return v is not None and v & ~START_MASK == self.tag

    def get(self, pid: int, default: Optional[int] = None) -> Optional[int]:
        v = self.index.get(pid)
        return v & START_MASK if v is not None and v & ~START_MASK == self.tag else default

    def __setitem__(self, pid: int, start: int) -> None:
        if pid not in self:
            self.count += 1
        self.index[pid] = self.tag | start

    def pop(self, pid: int, default: Optional[int] = None) -> Optional[int]:
        v = self.index.get(pid)
        if v is None or v & ~START_MASK != self.tag:
            return default
        del self.index[pid]
        self.count -= 1
        return v & START_MASK

    def items(self) -> List[Tuple[int, int]]:
        """(pid, start_ticks) pairs, as a list: safe to mutate the job while looping."""
        tag = self.tag
        return [(pid, v & START_MASK) for pid, v in self.index.items()
                if v & ~START_MASK == tag]

    def __iter__(self) -> Iterator[int]:
        return iter([pid for pid, _ in self.items()])


class ExitHistory:
    """Members that exited recently, so that accounting records arriving after
    the exit event still find their job (CSA shipped that race, 12b6a9d).

    Held in one dict per second of exits: expiry drops whole generations, and
    an exit costs one (jid, start_ticks) tuple in a dict (~170 B). A busy node
    exiting 5,000 processes a second holds linger x 5,000 of them (a list per
    pid with a record object and a deque entry measured 480 B each, 145 MB for
    300,000). Beyond the linger the aggregator resolves from the membership
    history in the store.
    """

    def __init__(self, linger: float, clock: Callable[[], float]) -> None:
        self.linger = linger
        self.clock = clock
        # (second, {pid: (jid, start) or [(jid, start), ...] if the pid repeats})
        self.generations: Deque[Tuple[int, Dict[int, Any]]] = collections.deque()
        # pid -> the newest generation holding it. Most lookups are
        # misses (every process on the machine has an accounting record, few
        # are members): one dict lookup answers them instead of one per
        # generation (a linger's worth), a measured part of elsad's CPU per process.
        self._newest: Dict[int, Dict[int, Any]] = {}

    def add(self, pid: int, jid: int, start_ticks: int, now: Optional[float] = None) -> None:
        """*now*: the clock's time when the caller has just read it."""
        second = int(self.clock() if now is None else now)
        gens = self.generations
        if gens and gens[-1][0] == second:
            gen = gens[-1][1]
        else:
            gen = {}
            gens.append((second, gen))
        self._newest[pid] = gen
        entry = (jid, start_ticks)
        prev = gen.setdefault(pid, entry)
        if prev is not entry:  # the pid was reused within the second
            if isinstance(prev, list):
                prev.append(entry)
            else:
                gen[pid] = [prev, entry]

    def find(self, pid: int, start_ticks: Optional[int], tolerance: int) -> Optional[int]:
        """The job of the latest exit of *pid* matching *start_ticks*."""
        newest = self._newest.get(pid)
        if newest is None:
            return None
        entry = newest.get(pid)
        if type(entry) is tuple and (start_ticks is None
                                     or abs(entry[1] - start_ticks) <= tolerance):
            return entry[0]  # the latest exit matches: the common case, one lookup
        for _, gen in reversed(self.generations):
            entry = gen.get(pid)
            if entry is None:
                continue
            for jid, start in (reversed(entry) if isinstance(entry, list) else (entry,)):
                if start_ticks is None or abs(start - start_ticks) <= tolerance:
                    return jid
        return None

    def jids(self) -> Set[int]:
        """Jobs with a member that exited within the linger (records may still come)."""
        out: Set[int] = set()
        for _, gen in self.generations:
            for entry in gen.values():
                if isinstance(entry, list):
                    out.update(jid for jid, _ in entry)
                else:
                    out.add(entry[0])
        return out

    def expire(self) -> None:
        horizon = self.clock() - self.linger
        gens = self.generations
        newest = self._newest
        while gens and gens[0][0] + 1 <= horizon:
            gen = gens.popleft()[1]
            for pid in gen:
                if newest.get(pid) is gen:  # no newer generation holds it
                    del newest[pid]

    def __len__(self) -> int:
        return sum(len(gen) for _, gen in self.generations)
