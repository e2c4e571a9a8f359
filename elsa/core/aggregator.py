"""The accounting aggregator: ties usage records to jobs and writes them to the store.

Every source hands :class:`~elsa.core.source.UsageRecord` values to
:meth:`Aggregator.add` on the daemon's event thread. Each per-process record
is attributed to a job by its identity (pid, start time) through the
membership history (:meth:`elsa.core.manager.JobManager.resolve`), which keeps
exited members for ``exited_linger`` seconds: the proc connector's exit event
and the accounting record arrive in either order (CSA shipped that race as a
bug). A record that resolves to nothing yet is held for ``hold_seconds`` and
retried after later events were processed (its fork event may still be queued
on the netlink socket); then the persisted membership history is consulted,
then, for records memory does not cover (a process that forked and exited
while elsad was down), the record's ppid chain; only then is it stored as "no
job" (most processes on a host are in none).

Attribution follows the one rule of :mod:`elsa.core.attribution` (same boot,
pid and start time within the source's tolerance, :func:`~elsa.core.attribution.identity`).

Writes go through :meth:`elsa.core.store.Store.submit` (the batching writer
thread), so the event path never waits on disk. Per-job and per-hour
aggregates are summed in the writer's transaction from the rows really
inserted (:func:`add_to_sums`, the ids past the table's highest before the
insert), so a record read twice after a crash is never counted twice.

Which source's figure is "best" where sources overlap is the usage model's
rule too (:func:`elsa.core.usage.best`, by each source spec's priority).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from elsa.core import usage
from elsa.core.attribution import (
    CARRIED_SQL,
    HISTORY_SQL,
    PARENT_SQL,
    TASKSTATS_TOLERANCE_TICKS,
    ParentLookup,
    attribute_by_parent,
    history_params,
    identity,
)
from elsa.core.model import CLOCK_TICKS, Job
from elsa.core.thresholds import INSERT_FOLDED, Folder
from elsa.core.usage import (
    JOB_USAGE_ACCUMULATE,
    ROLLUP_ACCUMULATE,
    ROW_FIELDS,
    UsageRecord,
    record_row,
)
from elsa.kernel.procfs import boot_epoch

#: Row fields the aggregator reads (ROW_FIELDS positions).
_JID, _PID, _END, _START_TICKS = usage.JID, usage.PID, usage.END, usage.START_TICKS

#: (pid, start ticks, tolerance ticks, end epoch) -> the job of that process in the
#: persisted history (:func:`history_lookup`).
HistoryLookup = Callable[[int, int, int, float], Optional[int]]

#: Process-level columns of proc_usage, in insert order (a usage row).
PROC_COLUMNS = ROW_FIELDS
INSERT_PROC = (f"INSERT OR IGNORE INTO proc_usage({', '.join(PROC_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(PROC_COLUMNS))})")

_JOB_LEVEL_COLUMNS = ("cpu_user_us", "cpu_system_us", "max_rss_kb", "read_bytes",
                      "write_bytes", "minflt", "majflt")
# A job-level reading (cgroupstat) replaces the previous one: the kernel's
# counters are cumulative for the cgroup.
INSERT_SAMPLE = ("INSERT OR REPLACE INTO job_samples(jid, t, cpu_us, mem_bytes) "
                 "VALUES (?, ?, ?, ?)")
UPSERT_JOB_LEVEL = (
    "INSERT INTO job_usage(jid, source, " + ", ".join(_JOB_LEVEL_COLUMNS) + ", updated, extra) "
    "VALUES (?, ?, " + ", ".join("?" * len(_JOB_LEVEL_COLUMNS)) + ", ?, ?) "
    "ON CONFLICT(jid, source) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _JOB_LEVEL_COLUMNS)
    + ", updated = excluded.updated, extra = excluded.extra")
FLAG_INCOMPLETE = (
    "INSERT INTO job_usage(jid, source, incomplete, updated) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(jid, source) DO UPDATE SET incomplete = CASE "
    "WHEN job_usage.incomplete IS NULL THEN excluded.incomplete "
    "WHEN instr(job_usage.incomplete, excluded.incomplete) > 0 THEN job_usage.incomplete "
    "ELSE job_usage.incomplete || '; ' || excluded.incomplete END")

#: Records of processes that ended longer ago than this are not held.
STALE_SECONDS = 30.0


#: The proc_usage row of a per-process record.
proc_row = record_row





@dataclass
class AggregatorCounters:
    records: int = 0
    attributed: int = 0
    unattributed: int = 0
    held: int = 0
    resolved_late: int = 0
    resolved_from_history: int = 0
    resolved_by_parent: int = 0
    settled: int = 0
    job_readings: int = 0
    per_source: Dict[str, int] = field(default_factory=dict)


Resolver = Callable[[int, Optional[int], int], Optional[int]]
Submit = Callable[[str, Sequence[Any]], None]
SubmitMany = Callable[[str, List[Sequence[Any]]], None]


class Aggregator:
    """Attributes records to jobs and submits them to the store.

    Internally every per-process record is a proc_usage row (a plain tuple in
    :data:`PROC_COLUMNS` order, ``jid`` still ``None``): sources on the hot
    path hand rows to :meth:`add_rows` directly (one tuple per process, no
    dataclass; see plugins/taskstats.py and plugins/bsdacct.py), others hand
    :class:`UsageRecord` values to :meth:`add`, which converts them with
    :func:`proc_row`.

    *settle*, when given (:meth:`elsa.core.events.ProcEvents.settle`), applies every proc
    connector event queued so far and returns True when that left nothing
    unknown: the socket was emptied, no loss is pending and no sequence hole
    is open. A process's fork event is queued before it can exit, so after a
    settle every record already received whose process was a member resolves
    in memory; one that does not is final at once ("no job") instead of being
    held and retried for ``hold_seconds``. *history_horizon* (epoch seconds)
    bounds what memory covers: records of processes that ended before it
    still go to the persisted history.

    *lost_fork*, given when the proc connector is filtered
    (:meth:`elsa.core.events.ProcEvents.lost_fork`), returns for a row still
    in no job after a settle the job its parent was a member of when the
    process started: with no sequence numbers to reveal it, that is how a
    fork event the kernel failed to send shows (the row then counts as
    ``resolved_by_parent`` too).

    *observe*, when given (:func:`elsa.core.listener.usage_sink`), sees every
    batch of rows as it is queued to the store, attributed, folded ones
    included: application accounting takes a process's exit figures from it.
    """

    def __init__(self, submit: Submit, resolve: Resolver, *,
                 history: Optional[HistoryLookup] = None,
                 hold_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 boot_epoch_fn: Callable[[], float] = boot_epoch,
                 submit_many: Optional[SubmitMany] = None,
                 settle: Optional[Callable[[], bool]] = None,
                 history_horizon: Optional[Callable[[], float]] = None,
                 folder: Optional[Folder] = None,
                 parent: Optional[ParentLookup] = None,
                 lost_fork: Optional[Callable[[Tuple[Any, ...], float], Optional[int]]] = None,
                 observe: Optional[Callable[[List[Tuple[Any, ...]]], None]] = None
                 ) -> None:
        self.submit = submit
        self.observe = observe
        self.folder = folder
        self.submit_many = submit_many or (lambda sql, rows: [submit(sql, r) for r in rows])
        self.resolve = resolve
        self.history = history
        self.parent = parent
        self.lost_fork = lost_fork
        self.hold_seconds = hold_seconds
        self.clock = clock
        self.boot_epoch_fn = boot_epoch_fn
        self.settle = settle
        self.history_horizon = history_horizon
        self.held: List[Tuple[Tuple[Any, ...], float]] = []  # (row, since)
        self.counters = AggregatorCounters()

    # -- intake --------------------------------------------------------------------------
    def add(self, records: Iterable[UsageRecord]) -> None:
        c = self.counters
        rows: List[Tuple[Any, ...]] = []
        for rec in records:
            c.records += 1
            c.per_source[rec.source] = c.per_source.get(rec.source, 0) + 1
            if rec.pid == 0:
                self._job_level(rec)
                continue
            rows.append(proc_row(rec, rec.jid))
        if rows:
            self._attribute(rows)

    def add_rows(self, source: str, rows: List[Tuple[Any, ...]]) -> None:
        """The hot path: per-process rows of *source* (``proc_row`` layout, jid
        ``None`` or set)."""
        c = self.counters
        c.records += len(rows)
        c.per_source[source] = c.per_source.get(source, 0) + len(rows)
        self._attribute(rows)

    def _boot_epoch(self) -> float:
        # Boot time in epoch seconds (moves with wall-clock steps): once per batch.
        return self.boot_epoch_fn()

    def _resolve_row(self, row: Sequence[Any], boot: float) -> Optional[int]:
        start, tol = identity(row, boot)
        if start is not None and start < -tol:
            return None  # started before this boot: no membership can match
        return self.resolve(row[_PID], start, tol)

    def _attribute(self, rows: List[Tuple[Any, ...]]) -> None:
        c = self.counters
        boot = self._boot_epoch()
        done: List[Tuple[Any, ...]] = []
        settled: Optional[bool] = None
        horizon = 0.0
        now = self.clock()
        wall = time.time()
        attributed = unattributed = 0
        late: List[Tuple[Any, ...]] = []
        resolve = self.resolve
        tol = TASKSTATS_TOLERANCE_TICKS
        for row in rows:
            jid = row[_JID]
            # After the batch's settle a lookup already sees its events: a
            # record that misses then is not looked up twice (most records
            # are of processes in no job: elsad's CPU per process).
            fresh = settled is not None
            if jid is None:
                start = row[_START_TICKS]
                if start is not None:  # _resolve_row, inline for the common case
                    if start >= -tol:
                        jid = resolve(row[_PID], start, tol)
                else:
                    jid = self._resolve_row(row, boot)
            if jid is not None:
                attributed += 1
                done.append(row if row[_JID] == jid else (row[0], jid) + row[2:])
                continue
            if settled is None:  # only when something does not resolve
                settled = self.settle is not None and self.settle()
                if settled:
                    horizon = self._horizon()
                    # The settle may have applied the very fork events we lacked.
            if settled:
                if not fresh:
                    jid = self._resolve_row(row, boot)
                if jid is None and self.lost_fork is not None:
                    jid = self._lost_fork(row, boot)
                if jid is not None:
                    c.resolved_late += 1
                    attributed += 1
                    done.append((row[0], jid) + row[2:])
                    continue
                if row[_END] >= horizon:
                    c.settled += 1
                    unattributed += 1
                    done.append(row)
                    continue
            if not settled and self.hold_seconds > 0 and wall - row[_END] <= STALE_SECONDS:
                # Hold only what may still be waiting for its fork event: not
                # after a settle (every event is in), not a record of a process
                # that ended long ago (a pacct backlog read after a restart).
                self.held.append((row, now))
                c.held += 1
                continue
            late.append(row)
        c.attributed += attributed
        c.unattributed += unattributed
        if late:
            done = self._late(late, done, boot)
        if done:
            self._store(done)

    def _lost_fork(self, row: Tuple[Any, ...], boot: float) -> Optional[int]:
        """The job of a settled row whose fork event a filtered proc connector
        lost (see *lost_fork* in the class docstring), counted by the ppid rule."""
        assert self.lost_fork is not None
        jid = self.lost_fork(row, boot)
        if jid is not None:
            self.counters.resolved_by_parent += 1
        return jid

    def _horizon(self) -> float:
        return 0.0 if self.history_horizon is None else self.history_horizon()

    def _late(self, late: List[Tuple[Any, ...]], done: List[Tuple[Any, ...]], boot: float
              ) -> List[Tuple[Any, ...]]:
        """Final attribution of rows memory does not cover: the stored history by
        identity, then the ppid rule (:func:`elsa.core.attribution.attribute_by_parent`)
        with *done* (the other rows of this pass, attributed) as the records
        read with them. Returns *done* with the late rows added."""
        c = self.counters
        jids = [self._from_history(row, boot) for row in late]
        todo = [i for i, jid in enumerate(jids) if jid is None]
        if todo and self.parent is not None:
            rows: List[Sequence[Any]] = list(late) + done
            all_jids = jids + [row[_JID] for row in done]
            c.resolved_by_parent += attribute_by_parent(rows, all_jids, todo, boot,
                                                        self.parent)
            jids = all_jids[:len(late)]
        for row, jid in zip(late, jids):
            self._settled(done, row, jid)
        return done

    def _settled(self, done: List[Tuple[Any, ...]], row: Tuple[Any, ...],
                 jid: Optional[int]) -> None:
        """Count *row* as attributed to *jid* (or to no job) and queue it for the store."""
        if jid is None:
            self.counters.unattributed += 1
            done.append(row)
        else:
            self.counters.attributed += 1
            done.append((row[0], jid) + row[2:])

    def _from_history(self, row: Sequence[Any], boot: float) -> Optional[int]:
        if self.history is None:
            return None
        start, tol = identity(row, boot)
        if start is None or start < -tol:
            return None
        jid = self.history(row[_PID], start, tol, row[_END])
        if jid is not None:
            self.counters.resolved_from_history += 1
        return jid

    def retry(self, force: bool = False) -> None:
        """Retry held records (timer; runs after the event callbacks of a loop
        iteration). Records held longer than ``hold_seconds`` (or, after a
        settle, records memory covers) are looked up in the persisted history
        when memory does not cover them, then stored without a job."""
        if not self.held:
            return
        now = self.clock()
        boot = self._boot_epoch()
        settled = self.settle is not None and self.settle()
        horizon = self._horizon() if settled else 0.0
        keep: List[Tuple[Tuple[Any, ...], float]] = []
        done: List[Tuple[Any, ...]] = []
        late: List[Tuple[Any, ...]] = []
        c = self.counters
        for row, since in self.held:
            jid = self._resolve_row(row, boot)
            if jid is None and settled and self.lost_fork is not None:
                jid = self._lost_fork(row, boot)
            if jid is not None:
                c.resolved_late += 1
            elif settled and row[_END] >= horizon:
                c.settled += 1
            elif force or now - since >= self.hold_seconds:
                late.append(row)
                continue
            else:
                keep.append((row, since))
                continue
            self._settled(done, row, jid)
        self.held = keep
        if late:
            done = self._late(late, done, boot)
        if done:
            self._store(done)

    def _store(self, rows: List[Tuple[Any, ...]]) -> None:
        if self.observe is not None:
            self.observe(rows)
        if self.folder is not None:
            rows, folded = self.folder.split(rows)
            if folded:
                self.submit_many(INSERT_FOLDED, folded)
            if not rows:
                return
        self.submit_many(INSERT_PROC, rows)

    def _job_level(self, rec: UsageRecord) -> None:
        if rec.jid is None:
            return
        self.counters.job_readings += 1
        now = time.time()
        self.submit(UPSERT_JOB_LEVEL, (
            rec.jid, rec.source, rec.cpu_user_us, rec.cpu_system_us, rec.max_rss_kb,
            rec.read_bytes, rec.write_bytes, rec.minflt, rec.majflt, now,
            usage.extra_json(rec.extra)))
        cpu = None
        if rec.cpu_user_us is not None or rec.cpu_system_us is not None:
            cpu = (rec.cpu_user_us or 0) + (rec.cpu_system_us or 0)
        self.submit(INSERT_SAMPLE, (rec.jid, now, cpu, rec.extra.get("memory_current")))

    # -- flags and lifecycle ----------------------------------------------------------------
    def flag_incomplete(self, jids: Iterable[int], source: str, why: str) -> None:
        """Mark jobs' usage from *source* incomplete (records were lost)."""
        now = time.time()
        for jid in jids:
            self.submit(FLAG_INCOMPLETE, (jid, source, why, now))

    def job_ending(self, job: Job) -> None:
        """Nothing to close here: late records of the job's processes still
        resolve through the exited-members history and update job_usage."""

    def stop(self) -> None:
        self.retry(force=True)

    def status(self) -> Dict[str, object]:
        c = self.counters
        return {"records": c.records, "attributed": c.attributed,
                "unattributed": c.unattributed, "held_now": len(self.held),
                "held_total": c.held, "resolved_late": c.resolved_late,
                "resolved_from_history": c.resolved_from_history,
                "resolved_by_parent": c.resolved_by_parent,
                "settled": c.settled, "job_readings": c.job_readings,
                "folded": 0 if self.folder is None else self.folder.folded,
                "per_source": dict(c.per_source)}


# -- bulk import (elsa import-acct, benchmarks) ----------------------------------------------

#: One pass over the new rows (ids in (lo, hi]) for both summary tables: their
#: figures per (hour, source, uid, command, job) into a temporary table, from which
#: usage_rollup's and job_usage's groups are summed (a fraction of the rows; one scan
#: and sort of the batch instead of two). Sums and maxima stay NULL where every row
#: lacks the figure, in both tables (docs/accounting.md: an unmeasured figure is never 0).
_GROUPS = "temp.usage_bulk_groups"
_GROUP_SUMS = ", ".join(usage.SUM_METRICS)
_GROUPS_TABLE = (f"CREATE TEMP TABLE IF NOT EXISTS usage_bulk_groups (bucket, source, uid, "
                 f"comm, jid, processes, {_GROUP_SUMS}, max_rss_kb, max_vm_kb, mem_kb_sum, "
                 "end_time)")
_GROUPS_FROM = f"""
    INSERT INTO {_GROUPS}
    SELECT CAST(end_time / 3600 AS INTEGER), source, COALESCE(uid, -1), comm, jid, COUNT(*),
           {", ".join(f"SUM({c})" for c in usage.SUM_METRICS)},
           MAX(max_rss_kb), MAX(max_vm_kb), SUM(COALESCE(max_rss_kb, max_vm_kb)),
           MAX(end_time)
    FROM proc_usage WHERE id > ? AND id <= ?
    GROUP BY 1, 2, 3, 4, 5
    """

_ROLLUP_FROM = f"""
    INSERT INTO usage_rollup
    SELECT bucket,
           -- prio: not read; reports rank sources by their specs' priority (elsa.core.usage)
           0, source, uid, comm, SUM(processes), SUM(cpu_user_us), SUM(cpu_system_us),
           SUM(elapsed_us), MAX(max_rss_kb), SUM(mem_kb_sum), SUM(read_bytes),
           SUM(write_bytes), SUM(minflt), SUM(majflt)
    FROM {_GROUPS} WHERE true
    GROUP BY 1, 2, 3, 4, 5
    """ + ROLLUP_ACCUMULATE

_JOBS_FROM = f"""
    INSERT INTO job_usage(jid, source, processes, cpu_user_us, cpu_system_us, elapsed_us,
                          max_rss_kb, max_vm_kb, read_bytes, write_bytes, read_chars,
                          write_chars, minflt, majflt, nvcsw, nivcsw, coremem_kb_us,
                          virtmem_kb_us, updated)
    SELECT jid, source, SUM(processes), SUM(cpu_user_us), SUM(cpu_system_us),
           SUM(elapsed_us), MAX(max_rss_kb), MAX(max_vm_kb), SUM(read_bytes),
           SUM(write_bytes), SUM(read_chars), SUM(write_chars), SUM(minflt), SUM(majflt),
           SUM(nvcsw), SUM(nivcsw), SUM(coremem_kb_us), SUM(virtmem_kb_us), MAX(end_time)
    FROM {_GROUPS} WHERE jid IS NOT NULL
    GROUP BY jid, source
    """ + JOB_USAGE_ACCUMULATE


def live_bulk(db: sqlite3.Connection, rows: Sequence[Sequence[object]]) -> None:
    """Insert usage rows (INSERT_PROC, inside the caller's transaction) and add
    the new ones to usage_rollup and job_usage: the store writer's runner for
    INSERT_PROC, and the way any code adds proc_usage rows to a store."""
    _bulk_in_transaction(db, lambda d: d.executemany(INSERT_PROC, rows))


def bulk_insert(db: sqlite3.Connection, insert: Callable[[sqlite3.Connection], None],
                after_insert: Optional[Callable[[sqlite3.Connection, int, int], None]] = None
                ) -> Tuple[int, int]:
    """Run *insert(db)* (which adds proc_usage rows) in one transaction, then
    aggregate the new rows with one GROUP BY. *after_insert(db, lo, hi)* may
    update the new rows (ids in (lo, hi]) first, e.g. to attribute them to
    jobs. Returns (lo, hi)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        lo, hi = _bulk_in_transaction(db, insert, after_insert)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return lo, hi


def _bulk_in_transaction(db: sqlite3.Connection, insert: Callable[[sqlite3.Connection], None],
                         after_insert: Optional[Callable[[sqlite3.Connection, int, int], None]]
                         = None) -> Tuple[int, int]:
    (lo,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM proc_usage").fetchone()
    insert(db)
    (hi,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM proc_usage").fetchone()
    if after_insert is not None:
        after_insert(db, lo, hi)
    add_to_sums(db, lo, hi)
    return lo, hi


def add_to_sums(db: sqlite3.Connection, lo: int = 0, hi: Optional[int] = None) -> None:
    """Add the proc_usage rows with ids in (*lo*, *hi*] (all from *lo* on when
    *hi* is None) to usage_rollup and job_usage. Store migration 7 dropped the
    per-row triggers: every writer of proc_usage rows calls this for the rows
    it added, in the same transaction (:func:`live_bulk` and :func:`bulk_insert`
    do)."""
    if hi is None:
        (hi,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM proc_usage").fetchone()
    db.execute(_GROUPS_TABLE)
    db.execute(_GROUPS_FROM, (lo, hi))
    db.execute(_ROLLUP_FROM)
    db.execute(_JOBS_FROM)
    db.execute(f"DELETE FROM {_GROUPS}")


def history_lookup(db: sqlite3.Connection, boot_id: str) -> HistoryLookup:
    """A resolver over the persisted membership history of boot *boot_id*: its
    member rows, then its carried rows (elsa.core.attribution.CARRIED_SQL)."""
    def lookup(pid: int, start_ticks: int, tol: int, end: float) -> Optional[int]:
        member, carried = history_params(boot_id, pid, start_ticks, tol, end)
        row = (db.execute(HISTORY_SQL, member).fetchone()
               or db.execute(CARRIED_SQL, carried).fetchone())
        return row[0] if row else None
    return lookup


def parent_lookup(db: sqlite3.Connection, boot_id: str,
                  memory: Optional[ParentLookup] = None) -> ParentLookup:
    """The ppid rule's membership lookup (:data:`elsa.core.attribution.PARENT_SQL`) over
    the persisted history of boot *boot_id*, after *memory* (the job manager's
    live members and recent exits: joins not committed yet)."""
    def lookup(ppid: int, start_ticks: int, tol: int, start_epoch: float) -> Optional[int]:
        if memory is not None:
            jid = memory(ppid, start_ticks, tol, start_epoch)
            if jid is not None:
                return jid
        tol_s = tol / CLOCK_TICKS
        row = db.execute(PARENT_SQL, (boot_id, ppid, start_ticks + tol, start_epoch - tol_s,
                                      start_epoch + tol_s)).fetchone()
        return row[0] if row else None
    return lookup
