"""elsad's event loop: one thread, one selector, events strictly in order.

Start-up order matters: we subscribe to the proc connector *before* reading
/proc to recover jobs, so a fork that happens in between is queued on the
socket rather than missed (duplicates are harmless: the manager ignores a
fork for a child it already holds).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import select as select_mod
import selectors
import signal
import socket
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from elsa import __version__
from elsa.config import Config, validate_table
from elsa.core.authorization import Authorizer
from elsa.core.backend import Backend, BackendContext
from elsa.core.burst import BurstHold
from elsa.core.manager import JobManager
from elsa.core.operations import Operations
from elsa.core.server import ControlServer
from elsa.core.store import Store
from elsa.errors import ConfigError, ElsaError, KernelInterfaceError
from elsa.kernel import sdnotify
from elsa.kernel.cnproc import (
    ExitEvent,
    ForkEvent,
    LossEvent,
    ProcConnector,
)
from elsa.kernel.procfs import ProcFS
from elsa.logsetup import structlog
from elsa.plugins import PluginHost

log = structlog.get_logger("elsa.daemon")

#: How long to drain events after a loss before resyncing anyway (a storm may
#: never leave the socket empty).
RESYNC_MAX_DELAY = 0.5

#: Batching window. cn_proc sends one datagram per event; woken for each
#: handful, the loop pays an epoll_wait, a context switch and a loop pass per
#: handful, which was most of elsad's CPU per process with a fork-heavy
#: workload (issue 6: ~50 µs per process on this VM, against ~10 µs to receive
#: a process's events). After each drain the proc connector's descriptor is
#: left out of the selector for EVENT_WINDOW seconds, so the next wake-up
#: takes everything that arrived meanwhile (the kernel buffer, netlink_rcvbuf
#: = 32 MiB, holds far more than a window's worth). Nothing waits on it: a
#: client request is served after a drain (add_reader's events_first), so a
#: reply always sees every event queued before the request; a backend's
#: job-emptied notice and the aggregator's settle drain by themselves.
#: Replaces the 2 ms pause
#: after busy drains (bench_forkstorm: 1.07 -> ~0.8 then).
EVENT_WINDOW = 0.01

#: With ``nice`` > 0: seconds without a backlog before elsad returns to its
#: configured nice value after a boost (see Daemon._boost).
BOOST_HOLD = 10.0

#: Events read per drain call, and full drains per loop pass.
DRAIN_BATCH = 4096
DRAIN_BATCHES = 4


class _Timer:
    __slots__ = ("interval", "callback", "name", "deferrable")

    def __init__(self, interval: float, callback: Callable[[], None], name: str,
                 deferrable: bool) -> None:
        self.interval = interval
        self.callback = callback
        self.name = name
        self.deferrable = deferrable


class Daemon:
    """The job daemon. ``start()`` then ``run()``; ``request_stop()`` from a signal."""

    #: True while _on_netlink drains (re-entrancy guard; a class default so a
    #: Daemon built without __init__, as a test does, has it).
    _draining = False
    #: The configured nice value (config ``nice``); a class default for the same reason.
    _nice_cfg = 0
    #: The burst hold (None: off), and how many messages the latest _on_netlink read.
    hold: Optional[BurstHold] = None
    _drained = 0

    def __init__(self, config: Config, host: PluginHost, *, procfs: Optional[ProcFS] = None,
                 self_test: bool = True) -> None:
        self.config = config
        self.host = host
        self.procfs = procfs or ProcFS()
        self.self_test = self_test
        self.selector = selectors.DefaultSelector()
        self._timers: List[Tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._readers: Dict[int, Callable[[], None]] = {}
        self._events_first: Set[int] = set()  # client descriptors (add_reader)
        self._deferrable: Set[int] = set()  # source descriptors, left unread in a hold
        self._paused: Set[int] = set()  # descriptors left out of the selector now
        self._held_timers: List[_Timer] = []  # deferrable timers due during a hold
        self._writers: Dict[int, Callable[[], None]] = {}
        self._stop_reason: Optional[str] = None
        self._reload = False
        self._loss_since: Optional[float] = None
        self.loss_events = 0
        self._nice_cfg = config.nice
        self._nice_now = os.getpriority(os.PRIO_PROCESS, 0)  # the nice value we run at now
        self._boosted_until = 0.0   # monotonic; 0: not boosted
        self.boosts = 0
        self.started = time.time()
        self.store: Optional[Store] = None
        self.connector: Optional[ProcConnector] = None
        self.control: Optional[ControlServer] = None
        self.backend: Optional[Backend] = None
        self.manager: Optional[JobManager] = None
        self.sources: Dict[str, Any] = {}
        self.source_status: Callable[[], Dict[str, Any]] = lambda: {}

    # -- selector plumbing -------------------------------------------------------------
    def _register(self, fd: int) -> None:
        mask = 0
        if fd in self._readers and fd not in self._paused:
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
                   events_first: bool = False, deferrable: bool = False) -> None:
        """Call *callback* when *fd* is readable. *events_first*: apply the proc
        connector events queued so far before (client requests: a reply must
        see every fork that happened before the request was sent).
        *deferrable*: left unread during a burst hold (accounting sources)."""
        self._readers[fd] = callback
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
        self._writers.pop(fd, None)
        self._register(fd)

    def set_writer(self, fd: int, callback: Optional[Callable[[], None]]) -> None:
        if callback is None:
            if self._writers.pop(fd, None) is None:
                return
        else:
            self._writers[fd] = callback
        self._register(fd)

    def add_timer(self, interval: float, callback: Callable[[], None], name: str,
                  deferrable: bool = False) -> None:
        """Call *callback* every *interval* seconds. *deferrable*: not during a
        burst hold (the work it does waits for the held events); it runs when
        the hold ends."""
        timer = _Timer(interval, callback, name, deferrable)
        heapq.heappush(self._timers, (time.monotonic() + interval, next(self._seq), timer))

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

    # -- start-up ---------------------------------------------------------------------------
    def _make_backend(self) -> Backend:
        specs = self.host.backends()
        spec = specs.get(self.config.backend)
        if spec is None:
            known = ", ".join(sorted(specs)) or "(none: are the elsa entry points installed?)"
            raise ConfigError(f"{self.config.path}: key 'backend': no backend named "
                              f"{self.config.backend!r}; available: {known}")
        options = validate_table(self.config.backend_table(spec.name), spec.options,
                                 where=f"backends.{spec.name}", path=self.config.path)
        backend = spec.factory()
        backend.start(BackendContext(options=options, procfs=self.procfs,
                                     state_dir=self.config.state_dir,
                                     job_emptied=self._job_emptied,
                                     add_reader=self.add_reader,
                                     remove_reader=self.remove_reader))
        return backend

    def start(self) -> None:
        cfg = self.config
        boot_id = self.procfs.boot_id()
        # Before the store: its writer thread inherits the nice value.
        if cfg.nice:
            self._set_nice(cfg.nice)
        self.store = Store(cfg.state_dir)
        self.backend = self._make_backend()
        self.manager = JobManager(store=self.store, backend=self.backend, procfs=self.procfs,
                                  boot_id=boot_id, job_end=cfg.job_end,
                                  exited_linger=cfg.exited_linger, hooks=self.host)
        # Subscribe first, then read /proc (see module docstring).
        self.connector = ProcConnector(cfg.netlink_rcvbuf)
        self.hold = self._make_hold(cfg.burst_hold)
        recovered = self.manager.recover()
        if self.self_test:
            self._self_test()
        self.add_reader(self.connector.fileno(), self._on_netlink)
        limits = dict(cfg.limits)
        authz = Authorizer(cfg.admin_group, self.procfs, self.manager)
        ops = Operations(self.manager, authz, backend_name=self.backend.name, limits=limits,
                         status=self.status)
        self.control = ControlServer(cfg.socket, ops, authz, self.store, limits=limits,
                                     add_reader=functools.partial(self.add_reader,
                                                                  events_first=True),
                                     remove_reader=self.remove_reader,
                                     set_writer=self.set_writer)
        self.manager.after_end.append(self.control.job_ended)
        self.add_reader(self.store.commit_notifications(), self.control.on_commit)
        self._start_sources()
        # 0.1 s: the resolution of 'wait' timeouts and of the idle limits.
        self.add_timer(0.1, self.control.sweep, "control-sweep")
        # Deferrable: exits are recorded when their events are read, and a
        # sequence hole cannot close while the events stay unread.
        self.add_timer(5.0, self.manager.expire_exited, "expire-exited", deferrable=True)
        # Always: a SIGHUP may set a nice value later (_unboost returns at
        # once while none is configured).
        self.add_timer(1.0, self._unboost, "unboost")
        self.add_timer(0.25, self._expire_seq_holes, "seq-holes", deferrable=True)
        log.info("elsad ready", version=__version__, backend=self.backend.name,
                 socket=cfg.socket, state_dir=cfg.state_dir, rcvbuf=self.connector.rcvbuf,
                 **recovered)
        self.host.daemon_ready(self.status())
        sdnotify.notify("READY=1", f"STATUS=tracking {len(self.manager.jobs)} jobs")

    def _make_hold(self, max_hold: float) -> Optional[BurstHold]:
        assert self.connector is not None
        try:
            self.connector.queued()
        except OSError as exc:  # SO_MEMINFO: Linux 4.12
            log.warning("burst hold off: the kernel does not report socket queues "
                        "(SO_MEMINFO)", error=exc.strerror)
            return None
        return BurstHold(self.connector.queued, max_hold)

    def _start_sources(self) -> None:
        """Start the accounting sources named in ``sources`` (see elsa/core/source.py)."""
        if not self.config.sources:
            return
        specs = self.host.sources()
        for name in self.config.sources:
            if name not in specs:
                known = ", ".join(sorted(specs)) or "(none installed)"
                raise ConfigError(f"{self.config.path}: key 'sources': no source named "
                                  f"{name!r}; available: {known}")
        from elsa.core.accounting import start_sources  # sources are optional

        self.sources, self.source_status = start_sources(self, specs)

    def _self_test(self) -> None:
        """Fork a child and wait for proof that events reach us.

        The kernel silently ignores a subscription from outside the initial
        pid/user namespace (drivers/connector/cn_proc.c cn_proc_mcast_ctl);
        without this check elsad would run and track nothing.
        """
        assert self.connector is not None and self.manager is not None
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
        raise KernelInterfaceError(
            "subscribed to the proc connector but saw no event for a test child in 3 s; "
            "elsad must run in the initial pid and user namespace (not in a container)")

    def _dispatch(self, ev: object) -> None:
        """Slow-path dispatch of decoded events (start-up only)."""
        m = self.manager
        assert m is not None
        if isinstance(ev, ForkEvent):
            m.on_fork(ev.parent_tgid, ev.child_pid, ev.child_tgid, ev.timestamp_ns)
        elif isinstance(ev, ExitEvent):
            m.on_exit(ev.pid, ev.tgid, ev.exit_code, ev.timestamp_ns)
        elif isinstance(ev, LossEvent):
            self.on_loss(ev)

    # -- event path ----------------------------------------------------------------------------
    def on_exec(self, pid: int, tgid: int) -> None:
        return None

    def on_loss(self, event: LossEvent) -> None:
        self.loss_events += 1
        if self._loss_since is None:
            self._loss_since = time.monotonic()
            log.warning("proc connector events lost; will resync from /proc",
                        reason=event.reason, cpu=event.cpu, missing=event.missing)

    def _on_netlink(self) -> bool:
        """Drain the proc connector; True when the socket was emptied."""
        if self._draining:
            # Re-entered from an event's consequences (a job ends, a source
            # emits its final reading, the aggregator asks to settle): the
            # outer drain carries on after we return.
            return False
        conn = self.connector
        manager = self.manager
        assert conn is not None and manager is not None
        sink = self._sink()
        self._draining = True
        self._drained = 0
        try:
            # At most DRAIN_BATCHES full batches per loop pass: under a sustained
            # storm the socket never empties, and clients and timers must still
            # get their turn (the socket stays readable, so we are back at once).
            for _ in range(DRAIN_BATCHES):
                n = conn.drain(sink, DRAIN_BATCH)
                self._drained += n
                if self._loss_since is not None:
                    if n < DRAIN_BATCH or time.monotonic() - self._loss_since > RESYNC_MAX_DELAY:
                        self._loss_since = None
                        manager.resync("event loss")
                if n < DRAIN_BATCH:
                    return True
            if self._nice_cfg:
                self._boost()
            return False
        finally:
            self._draining = False
            if self.hold is not None and self.hold.active:
                # Drained during a hold (a request, a job-emptied notice):
                # the queue shrank, which is not the burst ending.
                self.hold.rebase(time.monotonic())

    # -- priority (config ``nice``) ----------------------------------------------------
    def _set_nice(self, value: int) -> None:
        """Set every thread's nice value (Linux nice is per thread)."""
        try:
            for tid in os.listdir("/proc/self/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except (OSError, ValueError) as exc:
            log.warning("could not set nice value", nice=value, error=str(exc))
            return
        self._nice_now = value

    def _boost(self) -> None:
        """The proc connector backlog outgrew a loop pass: run at nice 0 until
        BOOST_HOLD seconds pass without that (checked by _unboost)."""
        if self._nice_now != 0:
            self.boosts += 1
            log.warning("event backlog: running at nice 0 until caught up",
                        configured_nice=self._nice_cfg)
            self._set_nice(0)
        self._boosted_until = time.monotonic() + BOOST_HOLD

    def _unboost(self) -> None:
        if (self._nice_cfg and self._nice_now != self._nice_cfg
                and time.monotonic() >= self._boosted_until):
            self._set_nice(self._nice_cfg)

    def settle_events(self) -> bool:
        """Apply every proc-connector event queued so far (the accounting
        aggregator calls this before it gives up on a record's job).

        True when the socket was emptied with no loss pending and no sequence
        hole open: then every fork and exit that happened before this call is
        reflected in the manager (the kernel queues a process's fork event
        before the process can exit, hence before its accounting record
        exists). False otherwise (also when called from inside a drain).
        """
        conn = self.connector
        if conn is None or self.manager is None:
            return False
        if not self._on_netlink():
            return False
        return self._loss_since is None and not conn.seqs.holes

    def _sink(self) -> _Sink:
        m = self.manager
        assert m is not None
        return _Sink(m.on_fork, m.on_exit, self.on_exec, self.on_loss)

    def _expire_seq_holes(self) -> None:
        assert self.connector is not None
        if self.connector.seqs.holes:
            self.connector.expire_holes(self._sink(), time.monotonic_ns())
            if self._loss_since is not None:
                self._on_netlink()  # drains (maybe nothing) and resyncs

    def _job_emptied(self, jid: int) -> None:
        """A backend saw a job's kernel object empty (e.g. cgroup.events populated 0)."""
        manager = self.manager
        if manager is None or jid not in manager.jobs:
            return
        # Exit events still queued on the proc connector carry exit codes (and
        # often end the job by themselves): take them first.
        if self.connector is not None:
            self._on_netlink()
        if jid in manager.jobs:
            manager.job_emptied(jid)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        m = self.manager
        conn = self.connector
        assert m is not None and conn is not None and self.backend is not None
        out: Dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "backend": self.backend.name,
            "backend_status": self.backend.status(),
            "jobs_running": len(m.jobs),
            "members": len(m.index),
            "events": conn.events,
            "lost_events": {"enobufs": conn.enobufs, "seq_gap": conn.seq_lost},
            "reordered_events": conn.seqs.reordered,
            "loss_notices": self.loss_events,
            "resyncs": m.counters.resyncs,
            "counters": m.counters.as_dict(),
            "rcvbuf": conn.rcvbuf,
            "priority": {"nice": self._nice_now, "configured": self._nice_cfg,
                         "boosts": self.boosts},
            "hold": self.hold.status() if self.hold else {"active": False, "max_hold": 0},
            "plugins": self.host.plugin_names(),
            "plugin_failures": dict(self.host.failures),
            "sources": self.source_status(),
            "store": {"path": self.store.path if self.store else None,
                      "schema": self.store.schema_version if self.store else None},
        }
        if self.control is not None:
            out["control"] = self.control.stats()
        return out

    # -- loop --------------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def request_reload(self) -> None:
        self._reload = True

    def install_signal_handlers(self) -> None:
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

    def run(self) -> str:
        """Serve until a stop is requested; returns the reason."""
        select = self.selector.select
        readers = self._readers
        writers = self._writers
        events_first = self._events_first
        nl_fd = self.connector.fileno() if self.connector else -1
        resume: Optional[float] = None  # proc connector left out until then (EVENT_WINDOW)
        hold = self.hold
        hold_check: Optional[float] = None  # holding: when to call hold.check
        release_bytes: Optional[int] = None  # a hold ended with this backlog
        control = self.control
        monotonic = time.monotonic
        last_drain = 0.0  # the events queued at start-up are no burst
        # Switching the descriptor off and on: the selector's register and
        # unregister cost ~10 µs of Python per window; the epoll object under
        # EpollSelector (CPython's selectors keeps it in ``_selector``) does it
        # with one epoll_ctl (events 0 = reported never).
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
        while self._stop_reason is None:
            if self._reload:
                self._reload = False
                self._do_reload()
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - monotonic())
            if resume is not None:
                wait = resume - monotonic()
                if wait <= 0:
                    resume = None
                    if nl_fd in readers:
                        nl_on()
                elif timeout is None or wait < timeout:
                    timeout = wait
            if hold_check is not None:
                assert hold is not None and self.connector is not None
                now = monotonic()
                if now >= hold_check:
                    if control is not None and control.waiters:
                        hold_check = hold.end(now, "waiter")  # job ends must not wait
                    else:
                        hold_check = hold.check(now)
                    if hold_check is None:
                        release_bytes = self.connector.queued()[0]
                        self._release_sources()
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
                    emptied = self._on_netlink()  # the proc connector's reader
                    now = monotonic()
                    if nl_fd in readers:
                        nl_off()
                        if release_bytes is not None:  # the backlog of a hold
                            assert hold is not None
                            if emptied:
                                hold.calibrate(release_bytes, self._drained)
                            release_bytes = None
                            resume = now + EVENT_WINDOW
                        elif (hold is not None and hold.wants(self._drained, now - last_drain)
                              and not (control is not None and control.waiters)):
                            hold_check = hold.begin(now)
                            self._hold_sources()
                        else:
                            resume = now + EVENT_WINDOW
                    last_drain = now
                    continue
                if (resume is not None or hold_check is not None) and fd in events_first:
                    # Events queued before this request come first. (Not for
                    # the others: the commit pipe and timers need no events,
                    # a backend's job-emptied notice and the aggregator's
                    # settle drain by themselves. A drain per wake-up there
                    # cost the cgroup2 jobs benchmark ~90 µs a job.)
                    self._on_netlink()
                if mask & selectors.EVENT_READ:
                    cb = readers.get(fd)
                    if cb is not None:
                        cb()
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
                try:
                    timer.callback()
                except Exception as exc:
                    log.exception("timer failed", timer=timer.name, error=str(exc))
                heapq.heappush(self._timers, (now + timer.interval, next(self._seq), timer))
        if (resume is not None or hold_check is not None) and nl_fd in readers:
            nl_on()
        if hold_check is not None:
            assert hold is not None
            hold.end(monotonic(), "stop")
            self._release_sources()  # the sources' stop() reads what is left
        return self._stop_reason

    def _do_reload(self) -> None:
        from elsa import config as config_mod
        from elsa import logsetup

        path = None if self.config.path == "<defaults>" else self.config.path
        try:
            new = config_mod.load(path)
        except ElsaError as exc:
            log.error("reload refused; keeping the running config", error=exc.message)
            return
        needs_restart = [k for k in ("backend", "socket", "state_dir", "sources")
                         if getattr(new, k) != getattr(self.config, k)]
        if needs_restart:
            log.warning("config changes that need a restart were not applied",
                        keys=needs_restart)
        logsetup.configure(new.log_level)
        assert self.manager is not None
        self.manager.job_end = new.job_end
        self.manager.exited_linger = new.exited_linger
        if self.hold is not None:
            self.hold.max_hold = new.burst_hold
        if new.nice != self._nice_cfg:
            self._nice_cfg = new.nice
            self._boosted_until = 0.0
            self._set_nice(new.nice)
        if self.control is not None:
            self.control.limits.update(new.limits)
        self.config = new
        log.info("config reloaded", path=new.path)
        sdnotify.notify("READY=1")

    def stop(self, reason: str) -> None:
        sdnotify.notify("STOPPING=1")
        self.host.daemon_stopping(reason)
        for name, src in self.sources.items():
            try:
                src.stop()
            except Exception as exc:
                log.error("source failed to stop", source=name, error=str(exc))
        if self.control is not None:
            self.control.close()
        if self.connector is not None:
            self.connector.close()
        if self.backend is not None:
            try:
                self.backend.stop()
            except Exception as exc:
                log.error("backend failed to stop", error=str(exc))
        if self.store is not None:
            self.store.close()
        log.info("elsad stopped", reason=reason)


class _Sink:
    """Binds the connector's hot-path callbacks to the manager's methods."""

    __slots__ = ("on_fork", "on_exit", "on_exec", "on_loss")

    def __init__(self, on_fork, on_exit, on_exec, on_loss) -> None:
        self.on_fork = on_fork
        self.on_exit = on_exit
        self.on_exec = on_exec
        self.on_loss = on_loss


def check_privileges(proc_root: str = "/proc") -> None:
    """Refuse to start without CAP_NET_ADMIN (needed to subscribe to cn_proc)."""
    cap_net_admin = 12  # include/uapi/linux/capability.h
    try:
        with open(f"{proc_root}/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    break
            else:
                caps = 0
    except OSError:
        caps = 0
    if not caps & (1 << cap_net_admin):
        from elsa.errors import PrivilegeError

        raise PrivilegeError(
            "elsad needs CAP_NET_ADMIN to subscribe to the kernel's proc connector "
            f"(uid {os.geteuid()} lacks it); run it as root, e.g. via the systemd unit "
            "in packaging/elsad.service")



