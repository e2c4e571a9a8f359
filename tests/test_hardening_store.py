"""Faults of the store: a full disk and a corrupt database.

The full-disk tests mount a small tmpfs (root, as in CI) so the disk really
fills: SQLite gets SQLITE_FULL from the kernel, as on a full /var.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from elsa.core.aggregator import INSERT_PROC, proc_row
from elsa.core.model import Job
from elsa.core.source import UsageRecord
from elsa.core.store import Store
from elsa.errors import StoreError
from elsa.testing import wait_for

ROW = ("INSERT INTO proc_usage(source, pid, start_time, end_time, comm, extra) "
       "VALUES (?, ?, ?, ?, ?, ?)")
PAD = "x" * 600  # rows big enough to fill a small file system quickly


@contextlib.contextmanager
def small_tmpfs(size: str = "1m") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tempfile.mkdtemp(prefix="elsa-harden-fs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", mnt],
                   check=True)
    try:
        yield Path(mnt)
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)


def fill(fs: Path) -> Path:
    """Fill *fs* to the last block; returns the filler file."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def _job(jid: int) -> Job:
    return Job(jid=jid, name=f"j{jid}", owner_uid=1000, tags=(), created=time.time(),
               ended=None, state="running", backend="cnproc", params={})


def test_writes_that_failed_on_a_full_disk_are_committed_when_space_returns():
    with small_tmpfs() as fs:
        store = Store(str(fs / "state"), batch_interval=0.05)
        try:
            filler = fill(fs)
            mark0 = store.mark()
            n = 0
            # Write until a commit fails (the WAL needs new blocks).
            deadline = time.monotonic() + 20
            while store.health()["ok"] and time.monotonic() < deadline:
                store.insert_job(_job(n + 1))
                store.submit_many(ROW, [("taskstats", n * 100 + i, 1.0, 2.0 + n, "c", PAD)
                                        for i in range(20)])
                n += 1
                time.sleep(0.01)
            h = store.health()
            assert not h["ok"] and "full" in h["error"], h
            # Nothing that was rolled back counts as committed: a held reply
            # or a pacct position waiting on this mark must not be released.
            mark = store.mark()
            assert not store.is_committed(mark)
            with pytest.raises(StoreError, match="new jobs are refused"):
                store.check_accepting()
            with pytest.raises(StoreError, match="cannot write"):
                store.flush(timeout=5)
            # More writes while full wait too.
            store.insert_job(_job(n + 1))
            n += 1
            mark = store.mark()
            filler.unlink()  # space returns: no restart
            wait_for(lambda: store.is_committed(mark), 20, what="held writes to commit")
            assert store.health()["ok"] and store.health()["pending_writes"] == 0
            assert store.is_committed(mark0)
            store.check_accepting()
            (jobs,) = store.db.execute("SELECT count(*) FROM jobs").fetchone()
            (rows,) = store.db.execute("SELECT count(*) FROM proc_usage").fetchone()
            assert jobs == n and rows == 20 * (n - 1)
        finally:
            store.close()


def test_members_rolled_back_with_a_failed_batch_are_kept(tmp_path):
    store = Store(str(tmp_path), batch_interval=5.0)
    try:
        store.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON jobs "
                         "BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END")
        store.add_member("boot", 1, 100, 5, 1.0, "fork")
        store.insert_job(_job(1))
        with pytest.raises(StoreError, match="cannot write"):
            store.flush(timeout=5)
        store.close_member("boot", 1, 100, 5, 3.0, 0)  # merges into the held row
        store.db.execute("DROP TRIGGER refuse")
        mark = store.mark()
        wait_for(lambda: store.is_committed(mark), 10, what="the retry")
        assert store.db.execute("SELECT pid, left, exit_code FROM members").fetchall() == [
            (100, 3.0, 0)]
        assert store.db.execute("SELECT jid FROM jobs").fetchall() == [(1,)]
    finally:
        store.close()


@pytest.mark.root
def test_daemon_on_a_full_disk_acknowledges_only_what_it_stored(tmp_path, spawned):
    """elsad's state_dir on a tmpfs that fills up while a job runs: new jobs
    are refused with the reason, status shows the store error, and once space
    returns (no restart) every acknowledged job and every record is stored."""
    from elsa.client import Client
    from elsa.errors import ElsaError
    from elsa.testing import DaemonProc

    with small_tmpfs("3m") as fs:
        d = DaemonProc(tmp_path, extra="[sources.taskstats]\n")
        state = fs / "state"
        d.config_path.write_text(d.config_path.read_text().replace(
            f'state_dir = "{d.state_dir}"', f'state_dir = "{state}"'))
        d.start()
        try:
            p = subprocess.Popen(["sh", "-c", "read x; for i in $(seq 40); do /bin/true; done"],
                                 stdin=subprocess.PIPE, start_new_session=True)
            spawned.append(p)
            with Client(d.socket, timeout=60) as c:
                acked = [c.create(name="before", pids=[p.pid])["jid"]]
                filler = fill(fs)
                p.stdin.write(b"go\n")
                p.stdin.close()
                p.wait(30)
                # The job's 41 exit records (and membership rows) need space.
                wait_for(lambda: not c.status()["store"]["ok"], 30,
                         what="status to show the store error")
                st = c.status()["store"]
                assert "full" in st["error"] and st["pending_writes"] > 0
                # The admin's `elsa-jobmng status` says so too, not only its --json.
                text = subprocess.run([sys.executable, "-m", "elsa.jobmng", "--socket",
                                       d.socket, "status"], capture_output=True, text=True,
                                      check=True).stdout
                (line,) = [t for t in text.splitlines() if t.startswith("store ")]
                assert line.startswith("store      FAILING since ") and "full" in line, text
                assert "writes waiting" in line, text
                with pytest.raises(ElsaError, match="new jobs are refused"):
                    c.create(name="while-full")
                filler.unlink()
                wait_for(lambda: c.status()["store"]["ok"], 30, what="the store to recover")
                acked.append(c.create(name="after")["jid"])
                assert c.status()["store"]["pending_writes"] == 0
        finally:
            d.stop()
        db = sqlite3.connect(str(state / "elsa.db"))
        names = [r[0] for r in db.execute("SELECT name FROM jobs ORDER BY created")]
        assert names == ["before", "after"] and len(acked) == 2
        (trues,) = db.execute(
            "SELECT count(*) FROM proc_usage WHERE source = 'taskstats' AND comm = 'true' "
            "AND jid = (SELECT jid FROM jobs WHERE name = 'before')").fetchone()
        assert trues == 40
        db.close()


# -- corruption ---------------------------------------------------------------------------------

def _filled_store(path: Path, jobs: int = 3, rows: int = 6000) -> None:
    store = Store(str(path))
    try:
        for j in range(1, jobs + 1):
            store.insert_job(_job(j))
        store.submit_many(INSERT_PROC, [
            proc_row(UsageRecord("taskstats", 10 + i, start_time=1.0 * i, end_time=2.0 * i + 5,
                                 comm="c", cpu_user_us=1000), 1 + i % jobs)
            for i in range(rows)])
        store.submit("INSERT INTO proc_folded(source, jid, end_time, folded, mem_kb_sum, "
                     "cpu_user_us) VALUES ('bsdacct', 1, 10.0, 7, 0, 70)")
        store.flush()
    finally:
        store.close()


def _pages(db_path: Path, table: str) -> list:
    db = sqlite3.connect(str(db_path))
    try:
        return [r[0] for r in db.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (table,))] or [r[0] for r in db.execute(
                "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))]
    except sqlite3.OperationalError:
        pytest.skip("this SQLite has no dbstat table to find a table's pages")
    finally:
        db.close()


def _damage(db_path: Path, pageno: int) -> None:
    with open(db_path, "r+b") as f:
        f.seek((pageno - 1) * 4096)
        f.write(bytes([0x0D]) + b"\xff" * 4095)  # a leaf header with nonsense offsets


def test_corrupt_store_outside_a_state_dir_is_salvaged_by_its_file(tmp_path):
    """A damaged store file that is not a state dir's elsa.db (elsa import-acct --db
    FILE) is salvaged with --db FILE: --state-dir would look for elsa.db beside it."""
    from elsa.core.store import check_integrity

    _filled_store(tmp_path)
    other = tmp_path / "site.db"
    os.rename(tmp_path / "elsa.db", other)
    _damage(other, _pages(other, "proc_usage")[3])
    db = sqlite3.connect(str(other))
    try:
        with pytest.raises(StoreError, match=re.escape(f"store-salvage --db {other}'")):
            check_integrity(db, str(other), 10.0)
    finally:
        db.close()


def test_corrupt_store_is_refused_at_start_and_salvaged(tmp_path):
    _filled_store(tmp_path)
    db_path = tmp_path / "elsa.db"
    leaves = _pages(db_path, "proc_usage")
    assert len(leaves) > 10
    _damage(db_path, leaves[len(leaves) // 2])
    t = time.monotonic()
    with pytest.raises(StoreError, match="corrupt.*elsa store-salvage"):
        Store(str(tmp_path), check_seconds=10.0)
    assert time.monotonic() - t < 10.0
    r = subprocess.run([sys.executable, "-m", "elsa.report.cli",
                        "store-salvage", "--state-dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json
    result = json.loads(r.stdout)
    assert result["unreadable"] and os.path.exists(result["damaged_copy"])
    store = Store(str(tmp_path))  # passes the check now
    try:
        assert store.db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3
        (n,) = store.db.execute("SELECT count(*) FROM proc_usage").fetchone()
        assert 6000 - 2 * 6000 // len(leaves) - 50 < n < 6000  # one page of rows lost
        # Rollups that were readable are kept whole.
        (cpu,) = store.db.execute("SELECT sum(cpu_user_us) FROM job_usage").fetchone()
        assert cpu == 6000 * 1000 + 70  # and the folded row
        assert int(store.get_meta("jid_counter_reserved", "0")) >= 3
        # Tables of later migrations are copied too.
        assert store.db.execute("SELECT folded FROM proc_folded").fetchall() == [(7,)]
        assert oct(os.stat(tmp_path / "elsa.db").st_mode & 0o777) == oct(0o600)
    finally:
        store.close()


def test_corruption_met_at_run_time_is_reported_with_the_recovery_command(tmp_path):
    _filled_store(tmp_path, jobs=3, rows=10)
    db_path = tmp_path / "elsa.db"
    (root,) = _pages(db_path, "jobs")[:1]
    store = Store(str(tmp_path), batch_interval=0.05)
    try:
        _damage(db_path, root)  # the writer has not read this page yet
        store.end_job(2, time.time(), "ended")
        wait_for(lambda: store.health()["corrupt"], 10, what="the writer to meet the damage")
        assert "store-salvage" in store.health()["error"]
        with pytest.raises(StoreError, match="store-salvage"):
            store.check_accepting()
    finally:
        store.close()


def test_a_corrupt_store_never_shows_without_its_message(tmp_path, monkeypatch):
    """status reads health() from the event thread while the writer fails: at
    any moment it sees "corrupt", the recovery command is there too. The
    writer logs the failure in the middle of marking it (a slow call: the
    window CI once hit), so health() is read from inside that log call."""
    import elsa.core.store as store_mod

    _filled_store(tmp_path, jobs=3, rows=10)
    db_path = tmp_path / "elsa.db"
    (root,) = _pages(db_path, "jobs")[:1]
    store = Store(str(tmp_path), batch_interval=0.05)
    seen = []
    real_error = store_mod.log.error

    def error(event, **kw):
        seen.append(store.health())
        return real_error(event, **kw)

    monkeypatch.setattr(store_mod.log, "error", error)
    try:
        _damage(db_path, root)
        store.end_job(2, time.time(), "ended")
        wait_for(lambda: seen, 10, what="the writer to meet the damage")
    finally:
        store.close()
    for h in seen:
        assert not h["corrupt"] or "store-salvage" in (h["error"] or ""), h


def test_corruption_met_by_a_read_marks_the_store(tmp_path):
    """A request's read (show, list) that meets the damage answers with the
    recovery command instead of an internal error, and status shows it."""
    _filled_store(tmp_path, jobs=3, rows=10)
    (root,) = _pages(tmp_path / "elsa.db", "jobs")[:1]
    store = Store(str(tmp_path))
    try:
        _damage(tmp_path / "elsa.db", root)
        reader = sqlite3.connect(str(tmp_path / "elsa.db"))  # nothing cached
        with pytest.raises(sqlite3.DatabaseError) as exc:
            reader.execute("SELECT * FROM jobs").fetchall()
        reader.close()
        msg = store.read_failed(exc.value)
        assert msg is not None and "elsa store-salvage" in msg
        assert store.health()["corrupt"] and not store.health()["ok"]
        assert store.read_failed(ValueError("x")) is None
        # A later write to pages the damage spared commits (at the writer's
        # next retry); status still names the damage and the recovery command.
        store.submit("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", ("probe", "1"))
        wait_for(lambda: store.pending() == 0, 10, what="the write to commit")
        h = store.health()
        assert h["corrupt"] and not h["ok"] and "elsa store-salvage" in h["error"], h
    finally:
        store.close()


def test_a_store_of_an_older_schema_is_salvaged_as_its_upgrade_reads(tmp_path):
    """A store damaged before the upgrade that would have migrated it: its rollup rows
    are migrated with it. Schemas 2 to 6 filed them per source priority and counted
    figures no record measured as 0; copied as they were into the current schema they
    sat beside their rebuilt twins (counted twice) and kept their 0s (migration 13)."""
    import shutil

    from elsa.core.schema import migrate
    from elsa.report.salvage import salvage

    old = tmp_path / "old.db"
    db = sqlite3.connect(str(old), isolation_level=None)
    migrate(db, str(old), target=6)  # its per-row triggers fill the rollups
    db.execute("INSERT INTO jobs(jid, name, owner_uid, tags, created, state, backend, params) "
               "VALUES (1, 'j', 1000, '{}', 0, 'ended', 'cnproc', '{}')")
    for i in range(40):
        end = 1_800_000_000.0 + 60 * i
        db.execute("INSERT INTO proc_usage(source, jid, pid, start_time, end_time, uid, comm, "
                   "cpu_user_us, read_bytes) VALUES ('taskstats', 1, ?, ?, ?, 1000, 'c', "
                   "1000, 4096)", (100 + i, end - 1, end))
        db.execute("INSERT INTO proc_usage(source, jid, pid, start_time, end_time, uid, comm, "
                   "cpu_user_us) VALUES ('bsdacct', 1, ?, ?, ?, 1000, 'c', 1000)",
                   (100 + i, end - 1, end - 0.5))
    db.close()
    upgraded, salvaged = tmp_path / "upgraded.db", tmp_path / "salvaged.db"
    shutil.copy(old, upgraded)
    shutil.copy(old, salvaged)
    db = sqlite3.connect(str(upgraded), isolation_level=None)
    migrate(db, str(upgraded))
    want = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4").fetchall()
            for t in ("usage_rollup", "job_usage")}
    db.close()
    salvage(str(salvaged))
    db = sqlite3.connect(str(salvaged))
    try:
        got = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4").fetchall()
               for t in ("usage_rollup", "job_usage")}
        assert got == want
        by_source = dict(db.execute("SELECT source, SUM(processes) FROM usage_rollup "
                                    "GROUP BY source").fetchall())
        assert by_source == {"bsdacct": 40, "taskstats": 40}
        # pacct has no I/O bytes: unknown, not 0.
        assert db.execute("SELECT DISTINCT read_bytes FROM usage_rollup WHERE source = "
                          "'bsdacct'").fetchall() == [(None,)]
    finally:
        db.close()


@pytest.mark.parametrize("report", [["job", "0x1"], ["summary"], ["jobs"], ["eff", "0x1"]])
def test_reports_on_a_damaged_store_say_so_and_name_the_recovery(tmp_path, report):
    """Opening the store reads its header only: damage in a table's pages is met by
    the report's query. The admin gets one line naming the store and the recovery
    command (exit 2), not a traceback."""
    _filled_store(tmp_path)
    db_path = tmp_path / "elsa.db"
    for table in ("proc_usage", "jobs", "job_usage"):
        _damage(db_path, _pages(db_path, table)[0])
    r = subprocess.run([sys.executable, "-m", "elsa", *report, "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"elsa: store {db_path} is corrupt ("), line
    assert f"'elsa store-salvage --state-dir {tmp_path}'" in line, line


def test_a_store_that_is_not_a_database_names_the_recovery(tmp_path):
    (tmp_path / "elsa.db").write_bytes(b"GARBAGE" * 1000)
    r = subprocess.run([sys.executable, "-m", "elsa", "jobs", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"'elsa store-salvage --state-dir {tmp_path}'" in r.stderr, r.stderr


def test_store_salvage_refuses_a_store_elsad_is_running_on(elsad):
    """Salvage renames the store and writes a new one: under a running elsad, whose
    connection follows the renamed file, every later write of elsad went to the
    '.damaged' copy and the new store never saw it. Refused, naming the elsad."""
    d = elsad()
    r = subprocess.run([sys.executable, "-m", "elsa", "store-salvage", "--state-dir",
                        d.state_dir], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert (f"elsa: elsad (pid {d.proc.pid}) is running on {d.state_dir}; stop it first "
            in r.stderr), r.stderr
    assert not [n for n in os.listdir(d.state_dir) if ".damaged" in n or ".salvage" in n]
    d.stop()
    r = subprocess.run([sys.executable, "-m", "elsa", "store-salvage", "--state-dir",
                        d.state_dir], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # once it is stopped


def test_a_create_that_meets_a_full_disk_is_answered_with_the_store_error(tmp_path, spawned):
    """The first create after the disk filled: its commit is the one that fails. Its
    reply waited for a commit that never came, and the client gave up after its
    timeout with "elsad did not answer 'create' in time" (elsa-jobmng run: 30 s,
    then CMD not started), as if elsad hung. It gets the store's error at once."""
    from elsa.client import Client, RequestFailed
    from elsa.testing import DaemonProc

    with small_tmpfs("3m") as fs:
        d = DaemonProc(tmp_path)
        state = fs / "state"
        d.config_path.write_text(d.config_path.read_text().replace(
            f'state_dir = "{d.state_dir}"', f'state_dir = "{state}"'))
        d.start()
        try:
            with Client(d.socket, timeout=20) as c:
                c.create(name="before")
                filler = fill(fs)
                t = time.monotonic()
                with pytest.raises(RequestFailed) as exc:
                    c.create(name="while-full")
                assert time.monotonic() - t < 10
                assert exc.value.code == "store", exc.value
                assert "full" in exc.value.message and "free space" in exc.value.message
                filler.unlink()
                wait_for(lambda: c.status()["store"]["ok"], 30, what="the store to recover")
                c.create(name="after")  # and it works again
        finally:
            d.stop()
