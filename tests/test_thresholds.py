"""[thresholds]: small records folded into one row per job and command, totals unchanged."""

from __future__ import annotations

import sqlite3

import pytest

from elsa import config
from elsa.core.aggregator import Aggregator
from elsa.core.schema import MIGRATIONS, _split_sql
from elsa.core.source import UsageRecord
from elsa.core.store import execute_writes
from elsa.core.thresholds import Folder
from elsa.errors import ConfigError
from elsa.report import query
from tests.support import FakeManager

T = 1_800_000_000.0  # an hour boundary + 0 s: every record ends in whole hours


def _db():
    db = sqlite3.connect(":memory:", isolation_level=None)
    for m in MIGRATIONS:
        for stmt in _split_sql(m):
            db.execute(stmt)
    return db


def _records():
    out = []
    for i in range(400):
        big = i % 40 == 0
        out.append(UsageRecord(
            source="taskstats", pid=1000 + i, start_ticks=i, uid=1000 + i % 2,
            comm="sh" if not big else "cc", end_time=T + i * 10, start_time=T + i * 10 - 1,
            cpu_user_us=(500_000 if big else 300 + i), cpu_system_us=100,
            elapsed_us=20_000, max_rss_kb=(90_000 if big else 1500 + i), read_bytes=i,
            write_bytes=0, minflt=3, majflt=0))
    return out


def _run(folder):
    db = _db()
    mgr = FakeManager()
    for i in range(0, 400, 2):  # even pids are members of job 7
        mgr.members[1000 + i] = [(i, 7)]
    agg = Aggregator(lambda sql, p: execute_writes(db, sql, [p]), mgr.resolve,
                     hold_seconds=0, boot_epoch_fn=lambda: T - 10_000, folder=folder,
                     submit_many=lambda sql, rows: execute_writes(db, sql, rows))
    recs = _records()
    for lo in range(0, len(recs), 50):  # batches as the sources deliver them
        agg.add(recs[lo:lo + 50])
    return db, agg


def test_totals_unchanged_rows_folded():
    plain, _ = _run(None)
    folded, agg = _run(Folder(min_cpu_ms=10, min_rss_kb=0))
    for db in (plain, folded):
        db.execute("PRAGMA query_only = 1")
    by_user = [query.summary(db, "user", T - 3600, T + 7200) for db in (plain, folded)]
    assert by_user[0] == by_user[1]
    by_cmd = [query.summary(db, "command", T - 3600, T + 7200) for db in (plain, folded)]
    assert by_cmd[0] == by_cmd[1]
    jobs = [query.job_usage(db)[7]["usage"] for db in (plain, folded)]
    assert jobs[0] == jobs[1] and jobs[0]["processes"] == 200
    rows = [db.execute("SELECT COUNT(*) FROM proc_usage").fetchone()[0]
            for db in (plain, folded)]
    assert rows == [400, 10]  # only the 10 big 'cc' records stay one by one
    n_folded = folded.execute("SELECT SUM(folded), COUNT(*) FROM proc_folded").fetchone()
    assert n_folded[0] == 390
    # One row per job (or none), user, command, hour and batch.
    assert n_folded[1] <= 2 * 2 * 8
    assert agg.status()["folded"] == 390
    # `elsa job` lists the job's folded records per command beside its processes.
    detail = query.job_detail(folded, 7)
    assert len(detail["processes"]) + sum(f["processes"] for f in detail["folded"]) == 200
    assert {f["comm"] for f in detail["folded"]} == {"sh"}
    assert query.job_detail(plain, 7)["folded"] == []


def test_job_detail_lists_folded_rows_when_every_record_was_folded():
    # A job none of whose records is stored one by one (ja while its finished
    # processes are all small) still lists them per command, with their I/O.
    db, _ = _run(Folder(min_cpu_ms=1000))
    assert db.execute("SELECT COUNT(*) FROM proc_usage").fetchone()[0] == 0
    detail = query.job_detail(db, 7)
    assert detail["processes"] == []
    assert sum(f["processes"] for f in detail["folded"]) == 200
    assert {f["comm"] for f in detail["folded"]} == {"sh", "cc"}
    assert sum(f["read_bytes"] for f in detail["folded"]) == sum(range(0, 400, 2))


def test_rss_threshold_and_either_rule():
    f = Folder(min_cpu_ms=0, min_rss_kb=2000)
    recs = _records()
    keep, folded = f.split([r for r in (_row(x) for x in recs[:60])])
    # rss 1500+i < 2000 for i < 500 except the big ones (i % 40 == 0)
    assert len(keep) == 2 and f.folded == 58


def _row(rec):
    from elsa.core.aggregator import proc_row

    return proc_row(rec, None)


def test_thresholds_config_validated(tmp_path):
    f = tmp_path / "elsa.toml"
    f.write_text("[thresholds]\nmin_cpu_ms = -1\n")
    with pytest.raises(ConfigError, match="'thresholds.min_cpu_ms' must be 0 or more"):
        config.load(str(f))
    f.write_text("[thresholds]\nmin_cpu_ms = 5\nmin_rss_kb = 1000\n")
    assert config.load(str(f)).section("thresholds") == {"min_cpu_ms": 5, "min_rss_kb": 1000}
    assert Folder.from_section(config.load(None).section("thresholds")) is None


@pytest.mark.root
def test_daemon_folds_and_status_counts(elsad):
    import os
    import subprocess
    import sys

    from tests.conftest import wait_for

    d = elsad(extra="[sources.taskstats]\n[thresholds]\nmin_cpu_ms = 50\n")
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--", "sh", "-c",
                        "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done"], env=env)
    assert r.returncode == 0
    db = sqlite3.connect(f"file:{d.state_dir}/elsa.db?mode=ro", uri=True)

    def job_has_all() -> bool:
        row = db.execute("SELECT MAX(processes) FROM job_usage").fetchone()
        return bool(row[0] and row[0] >= 11)

    wait_for(job_has_all, 30, what="the job's 11 processes in job_usage")
    (jid, n_job_rows) = db.execute("SELECT jid, COUNT(*) FROM proc_usage WHERE jid IS NOT NULL "
                                   "GROUP BY jid").fetchone() or (None, 0)
    assert n_job_rows < 11  # the ten /bin/true (and probably sh) were folded
    assert db.execute("SELECT SUM(folded) FROM proc_folded WHERE jid IS NOT NULL"
                      ).fetchone()[0] >= 10
    out = subprocess.run(["elsa-jobmng", "--socket", d.socket, "status"], env=env,
                         capture_output=True, text=True).stdout
    assert "small process records ([thresholds])" in out
