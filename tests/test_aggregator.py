"""Aggregator: attribution by (pid, start), either arrival order, hold/retry,
the "best" rule, and the store's triggers (no double counting)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from elsa.core.aggregator import INSERT_PROC, Aggregator, proc_row
from elsa.core.schema import MIGRATIONS, _split_sql
from elsa.core.source import UsageRecord
from elsa.core.store import execute_writes
from elsa.core.usage import best
from tests.support import FakeManager


@pytest.fixture
def db():
    db = sqlite3.connect(":memory:", isolation_level=None)
    for m in MIGRATIONS:
        for stmt in _split_sql(m):
            db.execute(stmt)
    return db


def _agg(db, mgr, **kw):
    clock = [0.0]
    agg = Aggregator(lambda sql, p: execute_writes(db, sql, [p]), mgr.resolve,
                     clock=lambda: clock[0], boot_epoch_fn=lambda: 1_700_000_000.0,
                     submit_many=lambda sql, rows: execute_writes(db, sql, rows), **kw)
    return agg, clock


def _ts(pid, start_ticks, cpu=1000, end=None):
    # A fresh record (a stale one, from a backlog, is not held).
    end = time.time() if end is None else end
    return UsageRecord(source="taskstats", pid=pid, start_ticks=start_ticks, uid=1000,
                       comm="work", cpu_user_us=cpu, cpu_system_us=cpu // 10, end_time=end,
                       start_time=end - 1, elapsed_us=10_000, max_rss_kb=500)


def test_record_attributed_by_pid_and_start(db):
    mgr = FakeManager()
    mgr.members[10] = [(5000, 1)]
    agg, _ = _agg(db, mgr)
    agg.add([_ts(10, 5010)])                 # within tolerance: job 1
    agg.add([_ts(10, 9000)])       # same pid, another process: not job 1
    rows = db.execute("SELECT pid, jid FROM proc_usage ORDER BY id").fetchall()
    assert rows == [(10, 1)]
    assert agg.counters.held == 1


def test_record_before_membership_is_held_then_attributed(db):
    mgr = FakeManager()
    agg, clock = _agg(db, mgr, hold_seconds=2.0)
    agg.add([_ts(11, 100)])        # accounting record first (event still queued)
    assert db.execute("SELECT COUNT(*) FROM proc_usage").fetchone() == (0,)
    mgr.members[11] = [(100, 7)]   # the fork/exit events are processed
    clock[0] = 0.5
    agg.retry()
    assert db.execute("SELECT jid FROM proc_usage").fetchall() == [(7,)]
    assert agg.counters.resolved_late == 1


def test_unresolvable_record_is_stored_without_job_after_hold(db):
    agg, clock = _agg(db, FakeManager(), hold_seconds=2.0)
    agg.add([_ts(12, 100)])
    clock[0] = 1.0
    agg.retry()
    assert db.execute("SELECT COUNT(*) FROM proc_usage").fetchone() == (0,)
    clock[0] = 2.5
    agg.retry()
    assert db.execute("SELECT pid, jid FROM proc_usage").fetchall() == [(12, None)]


def test_acct_record_matches_with_one_second_btime(db):
    mgr = FakeManager()
    mgr.members[13] = [(12_345, 3)]  # started 123.45 s after boot
    agg, _ = _agg(db, mgr)
    # btime is whole seconds (exit time minus elapsed, truncated): 123 s after boot.
    rec = UsageRecord(source="bsdacct", pid=13, start_time=1_700_000_123.0,
                      end_time=1_700_000_124.0, cpu_user_us=10_000, comm="x", uid=0)
    agg.add([rec])
    assert db.execute("SELECT jid FROM proc_usage").fetchall() == [(3,)]


def test_duplicate_record_is_not_counted_twice(db):
    mgr = FakeManager()
    mgr.members[14] = [(100, 9)]
    agg, _ = _agg(db, mgr)
    rec = _ts(14, 100, cpu=2000)
    agg.add([rec])
    agg.add([rec])   # re-read after a crash
    assert db.execute("SELECT COUNT(*) FROM proc_usage").fetchone() == (1,)
    assert db.execute("SELECT processes, cpu_user_us FROM job_usage WHERE jid = 9"
                      ).fetchone() == (1, 2000)
    assert db.execute("SELECT SUM(processes), SUM(cpu_user_us) FROM usage_rollup"
                      ).fetchone() == (1, 2000)


def test_job_level_readings_replace_and_best_rule(db):
    mgr = FakeManager()
    mgr.members[15] = [(100, 4)]
    agg, _ = _agg(db, mgr)
    agg.add([_ts(15, 100, cpu=1000)])
    acct = UsageRecord(source="bsdacct", pid=15, start_time=1_700_000_001.0,
                       end_time=1_700_000_002.0, cpu_user_us=0, cpu_system_us=0, comm="x",
                       max_vm_kb=9000, minflt=3)
    agg.add([acct])
    for cpu in (500, 1500):  # interim then final: the later reading replaces
        agg.add([UsageRecord(source="cgroupstat", pid=0, jid=4, cpu_user_us=cpu,
                             cpu_system_us=10, max_rss_kb=None)])
    per = {r[0]: {"processes": r[1], "cpu_user_us": r[2], "max_rss_kb": r[3],
                  "max_vm_kb": r[4]}
           for r in db.execute("SELECT source, processes, cpu_user_us, max_rss_kb, max_vm_kb "
                               "FROM job_usage WHERE jid = 4")}
    assert per["cgroupstat"]["cpu_user_us"] == 1500
    # The priorities are the source specs' (cgroupstat 10, taskstats 20, bsdacct 30).
    values, chosen = best(per, {"cgroupstat": 10, "taskstats": 20, "bsdacct": 30})
    assert chosen["cpu_user_us"] == "cgroupstat" and values["cpu_user_us"] == 1500
    assert chosen["processes"] == "taskstats" and values["processes"] == 1
    assert chosen["max_rss_kb"] == "taskstats" and values["max_rss_kb"] == 500
    assert chosen["max_vm_kb"] == "bsdacct"   # only acct measured it here


def test_incomplete_flag_accumulates_reasons(db):
    agg, _ = _agg(db, FakeManager())
    agg.flag_incomplete([5], "taskstats", "records lost (ENOBUFS)")
    agg.flag_incomplete([5], "taskstats", "records lost (ENOBUFS)")
    assert db.execute("SELECT incomplete FROM job_usage").fetchone() == (
        "records lost (ENOBUFS)",)


def test_proc_row_matches_insert_columns():
    row = proc_row(_ts(1, 1), 3)
    assert INSERT_PROC.count("?") == len(row)


def test_live_bulk_batches_total_the_same_as_per_row_triggers(tmp_path):
    """The store writer adds each batch of usage rows to the sums with one GROUP BY
    (aggregator.live_bulk, its runner for INSERT_PROC); the totals must match those
    of the per-row triggers that schema 6 had (store migration 7 dropped them)."""
    import sqlite3

    from elsa.core.aggregator import INSERT_PROC, proc_row
    from elsa.core.schema import migrate
    from elsa.core.source import UsageRecord
    from elsa.core.store import Store

    def records(n, source):
        return [UsageRecord(source=source, pid=1000 + i, start_ticks=i, uid=7 + i % 3,
                            comm=f"c{i % 4}", end_time=1_800_000_000.0 + i,
                            start_time=1_799_999_990.0, cpu_user_us=10 + i,
                            cpu_system_us=i, elapsed_us=100, max_rss_kb=50 + i,
                            read_bytes=i, write_bytes=2 * i, minflt=1, majflt=0)
                for i in range(n)]

    rows = [proc_row(r, 0x42 if r.pid % 2 else None) for r in records(24, "taskstats")]
    queries = ("SELECT jid, source, processes, cpu_user_us, cpu_system_us, max_rss_kb, "
               "read_bytes, write_bytes FROM job_usage ORDER BY jid, source",
               "SELECT bucket, uid, comm, processes, cpu_user_us, max_rss_kb "
               "FROM usage_rollup ORDER BY 1, 2, 3")
    old = sqlite3.connect(str(tmp_path / "schema6.db"), isolation_level=None)
    migrate(old, str(tmp_path / "schema6.db"), target=6)
    for row in rows + rows[:5]:  # duplicates are ignored either way
        old.execute(INSERT_PROC, row)
    totals = [tuple(old.execute(q).fetchall() for q in queries)]
    store = Store(str(tmp_path / "store"))
    try:
        for row in rows + rows[:5]:
            store.submit(INSERT_PROC, row)
        store.flush()
        totals.append(tuple(store.db.execute(q).fetchall() for q in queries))
    finally:
        store.close()
    assert totals[0] == totals[1]
    assert totals[0][0] and totals[0][1]  # something was aggregated at all


def test_the_observer_sees_each_row_once_attributed_and_folded_ones_too(db):
    """Listeners (application accounting) take exit figures from what the
    aggregator stores: every row, when it is final, including a [thresholds]
    fold's rows, which proc_usage does not keep."""
    from elsa.core.thresholds import Folder

    mgr = FakeManager()
    mgr.members[10] = [(5000, 1)]
    seen = []
    agg, clock = _agg(db, mgr, hold_seconds=2.0, folder=Folder(min_cpu_ms=10),
                      observe=lambda rows: seen.extend((r[2], r[1]) for r in rows))
    agg.add([_ts(10, 5000, cpu=50_000), _ts(11, 100, cpu=10)])  # 11: no job yet, small
    assert seen == [(10, 1)]  # 11 waits for its fork event, unseen
    mgr.members[11] = [(100, 7)]
    clock[0] = 1.0
    agg.retry()
    assert seen == [(10, 1), (11, 7)]
    assert [r[0] for r in db.execute("SELECT pid FROM proc_usage")] == [10]  # 11 folded
