"""Prometheus exporter served by elsad (``[export.prometheus] listen = "127.0.0.1:9466"``).

Built on ``prometheus_client``: custom collectors (:class:`JobCollector`,
:class:`DaemonCollector`) yield metric families and the library writes the
exposition. Nothing here runs on elsad's event thread except two cheap
publications:

* job created / ended (plugin hooks): one dict assignment under a lock that
  the other threads hold only to copy the dicts or counters;
* once a second, the daemon's status counters (a dict the event thread
  builds as for ``status``), published by replacing one reference.

The exporter's *sampler* thread reads the figures of every exported job each
``interval`` seconds: cgroup-backed jobs from their cgroup's statistics files
(the parser the ``cgroupstat`` source uses), others and ended jobs from the
store's per-job usage through the report query layer. It then has the library
render the per-job families once; a scrape serves that rendering plus the
daemon's families rendered at the scrape. prometheus_client formats ~20 µs a
sample on a small VM, so 10,000 jobs (80,000 samples) take seconds to render:
rendering per sample instead of per scrape keeps a scrape to milliseconds
whoever scrapes how often, and the sampler spaces its passes (SAMPLER_DUTY)
so it never takes more than a fifth of a core (docs/export.md).

An ended job keeps its final figures for ``ended_grace`` seconds, then its
series stop (Prometheus marks them stale at the next scrape).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from elsa.config import Option, non_negative, positive
from elsa.hookspecs import hookimpl
from elsa.logsetup import structlog
from elsa.users import user_name

log = structlog.get_logger("elsa.export.prometheus")

PREFIX = "elsa_"
#: The sampler waits at least this many times its own pass between passes.
SAMPLER_DUTY = 5.0


def _listen(v: Any) -> Optional[str]:
    if not v:
        return None
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT (e.g. \"127.0.0.1:9466\") or empty (off)"
    return None


def _labels_check(tags: Sequence[str]) -> Optional[str]:
    names = [_label_name(t) for t in tags]
    clash = sorted({n for n in names if names.count(n) > 1 or n in ("jid", "name", "user")})
    if clash:
        return (f"gives the label(s) {', '.join(clash)} twice (jid, name and user are always"
                " there; tags differing only in characters outside [A-Za-z0-9_] collide)")
    return None


OPTIONS: Dict[str, Option] = {
    "listen": Option(str, "", "Address (HOST:PORT) the metrics endpoint listens on, e.g."
                     " \"127.0.0.1:9466\". Empty: no exporter.", check=_listen),
    "labels": Option(list, [], "Job tags exported as labels of every per-job metric (e.g."
                     " [\"account\", \"queue\"]); a job without the tag gets \"\".",
                     item_type=str, check=lambda v: _labels_check(v)),
    "ended_grace": Option(float, 60.0, "Seconds an ended job stays exported (its final"
                          " figures) before its series disappear.", check=non_negative),
    "interval": Option(float, 5.0, "Seconds between readings of running jobs' figures"
                       " (in the exporter's thread; a scrape serves the latest reading).",
                       check=positive),
}

# -- the sample the sampler thread publishes -------------------------------------------------

#: A job's figures, in this order (None: unknown, no sample written).
JOB_FIGURES = ("cpu_user_seconds", "cpu_system_seconds", "memory_bytes", "memory_peak_bytes",
               "read_bytes", "written_bytes", "processes")

#: (label values: jid, name, user, *tags), (figures in JOB_FIGURES order), running
JobRow = Tuple[Tuple[str, ...], Tuple[Optional[float], ...], bool]

_FAMILIES = (
    # (name, counter?, help) in JOB_FIGURES order
    ("job_cpu_user_seconds", True, "CPU time in user mode of the job's processes."),
    ("job_cpu_system_seconds", True, "CPU time in kernel mode of the job's processes."),
    ("job_memory_bytes", False, "Memory the job's cgroup uses now (memory.current)."),
    ("job_memory_peak_bytes", False, "Peak memory of the job (cgroup memory.peak, else the"
     " largest process RSS)."),
    ("job_read_bytes", True, "Bytes the job read from storage."),
    ("job_written_bytes", True, "Bytes the job wrote to storage."),
    ("job_processes", False, "Processes of the job: live ones while it runs (cgroup"
     " pids.current), all it had once it ended."),
)


def _label_name(tag: str) -> str:
    out = "".join(c if (c.isascii() and c.isalnum()) or c == "_" else "_" for c in tag)
    if not out or out[0].isdigit() or out.startswith("__"):
        out = "tag_" + out
    return out


class Snapshot:
    """What one scrape formats; never mutated once published."""

    __slots__ = ("jobs", "status")

    def __init__(self, jobs: Sequence[JobRow], status: Mapping[str, Any]) -> None:
        self.jobs = jobs
        self.status = status


class JobCollector:
    """Per-job metric families of the rows ``get()`` returns."""

    def __init__(self, get: Callable[[], Sequence[JobRow]], tag_labels: Sequence[str]) -> None:
        self.get = get
        self.label_names = ["jid", "name", "user"] + [_label_name(t) for t in tag_labels]

    def describe(self) -> Iterable[Any]:
        return []  # registering must not collect

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = self.label_names
        fams = [(CounterMetricFamily if counter else GaugeMetricFamily)(
                    PREFIX + name, help_text, labels=labels)
                for name, counter, help_text in _FAMILIES]
        running = GaugeMetricFamily(PREFIX + "job_running",
                                    "1 while the job runs, 0 in its ended grace period.",
                                    labels=labels)
        adders = [f.add_metric for f in fams]
        add_running = running.add_metric
        for lv, figs, is_running in self.get():
            add_running(lv, 1 if is_running else 0)
            for add, v in zip(adders, figs):
                if v is not None:
                    add(lv, v)
        yield running
        yield from fams


class DaemonCollector:
    """elsad's own metrics, from the status mapping ``get()`` returns."""

    def __init__(self, get: Callable[[], Mapping[str, Any]]) -> None:
        self.get = get

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        return _daemon_metrics(self.get())


class ElsaCollector:
    """Everything of one :class:`Snapshot` (job and daemon metrics) in one collector."""

    def __init__(self, get: Callable[[], Snapshot], tag_labels: Sequence[str]) -> None:
        self.get = get
        self.tag_labels = tag_labels

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        snap = self.get()
        yield from JobCollector(lambda: snap.jobs, self.tag_labels).collect()
        yield from _daemon_metrics(snap.status)


def _daemon_metrics(st: Mapping[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not st:
        return
    jobs = st.get("_jobs", {})
    store = st.get("store") or {}
    agg = (st.get("sources") or {}).get("aggregator") or {}
    hold = st.get("hold") or {}
    central = st.get("central") or {}
    counter, gauge = CounterMetricFamily, GaugeMetricFamily
    scalars = [
        (counter, "events_received", "Proc connector events received.", st.get("events", 0)),
        (counter, "resyncs", "Resyncs from /proc after event loss.", st.get("resyncs", 0)),
        (counter, "jobs_created", "Jobs created since elsad started.", jobs.get("created", 0)),
        (counter, "jobs_ended", "Jobs ended since elsad started.", jobs.get("ended", 0)),
        (gauge, "jobs_running", "Jobs running now.", st.get("jobs_running", 0)),
        (gauge, "members", "Processes that are members of a job now.", st.get("members", 0)),
        (counter, "usage_records", "Usage records received from the accounting sources.",
         agg.get("records", 0)),
        (counter, "records_stored",
         "Usage records handed to the store (attributed to a job or not).",
         agg.get("attributed", 0) + agg.get("unattributed", 0)),
        (gauge, "store_pending_writes", "Store writes submitted and not committed yet.",
         store.get("pending_writes", 0)),
        (counter, "store_errors", "Store write batches that failed.",
         store.get("write_failures", 0)),
        (counter, "store_dropped_records",
         "Records dropped because the store could not write them.",
         store.get("dropped_records", 0)),
        (gauge, "store_ok", "1 while the store writes, 0 while it fails.",
         0 if store.get("ok") is False else 1),
        (counter, "burst_holds", "Burst holds (kernel queues left unread during a fork burst).",
         hold.get("holds", 0)),
        (counter, "burst_held_seconds", "Seconds spent in burst holds.",
         hold.get("held_seconds", 0)),
        (gauge, "burst_hold_active", "1 while a burst hold is on.",
         1 if hold.get("active") else 0),
        (gauge, "uptime_seconds", "Seconds since elsad started.", st.get("uptime", 0)),
    ]
    if central.get("enabled"):
        # Figures the shipper has not counted yet (just started) have no sample.
        scalars += [
            (gauge, "central_failing", "1 while shipping to the central store fails.",
             1 if central.get("failing") else 0),
            (gauge, "central_backlog_records",
             "Process records waiting to be shipped to the central store.",
             central.get("backlog_records")),
            (gauge, "central_backlog_jobs",
             "Ended jobs waiting to be shipped to the central store (new or retagged).",
             central.get("backlog_jobs")),
            (gauge, "central_backlog_apps",
             "Application records waiting to be shipped to the central store.",
             central.get("backlog_apps")),
            (gauge, "central_oldest_age_seconds",
             "Age of the oldest record waiting to be shipped (none waiting: no sample).",
             central.get("oldest_age_s")),
        ]
    for family, name, help_text, value in scalars:
        if value is None:
            continue
        metric = family(PREFIX + name, help_text)
        metric.add_metric([], value)
        yield metric
    lost = CounterMetricFamily(PREFIX + "events_lost",
                               "Proc connector events lost, by how the loss was seen.",
                               labels=["reason"])
    for reason, n in sorted((st.get("lost_events") or {}).items()):
        lost.add_metric([reason], n)
    yield lost
    up = GaugeMetricFamily(PREFIX + "source_up",
                           "1 when the accounting source runs, 0 when it failed to start.",
                           labels=["source"])
    errs = CounterMetricFamily(PREFIX + "source_callback_errors",
                               "Source callbacks that raised (isolated).", labels=["source"])
    for name, s in sorted((st.get("sources") or {}).items()):
        if name == "aggregator" or not isinstance(s, Mapping):
            continue
        up.add_metric([name], 0 if "error" in s else 1)
        errs.add_metric([name], s.get("callback_errors", 0))
    yield up
    yield errs


# -- the exporter --------------------------------------------------------------------------

#: cgroup files read for a running job (a subset of cgroupstats.STAT_FILES).
LIVE_FILES = ("cpu.stat", "memory.current", "memory.peak", "io.stat", "pids.current")
_SQLITE_MAX_VARS = 900
_UNKNOWN: Tuple[Optional[float], ...] = (None,) * len(JOB_FIGURES)


class PrometheusExporter:
    """Job list (fed on the event thread), sampler thread, HTTP endpoint."""

    def __init__(self, options: Mapping[str, Any], *, db_path: Optional[str],
                 cgroup_mount: Optional[str] = None) -> None:
        self.options = options
        self.tags: List[str] = list(options["labels"])
        self.grace = float(options["ended_grace"])
        self.interval = float(options["interval"])
        self.db_path = db_path
        self.mount = cgroup_mount
        self._lock = threading.Lock()  # held only to change or copy the two dicts
        self._running: Dict[int, Any] = {}   # jid -> Job
        self._ended: Dict[int, Tuple[Any, float]] = {}  # jid -> (Job, monotonic end)
        self._jobs_counts = {"created": 0, "ended": 0}
        self._status: Mapping[str, Any] = {}
        self._snapshot = Snapshot((), {})
        self._last: Dict[int, Tuple[Optional[float], ...]] = {}  # sampler thread only
        self._db: Optional[sqlite3.Connection] = None  # the thread that opened it owns it
        self._db_owner: Optional[int] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._server: Any = None
        self.samples = 0
        self.sample_seconds = 0.0
        from prometheus_client import CollectorRegistry, ProcessCollector

        self._job_registry = CollectorRegistry(auto_describe=False)
        self._job_registry.register(JobCollector(lambda: self._snapshot.jobs, self.tags))
        self._daemon_registry = CollectorRegistry(auto_describe=False)
        self._daemon_registry.register(DaemonCollector(self.daemon_status))
        # process_cpu_seconds_total, process_resident_memory_bytes, ...: the
        # client library's own collector, as every exporter has them.
        ProcessCollector(registry=self._daemon_registry)
        self._job_body = b""

    # -- event thread: O(1) per call ---------------------------------------------------
    def job_created(self, job: Any) -> None:
        with self._lock:
            self._running[job.jid] = job
            self._jobs_counts["created"] += 1

    def job_ended(self, job: Any) -> None:
        with self._lock:
            self._running.pop(job.jid, None)
            self._ended[job.jid] = (job, time.monotonic())
            self._jobs_counts["ended"] += 1
        self._wake.set()  # the final figures are worth a prompt sample

    def seed(self, jobs: Iterable[Any]) -> None:
        """Jobs running when the exporter starts (recovered after a restart)."""
        with self._lock:
            for job in jobs:
                self._running[job.jid] = job

    def publish_status(self, status: Mapping[str, Any]) -> None:
        """The daemon's status (a fresh dict the event thread built); swapped in whole."""
        self._status = status

    # -- sampler thread ----------------------------------------------------------------
    def _labels(self, job: Any) -> Tuple[str, ...]:
        from elsa.export.records import jid_text

        tags = dict(job.tags)
        return (jid_text(job.jid), job.name, user_name(job.owner_uid),
                *(str(tags.get(t, "")) for t in self.tags))

    def _dir(self, job: Any) -> Optional[str]:
        path = job.params.get("cgroup_path")
        if not path:
            return None
        if os.path.isabs(path):
            return path
        return os.path.join(self.mount, path) if self.mount else None

    def _store_usage(self, jids: List[int]) -> Dict[int, Dict[str, Any]]:
        if not jids or not self.db_path:
            return {}
        from elsa.errors import ElsaError
        from elsa.report import query
        from elsa.report.connect import open_store

        try:
            if self._db is None:
                self._db = open_store(self.db_path)
                self._db_owner = threading.get_ident()
            out: Dict[int, Dict[str, Any]] = {}
            for i in range(0, len(jids), _SQLITE_MAX_VARS):
                out.update(query.job_usage(self._db, jids[i:i + _SQLITE_MAX_VARS]))
            return out
        except (ElsaError, sqlite3.Error) as exc:
            log.warning("prometheus: cannot read the store; job figures from it are missing",
                        error=getattr(exc, "message", str(exc)))
            return {}

    @staticmethod
    def _from_usage(u: Mapping[str, Any]) -> Tuple[Optional[float], ...]:
        v = u.get("usage") or {}

        def sec(us: Optional[int]) -> Optional[float]:
            return None if us is None else us / 1e6

        rss = v.get("max_rss_kb")
        return (sec(v.get("cpu_user_us")), sec(v.get("cpu_system_us")), None,
                None if rss is None else rss * 1024, v.get("read_bytes"), v.get("write_bytes"),
                v.get("processes"))

    @staticmethod
    def _from_cgroup(st: Any) -> Tuple[Optional[float], ...]:
        def sec(us: Optional[int]) -> Optional[float]:
            return None if us is None else us / 1e6

        return (sec(st.cpu_user_us), sec(st.cpu_system_us), st.memory_current,
                st.memory_peak, st.io_total("rbytes"), st.io_total("wbytes"), st.pids_current)

    def sample(self) -> Snapshot:
        """Read every exported job's figures, publish the snapshot and render
        its per-job families (the part of the body a scrape does not redo)."""
        from prometheus_client import generate_latest

        from elsa.errors import ElsaError
        from elsa.kernel import cgroupstats

        t0 = time.perf_counter()
        now = time.monotonic()
        with self._lock:
            for jid in [j for j, (_, t) in self._ended.items() if now - t > self.grace]:
                del self._ended[jid]
            running = list(self._running.values())
            ended = list(self._ended.values())
        rows: List[JobRow] = []
        need_store: List[int] = []
        live: Dict[int, Tuple[Optional[float], ...]] = {}
        for job in running:
            d = self._dir(job)
            if d is not None:
                try:
                    live[job.jid] = self._from_cgroup(cgroupstats.read_stats(d, LIVE_FILES))
                    continue
                except ElsaError:
                    pass  # gone (ending) or unreadable: the store's figures
            need_store.append(job.jid)
        need_store.extend(job.jid for job, _ in ended)
        usage = self._store_usage(need_store)
        last = self._last
        for job in running:
            figs = live.get(job.jid)
            if figs is None:
                u = usage.get(job.jid)
                figs = self._from_usage(u) if u else last.get(job.jid)
            if figs is None:
                figs = _UNKNOWN  # no reading yet: the job is there, its figures are not
            else:
                last[job.jid] = figs
            rows.append((self._labels(job), figs, True))
        for job, _ in ended:
            u = usage.get(job.jid)
            figs = self._from_usage(u) if u else None
            prev = last.get(job.jid)
            if figs is None or (prev is not None and (figs[0] or 0) + (figs[1] or 0)
                                < (prev[0] or 0) + (prev[1] or 0)):
                # The final reading is not stored yet: the last live one stands.
                figs = prev
            if figs is None:
                figs = _UNKNOWN
            else:
                last[job.jid] = figs
            # memory.current means nothing once the cgroup is gone
            rows.append((self._labels(job), figs[:2] + (None,) + figs[3:], False))
        keep = {job.jid for job in running} | {job.jid for job, _ in ended}
        for jid in [j for j in last if j not in keep]:
            del last[jid]
        snap = Snapshot(tuple(rows), self._status)
        self._snapshot = snap
        self._job_body = generate_latest(self._job_registry)
        self.samples += 1
        self.sample_seconds += time.perf_counter() - t0
        return snap

    def daemon_status(self) -> Mapping[str, Any]:
        """The latest daemon status, with the job counts of this moment."""
        with self._lock:  # counted when the job list changes: consistent with it
            jobs = dict(self._jobs_counts)
        status = dict(self._status)
        status["_jobs"] = jobs
        return status

    def snapshot(self) -> Snapshot:
        """The latest sample with the latest daemon status."""
        return Snapshot(self._snapshot.jobs, self.daemon_status())

    def body(self) -> bytes:
        """What a scrape gets: the per-job exposition rendered after the latest
        sample, then the daemon's metrics rendered now (both by prometheus_client)."""
        from prometheus_client import generate_latest

        return self._job_body + generate_latest(self._daemon_registry)

    def _sampler(self) -> None:
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    self.sample()
                except Exception as exc:  # the exporter must never take elsad down
                    log.exception("prometheus sampler failed",
                                  error=f"{type(exc).__name__}: {exc}")
                # Thousands of jobs make a pass cost seconds of (GIL-holding) Python:
                # space passes so the sampler stays under 1/SAMPLER_DUTY of a core.
                work = time.monotonic() - t0
                self._wake.wait(max(self.interval, SAMPLER_DUTY * work) - work)
                self._wake.clear()
        finally:
            self._close_db()

    def _close_db(self) -> None:
        """Close the store connection if this thread opened it: SQLite refuses a
        connection's use, close included, from any other thread."""
        if self._db is not None and self._db_owner == threading.get_ident():
            db, self._db = self._db, None
            db.close()

    # -- lifecycle ---------------------------------------------------------------------
    def make_registry(self) -> Any:
        """One registry with everything (tests, tools); elsad serves :meth:`body`."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(ElsaCollector(self.snapshot, self.tags))
        return registry

    def listen(self) -> None:
        """Bind and serve /metrics (before elsad starts: a taken port fails early)."""
        from elsa.errors import ConfigError

        host, _, port = str(self.options["listen"]).rpartition(":")
        try:
            self._server = _serve(host.strip("[]"), int(port), self.body)
        except OSError as exc:
            raise ConfigError(f"[export.prometheus] listen = {self.options['listen']!r}: cannot "
                              f"listen there ({exc.strerror}); pick a free address or leave "
                              "listen empty") from exc
        log.info("prometheus exporter listening", listen=self.options["listen"])

    def start_sampler(self) -> None:
        # The first pass runs in the thread too: the store connection is the thread's.
        self._thread = threading.Thread(target=self._sampler, name="elsa-prometheus-sampler",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)  # the thread closes its store connection
        self._close_db()  # opened by a caller's sample() (no sampler thread)


def _serve(host: str, port: int, body: Callable[[], bytes]) -> Any:
    """An HTTP server thread answering GET /metrics with ``body()``."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import CONTENT_TYPE_LATEST

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would flood the journal

    def app(environ: Mapping[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics here\n"]
        data = body()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST),
                                  ("Content-Length", str(len(data)))])
        return [data]

    server = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="elsa-prometheus-http",
                     daemon=True).start()
    return server


class _Hooks:
    """The exporter's plugin: job notifications from the event thread."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self.exporter = exporter

    @hookimpl
    def elsa_job_created(self, job: Any) -> None:
        self.exporter.job_created(job)

    @hookimpl
    def elsa_job_ended(self, job: Any) -> None:
        self.exporter.job_ended(job)


def bind(config: Any) -> Optional[PrometheusExporter]:
    """The exporter serving /metrics when ``[export.prometheus] listen`` is set,
    else None. The composition root calls this before the daemon starts, then
    :func:`attach` once it has."""
    import os

    options = config.section("export.prometheus")
    if not options["listen"]:
        return None
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        from elsa.errors import ConfigError

        raise ConfigError("[export.prometheus] listen is set but the Python package "
                          "prometheus_client is missing: pip install 'elsa[export]' (or "
                          "Debian's python3-prometheus-client), or leave listen empty") from exc
    exporter = PrometheusExporter(options, db_path=os.path.join(config.state_dir, "elsa.db"))
    exporter.listen()
    return exporter


def attach(exporter: PrometheusExporter, daemon: Any) -> None:
    """Feed *exporter* from a started :class:`~elsa.core.daemon.Daemon`: its
    jobs (plugin hooks), its status (a 1 s timer), then start the sampler."""
    from elsa.errors import ElsaError
    from elsa.kernel.cgroupfs import CgroupFS

    try:
        exporter.mount = CgroupFS().cgroup2_mount()
    except ElsaError:
        exporter.mount = None  # no cgroup2: every job's figures come from the store
    exporter.seed(daemon.manager.running())
    daemon.host.pm.register(_Hooks(exporter), name="elsa.export.prometheus")

    def publish() -> None:
        exporter.publish_status(daemon.status())

    publish()
    daemon.loop.add_timer(1.0, publish, "prometheus-status")
    exporter.start_sampler()
