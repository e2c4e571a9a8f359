"""A figure no source measured is unknown in the hourly rollup (``usage_rollup``) and in
everything that reads it, never 0 (docs/accounting.md): `elsa summary` by user and by
command (table ``-``, CSV empty, JSON null), the web's usage per day; a sum adds the
figures known. Store migration 13 makes the rollup's figures nullable and turns the 0s
an older store holds for figures none of its records measured into NULL, where the
records are still there to say so."""

from __future__ import annotations

import csv
import io
import json
import sqlite3

from elsa.core.aggregator import INSERT_PROC, proc_row
from elsa.core.schema import migrate
from elsa.core.source import UsageRecord
from elsa.core.store import execute_writes
from elsa.core.thresholds import INSERT_FOLDED, Folder
from elsa.kernel import pacct
from elsa.report import query
from elsa.report.cli import main

T = 1_789_999_200.0  # an hour boundary in the past (import-acct skips future records)
H = int(T // 3600)
ROLLUP = ("SELECT bucket, source, uid, comm, processes, cpu_user_us, elapsed_us, mem_kb_sum, "
          "read_bytes, write_bytes, minflt, majflt FROM usage_rollup ORDER BY 1, 2, 3, 4")


def _store(tmp_path, version=None):
    path = str(tmp_path / "elsa.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path, target=version)
    return path, db


def _rec(source, pid, end, comm="cc", **figures):
    return proc_row(UsageRecord(source, pid, start_ticks=pid, uid=1000, comm=comm,
                                start_time=end - 1, end_time=end, **figures), None)


def _bsd(pid, end, comm="cc"):
    # What a pacct record gives: CPU, elapsed, average memory (as max_vm_kb), faults;
    # no I/O bytes and no peak RSS.
    return _rec("bsdacct", pid, end, comm, cpu_user_us=20_000, cpu_system_us=0,
                elapsed_us=1_000_000, max_vm_kb=800, minflt=3, majflt=0)


def _task(pid, end, comm="cc", **io_figures):
    return _rec("taskstats", pid, end, comm, cpu_user_us=10_000, cpu_system_us=5_000,
                elapsed_us=1_000_000, max_rss_kb=900, max_vm_kb=2000, minflt=4, majflt=0,
                **io_figures)


def _summary(capsys, db_path, *extra):
    capsys.readouterr()  # what came before (the store's migration logs)
    assert main(["summary", "--db", db_path, *extra]) == 0
    return capsys.readouterr().out


def _table(out):
    lines = out.splitlines()
    return [dict(zip(lines[0].split(), line.split())) for line in lines[1:]]


def test_a_bsdacct_only_store_shows_unknown_io_as_dash_null_and_empty(tmp_path, capsys):
    # Through `elsa import-acct` (the bulk path); whole hours are read from the rollup,
    # a window's partial hours from the records: unknown either way.
    recs = [pacct.AcctRecord(offset=0, flag=0, tty=0, exitcode=0, uid=1000, gid=0,
                             pid=30_000 + i, ppid=1, btime=int(T) + i * 600, etime=100.0,
                             utime=10, stime=2, mem=1000 + i, io=0, rw=0, minflt=i, majflt=0,
                             comm="make") for i in range(12)]
    f = tmp_path / "pacct"
    f.write_bytes(pacct.encode(recs))
    db_path = str(tmp_path / "state" / "elsa.db")
    assert main(["import-acct", "--db", db_path, str(f)]) == 0
    for window in ([], ["--since", str(T + 900), "--until", str(T + 6000)]):
        for by in ("user", "command"):
            (row,) = _table(_summary(capsys, db_path, "--by", by, *window))
            assert (row["READ"], row["WRITE"]) == ("-", "-"), row
            assert row["AVGMEM"] != "-" and row["PROCS"] != "0"
            (js,) = json.loads(_summary(capsys, db_path, "--by", by, "--json", *window))
            assert js["read_bytes"] is None and js["write_bytes"] is None, js
            assert js["minflt"] == sum(r.minflt for r in recs
                                       if not window or T + 900 <= r.btime + 1 < T + 6000)
            (cs,) = csv.DictReader(io.StringIO(_summary(capsys, db_path, "--by", by,
                                                        "--csv", *window)))
            assert (cs["read_bytes"], cs["write_bytes"]) == ("", "")
            assert cs["cpu_user_us"] not in ("", "0")


def test_a_mixed_store_sums_the_known_figures(tmp_path, capsys):
    # Through the store writer's runner (live_bulk), batch by batch: a bsdacct record
    # (no I/O) in one hour, taskstats records with I/O in the next.
    db_path, db = _store(tmp_path)
    execute_writes(db, INSERT_PROC, [_bsd(1, T + 10)])
    (js,) = json.loads(_summary(capsys, db_path, "--by", "user", "--json"))
    assert js["read_bytes"] is None and js["cpu_user_us"] == 20_000
    execute_writes(db, INSERT_PROC, [_task(2, T + 3610, read_bytes=4096, write_bytes=100)])
    (js,) = json.loads(_summary(capsys, db_path, "--by", "user", "--json"))
    assert (js["read_bytes"], js["write_bytes"], js["processes"]) == (4096, 100, 2)
    (row,) = _table(_summary(capsys, db_path, "--by", "command"))
    assert (row["READ"], row["WRITE"]) == ("4K", "100B")
    # Within one group (hour, source, uid, command) across batches: the ON CONFLICT sum
    # skips an unknown whichever comes first, and stays unknown while all are.
    execute_writes(db, INSERT_PROC, [_task(3, T + 7210, "ld")])
    assert db.execute("SELECT read_bytes, write_bytes FROM usage_rollup WHERE comm = 'ld'"
                      ).fetchall() == [(None, None)]
    execute_writes(db, INSERT_PROC, [_task(4, T + 7220, "ld", read_bytes=7)])
    execute_writes(db, INSERT_PROC, [_task(5, T + 7230, "ld")])
    assert db.execute("SELECT processes, read_bytes, write_bytes FROM usage_rollup "
                      "WHERE comm = 'ld'").fetchall() == [(3, 7, None)]
    rows = {r["command"]: r for r in query.summary(db, "command")}
    assert (rows["ld"]["read_bytes"], rows["ld"]["write_bytes"]) == (7, None)


def test_folded_records_and_memory_unknown_stay_unknown(tmp_path):
    # [thresholds]' folded rows reach the rollup through their trigger; a folded row
    # none of whose records measured memory has mem_kb_sum 0 in proc_folded (NOT NULL),
    # which the rollup takes as unknown: the average memory is None, not 0.
    db_path, db = _store(tmp_path)
    rows = [_rec("x", 10 + i, T + 60 + i, "tiny", cpu_user_us=1, elapsed_us=5)
            for i in range(4)]
    keep, folded = Folder(min_cpu_ms=10).split(rows)
    assert keep == [] and len(folded) == 1
    execute_writes(db, INSERT_FOLDED, folded)
    assert db.execute(ROLLUP).fetchall() == [
        (H, "x", 1000, "tiny", 4, 4, 20, None, None, None, None, None)]
    (row,) = query.summary(db, "command")
    assert row["avg_mem_kb"] is None and row["max_rss_kb"] is None
    assert (row["cpu_user_us"], row["cpu_system_us"], row["minflt"]) == (4, None, None)
    # Records of another batch with memory: known from then on.
    _, more = Folder(min_cpu_ms=10).split(
        [_rec("x", 20, T + 90, "tiny", cpu_user_us=1, max_rss_kb=0, max_vm_kb=50)])
    execute_writes(db, INSERT_FOLDED, more)
    (row,) = query.summary(db, "command")
    assert row["processes"] == 5 and row["avg_mem_kb"] == 0  # a peak RSS of 0 is a figure


def test_usage_per_day_cpu_unknown_is_none(tmp_path):
    _, db = _store(tmp_path)
    execute_writes(db, INSERT_PROC, [_rec("x", 1, T + 5, elapsed_us=3)])
    assert [(r["processes"], r["cpu_us"]) for r in query.usage_per_day(db)] == [(1, None)]
    execute_writes(db, INSERT_PROC, [_rec("x", 2, T + 6, cpu_system_us=8)])
    assert [(r["processes"], r["cpu_us"]) for r in query.usage_per_day(db)] == [(2, 8)]


#: What add_to_sums wrote into the rollup up to schema 12 (unknowns counted as 0), for a
#: store at schema 12 with rows of that time.
_OLD_SUMS = """
    INSERT INTO usage_rollup
    SELECT CAST(end_time / 3600 AS INTEGER), 0, source, COALESCE(uid, -1), comm, COUNT(*),
           SUM(COALESCE(cpu_user_us, 0)), SUM(COALESCE(cpu_system_us, 0)),
           SUM(COALESCE(elapsed_us, 0)), MAX(max_rss_kb),
           SUM(COALESCE(max_rss_kb, max_vm_kb, 0)), SUM(COALESCE(read_bytes, 0)),
           SUM(COALESCE(write_bytes, 0)), SUM(COALESCE(minflt, 0)), SUM(COALESCE(majflt, 0))
    FROM proc_usage WHERE id > ? GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT DO UPDATE SET processes = processes + excluded.processes,
        cpu_user_us = cpu_user_us + excluded.cpu_user_us,
        cpu_system_us = cpu_system_us + excluded.cpu_system_us,
        elapsed_us = elapsed_us + excluded.elapsed_us,
        max_rss_kb = MAX(COALESCE(max_rss_kb, excluded.max_rss_kb),
                         COALESCE(excluded.max_rss_kb, max_rss_kb)),
        mem_kb_sum = mem_kb_sum + excluded.mem_kb_sum,
        read_bytes = read_bytes + excluded.read_bytes,
        write_bytes = write_bytes + excluded.write_bytes,
        minflt = minflt + excluded.minflt, majflt = majflt + excluded.majflt
    """


def _old_add(db, rows):
    (lo,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM proc_usage").fetchone()
    db.executemany(INSERT_PROC, rows)
    db.execute(_OLD_SUMS, (lo,))


def test_migration_13_keeps_known_figures_and_nulls_the_unknowable(tmp_path, capsys):
    # Rows of schema 6's per-row triggers (priority 1 or 2 in the key), then of schema
    # 12's add_to_sums (priority 0): both counted unknowns as 0.
    db_path, db = _store(tmp_path, 6)
    db.executemany(INSERT_PROC, [_bsd(1, T + 10), _task(2, T + 20, read_bytes=50)])
    db.executemany(INSERT_PROC, [_bsd(3, T + 3610, "ld"), _bsd(4, T + 3620, "ld")])
    _, (tiny,) = Folder(min_cpu_ms=10).split(
        [_rec("x", 9, T + 30, "tiny", cpu_user_us=1, read_bytes=0)])
    db.execute(INSERT_FOLDED, tiny)
    migrate(db, db_path, target=12)
    _old_add(db, [_bsd(5, T + 40), _task(6, T + 50, write_bytes=9)])
    # elsa ships and prunes records ([central] keep_local_days): one of ld's is gone.
    db.execute("DELETE FROM proc_usage WHERE pid = 4")
    before = db.execute(ROLLUP).fetchall()
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT prio) FROM usage_rollup "
                      "WHERE comm = 'cc' AND source = 'bsdacct'").fetchone() == (2, 2)
    assert all(r[8] is not None and r[9] is not None for r in before)  # 0s at schema 12

    migrate(db, db_path)
    assert db.execute("PRAGMA user_version").fetchone() == (13,)
    after = {(r[1], r[3]): r for r in db.execute(ROLLUP).fetchall()}
    # bsdacct's 'cc' rows merged (one priority); no record of theirs has I/O: unknown.
    assert after["bsdacct", "cc"] == (H, "bsdacct", 1000, "cc", 2, 40_000, 2_000_000, 1600,
                                      None, None, 6, 0)
    # Known sums stay, a measured 0 too (majflt); write_bytes: pid 6's 9, pid 2 none.
    assert after["taskstats", "cc"] == (H, "taskstats", 1000, "cc", 2, 20_000, 2_000_000,
                                        1800, 50, 9, 8, 0)
    # The folded row: a measured 0 of read_bytes stays 0, the rest unknown.
    assert after["x", "tiny"] == (H, "x", 1000, "tiny", 1, 1, None, None, 0, None, None,
                                  None)
    # ld's records are not all there any more: a 0 cannot be told from a measured one.
    assert after["bsdacct", "ld"][8:10] == (0, 0)
    assert len(after) == 4
    (row,) = _table(_summary(capsys, db_path, "--by", "command", "--until", str(T + 3600),
                             "--source", "bsdacct"))
    assert (row["READ"], row["WRITE"]) == ("-", "-")
    # The folded records' new trigger writes into the rebuilt table, unknowns as NULL.
    execute_writes(db, INSERT_FOLDED, [tiny])
    assert db.execute("SELECT processes, read_bytes, write_bytes, mem_kb_sum FROM "
                      "usage_rollup WHERE comm = 'tiny'").fetchall() == [(2, 0, None, None)]
