"""Glue between the daemon and the accounting sources (issue 5).

:meth:`elsa.core.daemon.Daemon._start_sources` calls :func:`start_sources`,
which builds the :class:`~elsa.core.aggregator.Aggregator`, validates each
enabled source's ``[sources.<name>]`` table, starts the source and wires it
into the event loop:

* ``loop.add_reader(source.fileno(), source.on_readable)`` when the source
  has a descriptor (taskstats' netlink socket);
* ``loop.add_timer(source.interval, source.poll)`` when it polls (pacct
  follower, cgroup readings);
* ``manager.before_end`` gets ``source.job_ending(job)`` (final readings before
  the backend removes the job's cgroup);
* a 0.25 s timer retries held records (``Aggregator.retry``) and runs the
  "stored" callbacks (:class:`Durability`).

All of them are *deferrable*: during a burst hold (elsa/core/burst.py) the
sources' descriptors stay unread and their timers wait for the hold to end.

A source that raises is logged with its name and isolated; one
that fails to start is reported in ``status`` and the daemon runs without it.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from elsa.config import Config, validate_table
from elsa.core.aggregator import (
    Aggregator,
    history_lookup,
    parent_lookup,
)
from elsa.core.attribution import save_boot_epoch
from elsa.core.guard import Guard, run_isolated
from elsa.core.model import Job, format_jid, parse_jid
from elsa.core.source import Source, SourceContext, SourceSpec
from elsa.core.thresholds import Folder
from elsa.core.usage import SET_META, gap_stmt, priorities_of, save_priorities
from elsa.errors import ElsaError
from elsa.kernel.procfs import ProcFS, boot_epoch
from elsa.logsetup import structlog

if TYPE_CHECKING:
    from elsa.core.loop import EventLoop
    from elsa.core.manager import JobManager
    from elsa.core.store import Store

log = structlog.get_logger("elsa.accounting")

RETRY_INTERVAL = 0.25
HISTORY_MARGIN_S = 1.0


class Durability:
    """Runs callbacks once the records emitted before them are committed.

    Two phases: a callback first waits out the aggregator's hold window (a
    record may sit there unresolved before it is submitted), then takes a store
    mark and waits for the writer to commit up to it.
    """

    def __init__(self, store: Any, hold_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.hold = hold_seconds
        self.clock = clock
        self.waiting: Deque[Tuple[float, Callable[[], None]]] = collections.deque()
        self.marked: Deque[Tuple[int, Callable[[], None]]] = collections.deque()

    def defer(self, cb: Callable[[], None]) -> None:
        self.waiting.append((self.clock(), cb))

    def tick(self) -> None:
        now = self.clock()
        while self.waiting and now - self.waiting[0][0] > self.hold + RETRY_INTERVAL:
            _, cb = self.waiting.popleft()
            self.marked.append((self.store.mark(), cb))
        while self.marked and self.store.is_committed(self.marked[0][0]):
            _, cb = self.marked.popleft()
            run_isolated(cb, "stored-callback")

    def drain(self) -> None:
        """At stop, after the aggregator forced out its held records."""
        self.store.flush()
        for _, cb in list(self.waiting) + list(self.marked):
            run_isolated(cb, "stored-callback")
        self.waiting.clear()
        self.marked.clear()


#: A source's gap that begins at most this many seconds after its previous one ended
#: extends that one: a sustained overflow (a gap per read) keeps one meta row, and
#: a gap too wide costs only the per-process reading of its hours (elsa.core.usage).
GAP_MERGE_S = 60.0


#: The gaps per source that ``status`` lists, the latest (merged as stored): a long run
#: with many overflow episodes keeps this many of each source in memory, not all.
GAP_STATUS_KEEP = 4
#: The distinct causes a merged gap names at most (a source's causes are a few phrases).
GAP_CAUSES_KEEP = 3


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def gap_entry(source: str, start: float, end: float, why: str,
              jobs: Sequence[str] = ()) -> Dict[str, Any]:
    """A gap as ``status`` lists it (``sources.gaps``), whatever its kind: a downtime
    found at start (*jobs*: the running jobs flagged incomplete for it) or a loss a
    running source told (GapRecorder; its jobs are flagged as the source says)."""
    return {"source": source, "from": round(start, 3), "to": round(end, 3),
            "jobs": list(jobs), "why": why}


@dataclass
class RunningGap:
    """A gap a running source told, as merged so far, with what its records were lost to."""

    start: float
    end: float
    lost: List[str]

    def why(self, source: str) -> str:
        to = f" to {' and to '.join(self.lost)}" if self.lost else ""
        return f"{source} records lost{to} from {_clock(self.start)} to {_clock(self.end)}"


class GapRecorder:
    """Stores the gaps the running sources report (SourceContext.gap) through the
    store's writer thread: the event thread never waits on SQLite. Keeps each
    source's latest ones for ``status`` (memory, not the store: the event thread
    answers it)."""

    def __init__(self, submit: Callable[..., None]) -> None:
        self.submit = submit
        self.recent: Dict[str, Deque[RunningGap]] = {}  # source -> its latest gaps

    def add(self, source: str, start: float, end: float, lost: str = "") -> None:
        recent = self.recent.setdefault(source, collections.deque(maxlen=GAP_STATUS_KEEP))
        prev = recent[-1] if recent else None
        if prev is not None and start <= prev.end + GAP_MERGE_S and end >= prev.start:
            prev.start, prev.end = min(start, prev.start), max(end, prev.end)
            if lost and lost not in prev.lost and len(prev.lost) < GAP_CAUSES_KEEP:
                prev.lost.append(lost)
            gap = prev
        else:
            gap = RunningGap(start, end, [lost] if lost else [])
            recent.append(gap)
        self.submit(*gap_stmt(source, gap.start, gap.end))

    def status(self) -> List[Dict[str, Any]]:
        """The latest gaps of each source, oldest first."""
        gaps = [(g.start, source, g) for source, kept in self.recent.items() for g in kept]
        return [gap_entry(source, g.start, g.end, g.why(source))
                for _, source, g in sorted(gaps, key=lambda x: (x[0], x[1]))]


class AccountingStop:
    """Listed last among the daemon's sources so that the daemon's stop loop,
    which stops every source before closing the store, flushes the aggregator
    (held records) and runs the pending "stored" callbacks after the real
    sources emitted their final records."""

    def __init__(self, aggregator: Aggregator, durability: Durability, store: Store) -> None:
        self.aggregator = aggregator
        self.durability = durability
        self.store = store

    def stop(self) -> None:
        self.aggregator.stop()
        self.durability.drain()
        # The sources stopped listening now: the next start's gap begins here, not
        # at the last mark of the "alive" timer (up to ALIVE_INTERVAL before).
        self.store.submit(*alive_stmt(time.time()))

    def status(self) -> Dict[str, object]:
        return self.aggregator.status()


def start_sources(specs: Mapping[str, SourceSpec], names: Sequence[str], *, config: Config,
                  manager: JobManager, store: Store, procfs: ProcFS, loop: EventLoop,
                  settle: Callable[[], bool],
                  lost_fork: Optional[Callable[[Tuple[Any, ...], float], Optional[int]]] = None,
                  observe: Optional[Callable[[List[Tuple[Any, ...]]], None]] = None,
                  sources_held: Callable[[], bool] = lambda: False,
                  waited: Callable[[int], bool] = lambda jid: False,
                  ) -> Tuple[Dict[str, Any], Callable[[], Dict[str, Any]], Callable[[], None]]:
    """Start the sources *names* (elsa.core.defaults.enabled_sources); return
    (sources by name, status function, a function that reads the sources'
    descriptors now).

    *settle* applies the proc-connector events queued so far (the aggregator
    calls it before it gives up on a record's job); *lost_fork*, for a
    filtered proc connector, finds the job of a record whose fork event was
    lost; *observe* sees the usage rows as they are stored (both:
    elsa.core.aggregator.Aggregator); *sources_held*: a burst hold leaves the
    sources unread now (elsa/core/burst.py); *waited(jid)*: a client waits for the
    job's end (``wait``)."""
    cfg = config
    # For the reports and elsa import-acct: how the sources rank, when this boot began.
    save_priorities(store.db, store.submit, priorities_of(specs))
    save_boot_epoch(store.submit, manager.boot_id, boot_epoch())
    started_wall = time.time()
    gaps = downtime_gaps(store, manager, specs, names, started_wall)

    def history_horizon() -> float:
        # Memory (index, exit history, left-alive map) knows every membership
        # of processes that exited after max(start, now - linger); older ones
        # need the store. A record's end time (btime + elapsed) can be up to
        # 1 s late: the kernel computes btime as the current second minus the
        # *whole* seconds elapsed (docs/kernel.md, "taskstats" and "BSD
        # accounting"), so end = floor(exit) + frac(elapsed). HISTORY_MARGIN_S
        # covers that, so end >= horizon implies memory saw the exit.
        return max(started_wall, time.time() - manager.exited_linger) + HISTORY_MARGIN_S

    aggregator = Aggregator(store.submit, manager.resolve,
                            history=history_lookup(store.db, manager.boot_id),
                            parent=parent_lookup(store.db, manager.boot_id,
                                                 manager.parent_member),
                            submit_many=store.submit_many,
                            settle=settle, lost_fork=lost_fork, observe=observe,
                            history_horizon=history_horizon,
                            folder=Folder.from_section(cfg.section("thresholds")))
    durability = Durability(store, aggregator.hold_seconds)
    gap_recorder = GapRecorder(store.submit)
    started: Dict[str, Any] = {}
    failed: Dict[str, str] = {}
    guards: Dict[str, List[Guard]] = {}
    readers: List[Callable[[], None]] = []
    reading: Set[str] = set()  # sources whose descriptor is being read now

    def reader(name: str, g: Guard) -> Callable[[], None]:
        def read() -> None:
            # No re-entry: a read's records may make the aggregator settle the
            # proc-connector events, which may end a job, which reads (job_ending).
            if name in reading:
                return
            reading.add(name)
            try:
                g()
            finally:
                reading.discard(name)
        return read

    def affected_jobs() -> Set[int]:
        jids = {j.jid for j in manager.running()}
        jids.update(manager.exited.jids())
        return jids

    for name in names:
        spec = specs[name]
        try:
            options = validate_table(cfg.source_table(name), spec.options,
                                     where=f"sources.{name}", path=cfg.path)
            src: Source = spec.factory()

            def flag(jid: Optional[int], why: str, _name: str = name) -> None:
                jids = affected_jobs() if jid is None else {jid}
                aggregator.flag_incomplete(sorted(jids), _name, why)

            ctx = SourceContext(options=options, procfs=procfs,
                                state_dir=cfg.state_dir, emit=aggregator.add,
                                emit_rows=aggregator.add_rows,
                                jobs=lambda: manager.running(), flag_incomplete=flag,
                                gap=lambda start, end, lost="", _name=name: (
                                    gap_recorder.add(_name, start, end, lost)),
                                when_stored=durability.defer,
                                extra={"boot_id": manager.boot_id})
            src.start(ctx)
        except ElsaError as exc:
            failed[name] = exc.message
            log.error("accounting source failed to start; running without it",
                      source=name, error=exc.message)
            continue
        except Exception as exc:  # a third-party source must not stop the daemon
            failed[name] = f"{type(exc).__name__}: {exc}"
            log.exception("accounting source failed to start; running without it",
                          source=name, error=failed[name])
            continue
        started[name] = src
        guards[name] = []
        fd = src.fileno()
        if fd is not None:
            g = Guard(name, "on_readable", src.on_readable,
                      on_give_up=lambda fd=fd: loop.remove_reader(fd))
            guards[name].append(g)
            readers.append(reader(name, g))
            loop.add_reader(fd, readers[-1], deferrable=True, window=float(src.read_window))
        if src.interval:
            g = Guard(name, "poll", src.poll)
            guards[name].append(g)
            loop.add_timer(float(src.interval), g, f"source-{name}", deferrable=True,
                           active=src.has_poll_work)
        log.info("accounting source started", source=name)

    def read_now() -> None:
        # A reply about a running job ('ja') must count the processes that exited
        # before it was asked: the kernel queued their records at their exit
        # (taskstats before the exit event), but the loop reads a descriptor in
        # batches (read_window). The descriptors are non-blocking.
        for g in readers:
            g()

    def job_ending(job: Job) -> None:
        for name, src in started.items():
            run_isolated(lambda src=src: src.job_ending(job), "job_ending", name)
        # The last members' records are queued already (taskstats' before the exit
        # event and before the cgroup empties): read them, so that they are stored
        # with the end and 'wait' (which answers after the commit) sees the job's
        # final figures. Only for a job a client waits for: a read at every job's
        # end costs elsad CPU per job (benchmarks/bench_cgroup_jobs.py).
        # Not during a burst hold, whose point is to leave the queues unread.
        if waited(job.jid) and not sources_held():
            read_now()
        aggregator.job_ending(job)

    manager.before_end.append(job_ending)

    def tick() -> None:
        aggregator.retry()
        durability.tick()

    loop.add_timer(RETRY_INTERVAL, tick, "accounting-retry", deferrable=True,
                   active=lambda: bool(aggregator.held or durability.waiting
                                       or durability.marked))
    sources: Dict[str, Any] = dict(started)
    sources["accounting"] = AccountingStop(aggregator, durability, store)

    def status() -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name, src in started.items():
            try:
                st = dict(src.status())
            except Exception as exc:
                st = {"status_error": f"{type(exc).__name__}: {exc}"}
            st["callback_errors"] = sum(g.errors for g in guards.get(name, ()))
            out[name] = st
        for name, why in failed.items():
            out[name] = {"error": why}
        out["aggregator"] = aggregator.status()
        # The downtime found at start, then what the sources lost since (bounded).
        all_gaps = gaps + gap_recorder.status()
        if all_gaps:
            out["gaps"] = all_gaps
        return out

    record_gaps(store, gaps, list(started), specs, time.time())
    # status shows a downtime that flagged jobs, or one after an earlier run (the
    # reports read its hours process by process, jobs or not); not the time before
    # a first start, when the store did not exist and nothing ran to lose records.
    gaps = [g for g in gaps if g["jobs"] or g["from"]]
    for gap in gaps:
        aggregator.flag_incomplete([parse_jid(j) for j in gap["jobs"]], gap["source"],
                                   gap["why"])
    loop.add_timer(ALIVE_INTERVAL, lambda: store.submit(*alive_stmt(time.time())), "alive")
    return sources, status, read_now


#: Seconds between elsad's "alive" marks in the store: after a kill -9 the
#: last mark bounds the time it was not running.
ALIVE_INTERVAL = 2.0
ALIVE_KEY = "daemon.alive"


def alive_stmt(now: float) -> Tuple[str, Tuple[Any, ...]]:
    return ("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
            "SET value = excluded.value", (ALIVE_KEY, repr(round(now, 3))))


#: The sources that cannot cover a downtime running now (JSON list), and when each such
#: source was last known to be listening (JSON object): where its next gap begins.
LISTENING_KEY = "sources.listening"
LISTENED_KEY = "sources.listened"


def _json_meta(store: Store, key: str) -> Any:
    try:
        return json.loads(store.get_meta(key, "") or "null")
    except ValueError:
        return None


def downtime_gaps(store: Store, manager: JobManager, specs: Mapping[str, SourceSpec],
                  names: Sequence[str], now: float) -> List[Dict[str, Any]]:
    """What the sources that cannot cover elsad's downtime missed: per source, the
    interval since it last listened (elsad's last "alive" mark, or the start of
    the store when it never ran here) and the running jobs that ran across it."""
    try:
        last = float(store.get_meta(ALIVE_KEY, "") or 0)
    except ValueError:
        last = 0.0
    store.submit(*alive_stmt(now))
    if last >= now:
        return []  # the clock went back: no interval to tell
    listening = _json_meta(store, LISTENING_KEY)
    listened = _json_meta(store, LISTENED_KEY)
    listened = {str(k): float(v) for k, v in listened.items()
                if isinstance(v, (int, float))} if isinstance(listened, dict) else {}
    if not isinstance(listening, list):
        # A store of an elsad that did not say: the sources of this one ran until then.
        listening = list(names) if last else []
    listened.update((str(name), last) for name in listening if last)
    store.submit(SET_META, (LISTENED_KEY, json.dumps(listened, sort_keys=True)))
    # Every job recovered as running ran across the downtime (or the part of
    # it after its creation).
    jobs = [format_jid(j.jid) for j in manager.running()]
    end = _clock(now)
    out = []
    for name in names:
        if getattr(specs.get(name), "covers_downtime", False):
            continue
        since = listened.get(name, 0.0)
        if since:
            start = _clock(since)
            why = (f"no {name} records from {start} to {end} (elsad was not running for "
                   f"{now - since:.1f} s)" if since == last else
                   f"no {name} records from {start} to {end} (the source was not running)")
        else:
            why = f"no {name} records before {end} (the source never ran on this store)"
        out.append(gap_entry(name, since, now, why, jobs))
        if jobs:
            log.warning("accounting gap while the source was not running", source=name,
                        since=since, jobs=len(jobs), seconds=round(now - since, 1))
    return out


def record_gaps(store: Store, gaps: Sequence[Dict[str, Any]], started: Sequence[str],
                specs: Mapping[str, SourceSpec], now: float) -> None:
    """Once the sources listen (*now*): store each gap for the reports
    (elsa.core.usage: the hours a gap overlaps are counted process by process),
    and which sources that cannot cover a downtime now listen."""
    for gap in gaps:
        store.submit(*gap_stmt(gap["source"], gap["from"], max(now, gap["to"])))
    store.submit(SET_META, (LISTENING_KEY, json.dumps(sorted(
        name for name in started if not getattr(specs.get(name), "covers_downtime", False)))))
