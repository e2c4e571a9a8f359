"""Process-event listeners: plugins that see every exec and exit on the machine.

The job manager only cares about members of jobs; a listener (application
accounting, elsa/apps/) sees the proc connector's exec and exit events of
every process, in event order, on the daemon's event thread. The daemon binds
the listeners' methods into its event sink only when a plugin returned one
from ``elsa_event_listeners``, so a daemon without listeners pays nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from elsa.config import Config
from elsa.core.store import Store
from elsa.kernel.procfs import ProcFS


@dataclass
class ListenerContext:
    """What the daemon hands ``elsa_event_listeners`` (built once at start)."""

    config: Config
    procfs: ProcFS
    store: Store
    boot_id: str
    #: The host part of this daemon's job ids (unique per state dir and host).
    host_id: int
    #: The job a live pid belongs to now, or None.
    job_of: Callable[[int], Optional[int]]
    #: add_timer(interval_s, callback, name): a callback on the event thread.
    add_timer: Callable[[float, Callable[[], None], str], None]
    #: Source name -> priority (lower wins) of every installed accounting
    #: source (elsa.core.usage.priorities_of).
    source_priority: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: True while a burst hold leaves the accounting sources unread (docs/daemon.md,
    #: "Burst hold"): exit records then arrive late.
    sources_held: Callable[[], bool] = lambda: False


class EventListener:
    """Base class of a listener. Every method runs on the event thread and must
    not block: read what /proc has now, queue store writes, return."""

    name = ""
    #: True: the listener reads /proc at each event, so events must be read
    #: promptly (the daemon's burst hold then holds only the accounting
    #: sources, docs/daemon.md).
    prompt = False

    def on_exec(self, pid: int, tgid: int, ts_ns: int) -> None:
        """Process *tgid* replaced its program image; *ts_ns* is the kernel's
        CLOCK_MONOTONIC stamp of the event."""

    def on_exit(self, pid: int, tgid: int, exit_status: int, ts_ns: int) -> None:
        """Task *pid* of process *tgid* exited with the wait(2) status
        *exit_status* (threads too: ``pid != tgid``)."""

    def stop(self) -> None:
        """The daemon stops: persist what is open (called before the store closes)."""

    def status(self) -> Dict[str, Any]:
        """Counters for the ``status`` request."""
        return {}
