"""Burst hold: leave the kernel's queues unread while a burst of processes runs.

Why. Every process a workload starts costs elsad CPU (decoding its events and
accounting records, the membership index, the store): about 90 µs per process
with every source on, on the 2-core development VM. A fork-heavy workload there
costs the kernel about 250 µs of CPU per process, so elsad working alongside it
stretched its wall time by 15-33 % (issue 6; ``benchmarks/bench_overhead.py``).
Neither ``nice 19`` nor ``SCHED_IDLE`` helped: elsad still ran in the
workload's short idle gaps (0.3 CPU s during a 1.7 s run) and the workload was
as slow. With elsad stopped for the length of the burst and left to catch up
afterwards, the same run was 3 % slower than without elsad: the kernel's own
cost of the three interfaces. The kernel buffers what elsad has not read yet
(the proc connector's ``netlink_rcvbuf``, the taskstats socket's ``rcvbuf``,
the pacct file), so a burst can wait there: 10,000 forks and exits queue
17 MB of socket buffer (docs/kernel.md, "cn_proc").

What. After a drain of the proc connector the daemon asks :meth:`BurstHold.wants`
whether events arrive faster than ``rate`` per second. If so it *holds*: it
leaves the proc connector and the accounting sources unread and only calls
:meth:`BurstHold.check` now and then, which reads the proc connector's queued
bytes (one ``getsockopt``) and ends the hold when

* ``quiet``: the queue grew by less than half the entry rate over
  QUIET_CHECKS checks in a row (the burst is over; a pause of a check or
  two, as between the steps of a build or at a workload's start-up, is not
  its end, and work resumed at once would compete with the workload's own
  wind-down);
* ``watermark``: the queue reached half the socket's capacity (a storm longer
  than the buffers; the next check is scheduled early enough, at the observed
  growth rate, to get there before the buffer overflows);
* ``max``: the hold lasted ``max_hold`` seconds (how stale accounting may get).

With an event listener that must see each exec at once (``prompt``, e.g.
application accounting reading /proc/PID/exe before a short-lived program
exits), the hold is *sources only*: the proc connector is read as always and
only the accounting sources wait. Their work (decoding and aggregating exit
records, the store) is then still done in one batch after the burst. The
queue measured is then the events that would have queued: those read since
the hold began (``arrived``) plus those queued now, at the learnt bytes per
event; the accounting sources' own buffers (the taskstats socket) fill at
about that pace.

The daemon ends it by itself for reasons of its own (``waiter``: a client
waits for a job to end; ``stop``). Requests are answered during a hold as always: the
daemon applies the queued events before it reads a request.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

#: Events per second above which the daemon holds (about 250-500 processes a
#: second: a fork is one event, an exec two more, an exit one).
ENTER_RATE = 1000.0
#: Seconds between checks during a hold.
CHECK_INTERVAL = 0.05
#: Consecutive checks with the queue (nearly) still that end a hold.
QUIET_CHECKS = 3
#: Fraction of the socket's capacity that ends a hold.
WATERMARK = 0.5
#: The kernel's charge per queued proc-connector message before any is
#: measured (docs/kernel.md, "cn_proc").
BYTES_PER_EVENT = 832

REASONS = ("quiet", "watermark", "max", "waiter", "stop")


class BurstHold:
    """The hold policy; the daemon does the holding.

    *queued* returns ``(bytes queued, capacity in bytes)`` of the proc
    connector (``ProcConnector.queued``); *max_hold* of 0 disables holding.
    :attr:`arrived`, when set, returns the events read so far and makes the
    hold sources only (module docstring).
    """

    def __init__(self, queued: Callable[[], Tuple[int, int]], max_hold: float,
                 rate: float = ENTER_RATE, interval: float = CHECK_INTERVAL) -> None:
        self._kernel_queued = queued
        self.arrived: Optional[Callable[[], int]] = None
        self._arrived_base = 0
        self.max_hold = max_hold
        self.rate = rate
        self.interval = interval
        self.bytes_per_event = float(BYTES_PER_EVENT)
        self.active = False
        self.since = 0.0
        self._last_bytes = 0
        self._last_t = 0.0
        self._quiet = 0  # consecutive quiet checks
        self.holds = 0
        self.held_seconds = 0.0
        self.ended: Dict[str, int] = dict.fromkeys(REASONS, 0)

    def wants(self, events: int, seconds: float) -> bool:
        """Whether *events* that arrived over *seconds* make a burst."""
        return self.max_hold > 0 and events >= self.rate * max(seconds, 1e-3)

    @property
    def sources_only(self) -> bool:
        return self.arrived is not None

    def queued(self) -> Tuple[int, int]:
        """(bytes queued, capacity); sources only: as if no event had been read."""
        queued, capacity = self._kernel_queued()
        if self.arrived is not None:
            queued += int((self.arrived() - self._arrived_base) * self.bytes_per_event)
        return queued, capacity

    def begin(self, now: float) -> float:
        """Start a hold; returns when to call :meth:`check`."""
        self.active = True
        self.since = now
        self._quiet = 0
        if self.arrived is not None:
            self._arrived_base = self.arrived()
        self._last_bytes, self._last_t = self.queued()[0], now
        self.holds += 1
        return now + self.interval

    def rebase(self, now: float) -> None:
        """The daemon drained the queue during the hold: measure growth from here
        (sources only: the measured queue counts the drained events, no rebase)."""
        if self.arrived is None:
            self._last_bytes, self._last_t = self.queued()[0], now

    def check(self, now: float) -> Optional[float]:
        """When to check next, or None when the hold is over (see module docstring)."""
        queued, capacity = self.queued()
        high = capacity * WATERMARK
        if queued >= high:
            return self.end(now, "watermark")
        if now - self.since >= self.max_hold:
            return self.end(now, "max")
        dt = max(now - self._last_t, 1e-3)
        growth = (queued - self._last_bytes) / dt  # bytes per second
        self._last_bytes, self._last_t = queued, now
        if growth < self.rate * self.bytes_per_event / 2:
            self._quiet += 1
            if self._quiet >= QUIET_CHECKS:
                return self.end(now, "quiet")
            return now + self.interval
        self._quiet = 0
        # Early enough to reach the watermark before the buffer does at this rate.
        until_high = (high - queued) / growth / 2
        return now + max(0.001, min(self.interval, until_high, self.since + self.max_hold - now))

    def end(self, now: float, reason: str) -> None:
        """End the hold (if one is on) and count *reason*."""
        if self.active:
            self.active = False
            self.held_seconds += now - self.since
            self.ended[reason] += 1
        return None

    def calibrate(self, queued_bytes: int, events: int) -> None:
        """Learn the kernel's charge per message from a drain of a known backlog."""
        if events >= 100 and queued_bytes > 0:
            self.bytes_per_event = min(4096.0, max(256.0, queued_bytes / events))

    def status(self) -> Dict[str, object]:
        return {"active": self.active, "sources_only": self.sources_only,
                "max_hold": self.max_hold, "holds": self.holds,
                "held_seconds": round(self.held_seconds, 3), "ended": dict(self.ended),
                "bytes_per_event": round(self.bytes_per_event)}
