"""The proc connector's fork and exit events, applied to the job manager.

Drains in bounded batches, resyncs from /proc after a loss, keeps the burst
hold's baseline current and asks for a priority boost under a backlog. Runs on
the event thread; :class:`~elsa.core.loop.EventLoop` decides when to drain.
"""

from __future__ import annotations

import selectors
import subprocess
import time
from typing import Any, Callable, List, Optional, Tuple

from elsa.core import attribution, usage
from elsa.core.burst import BurstHold
from elsa.core.manager import JobManager
from elsa.core.priority import Priority
from elsa.core.usage import UsageRow
from elsa.errors import KernelInterfaceError
from elsa.kernel.cnproc import ExitEvent, ForkEvent, LossEvent, ProcConnector
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.daemon")

#: How long to drain events after a loss before resyncing anyway (a storm may
#: never leave the socket empty).
RESYNC_MAX_DELAY = 0.5

#: Events read per drain call, and full drains per loop pass.
DRAIN_BATCH = 4096
DRAIN_BATCHES = 4


class _Sink:
    """Binds the connector's hot-path callbacks to the manager's methods."""

    __slots__ = ("on_fork", "on_exit", "on_exec", "on_loss")

    def __init__(self, on_fork, on_exit, on_exec, on_loss) -> None:
        self.on_fork = on_fork
        self.on_exit = on_exit
        self.on_exec = on_exec
        self.on_loss = on_loss


def make_hold(connector: ProcConnector, max_hold: float) -> Optional[BurstHold]:
    """The burst hold on *connector*'s queue, or None where the kernel cannot report it."""
    try:
        connector.queued()
    except OSError as exc:  # SO_MEMINFO: Linux 4.12
        log.warning("burst hold off: the kernel does not report socket queues "
                    "(SO_MEMINFO)", error=exc.strerror)
        return None
    return BurstHold(connector.queued, max_hold)


class ProcEvents:
    """The proc connector's reader: fork and exit events into the manager."""

    def __init__(self, connector: ProcConnector, manager: JobManager, *,
                 hold: Optional[BurstHold], priority: Priority) -> None:
        self.connector = connector
        self.manager = manager
        self.hold = hold
        self.priority = priority
        self.loss_events = 0
        self.drained = 0  # messages the latest drain() read
        self.total = 0  # messages read since start
        self._draining = False
        self._loss_since: Optional[float] = None
        self._sink = _Sink(manager.on_fork, manager.on_exit, self.on_exec, self.on_loss)

    def fileno(self) -> int:
        return self.connector.fileno()

    def arrived(self) -> int:
        """Messages read so far (the sources-only burst hold's measure)."""
        return self.total

    def queued_bytes(self) -> int:
        return self.connector.queued()[0]

    # -- event path ----------------------------------------------------------------------------
    def on_exec(self, pid: int, tgid: int, ts_ns: int) -> None:
        return None

    def add_listeners(self, listeners: List[Any]) -> None:
        """Call *listeners* (elsa/core/listener.py) for every exec and exit,
        after the manager. Without listeners the sink stays as it is."""
        if not listeners:
            return
        manager = self.manager
        on_exit, on_exec = _with_listeners(manager.on_exit, listeners)
        self._sink = _Sink(manager.on_fork, on_exit, on_exec, self.on_loss)
        prompt = [lst.name for lst in listeners if lst.prompt]
        if prompt and self.hold is not None:
            # A listener that reads /proc at each event would find a held
            # burst's short-lived processes gone by the time it is read:
            # events are read at once, only the accounting sources wait.
            log.info("burst hold: sources only, an event listener reads /proc at each event",
                     listeners=prompt)
            self.hold.arrived = self.arrived

    def lost_fork(self, row: UsageRow, boot: float) -> Optional[int]:
        """For a filtered connector (no sequence numbers to reveal loss): a
        usage *row* in no job after a settle whose parent was a member when
        the row's process started was born in that job, and its fork event
        was lost (the kernel drops a message it cannot allocate for every
        listener: docs/daemon.md, "Event loss and resync"). Returns that job
        (the ppid rule, elsa.core.attribution.attribute_by_parent) and reports the
        loss, so that a resync adopts the process's descendants; None when
        the parent was no member then. *boot* is the boot's epoch."""
        ppid = row[usage.PPID]
        manager = self.manager
        if not ppid or manager.index.get(ppid) is None:
            return None  # the common case: a process in no job, child of one in none
        start, tol = attribution.identity(row, boot)
        if start is None:
            return None
        jid = manager.parent_member(ppid, start, tol, row[usage.START_TIME] or 0.0)
        if jid is not None:
            self.on_loss(LossEvent("lost-fork"))
        return jid

    def on_loss(self, event: LossEvent) -> None:
        self.loss_events += 1
        if self._loss_since is None:
            self._loss_since = time.monotonic()
            log.warning("proc connector events lost; will resync from /proc",
                        reason=event.reason, cpu=event.cpu, missing=event.missing)

    def drain(self) -> bool:
        """Apply the queued events; True when the socket was emptied."""
        if self._draining:
            # Re-entered from an event's consequences (a job ends, a source
            # emits its final reading, the aggregator asks to settle): the
            # outer drain carries on after we return.
            return False
        conn = self.connector
        manager = self.manager
        sink = self._sink
        self._draining = True
        self.drained = 0
        try:
            # At most DRAIN_BATCHES full batches per loop pass: under a sustained
            # storm the socket never empties, and clients and timers must still
            # get their turn (the socket stays readable, so we are back at once).
            for _ in range(DRAIN_BATCHES):
                n = conn.drain(sink, DRAIN_BATCH)
                self.drained += n
                if self._loss_since is not None:
                    if n < DRAIN_BATCH or time.monotonic() - self._loss_since > RESYNC_MAX_DELAY:
                        self._loss_since = None
                        manager.resync("event loss")
                if n < DRAIN_BATCH:
                    return True
            self.priority.backlog()
            return False
        finally:
            self._draining = False
            self.total += self.drained
            if self.hold is not None and self.hold.active:
                # Drained during a hold (a request, a job-emptied notice):
                # the queue shrank, which is not the burst ending.
                self.hold.rebase(time.monotonic())

    def settle(self) -> bool:
        """Apply every proc-connector event queued so far (the accounting
        aggregator calls this before it gives up on a record's job).

        True when the socket was emptied with no loss pending and no sequence
        hole open: then every fork and exit that happened before this call is
        reflected in the manager (the kernel queues a process's fork event
        before the process can exit, hence before its accounting record
        exists). False otherwise (also when called from inside a drain).
        """
        if not self.drain():
            return False
        return self._loss_since is None and not self.connector.seqs.holes

    def holes_open(self) -> bool:
        """Whether a sequence hole waits (the work of :meth:`expire_seq_holes`)."""
        return bool(self.connector.seqs.holes)

    def expire_seq_holes(self) -> None:
        """A timer: give up on sequence holes that stayed open (lost events)."""
        if self.connector.seqs.holes:
            self.connector.expire_holes(self._sink, time.monotonic_ns())
            if self._loss_since is not None:
                self.drain()  # drains (maybe nothing) and resyncs

    def job_emptied(self, jid: int) -> None:
        """A backend saw a job's kernel object empty (e.g. cgroup.events populated 0)."""
        manager = self.manager
        if jid not in manager.jobs:
            return
        # Every event queued before the notice first: exit events carry exit
        # codes (and often end the job by themselves), and fork events make
        # the job's later processes members. After a burst hold the backlog
        # is more than one drain's worth; ending the job after the first
        # drain left the forks behind it outside the job (their records
        # without a job). Bounded by what was queued at the notice (256 bytes:
        # the smallest charge per message BurstHold.calibrate accepts), as
        # other processes' events keep arriving in a storm.
        backlog = self.connector.queued()[0]
        read = 0
        while not self.drain() and not self._draining:
            read += self.drained
            if read * 256 >= backlog:
                break
        if jid in manager.jobs:
            manager.job_emptied(jid)

    # -- start-up ---------------------------------------------------------------------------
    def self_test(self) -> None:
        """Fork a child and wait for proof that events reach us.

        The kernel silently ignores a subscription from outside the initial
        pid/user namespace (docs/kernel.md, "cn_proc"); without this check
        elsad would run and track nothing.
        """
        child = subprocess.Popen(["true"], close_fds=True)
        child.wait()
        deadline = time.monotonic() + 3.0
        sel = selectors.DefaultSelector()
        sel.register(self.connector.fileno(), selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                sel.select(0.1)
                seen = False
                for ev in self.connector.read():
                    self._dispatch(ev)
                    # Any event proves the subscription works; so does ENOBUFS
                    # (events were sent to us and did not fit the buffer).
                    seen = seen or isinstance(ev, (ForkEvent, ExitEvent, LossEvent))
                if seen:
                    return
        finally:
            sel.close()
        hint = ("; if this kernel does not take the event filter despite its release "
                "(a LISTEN with an event mask is ignored before Linux 6.6), set "
                "proc_event_filter = false" if self.connector.filtered else "")
        raise KernelInterfaceError(
            "subscribed to the proc connector but saw no event for a test child in 3 s; "
            "elsad must run in the initial pid and user namespace (not in a container)"
            + hint)

    def _dispatch(self, ev: object) -> None:
        """Slow-path dispatch of decoded events (start-up only)."""
        m = self.manager
        if isinstance(ev, ForkEvent):
            m.on_fork(ev.parent_tgid, ev.child_pid, ev.child_tgid, ev.timestamp_ns)
        elif isinstance(ev, ExitEvent):
            m.on_exit(ev.pid, ev.tgid, ev.exit_code, ev.timestamp_ns)
        elif isinstance(ev, LossEvent):
            self.on_loss(ev)


def _with_listeners(manager_exit: Callable[[int, int, int, int], None],
                    listeners: List[Any]) -> Tuple[Callable[..., None], Callable[..., None]]:
    """The sink's (on_exit, on_exec) with the listeners called after the manager.

    A raising listener is logged and isolated here (the hot path's one guard),
    so it can stop neither the daemon nor the manager's bookkeeping."""
    def guarded(method: Callable[..., None], name: str) -> Callable[..., None]:
        def call(*args: int) -> None:
            try:
                method(*args)
            except Exception as exc:
                log.exception("event listener raised; isolated", listener=name,
                              error=f"{type(exc).__name__}: {exc}")
        return call

    execs = [guarded(lst.on_exec, lst.name) for lst in listeners]
    exits = [guarded(lst.on_exit, lst.name) for lst in listeners]
    if len(listeners) == 1:
        (one_exec,), (one_exit,) = execs, exits

        def on_exit(pid: int, tgid: int, code: int, ts: int) -> None:
            manager_exit(pid, tgid, code, ts)
            one_exit(pid, tgid, code, ts)

        return on_exit, one_exec

    def on_exit_all(pid: int, tgid: int, code: int, ts: int) -> None:
        manager_exit(pid, tgid, code, ts)
        for f in exits:
            f(pid, tgid, code, ts)

    def on_exec_all(pid: int, tgid: int, ts: int) -> None:
        for f in execs:
            f(pid, tgid, ts)

    return on_exit_all, on_exec_all
