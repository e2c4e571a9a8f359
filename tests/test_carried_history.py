"""Short fork stays carried by their usage rows instead of member rows (issue 18).

A process that joined its job at its fork and left it at its exit within
CARRIED_STAY_S needs no member row when its taskstats row, which names the job,
is committed: the store drops the row, and every lookup of the stored history
(the live path's HISTORY/CARRIED and PARENT, the importer's ATTRIBUTE and its
ppid leads, a job's member list) reads the usage row instead. The store unit
tests use SQLite directly; the last test runs elsad on the real kernel with
taskstats and managed bsdacct and checks that the stored history gives every
real pacct record the job memory gave it.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time

import pytest

from elsa.core import carrying
from elsa.core.aggregator import INSERT_PROC, history_lookup, parent_lookup
from elsa.core.attribution import (
    ATTRIBUTE_SQL,
    CARRIED_STAY_S,
    JOB_MEMBERS_SQL,
    attribute_imported_by_parent,
    save_boot_epoch,
)
from elsa.core.model import CLOCK_TICKS, parse_jid
from elsa.core.store import MEMBER_COLUMNS, Store
from elsa.core.usage import ROW_FIELDS
from elsa.testing import DaemonProc, wait_for

BOOT = "b1"
BOOT_EPOCH = 1_700_000_000.0
JID = 7


def _usage(pid, start_ticks, jid=JID, source="taskstats", ppid=1, life=0.01):
    """A usage row (ROW_FIELDS order) of a process that started *start_ticks* after
    boot and lived *life* seconds. Both sources' start_time is btime (whole seconds)
    and their end btime + elapsed."""
    btime = float(int(BOOT_EPOCH + start_ticks / CLOCK_TICKS))
    row = dict.fromkeys(ROW_FIELDS)
    row.update(source=source, jid=jid, pid=pid,
               start_ticks=start_ticks if source == "taskstats" else None,
               start_time=btime, end_time=btime + life, ppid=ppid, uid=0,
               gid=0, comm="x", exit_code=0, cpu_user_us=10, cpu_system_us=5,
               elapsed_us=int(life * 1e6))
    return tuple(row[k] for k in ROW_FIELDS)


def _fork_stay(store, pid, start_ticks, jid=JID, stay=0.001, how="fork", detached=False):
    # Now, not on the fake boot's clock: a stay that left over carry_wait ago is
    # written at once.
    joined = time.time()
    store.add_member(BOOT, jid, pid, start_ticks, joined, how)
    store.close_member(BOOT, jid, pid, start_ticks, joined + stay, 0, detached)


@pytest.fixture
def new_store(tmp_path):
    """``new_store(carry_wait)``: a Store in tmp_path, closed after the test."""
    made = []

    def make(carry_wait):
        made.append(Store(str(tmp_path), batch_interval=0.05, carry_wait=carry_wait))
        return made[-1]
    yield make
    for store in made:
        store.close()


def test_member_row_positions_are_the_stores_columns():
    assert [MEMBER_COLUMNS[i] for i in (carrying.M_PID, carrying.M_START, carrying.M_JID,
                                        carrying.M_JOINED, carrying.M_HOW, carrying.M_LEFT,
                                        carrying.M_DETACHED)] == [
        "pid", "start_ticks", "jid", "joined", "how", "left", "detached"]


def _carrying(store):
    """Let *store* see a carrier (a usage row of another job's process): it holds
    short stays only while a source carries them."""
    store.submit_many(INSERT_PROC, [_usage(1, 1, jid=99)])
    store.flush()


def _member_pids(store):
    return sorted(p for (p,) in store.db.execute("SELECT pid FROM members"))


def test_a_short_fork_stay_with_its_usage_row_writes_no_member_row(tmp_path, new_store):
    store = new_store(30.0)
    _carrying(store)
    _fork_stay(store, 100, 5000)                    # carried, same batch
    _fork_stay(store, 101, 5010)                    # carried by a later batch
    _fork_stay(store, 102, 5020, how="attach")      # attached: always a row
    _fork_stay(store, 103, 5030, stay=CARRIED_STAY_S + 0.5)  # too long
    _fork_stay(store, 104, 5040, detached=True)     # left the job alive
    _fork_stay(store, 105, 5050)                    # its row names another job
    _fork_stay(store, 106, 5060)                    # its row's start is another process
    store.submit_many(INSERT_PROC, [_usage(100, 5003)])
    store.flush()
    assert _member_pids(store) == [102, 103, 104]
    store.submit_many(INSERT_PROC, [_usage(101, 5012), _usage(105, 5050, jid=JID + 1),
                                    _usage(106, 5060 + 100)])
    store.flush()
    assert store.health()["member_rows_carried"] == 2
    assert store.health()["member_rows_waiting"] == 2   # 105 and 106 still wait
    store.close()   # stopping writes what still waits
    db = sqlite3.connect(str(tmp_path / "elsa.db"))
    assert sorted(p for (p,) in db.execute("SELECT pid FROM members")) == [102, 103, 104,
                                                                            105, 106]
    # The job's members: the carried stays from their usage rows, the others as rows
    # (106's usage row is another process of the job with that pid: a stay of its own;
    # 105's usage row is in job 8, its member row in 7).
    got = sorted((r[0], r[5]) for r in db.execute(JOB_MEMBERS_SQL, (JID,)))
    assert got == [(100, "fork"), (101, "fork"), (102, "attach"), (103, "fork"),
                   (104, "fork"), (105, "fork"), (106, "fork"), (106, "fork")]


def test_an_uncarried_stay_is_written_after_the_wait_without_further_writes(new_store):
    store = new_store(0.3)
    _carrying(store)
    now = time.time()
    store.add_member(BOOT, JID, 200, 9000, now, "fork")
    store.close_member(BOOT, JID, 200, 9000, now + 0.001, 0)
    store.flush()
    assert _member_pids(store) == []   # waits for its carrier
    wait_for(lambda: _member_pids(store) == [200], 5, what="the waiting row written")
    assert store.health()["member_rows_waiting"] == 0


def test_waiting_rows_taken_by_a_failed_commit_are_written_by_the_retry(new_store):
    from elsa.errors import StoreError

    store = new_store(30.0)
    _carrying(store)
    _fork_stay(store, 300, 7000)
    store.flush()
    store.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON proc_usage "
                     "BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END")
    store.submit_many(INSERT_PROC, [_usage(301, 7100)])  # carries nothing
    store.submit_many(INSERT_PROC, [_usage(300, 7001)])
    with pytest.raises(StoreError, match="cannot write"):
        store.flush(timeout=5)
    store.db.execute("DROP TRIGGER refuse")
    mark = store.mark()
    wait_for(lambda: store.is_committed(mark), 10, what="the retry")
    assert _member_pids(store) == []
    assert store.db.execute("SELECT pid FROM proc_usage ORDER BY pid").fetchall() == [
        (1,), (300,), (301,)]
    assert store.health()["member_rows_carried"] == 1


def test_without_a_carrying_source_short_stays_are_written_at_once(new_store):
    # taskstats off: nothing would carry them, so nothing waits (pacct rows, whose start
    # is in whole seconds, carry nothing).
    store = new_store(30.0)
    _fork_stay(store, 400, 8000)
    store.submit_many(INSERT_PROC, [_usage(400, 8000, source="acct")])
    store.flush()
    assert _member_pids(store) == [400]
    assert store.health()["member_rows_waiting"] == 0


def _history_store(tmp_path):
    """A store of boot b1 with job 7: an attached root (pid 10, member row) whose
    short fork child 11 is carried, and pid 12, attached to job 8 late in its life
    (its usage row says 8, its member row says when it joined)."""
    path = str(tmp_path / "elsa.db")
    store = Store(str(tmp_path), batch_interval=0.05, carry_wait=30.0)
    _carrying(store)
    store.add_member(BOOT, JID, 10, 1000, BOOT_EPOCH + 10, "attach")
    _fork_stay(store, 11, 2000, stay=0.3)
    store.submit_many(INSERT_PROC, [_usage(11, 2002, ppid=10, life=0.3)])
    store.add_member(BOOT, 8, 12, 3000, BOOT_EPOCH + 35, "attach")
    store.close_member(BOOT, 8, 12, 3000, BOOT_EPOCH + 35.4, 0)
    store.submit_many(INSERT_PROC, [_usage(12, 3001, jid=8, life=5.4)])
    store.close()
    db = sqlite3.connect(path, isolation_level=None)
    assert sorted(p for (p,) in db.execute("SELECT pid FROM members")) == [10, 12]
    return db


def test_the_live_lookups_read_carried_rows(tmp_path):
    db = _history_store(tmp_path)
    lookup = history_lookup(db, BOOT)
    end = BOOT_EPOCH + 20.3
    # A late taskstats record (0.52 s) and a pacct one (2 s, start from whole seconds).
    assert lookup(11, 2004, 52, end) == JID
    assert lookup(11, 1950, 200, end - 0.6) == JID
    assert lookup(11, 2004, 52, end + 5) is None      # another process's end
    assert lookup(13, 2004, 52, end) is None          # another pid
    parent = parent_lookup(db, BOOT)
    # A grandchild forked by 11 during its 0.3 s.
    assert parent(11, 2010, 52, BOOT_EPOCH + 20.1) == JID
    assert parent(11, 2200, 52, BOOT_EPOCH + 22.0) is None   # long after 11 exited
    # 12 forked this child before it was attached to job 8: its member row rules,
    # though its usage row names job 8.
    assert parent(12, 3100, 52, BOOT_EPOCH + 31) is None
    # One forked during its 0.4 s in job 8, surely after the attach (its start known
    # within 0.1 s); within 0.52 s of it, it may have been forked before.
    assert parent(12, 3530, 10, BOOT_EPOCH + 35.3) == 8
    assert parent(12, 3530, 52, BOOT_EPOCH + 35.3) is None


def test_import_attributes_by_carried_rows_and_follows_them_as_parents(tmp_path):
    db = _history_store(tmp_path)
    save_boot_epoch(db.execute, BOOT, BOOT_EPOCH)
    (lo,) = db.execute("SELECT MAX(id) FROM proc_usage").fetchone()
    # A pacct file with 11's record: its identity finds the carried row.
    db.executemany(INSERT_PROC, [_usage(11, 2002, jid=None, source="acct", ppid=10, life=0.3)])
    (hi,) = db.execute("SELECT MAX(id) FROM proc_usage").fetchone()
    db.execute(ATTRIBUTE_SQL, (lo, hi))
    assert db.execute("SELECT pid, jid FROM proc_usage WHERE id > ?", (lo,)).fetchall() == [
        (11, JID)]
    # One with only 11's child 20, which nobody saw fork: the carried row is its
    # parent's membership (the ppid rule's lead and PARENT_SQL).
    lo = hi
    db.executemany(INSERT_PROC, [_usage(20, 2010, jid=None, source="acct", ppid=11)])
    (hi,) = db.execute("SELECT MAX(id) FROM proc_usage").fetchone()
    db.execute(ATTRIBUTE_SQL, (lo, hi))
    assert db.execute("SELECT jid FROM proc_usage WHERE id = ?", (hi,)).fetchone() == (None,)
    assert attribute_imported_by_parent(db, lo, hi) == 1
    assert db.execute("SELECT jid FROM proc_usage WHERE id = ?", (hi,)).fetchone() == (JID,)


@pytest.mark.root
@pytest.mark.skipif(shutil.which("stress-ng") is None,
                    reason="needs stress-ng (packaging/ci-apt-packages.txt)")
def test_the_stored_history_gives_real_pacct_records_the_jobs_memory_gave(tmp_path):
    """elsad with its default sources and managed bsdacct; a job forks 400 short
    children. Their member rows are carried by their taskstats rows, and the
    stored history (ATTRIBUTE_SQL, as `elsa import-acct` uses it) gives each of
    the job's real pacct records the job elsad gave it live."""
    from tests.support import kernel_acct_lock

    with kernel_acct_lock():
        d = DaemonProc(tmp_path, extra='[sources.bsdacct]\nmode = "managed"\n'
                                       "interval = 0.2\n").start()
        try:
            job = subprocess.Popen(
                ["elsa-jobmng", "--socket", d.socket, "run", "--name", "carried", "--",
                 "sh", "-c", 'echo "$ELSA_JID"; stress-ng --fork 1 --fork-ops 400 -q'],
                stdout=subprocess.PIPE, text=True, start_new_session=True)
            assert job.stdout is not None
            jid = parse_jid(job.stdout.readline().strip())
            assert job.wait(60) == 0
            with d.client() as c:
                size = os.stat(c.status()["sources"]["bsdacct"]["file"]).st_size
                wait_for(lambda: c.status()["sources"]["bsdacct"]["offset"] >= size, 30,
                         interval=0.1, what="bsdacct to read past the job's end")

            def settled():
                st = d.call("status")["store"]
                return st["pending_writes"] == 0 and st["member_rows_waiting"] == 0 and st
            store_status = wait_for(settled, 30, interval=0.1, what="no stay waiting")
            assert store_status["member_rows_carried"] >= 350
        finally:
            d.stop()
    db = sqlite3.connect(os.path.join(d.state_dir, "elsa.db"), isolation_level=None)
    forks = db.execute("SELECT COUNT(*) FROM members WHERE jid = ? AND how = 'fork'",
                       (jid,)).fetchone()[0]
    live = dict(db.execute("SELECT id, jid FROM proc_usage WHERE source = 'bsdacct' "
                           "AND jid = ?", (jid,)))
    members = db.execute(JOB_MEMBERS_SQL, (jid,)).fetchall()
    assert forks < 50 and len(members) >= 400 and len(live) >= 400
    # Forget the live attribution and let the stored history decide again.
    db.execute("UPDATE proc_usage SET jid = NULL WHERE source = 'bsdacct'")
    db.execute(ATTRIBUTE_SQL, (0, 10 ** 12))
    again = dict(db.execute("SELECT id, jid FROM proc_usage WHERE source = 'bsdacct' "
                            "AND jid = ?", (jid,)))
    assert again == live
