"""elsad's composition root: builds the components and wires them together.

Start-up order matters: we subscribe to the proc connector *before* reading
/proc to recover jobs, so a fork that happens in between is queued on the
socket rather than missed (duplicates are harmless: the manager ignores a
fork for a child it already holds).

Who talks to whom is written out in :meth:`Daemon.start`: the event loop
(:mod:`elsa.core.loop`) serves the proc connector (:mod:`elsa.core.events`),
the control server (:mod:`elsa.core.server`), the backend's and the sources'
descriptors and the timers; the job manager (:mod:`elsa.core.manager`) owns
the jobs; the store (:mod:`elsa.core.store`) persists them.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from typing import Any, Callable, Dict, List, Optional

from elsa import __version__
from elsa.config import Config, validate_table
from elsa.core import reloading
from elsa.core.authorization import Authorizer
from elsa.core.backend import Backend, BackendContext
from elsa.core.cost import SelfCost
from elsa.core.defaults import choose_backend, enabled_sources
from elsa.core.events import ProcEvents, make_hold
from elsa.core.guard import Guard
from elsa.core.loop import EventLoop
from elsa.core.manager import JobManager
from elsa.core.operations import Operations
from elsa.core.priority import Priority
from elsa.core.server import ControlServer
from elsa.core.store import Store, lock_state_dir
from elsa.errors import ConfigError, ElsaError
from elsa.kernel import caps, sdnotify
from elsa.kernel.cnproc import NEEDED_EVENTS, PROC_EVENT_ALL, ProcConnector
from elsa.kernel.procfs import ProcFS
from elsa.logsetup import structlog
from elsa.plugins import PluginHost

log = structlog.get_logger("elsa.daemon")


#: Allocations (net, of container objects) between young-generation
#: collections. The hot path allocates a few tuples per event and frees them
#: at once; only queued rows (held records, the writer's batches) stay. With
#: the interpreter's default (700) a storm runs a collection every few hundred
#: rows, ~7 % of elsad's CPU; the event data holds no reference cycles.
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Exclude what start-up built (modules, config, recovered jobs) from
    future collections (gc.freeze) and collect the young generation less
    often. Cycles are still collected, only in larger batches."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class Daemon:
    """The job daemon. ``start()`` then ``run()``; ``request_stop()`` from a signal."""

    def __init__(self, config: Config, host: PluginHost, *, procfs: Optional[ProcFS] = None,
                 self_test: bool = True,
                 check_config: Optional[Callable[[Config], None]] = None) -> None:
        self.config = config
        self.host = host
        # What `elsad --check-config` checks beyond the core keys (the plugins'
        # tables): a reload refuses a file that a start would refuse.
        self.check_config = check_config
        self.procfs = procfs or ProcFS()
        self.self_test = self_test
        self.loop = EventLoop()
        self.loop.on_reload = self._do_reload
        self.priority = Priority(config.nice)
        self.restart_needed: List[str] = []  # changed keys a reload could not apply
        self.started = time.time()
        self.cost = SelfCost(self.procfs)
        self.store: Optional[Store] = None
        self.state_lock: Optional[int] = None  # the state dir's lock (lock_state_dir)
        self.connector: Optional[ProcConnector] = None
        self.events: Optional[ProcEvents] = None
        self.control: Optional[ControlServer] = None
        self.backend: Optional[Backend] = None
        self.backend_reason = ""  # why this backend (config or the 'auto' choice)
        self.manager: Optional[JobManager] = None
        self.sources: Dict[str, Any] = {}
        self.listeners: List[Any] = []  # elsa_event_listeners (elsa/core/listener.py)
        self.source_status: Callable[[], Dict[str, Any]] = lambda: {}
        self.shipper: Any = None  # elsa.central.shipper.Shipper when [central] url is set

    # -- start-up ---------------------------------------------------------------------------
    def _make_backend(self) -> Backend:
        specs = self.host.backends()

        def start(name: str) -> Backend:
            spec = specs.get(name)
            if spec is None:
                known = ", ".join(sorted(specs)) or "(none: are the elsa entry points installed?)"
                raise ConfigError(f"{self.config.path}: key 'backend': no backend named "
                                  f"{name!r}; available: auto, {known}")
            options = validate_table(self.config.backend_table(spec.name), spec.options,
                                     where=f"backends.{spec.name}", path=self.config.path)
            backend = spec.factory()
            backend.start(BackendContext(options=options, procfs=self.procfs,
                                         state_dir=self.config.state_dir,
                                         job_emptied=self._job_emptied,
                                         add_reader=self._guarded_reader(name),
                                         remove_reader=self.loop.remove_reader))
            return backend

        backend, self.backend_reason = choose_backend(self.config.backend, list(specs), start)
        log.info("backend chosen", backend=backend.name, configured=self.config.backend,
                 reason=self.backend_reason)
        return backend

    def _guarded_reader(self, plugin: str) -> Callable[..., None]:
        """add_reader for a backend: its callbacks are isolated like a source's."""
        def add(fd: int, callback: Callable[[], None], **kw: Any) -> None:
            guard = Guard(plugin, "reader", callback,
                          on_give_up=lambda: self.loop.remove_reader(fd))
            self.loop.add_reader(fd, guard, **kw)
        return add

    def start(self) -> None:
        cfg = self.config
        loop = self.loop
        # Before any thread exists: capabilities are per thread (capabilities(7)).
        try:
            dropped = caps.drop_unneeded(caps.needed(cfg.backend, cfg.sources))
            if dropped:
                log.info("capabilities dropped", dropped=dropped, backend=cfg.backend)
        except ElsaError as exc:
            log.warning("capabilities not dropped", error=exc.message)
        boot_id = self.procfs.boot_id()
        # Before the store: its writer thread inherits the nice value.
        if cfg.nice:
            self.priority.set(cfg.nice)
        self.state_lock = lock_state_dir(cfg.state_dir)  # before anything touches it
        store = self.store = Store(cfg.state_dir)
        backend = self.backend = self._make_backend()
        manager = self.manager = JobManager(
            store=store, backend=backend, procfs=self.procfs, boot_id=boot_id,
            job_end=cfg.job_end, exited_linger=cfg.exited_linger, hooks=self.host)
        # Subscribe first, then read /proc (see module docstring).
        connector = self.connector = ProcConnector(
            cfg.netlink_rcvbuf, NEEDED_EVENTS if cfg.proc_event_filter else PROC_EVENT_ALL)
        events = self.events = ProcEvents(connector, manager,
                                          hold=make_hold(connector, cfg.burst_hold),
                                          priority=self.priority)
        recovered = manager.recover()
        self._start_listeners(boot_id)
        if self.self_test:
            events.self_test()
        loop.attach_events(events)

        limits = dict(cfg.limits)  # one dict: a reload updates server and hello alike
        authz = Authorizer(cfg.admin_group, self.procfs, manager)
        ops = Operations(manager, authz, backend_name=backend.name, limits=limits,
                         status=self.status, store_path=store.path,
                         private_data=bool(cfg.section("reports")["private_data"]),
                         billing=_billing(cfg))
        control = self.control = ControlServer(
            cfg.socket, ops, authz, store, limits=limits,
            add_reader=functools.partial(loop.add_reader, events_first=True),
            remove_reader=loop.remove_reader, set_writer=loop.set_writer,
            after_pass=loop.add_after_pass)
        loop.urgent = lambda: bool(control.waiters)
        manager.after_end.append(control.job_ended)
        loop.add_reader(store.commit_notifications(), control.on_commit)

        self._start_sources()
        # After the sources: they flag the downtime and read the kernel's counters.
        manager.end_recovered()
        from elsa.central.shipper import start_shipper

        self.shipper = start_shipper(cfg, self.store)
        # 0.1 s: the resolution of 'wait' timeouts and of the idle limits.
        loop.add_timer(0.1, control.sweep, "control-sweep", active=control.has_sweep_work)
        # Deferrable: exits are recorded when their events are read, and a
        # sequence hole cannot close while the events stay unread.
        loop.add_timer(5.0, manager.expire_exited, "expire-exited", deferrable=True,
                       active=lambda: bool(manager.exited.generations))
        # Active only while boosted: a SIGHUP may set a nice value later.
        loop.add_timer(1.0, self.priority.unboost, "unboost", active=self.priority.boosted)
        loop.add_timer(0.25, events.expire_seq_holes, "seq-holes", deferrable=True,
                       active=events.holes_open)
        loop.add_timer(5.0, lambda: manager.end_never_joined(limits["empty_job_timeout"]),
                       "empty-jobs", deferrable=True, active=lambda: bool(manager.jobs))
        self.cost.start()
        log.info("elsad ready", version=__version__, backend=backend.name,
                 socket=cfg.socket, state_dir=cfg.state_dir, rcvbuf=connector.rcvbuf,
                 **recovered)
        self.host.daemon_ready(self.status())
        sdnotify.notify("READY=1", f"STATUS=tracking {len(manager.jobs)} jobs")

    def _start_listeners(self, boot_id: str) -> None:
        from elsa.core.listener import ListenerContext
        from elsa.core.usage import priorities_of

        assert self.store is not None and self.manager is not None and self.events is not None
        self.listeners = self.host.event_listeners(ListenerContext(
            config=self.config, procfs=self.procfs, store=self.store, boot_id=boot_id,
            host_id=self.manager.allocator.host, job_of=self.manager.job_of,
            add_timer=self.loop.add_timer,
            source_priority=priorities_of(self.host.sources()),
            sources_held=self._sources_held))
        self.events.add_listeners(self.listeners)

    def _sources_held(self) -> bool:
        hold = self.events.hold if self.events is not None else None
        return hold is not None and hold.active

    def _start_sources(self) -> None:
        """Start the accounting sources named in ``sources`` (see elsa/core/source.py)."""
        specs = self.host.sources()
        names = enabled_sources(self.config.sources, self.config.disabled_sources, specs)
        if not names:
            return
        for name in self.config.sources:
            if name not in specs:
                known = ", ".join(sorted(specs)) or "(none installed)"
                raise ConfigError(f"{self.config.path}: key 'sources': no source named "
                                  f"{name!r}; available: {known}")
        from elsa.core.accounting import start_sources  # sources are optional
        from elsa.core.listener import usage_sink

        assert self.manager is not None and self.store is not None and self.events is not None
        self.sources, self.source_status, read_now = start_sources(
            specs, names, config=self.config, manager=self.manager, store=self.store,
            procfs=self.procfs, loop=self.loop, settle=self.events.settle,
            lost_fork=self.events.lost_fork if self.events.connector.filtered else None,
            observe=usage_sink(self.listeners), sources_held=self._sources_held,
            waited=lambda jid: self.control is not None and self.control.waits_for(jid))
        if self.control is not None:
            self.control.ops.read_sources = read_now

    def _job_emptied(self, jid: int) -> None:
        """A backend saw a job's kernel object empty (e.g. cgroup.events populated 0)."""
        if self.events is not None:
            self.events.job_emptied(jid)
        elif self.manager is not None and jid in self.manager.jobs:
            self.manager.job_emptied(jid)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        m = self.manager
        conn = self.connector
        events = self.events
        assert m is not None and conn is not None and events is not None
        assert self.backend is not None
        hold = events.hold
        out: Dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "backend": self.backend.name,
            "backend_reason": self.backend_reason,
            "backend_status": self.backend.status(),
            "jobs_running": len(m.jobs),
            "members": len(m.index),
            "events": conn.events,
            "lost_events": {"enobufs": conn.enobufs, "seq_gap": conn.seq_lost},
            # filtered: fork/exec/exit only, no seq-gap detection (config
            # proc_event_filter); socket_drops: the kernel's count of messages
            # that did not fit the buffer, the loss count whether filtered or not.
            "proc_connector": {"filtered": conn.filtered, "socket_drops": conn.dropped()},
            "reordered_events": conn.seqs.reordered,
            "loss_notices": events.loss_events,
            "resyncs": m.counters.resyncs,
            "counters": m.counters.as_dict(),
            "rcvbuf": conn.rcvbuf,
            "priority": self.priority.status(),
            "hold": hold.status() if hold else {"active": False, "max_hold": 0},
            "plugins": self.host.plugin_names(),
            "plugin_failures": dict(self.host.failures),
            "sources": self.source_status(),
            "listeners": {lst.name: lst.status() for lst in self.listeners},
            "config": {"path": self.config.path, "restart_needed": self.restart_needed},
            "store": ({"path": self.store.path, "schema": self.store.schema_version,
                       **self.store.health()} if self.store else {"path": None}),
            "central": self.shipper.status() if self.shipper else {"enabled": False},
            "cost": self.cost.status(),
        }
        if self.control is not None:
            out["control"] = self.control.stats()
        return out

    # -- running ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        self.loop.install_signal_handlers()

    def request_stop(self, reason: str) -> None:
        self.loop.request_stop(reason)

    def run(self) -> str:
        """Serve until a stop is requested; returns the reason."""
        tune_gc()
        return self.loop.run()

    def _do_reload(self) -> None:
        from elsa import config as config_mod
        from elsa import logsetup

        path = None if self.config.path == "<defaults>" else self.config.path
        try:
            new = config_mod.load(path)
            if self.check_config is not None:
                self.check_config(new)
        except ElsaError as exc:
            log.error("reload refused; keeping the running config", error=exc.message)
            return
        new, self.restart_needed = reloading.plan(self.config, new)
        if self.restart_needed:
            log.warning("config changes that need a restart were not applied",
                        keys=self.restart_needed)
        logsetup.configure(new.log_level)
        assert self.manager is not None
        self.manager.job_end = new.job_end
        self.manager.exited_linger = new.exited_linger
        if self.events is not None and self.events.hold is not None:
            self.events.hold.max_hold = new.burst_hold
        self.priority.reconfigure(new.nice)
        if self.control is not None:
            self.control.limits.update(new.limits)
            self.control.authz.set_admin_group(new.admin_group)
        self.config = new
        log.info("config reloaded", path=new.path)
        sdnotify.notify("READY=1")

    def stop(self, reason: str) -> None:
        sdnotify.notify("STOPPING=1")
        self.host.daemon_stopping(reason)
        for lst in self.listeners:
            try:
                lst.stop()
            except Exception as exc:
                log.exception("listener failed to stop", listener=lst.name, error=str(exc))
        for name, src in self.sources.items():
            try:
                src.stop()
            except Exception as exc:
                log.exception("source failed to stop", source=name, error=str(exc))
        if self.control is not None:
            self.control.close()
        if self.manager is not None:  # no more jobs are created
            try:
                self.manager.allocator.release()
            except ElsaError as exc:
                log.warning("job id block not released; the next ids skip its rest",
                            error=exc.message)
        if self.connector is not None:
            self.connector.close()
        if self.backend is not None:
            try:
                self.backend.stop()
            except Exception as exc:
                log.exception("backend failed to stop", error=str(exc))
        if self.shipper is not None:
            self.shipper.stop()
        if self.store is not None:
            self.store.close()
        if self.state_lock is not None:
            os.close(self.state_lock)
            self.state_lock = None
        log.info("elsad stopped", reason=reason)


def check_privileges(proc_root: str = "/proc") -> None:
    """Refuse to start without CAP_NET_ADMIN (needed to subscribe to cn_proc)."""
    if not caps.effective(ProcFS(proc_root)) & (1 << caps.CAPS["CAP_NET_ADMIN"]):
        from elsa.errors import PrivilegeError

        raise PrivilegeError(
            "elsad needs CAP_NET_ADMIN to subscribe to the kernel's proc connector "
            f"(uid {os.geteuid()} lacks it); run it as root, e.g. via the systemd unit "
            "in packaging/elsad.service")


def _billing(cfg: Config) -> Any:
    """The rate table 'bill' reports use (validated with the config at load)."""
    from elsa.billing import rates

    return rates.from_config(cfg)
