"""What elsad itself costs: its CPU time against the processes the machine started.

Every process started on the machine costs elsad work, in a job or not: a
proc-connector event or two and a taskstats record to read, decode and look up
(docs/daemon.md, "Sustained load"). So the figure a site weighs elsad by is its
CPU time per process started, the one ``benchmarks/bench_sustained.py`` prints,
and ``status`` reports it for the node's own load since elsad became ready.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from elsa.errors import ElsaError
from elsa.kernel.procfs import ProcFS

#: ``status`` names the event loop's thread by what it does, not "MainThread".
EVENT_THREAD = "events"
#: The figures are read again at most this often: reading them (/proc/stat and a file
#: per thread) costs ~30 µs, and a client polling ``status`` in a loop must not make the
#: event thread pay that each time (benchmarks/bench_socket.py floods it with status).
REFRESH_S = 1.0


class SelfCost:
    """elsad's CPU since :meth:`start` (its readiness), in total and per thread,
    and the processes the machine started meanwhile."""

    def __init__(self, procfs: ProcFS, clock: Callable[[], float] = time.monotonic) -> None:
        self.procfs = procfs
        self.clock = clock
        self._t0 = 0.0
        self._cpu0: Tuple[float, float] = (0.0, 0.0)
        self._forks0: Optional[int] = None
        self._threads0: Dict[int, float] = {}
        self._last: Optional[Dict[str, Any]] = None
        self._last_at = 0.0

    def start(self) -> None:
        times = os.times()
        self._t0 = self.clock()
        self._cpu0 = (times.user, times.system)
        self._forks0 = self._forks()
        self._threads0 = {tid: u + s for tid, (u, s) in self._thread_cpu().items()}
        self._last = None

    def status(self) -> Dict[str, Any]:
        """``seconds`` since ready; elsad's ``cpu_user_s`` and ``cpu_system_s``,
        ``cpu_percent`` of one CPU, ``processes_started`` on the machine,
        ``cpu_us_per_process`` (None before the first), and ``threads``: CPU
        seconds by thread name. At most REFRESH_S old."""
        now = self.clock()
        if self._last is not None and now - self._last_at < REFRESH_S:
            return self._last
        times = os.times()
        user = times.user - self._cpu0[0]
        system = times.system - self._cpu0[1]
        seconds = now - self._t0
        forks = self._forks()
        started = None if forks is None or self._forks0 is None else forks - self._forks0
        names = {t.native_id: (EVENT_THREAD if t is threading.main_thread() else t.name)
                 for t in threading.enumerate()}
        threads: Dict[str, float] = {}
        for tid, (u, s) in self._thread_cpu().items():
            name = names.get(tid, f"thread-{tid}")  # a library's thread started in C
            used = u + s - self._threads0.get(tid, 0.0)
            threads[name] = round(threads.get(name, 0.0) + used, 3)
        self._last, self._last_at = {
            "seconds": round(seconds, 3),
            "cpu_user_s": round(user, 3),
            "cpu_system_s": round(system, 3),
            "cpu_percent": round(100 * (user + system) / seconds, 3) if seconds > 0 else None,
            "processes_started": started,
            "cpu_us_per_process": (round((user + system) / started * 1e6, 1)
                                   if started else None),
            "threads": threads,
        }, now
        return self._last

    def _forks(self) -> Optional[int]:
        try:
            return self.procfs.forks()
        except ElsaError:
            return None  # status still answers; the figure is unknown

    def _thread_cpu(self) -> Dict[int, Tuple[float, float]]:
        try:
            return self.procfs.thread_cpu(os.getpid())
        except ElsaError:
            return {}
