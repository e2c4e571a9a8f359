"""elsad's CPU priority (config ``nice``), with a boost to nice 0 under a backlog.

A niced elsad yields to the workload; when the proc connector's backlog
outgrows a loop pass it runs at nice 0 until BOOST_HOLD seconds pass without
that, so events are not lost to a full socket buffer.
"""

from __future__ import annotations

import os
import time
from typing import Dict

from elsa.errors import ElsaError
from elsa.kernel.procfs import ProcFS
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.daemon")

#: Seconds without a backlog before elsad returns to its configured nice value.
BOOST_HOLD = 10.0


class Priority:
    """The configured nice value and the one elsad runs at now."""

    def __init__(self, configured: int = 0) -> None:
        self.configured = configured
        self.now = os.getpriority(os.PRIO_PROCESS, 0)
        self.boosted_until = 0.0  # monotonic; 0: not boosted
        self.boosts = 0

    def set(self, value: int) -> None:
        """Set every thread's nice value (Linux nice is per thread)."""
        try:
            for tid in ProcFS().threads(os.getpid()):
                os.setpriority(os.PRIO_PROCESS, tid, value)
        except (OSError, ElsaError) as exc:
            log.warning("could not set nice value", nice=value, error=str(exc))
            return
        self.now = value

    def backlog(self) -> None:
        """The event backlog outgrew a loop pass: boost if a nice value is configured."""
        if not self.configured:
            return
        if self.now != 0:
            self.boosts += 1
            log.warning("event backlog: running at nice 0 until caught up",
                        configured_nice=self.configured)
            self.set(0)
        self.boosted_until = time.monotonic() + BOOST_HOLD

    def boosted(self) -> bool:
        """Whether :meth:`unboost` may have to act (the timer's work)."""
        return bool(self.configured) and self.now != self.configured

    def unboost(self) -> None:
        """Back to the configured value once the boost has expired (a timer)."""
        if (self.configured and self.now != self.configured
                and time.monotonic() >= self.boosted_until):
            self.set(self.configured)

    def reconfigure(self, configured: int) -> None:
        """A reload changed ``nice``."""
        if configured != self.configured:
            self.configured = configured
            self.boosted_until = 0.0
            self.set(configured)

    def status(self) -> Dict[str, int]:
        return {"nice": self.now, "configured": self.configured, "boosts": self.boosts}
