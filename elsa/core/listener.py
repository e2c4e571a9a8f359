"""Process-event listeners: plugins that see every exec and exit on the machine.

The job manager only cares about members of jobs; a listener (application
accounting, elsa/apps/) sees the proc connector's exec and exit events of
every process, in event order, on the daemon's event thread, and, if it
defines :meth:`EventListener.on_usage`, every per-process usage row the
accounting sources store. The daemon binds the listeners' methods into its
event sink and the aggregator only when a plugin returned one from
``elsa_event_listeners``, so a daemon without listeners pays nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

from elsa.config import Config
from elsa.core.guard import run_isolated
from elsa.core.store import Store
from elsa.core.usage import UsageRow
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
    #: add_timer(interval_s, callback, name, active=None): a callback on the event
    #: thread; *active*, if given, says whether it has work (elsa/core/loop.py).
    add_timer: Callable[..., None]
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

    def on_usage(self, rows: List[UsageRow]) -> None:
        """Per-process usage rows (:data:`elsa.core.usage.ROW_FIELDS` order, jid
        attributed) as the aggregator queues them to the store, in batches,
        folded ones included: a process's exit record, from each source, in
        either order with its exit event. Not called unless a listener class
        overrides it."""

    def stop(self) -> None:
        """The daemon stops: persist what is open (called before the store closes)."""

    def status(self) -> Dict[str, Any]:
        """Counters for the ``status`` request."""
        return {}


def usage_sink(listeners: List[EventListener]
               ) -> Optional[Callable[[List[UsageRow]], None]]:
    """The aggregator's observer: every listener's :meth:`EventListener.on_usage`
    that its class overrides, each isolated (a raising listener is logged and
    cannot stop the sources' records from being stored); None without any."""
    observers = [lst for lst in listeners
                 if type(lst).on_usage is not EventListener.on_usage]
    if not observers:
        return None

    def sink(rows: List[UsageRow]) -> None:
        for lst in observers:
            run_isolated(lambda lst=lst: lst.on_usage(rows), "on_usage", lst.name)
    return sink
