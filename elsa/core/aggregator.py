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
and only then is it stored as "no job" (most processes on a host are in none).

Start-time tolerance: taskstats gives the start to the delivery latency
(``start_ticks`` from etime), matched within ``TASKSTATS_TOLERANCE_TICKS``;
pacct's ``ac_btime`` is whole seconds computed as exit time minus elapsed
(kernel/acct.c fill_ac), so it is off by up to 1 s either way, matched within
``ACCT_TOLERANCE_S``. A pid cannot come back within 2 s without the kernel
cycling through pid_max other pids first.

Writes go through :meth:`elsa.core.store.Store.submit` (the batching writer
thread), so the event path never waits on disk. Per-job and per-hour
aggregates are maintained by triggers in the store (migration 2) for rows
really inserted, so a record read twice after a crash is never counted twice.

The "best" figure per metric (:func:`best`): where sources overlap, cgroup >
taskstats > acct. cgroup counters are kept by the kernel for the whole job,
including processes whose records were lost; taskstats is exact per task and
measured in µs; acct rounds to 10 ms ticks and comp_t's 13-bit mantissa.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from elsa.core.model import CLOCK_TICKS, Job
from elsa.core.procfs import boot_epoch
from elsa.core.source import UsageRecord

#: Source priority for the "best" figure (lower wins); unknown sources come last.
PRIORITY: Dict[str, int] = {"cgroupstat": 0, "taskstats": 1, "bsdacct": 2}
UNKNOWN_PRIORITY = 9

#: Job metrics, with how per-process values combine into the job's.
SUM_METRICS = ("cpu_user_us", "cpu_system_us", "elapsed_us", "read_bytes", "write_bytes",
               "read_chars", "write_chars", "minflt", "majflt", "nvcsw", "nivcsw",
               "coremem_kb_us", "virtmem_kb_us")
MAX_METRICS = ("max_rss_kb", "max_vm_kb")
METRICS = ("processes",) + SUM_METRICS + MAX_METRICS

#: Process-level columns of proc_usage, in insert order.
PROC_COLUMNS = ("source", "jid", "pid", "start_ticks", "start_time", "end_time", "ppid", "uid",
                "gid", "comm", "exit_code", "cpu_user_us", "cpu_system_us", "elapsed_us",
                "max_rss_kb", "max_vm_kb", "read_bytes", "write_bytes", "read_chars",
                "write_chars", "minflt", "majflt", "nvcsw", "nivcsw", "coremem_kb_us",
                "virtmem_kb_us", "extra")
INSERT_PROC = (f"INSERT OR IGNORE INTO proc_usage({', '.join(PROC_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(PROC_COLUMNS))})")

_JOB_LEVEL_COLUMNS = ("cpu_user_us", "cpu_system_us", "max_rss_kb", "read_bytes",
                      "write_bytes", "minflt", "majflt")
# A job-level reading (cgroupstat) replaces the previous one: the kernel's
# counters are cumulative for the cgroup.
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

TASKSTATS_TOLERANCE_TICKS = 50   # 0.5 s of delivery latency
ACCT_TOLERANCE_S = 2.0
#: Records of processes that ended longer ago than this are not held.
STALE_SECONDS = 30.0


def priority(source: str) -> int:
    return PRIORITY.get(source, UNKNOWN_PRIORITY)


def best(per_source: Mapping[str, Mapping[str, Any]]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The best figure of each metric and the source it came from.

    *per_source* maps a source name to its job totals (metric -> value, ``None``
    when the source does not measure it). The highest-priority source with a
    value wins, per metric: cgroup > taskstats > acct.
    """
    values: Dict[str, Any] = {}
    chosen: Dict[str, str] = {}
    order = sorted(per_source, key=lambda s: (priority(s), s))
    for metric in METRICS:
        for src in order:
            v = per_source[src].get(metric)
            if v is not None:
                values[metric] = v
                chosen[metric] = src
                break
        else:
            values[metric] = None
    return values, chosen


def proc_row(rec: UsageRecord, jid: Optional[int]) -> Tuple[Any, ...]:
    """The proc_usage row of a per-process record."""
    end = rec.end_time
    if end is None:
        end = time.time()
    return (rec.source, jid, rec.pid, rec.start_ticks, rec.start_time, end, rec.ppid, rec.uid,
            rec.gid, rec.comm, rec.exit_code, rec.cpu_user_us, rec.cpu_system_us,
            rec.elapsed_us, rec.max_rss_kb, rec.max_vm_kb, rec.read_bytes, rec.write_bytes,
            rec.read_chars, rec.write_chars, rec.minflt, rec.majflt, rec.nvcsw, rec.nivcsw,
            rec.coremem_kb_us, rec.virtmem_kb_us,
            json.dumps(dict(rec.extra), separators=(",", ":")) if rec.extra else None)


@dataclass
class _Held:
    rec: UsageRecord
    since: float


@dataclass
class AggregatorCounters:
    records: int = 0
    attributed: int = 0
    unattributed: int = 0
    held: int = 0
    resolved_late: int = 0
    resolved_from_history: int = 0
    job_readings: int = 0
    per_source: Dict[str, int] = field(default_factory=dict)


Resolver = Callable[[int, Optional[int], int], Optional[int]]
Submit = Callable[[str, Sequence[Any]], None]


class Aggregator:
    """Attributes records to jobs and submits them to the store."""

    def __init__(self, submit: Submit, resolve: Resolver, *,
                 history: Optional[Callable[[int, int, int], Optional[int]]] = None,
                 hold_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 boot_epoch_fn: Callable[[], float] = boot_epoch) -> None:
        self.submit = submit
        self.resolve = resolve
        self.history = history
        self.hold_seconds = hold_seconds
        self.clock = clock
        self.boot_epoch_fn = boot_epoch_fn
        self.held: List[_Held] = []
        self.counters = AggregatorCounters()

    # -- intake --------------------------------------------------------------------------
    def add(self, records: Iterable[UsageRecord]) -> None:
        now = self.clock()
        boot = None
        for rec in records:
            c = self.counters
            c.records += 1
            c.per_source[rec.source] = c.per_source.get(rec.source, 0) + 1
            if rec.pid == 0:
                self._job_level(rec)
                continue
            if boot is None:
                boot = self.boot_epoch_fn()
            jid = self._resolve(rec, boot)
            if jid is None:
                if self.hold_seconds > 0 and not self._stale(rec):
                    self.held.append(_Held(rec, now))
                    c.held += 1
                    continue
                jid = self._from_history(rec, boot)
            self._write(rec, jid)

    def _stale(self, rec: UsageRecord) -> bool:
        # A record of a process that ended long ago (a pacct backlog read after
        # a restart) cannot be waiting for its fork event: skip the hold.
        return rec.end_time is not None and time.time() - rec.end_time > STALE_SECONDS

    def _from_history(self, rec: UsageRecord, boot: float) -> Optional[int]:
        if self.history is None:
            return None
        start, tol = self._identity(rec, boot)
        if start is None or start < -tol:
            return None
        jid = self.history(rec.pid, start, tol)
        if jid is not None:
            self.counters.resolved_from_history += 1
        return jid

    def _identity(self, rec: UsageRecord, boot: float) -> Tuple[Optional[int], int]:
        if rec.start_ticks is not None:
            return rec.start_ticks, TASKSTATS_TOLERANCE_TICKS
        if rec.start_time is not None:
            start = int(round((rec.start_time - boot) * CLOCK_TICKS))
            return start, int(ACCT_TOLERANCE_S * CLOCK_TICKS)
        return None, 0

    def _resolve(self, rec: UsageRecord, boot: float) -> Optional[int]:
        if rec.jid is not None:
            return rec.jid
        start, tol = self._identity(rec, boot)
        if start is not None and start < -tol:
            return None  # started before this boot: no membership can match
        return self.resolve(rec.pid, start, tol)

    def retry(self, force: bool = False) -> None:
        """Retry held records (timer; runs after the event callbacks of a loop
        iteration). Records held longer than ``hold_seconds`` are looked up in
        the persisted history, then stored without a job."""
        if not self.held:
            return
        now = self.clock()
        boot = self.boot_epoch_fn()
        keep: List[_Held] = []
        for h in self.held:
            jid = self._resolve(h.rec, boot)
            if jid is not None:
                self.counters.resolved_late += 1
                self._write(h.rec, jid)
            elif force or now - h.since >= self.hold_seconds:
                self._write(h.rec, self._from_history(h.rec, boot))
            else:
                keep.append(h)
        self.held = keep

    def _write(self, rec: UsageRecord, jid: Optional[int]) -> None:
        if jid is None:
            self.counters.unattributed += 1
        else:
            self.counters.attributed += 1
        self.submit(INSERT_PROC, proc_row(rec, jid))

    def _job_level(self, rec: UsageRecord) -> None:
        if rec.jid is None:
            return
        self.counters.job_readings += 1
        self.submit(UPSERT_JOB_LEVEL, (
            rec.jid, rec.source, rec.cpu_user_us, rec.cpu_system_us, rec.max_rss_kb,
            rec.read_bytes, rec.write_bytes, rec.minflt, rec.majflt, time.time(),
            json.dumps(dict(rec.extra), separators=(",", ":")) if rec.extra else None))

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
                "job_readings": c.job_readings, "per_source": dict(c.per_source)}


# -- bulk import (elsa import-acct, benchmarks) ----------------------------------------------

_ROLLUP_FROM = """
    INSERT INTO usage_rollup
    SELECT CAST(end_time / 3600 AS INTEGER),
           CASE source WHEN 'taskstats' THEN 1 WHEN 'bsdacct' THEN 2 ELSE 9 END,
           source, COALESCE(uid, -1), comm, COUNT(*),
           SUM(COALESCE(cpu_user_us, 0)), SUM(COALESCE(cpu_system_us, 0)),
           SUM(COALESCE(elapsed_us, 0)), MAX(max_rss_kb),
           SUM(COALESCE(max_rss_kb, max_vm_kb, 0)),
           SUM(COALESCE(read_bytes, 0)), SUM(COALESCE(write_bytes, 0)),
           SUM(COALESCE(minflt, 0)), SUM(COALESCE(majflt, 0))
    FROM proc_usage WHERE id > ? AND id <= ?
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT DO UPDATE SET
        processes = processes + excluded.processes,
        cpu_user_us = cpu_user_us + excluded.cpu_user_us,
        cpu_system_us = cpu_system_us + excluded.cpu_system_us,
        elapsed_us = elapsed_us + excluded.elapsed_us,
        max_rss_kb = MAX(COALESCE(max_rss_kb, excluded.max_rss_kb),
                         COALESCE(excluded.max_rss_kb, max_rss_kb)),
        mem_kb_sum = mem_kb_sum + excluded.mem_kb_sum,
        read_bytes = read_bytes + excluded.read_bytes,
        write_bytes = write_bytes + excluded.write_bytes,
        minflt = minflt + excluded.minflt,
        majflt = majflt + excluded.majflt
"""

_JOBS_FROM = """
    INSERT INTO job_usage(jid, source, processes, cpu_user_us, cpu_system_us, elapsed_us,
                          max_rss_kb, max_vm_kb, read_bytes, write_bytes, read_chars,
                          write_chars, minflt, majflt, nvcsw, nivcsw, coremem_kb_us,
                          virtmem_kb_us, updated)
    SELECT jid, source, COUNT(*), SUM(cpu_user_us), SUM(cpu_system_us), SUM(elapsed_us),
           MAX(max_rss_kb), MAX(max_vm_kb), SUM(read_bytes), SUM(write_bytes),
           SUM(read_chars), SUM(write_chars), SUM(minflt), SUM(majflt), SUM(nvcsw),
           SUM(nivcsw), SUM(coremem_kb_us), SUM(virtmem_kb_us), MAX(end_time)
    FROM proc_usage WHERE id > ? AND id <= ? AND jid IS NOT NULL
    GROUP BY jid, source
    ON CONFLICT DO UPDATE SET
        processes = processes + excluded.processes,
        cpu_user_us = cpu_user_us + excluded.cpu_user_us,
        cpu_system_us = cpu_system_us + excluded.cpu_system_us,
        elapsed_us = elapsed_us + excluded.elapsed_us,
        max_rss_kb = MAX(COALESCE(max_rss_kb, excluded.max_rss_kb),
                         COALESCE(excluded.max_rss_kb, max_rss_kb)),
        max_vm_kb = MAX(COALESCE(max_vm_kb, excluded.max_vm_kb),
                        COALESCE(excluded.max_vm_kb, max_vm_kb)),
        read_bytes = read_bytes + excluded.read_bytes,
        write_bytes = write_bytes + excluded.write_bytes,
        read_chars = read_chars + excluded.read_chars,
        write_chars = write_chars + excluded.write_chars,
        minflt = minflt + excluded.minflt,
        majflt = majflt + excluded.majflt,
        nvcsw = nvcsw + excluded.nvcsw,
        nivcsw = nivcsw + excluded.nivcsw,
        coremem_kb_us = coremem_kb_us + excluded.coremem_kb_us,
        virtmem_kb_us = virtmem_kb_us + excluded.virtmem_kb_us,
        updated = MAX(COALESCE(updated, 0), excluded.updated)
"""


#: A writer batch with at least this many usage rows aggregates them with one
#: GROUP BY per summary table instead of the per-row triggers. Each row's
#: triggers upsert the hourly rollup and the job's totals (two more B-tree
#: writes per process); with every source on that was a third of elsad's CPU
#: in benchmarks/bench_overhead.py. Small batches keep the triggers: the
#: aggregation queries cost more than a few trigger runs.
LIVE_BULK_MIN = 8


def live_bulk(db: sqlite3.Connection, rows: Sequence[Sequence[object]]) -> None:
    """The store writer's runner for a batch of INSERT_PROC rows (inside its
    transaction): same result as the triggers, one aggregation per table."""
    if len(rows) < LIVE_BULK_MIN:
        db.executemany(INSERT_PROC, rows)
        return
    _bulk_in_transaction(db, lambda d: d.executemany(INSERT_PROC, rows))


def bulk_insert(db: sqlite3.Connection, insert: Callable[[sqlite3.Connection], None],
                after_insert: Optional[Callable[[sqlite3.Connection, int, int], None]] = None
                ) -> Tuple[int, int]:
    """Run *insert(db)* (which adds proc_usage rows) in one transaction with
    the per-row triggers switched off, then aggregate the new rows with one
    GROUP BY each. *after_insert(db, lo, hi)* may update the new rows (ids in
    (lo, hi]) first, e.g. to attribute them to jobs. Returns (lo, hi).

    The switch is a meta row only this transaction sees; other writers (the
    daemon) wait for our lock and then run with their triggers as usual.
    """
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
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('usage.bulk', '1')")
    insert(db)
    (hi,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM proc_usage").fetchone()
    if after_insert is not None:
        after_insert(db, lo, hi)
    db.execute("DELETE FROM meta WHERE key = 'usage.bulk'")
    db.execute(_ROLLUP_FROM, (lo, hi))
    db.execute(_JOBS_FROM, (lo, hi))
    return lo, hi


def history_lookup(db: sqlite3.Connection, boot_id: str) -> Callable[[int, int, int],
                                                                     Optional[int]]:
    """A resolver over the persisted membership history of boot *boot_id*."""
    def lookup(pid: int, start_ticks: int, tol: int) -> Optional[int]:
        row = db.execute(
            "SELECT jid FROM members WHERE boot_id = ? AND pid = ? AND start_ticks BETWEEN ? AND ? "
            "ORDER BY abs(start_ticks - ?) LIMIT 1",
            (boot_id, pid, start_ticks - tol, start_ticks + tol, start_ticks)).fetchone()
        return row[0] if row else None
    return lookup
