"""elsad's event loop: one thread, one selector, events strictly in order.

The loop knows descriptors, timers and one special reader, the proc connector
(:class:`~elsa.core.events.ProcEvents`): it is read first on every wake-up, in
batches (``EVENT_WINDOW``), and a burst hold (elsa/core/burst.py) leaves it and
the accounting sources unread while a burst of processes runs. What the
descriptors and timers are is wired by the composition root,
:class:`elsa.core.daemon.Daemon`.
"""

from __future__ import annotations

import heapq
import itertools
import select as select_mod
import selectors
import signal
import socket
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from elsa.core.events import ProcEvents
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.daemon")

#: Batching window. cn_proc sends one datagram per event; woken for each
#: handful, the loop pays an epoll_wait, a context switch and a loop pass per
#: handful, most of elsad's CPU per process with a fork-heavy workload. After
#: each drain the proc connector's descriptor is left out of the selector for
#: EVENT_WINDOW seconds, so the next wake-up takes everything that arrived
#: meanwhile (the kernel buffer, netlink_rcvbuf = 32 MiB, holds far more than a
#: window's worth). Nothing waits on it: a client request is served after a
#: drain (add_reader's events_first), so a reply always sees every event queued
#: before the request; a backend's job-emptied notice and the aggregator's
#: settle drain by themselves. Each wake-up also costs what its cold caches cost
#: (the workload ran meanwhile): in an exec storm with application accounting, which
#: keeps reading through a burst, the event thread's CPU per drain fitted 132 µs +
#: 3.3 µs per event (docs/applications.md, "What prompt costs"), and 50 ms instead
#: of 10 ms halved elsad's CPU in that storm.
EVENT_WINDOW = 0.05
#: The window while a client waits for a job to end (``urgent``): with the cnproc
#: backend a job ends at its last member's exit event, which nothing else drains.
URGENT_EVENT_WINDOW = 0.01


class _Timer:
    __slots__ = ("interval", "callback", "name", "deferrable", "active")

    def __init__(self, interval: float, callback: Callable[[], None], name: str,
                 deferrable: bool, active: Optional[Callable[[], bool]]) -> None:
        self.interval = interval
        self.callback = callback
        self.name = name
        self.deferrable = deferrable
        self.active = active


class EventLoop:
    """Readers, writers and timers on one selector. ``run()`` until ``request_stop()``."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: List[Tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._readers: Dict[int, Callable[[], None]] = {}
        self._events_first: Set[int] = set()  # client descriptors (add_reader)
        self._deferrable: Set[int] = set()  # source descriptors, left unread in a hold
        self._paused: Set[int] = set()  # descriptors left out of the selector now
        self._windows: Dict[int, float] = {}  # reader -> its batching window (add_reader)
        self._resume_at: Dict[int, float] = {}  # windowed out until then (monotonic)
        self._held_timers: List[_Timer] = []  # deferrable timers due during a hold
        self._writers: Dict[int, Callable[[], None]] = {}
        self._after_pass: List[Callable[[], None]] = []
        self._stop_reason: Optional[str] = None
        self._reload = False
        self.events: Optional[ProcEvents] = None
        #: Called on the loop (not in the signal handler) after SIGHUP.
        self.on_reload: Callable[[], None] = lambda: None
        #: True while someone waits for a job to end: no burst hold then
        #: (job ends must not wait for the hold to end).
        self.urgent: Callable[[], bool] = lambda: False

    # -- selector plumbing -------------------------------------------------------------
    def _register(self, fd: int) -> None:
        mask = 0
        if fd in self._readers and fd not in self._paused and fd not in self._resume_at:
            mask |= selectors.EVENT_READ
        if fd in self._writers:
            mask |= selectors.EVENT_WRITE
        try:
            key = self.selector.get_key(fd)
        except KeyError:
            key = None
        if key is None and mask:
            self.selector.register(fd, mask)
        elif key is not None and mask:
            self.selector.modify(fd, mask)
        elif key is not None:
            self.selector.unregister(fd)

    def add_reader(self, fd: int, callback: Callable[[], None],
                   events_first: bool = False, deferrable: bool = False,
                   window: float = 0.0) -> None:
        """Call *callback* when *fd* is readable. *events_first*: apply the proc
        connector events queued so far before (client requests: a reply must
        see every fork that happened before the request was sent).
        *deferrable*: left unread during a burst hold (accounting sources).
        *window*: seconds *fd* is left out of the selector after each call, so
        that one wake-up reads what arrived meanwhile (a source whose kernel
        queue holds a batch: a wake-up per message costs more than the message;
        nothing wakes the loop for an idle descriptor, unlike a read timer)."""
        self._readers[fd] = callback
        if window > 0:
            self._windows[fd] = window
        else:
            self._windows.pop(fd, None)
        for flag, fds in ((events_first, self._events_first), (deferrable, self._deferrable)):
            if flag:
                fds.add(fd)
            else:
                fds.discard(fd)
        self._register(fd)

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)
        self._events_first.discard(fd)
        self._deferrable.discard(fd)
        self._paused.discard(fd)
        self._windows.pop(fd, None)
        self._resume_at.pop(fd, None)
        self._writers.pop(fd, None)
        self._register(fd)

    def set_writer(self, fd: int, callback: Optional[Callable[[], None]]) -> None:
        if callback is None:
            if self._writers.pop(fd, None) is None:
                return
        else:
            self._writers[fd] = callback
        self._register(fd)

    def add_after_pass(self, callback: Callable[[], None]) -> None:
        """Call *callback* after each pass over the ready descriptors and due
        timers, before the loop waits again: work the callbacks of one pass share."""
        self._after_pass.append(callback)

    def add_timer(self, interval: float, callback: Callable[[], None], name: str,
                  deferrable: bool = False,
                  active: Optional[Callable[[], bool]] = None) -> None:
        """Call *callback* every *interval* seconds. *deferrable*: not during a
        burst hold (the work it does waits for the held events); it runs when
        the hold ends. *active*: whether the timer has work now; while it says
        False the loop neither wakes for the timer nor calls it, and the timer
        keeps its period. Work for a timer appears in some callback, and the
        loop asks *active* again before it waits. So an idle elsad sleeps
        instead of waking for timers with nothing to do: each wake-up of an
        idle CPU cost 50-120 µs of CPU on the development VM."""
        timer = _Timer(interval, callback, name, deferrable, active)
        heapq.heappush(self._timers, (time.monotonic() + interval, next(self._seq), timer))

    def attach_events(self, events: ProcEvents) -> None:
        """The proc connector: the reader served first and in batches."""
        self.events = events
        self.add_reader(events.fileno(), events.drain)

    # -- burst hold (elsa/core/burst.py) -------------------------------------------------
    def _hold_sources(self) -> None:
        self._paused = set(self._deferrable)
        for fd in self._paused:
            self._register(fd)

    def _release_sources(self) -> None:
        paused, self._paused = self._paused, set()
        for fd in paused:
            self._register(fd)
        now = time.monotonic()
        for timer in self._held_timers:
            heapq.heappush(self._timers, (now, next(self._seq), timer))
        self._held_timers.clear()

    # -- stop and reload -------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def request_reload(self) -> None:
        self._reload = True

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop, SIGHUP reloads; the handlers only
        set a flag, and the wake-up fd makes select() return for it."""
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        self._wakeup = (rfd, wfd)  # keep both ends open for the process's life
        signal.set_wakeup_fd(wfd.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda s, f: self.request_stop("SIGTERM"))
        signal.signal(signal.SIGINT, lambda s, f: self.request_stop("SIGINT"))
        signal.signal(signal.SIGHUP, lambda s, f: self.request_reload())

        def drain_wakeup() -> None:
            try:
                while rfd.recv(512):
                    pass
            except BlockingIOError:
                pass

        self.add_reader(rfd.fileno(), drain_wakeup)

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> str:
        """Serve until a stop is requested; returns the reason."""
        select = self.selector.select
        readers = self._readers
        writers = self._writers
        windows = self._windows
        resume_at = self._resume_at  # descriptors windowed out, and until when
        after_pass = self._after_pass
        events_first = self._events_first
        events = self.events
        nl_fd = events.fileno() if events is not None else -1
        hold = events.hold if events is not None else None
        hold_check: Optional[float] = None  # holding: when to call hold.check
        release_bytes: Optional[int] = None  # a hold ended with this backlog
        urgent = self.urgent

        def window() -> float:
            return URGENT_EVENT_WINDOW if urgent() else EVENT_WINDOW
        monotonic = time.monotonic
        last_drain = 0.0  # the events queued at start-up are no burst
        # Switching the proc connector off and on: the selector's register and
        # unregister cost ~10 µs of Python per window; the epoll object under
        # EpollSelector (CPython's selectors keeps it in ``_selector``) does it
        # with one epoll_ctl (events 0 = reported never). The other windowed
        # readers are read a few times a second and go through _register.
        ep = getattr(self.selector, "_selector", None)
        if isinstance(ep, select_mod.epoll):
            def nl_off() -> None:
                ep.modify(nl_fd, 0)

            def nl_on() -> None:
                ep.modify(nl_fd, select_mod.EPOLLIN)
        else:  # pragma: no cover - DefaultSelector is epoll on Linux
            def nl_off() -> None:
                self.selector.unregister(nl_fd)

            def nl_on() -> None:
                self.selector.register(nl_fd, selectors.EVENT_READ)

        def watch_again(fd: int) -> None:
            if fd == nl_fd:
                if nl_fd in readers:
                    nl_on()
            else:
                self._register(fd)
        while self._stop_reason is None:
            if self._reload:
                self._reload = False
                self.on_reload()
            timeout = self._timer_timeout(monotonic())
            if resume_at:
                now = monotonic()
                for fd, at in list(resume_at.items()):
                    if at <= now:
                        del resume_at[fd]
                        watch_again(fd)
                    elif timeout is None or at - now < timeout:
                        timeout = at - now
            if hold_check is not None:
                assert hold is not None and events is not None
                now = monotonic()
                if now >= hold_check:
                    if urgent():
                        hold_check = hold.end(now, "waiter")  # job ends must not wait
                    else:
                        hold_check = hold.check(now)
                    if hold_check is None:
                        self._release_sources()
                        if not hold.sources_only:  # the proc connector was held too
                            release_bytes = events.queued_bytes()
                            if nl_fd in readers:
                                nl_on()
                if hold_check is not None:
                    wait = hold_check - now
                    if timeout is None or wait < timeout:
                        timeout = wait
            ready = select(timeout)
            if len(ready) > 1:
                # The proc connector first: epoll does not report in readiness
                # order, and a request must see the events queued before it.
                ready.sort(key=lambda km: km[0].fd != nl_fd)
            for key, mask in ready:
                fd = key.fd
                if fd == nl_fd:
                    assert events is not None
                    emptied = events.drain()
                    now = monotonic()
                    if nl_fd in readers:
                        nl_off()
                        if release_bytes is not None:  # the backlog of a hold
                            assert hold is not None
                            if emptied:
                                hold.calibrate(release_bytes, events.drained)
                            release_bytes = None
                            resume_at[nl_fd] = now + window()
                        elif (hold_check is None and hold is not None
                              and hold.wants(events.drained, now - last_drain) and not urgent()):
                            hold_check = hold.begin(now)
                            self._hold_sources()
                            if hold.sources_only:  # events still read (elsa/core/burst.py)
                                resume_at[nl_fd] = now + window()
                        else:
                            resume_at[nl_fd] = now + window()
                    last_drain = now
                    continue
                if (nl_fd in resume_at or hold_check is not None) and fd in events_first:
                    # Events queued before this request come first. (Not for
                    # the others: the commit pipe and timers need no events,
                    # a backend's job-emptied notice and the aggregator's
                    # settle drain by themselves; a drain per wake-up there
                    # would cost every cgroup2 job a loop pass.)
                    assert events is not None
                    events.drain()
                if mask & selectors.EVENT_READ:
                    cb = readers.get(fd)
                    if cb is not None:
                        cb()
                        if fd in windows:
                            resume_at[fd] = monotonic() + windows[fd]
                            self._register(fd)
                if mask & selectors.EVENT_WRITE:
                    cb = writers.get(fd)
                    if cb is not None:
                        cb()
            now = monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                if hold_check is not None and timer.deferrable:
                    self._held_timers.append(timer)  # _release_sources runs it
                    continue
                if timer.active is None or self._active(timer):
                    try:
                        timer.callback()
                    except Exception as exc:
                        log.exception("timer failed", timer=timer.name, error=str(exc))
                heapq.heappush(self._timers, (now + timer.interval, next(self._seq), timer))
            for cb in after_pass:
                cb()
        for fd in list(resume_at):
            del resume_at[fd]
            watch_again(fd)
        if hold_check is not None:
            if nl_fd in readers:
                nl_on()
            assert hold is not None
            hold.end(monotonic(), "stop")
            self._release_sources()  # the sources' stop() reads what is left
        return self._stop_reason

    def _timer_timeout(self, now: float) -> Optional[float]:
        """Seconds until the earliest timer that is due and active, None if none is."""
        timers = self._timers
        if not timers:
            return None
        due, _, top = timers[0]
        if top.active is None or self._active(top):  # the heap's first: most passes end here
            return max(0.0, due - now)
        first = min((d for d, _, t in timers if t.active is None or self._active(t)),
                    default=None)
        return None if first is None else max(0.0, first - now)

    @staticmethod
    def _active(timer: _Timer) -> bool:
        assert timer.active is not None
        try:
            return bool(timer.active())
        except Exception as exc:
            # A plugin's predicate (Source.has_poll_work) must not stop the loop;
            # the timer then runs at every period, as without one.
            log.exception("timer predicate failed; the timer runs at every period",
                          timer=timer.name, error=str(exc))
            timer.active = None
            return True
