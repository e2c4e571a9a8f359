"""The ppid rule (elsa.core.attribution.attribute_by_parent) and
best()'s skipping of incomplete sources, without a kernel: rows as the pacct
and taskstats readers build them, a real store for the stored membership."""

from __future__ import annotations

import sqlite3
from typing import Any, List, Optional, Tuple

from elsa.core import attribution, usage
from elsa.core.aggregator import (
    FLAG_INCOMPLETE,
    INSERT_PROC,
    Aggregator,
    live_bulk,
    parent_lookup,
)
from elsa.core.attribution import attribute_by_parent
from elsa.core.model import CLOCK_TICKS
from elsa.core.schema import migrate
from elsa.core.store import Store
from elsa.core.usage import UsageRecord, best, fallbacks, record_row
from tests.support import FakeManager

BOOT = 1_000_000.0  # boot epoch of the rows below


def acct(pid: int, ppid: int, start: float, end: float, jid: Optional[int] = None
         ) -> Tuple[Any, ...]:
    """A pacct-like row: start as epoch seconds, no start ticks (tolerance 2 s)."""
    return record_row(UsageRecord("bsdacct", pid, ppid=ppid, start_time=BOOT + start,
                                  end_time=BOOT + end, cpu_user_us=1000), jid)


def ticks(t: float) -> int:
    return int(t * CLOCK_TICKS)


def no_member(*_: Any) -> Optional[int]:
    return None


def test_chain_within_the_batch_reaches_a_resolved_ancestor():
    # 100 is a member (resolved by identity: jid 7); 200 forked while elsad was
    # down, 300 is its child; both exited in the downtime. Children exit first.
    rows = [acct(300, 200, 50, 51), acct(200, 100, 40, 52), acct(100, 1, 10, 60)]
    jids: List[Optional[int]] = [None, None, 7]
    assert attribute_by_parent(rows, jids, [0, 1], BOOT, no_member) == 2
    assert jids == [7, 7, 7]


def test_a_parent_record_outside_any_job_keeps_the_child_out():
    rows = [acct(300, 200, 50, 51), acct(200, 100, 40, 52)]
    jids: List[Optional[int]] = [None, None]
    # Row 1 is not in todo: memory covered it and found no job.
    calls = []
    assert attribute_by_parent(rows, jids, [0], BOOT,
                               lambda *a: calls.append(a) or 9) == 0
    assert jids == [None, None] and calls == []


def test_without_a_parent_record_the_parents_membership_decides():
    rows = [acct(300, 200, 50, 51)]
    jids: List[Optional[int]] = [None]
    seen = []

    def member(ppid, start, tol, start_epoch):
        seen.append((ppid, start, tol, round(start_epoch, 3)))
        return 5
    assert attribute_by_parent(rows, jids, [0], BOOT, member) == 1
    assert jids == [5]
    assert seen == [(200, ticks(50), attribution.ACCT_TOLERANCE_TICKS, BOOT + 50)]


def test_pid_reuse_a_parent_record_that_ended_before_the_child_started_is_not_it():
    # pid 200 was an earlier process (ended at 20 s); the child (started at 50 s)
    # was forked by a later 200 that is still alive, a member of job 4.
    rows = [acct(300, 200, 50, 51), acct(200, 100, 10, 20, jid=None)]
    jids: List[Optional[int]] = [None, 8]
    assert attribute_by_parent(rows, jids, [0], BOOT, lambda *a: 4) == 1
    assert jids[0] == 4


def test_orphans_and_unknown_parents_lead_nowhere():
    rows = [acct(300, 1, 50, 51), acct(301, 0, 50, 51)]
    jids: List[Optional[int]] = [None, None]
    assert attribute_by_parent(rows, jids, [0, 1], BOOT, lambda *a: 3) == 0
    assert jids == [None, None]


def test_taskstats_rows_follow_the_same_rule():
    row = record_row(UsageRecord("taskstats", 300, start_ticks=ticks(50), ppid=200,
                                 start_time=BOOT + 50, end_time=BOOT + 51), None)
    jids: List[Optional[int]] = [None]
    got = []
    attribute_by_parent([row], jids, [0], BOOT, lambda *a: got.append(a) or 6)
    assert jids == [6] and got[0][2] == attribution.TASKSTATS_TOLERANCE_TICKS


def _store(tmp_path) -> Store:
    return Store(str(tmp_path))


def test_stored_membership_of_the_parent_at_the_childs_start(tmp_path):
    s = _store(tmp_path)
    boot = "b1"
    # 200: forked into job 1 at 10 s, still a member. 210: attached to job 2 at
    # 60 s (children forked before are not the job's). 220: left job 3 at 30 s.
    s.add_member(boot, 1, 200, ticks(10), BOOT + 10, "fork")
    s.add_member(boot, 2, 210, ticks(5), BOOT + 60, "attach")
    s.add_member(boot, 3, 220, ticks(5), BOOT + 6, "fork")
    s.close_member(boot, 3, 220, ticks(5), BOOT + 30, None, True)
    s.flush()
    look = parent_lookup(s.db, boot)
    tol = attribution.ACCT_TOLERANCE_TICKS
    assert look(200, ticks(50), tol, BOOT + 50) == 1
    assert look(200, ticks(5), tol, BOOT + 5) is None   # child older than the parent
    assert look(210, ticks(50), tol, BOOT + 50) is None  # before the attach
    assert look(210, ticks(70), tol, BOOT + 70) == 2
    # A wrapper's child that ran just before the wrapper exec'd `elsa-jobmng run` and
    # attached, or one within the start's uncertainty of the attach, is not the job's.
    near = attribution.TASKSTATS_TOLERANCE_TICKS
    assert look(210, ticks(59.9), near, BOOT + 59.9) is None
    assert look(210, ticks(60.3), near, BOOT + 60.3) is None
    assert look(210, ticks(60.6), near, BOOT + 60.6) == 2
    assert look(220, ticks(20), tol, BOOT + 20) == 3
    assert look(220, ticks(50), tol, BOOT + 50) is None  # after it left
    assert look(200, ticks(50), tol, BOOT + 50) == 1
    assert parent_lookup(s.db, "other-boot")(200, ticks(50), tol, BOOT + 50) is None
    s.close()


def test_aggregator_applies_the_rule_to_records_memory_does_not_cover():
    stored: List[Tuple[Any, ...]] = []
    mgr = FakeManager()
    agg = Aggregator(lambda sql, row: stored.append(row), mgr.resolve,
                     history=lambda pid, start, tol, end: None, hold_seconds=0.0,
                     boot_epoch_fn=lambda: BOOT, settle=lambda: True,
                     history_horizon=lambda: BOOT + 1000,
                     parent=lambda ppid, start, tol, epoch: 9 if ppid == 100 else None)
    agg.add_rows("bsdacct", [acct(300, 200, 50, 51), acct(200, 100, 40, 52),
                             acct(400, 399, 50, 51)])
    by_pid = {r[usage.PID]: r[usage.JID] for r in stored}
    assert by_pid == {300: 9, 200: 9, 400: None}
    assert agg.status()["resolved_by_parent"] == 2


def test_best_skips_a_source_flagged_incomplete_when_a_complete_one_has_the_metric():
    per = {"taskstats": {"processes": 91, "cpu_user_us": 10, "read_bytes": 5},
           "bsdacct": {"processes": 3122, "cpu_user_us": 12, "read_bytes": None}}
    prios = {"taskstats": 20, "bsdacct": 30}
    values, chosen = best(per, prios)
    assert values["processes"] == 91 and chosen["processes"] == "taskstats"
    flagged = {"taskstats": "no taskstats records from ..."}
    values, chosen = best(per, prios, flagged)
    assert values["processes"] == 3122 and chosen["processes"] == "bsdacct"
    # Only the incomplete source has it: its figure, as before.
    assert values["read_bytes"] == 5 and chosen["read_bytes"] == "taskstats"
    why = fallbacks(chosen, per, prios, flagged)
    assert why == {"processes": "from bsdacct: taskstats incomplete for this job",
                   "cpu_user_us": "from bsdacct: taskstats incomplete for this job"}
    assert fallbacks(chosen, per, prios, {}) == {}


def test_job_sums_skip_unknowns_after_an_early_incomplete_flag(tmp_path):
    s = _store(tmp_path)
    s.submit(FLAG_INCOMPLETE, (5, "taskstats", "gap", 1.0))
    for pid in (10, 11):
        s.submit(INSERT_PROC, record_row(UsageRecord(
            "taskstats", pid, start_ticks=pid, cpu_user_us=100, cpu_system_us=5,
            start_time=1.0, end_time=2.0), 5))
    s.flush()
    assert s.db.execute("SELECT processes, cpu_user_us, cpu_system_us, max_rss_kb, incomplete "
                        "FROM job_usage").fetchall() == [(2, 200, 10, None, "gap")]
    s.close()


def test_migration_recounts_rows_that_lost_their_sums(tmp_path):
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path, target=5)
    db.execute(FLAG_INCOMPLETE, (5, "taskstats", "gap", 1.0))
    for pid in (10, 11):
        db.execute(INSERT_PROC, record_row(UsageRecord(
            "taskstats", pid, start_ticks=pid, cpu_user_us=100, start_time=1.0,
            end_time=2.0), 5))
    # What the sums of the old clause left: NULL + 1 stays NULL.
    db.execute("UPDATE job_usage SET processes = NULL, cpu_user_us = NULL")
    migrate(db, path)
    assert db.execute("SELECT processes, cpu_user_us, incomplete FROM job_usage"
                      ).fetchone() == (2, 200, "gap")
    live_bulk(db, [record_row(UsageRecord(
        "taskstats", 12, start_ticks=12, cpu_user_us=100, start_time=1.0, end_time=2.0), 5)])
    assert db.execute("SELECT processes, cpu_user_us FROM job_usage").fetchone() == (3, 300)


def test_import_acct_follows_the_ppid_chain(tmp_path):
    """elsa import-acct: the records of a subtree forked and exited while elsad was
    down (300 -> 400) join the job of their parent's membership (200)."""
    from elsa.core.attribution import save_boot_epoch
    from elsa.kernel import pacct
    from elsa.report.importer import import_files, open_for_import

    db_path = str(tmp_path / "elsa.db")
    epoch = 1_700_000_000.0
    db = open_for_import(db_path)
    save_boot_epoch(db.execute, "b1", epoch)
    db.execute("INSERT INTO members(boot_id, pid, start_ticks, jid, joined, how) "
               "VALUES ('b1', 200, ?, 1, ?, 'fork')", (ticks(100), epoch + 100))
    db.close()

    def rec(pid, ppid, start, elapsed):
        return pacct.AcctRecord(offset=0, flag=0, tty=0, exitcode=0, uid=0, gid=0, pid=pid,
                                ppid=ppid, btime=int(epoch) + start, etime=elapsed * 100,
                                utime=5, stime=1, mem=0, io=0, rw=0, minflt=0, majflt=0,
                                comm=f"p{pid}")
    f = tmp_path / "pacct"
    f.write_bytes(pacct.encode([
        rec(400, 300, 150, 1), rec(300, 200, 140, 20),  # the subtree, children first
        rec(500, 499, 150, 1),                           # nobody's
        rec(600, 200, 50, 1)]))                          # started before 200: not its child
    res = import_files(db_path, [str(f)])
    assert res[0]["inserted"] == 4
    db = sqlite3.connect(db_path)
    got = dict(db.execute("SELECT pid, jid FROM proc_usage").fetchall())
    assert got == {400: 1, 300: 1, 500: None, 600: None}
    assert db.execute("SELECT processes FROM job_usage WHERE jid = 1").fetchone() == (2,)
