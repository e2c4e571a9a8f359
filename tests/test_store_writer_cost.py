"""The store writer's cost per process: migration 7's indexes and the bulk path that
drops proc_usage's triggers (elsa/core/schema.py, elsa/core/aggregator.py). Every
lookup keeps an index, an existing store upgrades, and the sums stay the same."""

import sqlite3

import pytest

from elsa.core import usage
from elsa.core.aggregator import (
    DROP_TRIGGERS_MIN,
    INSERT_PROC,
    _bulk_in_transaction,
    live_bulk,
    proc_row,
)
from elsa.core.schema import MIGRATIONS, _split_sql, migrate
from elsa.core.source import UsageRecord

SUMS = ("SELECT jid, source, processes, cpu_user_us, cpu_system_us, elapsed_us, max_rss_kb, "
        "max_vm_kb, read_bytes, write_bytes, nvcsw, minflt FROM job_usage ORDER BY jid, source",
        "SELECT bucket, source, uid, comm, processes, cpu_user_us, cpu_system_us, elapsed_us, "
        "max_rss_kb, mem_kb_sum, read_bytes FROM usage_rollup ORDER BY 1, 2, 3, 4")
TRIGGERS = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"


def _store_at(path, version):
    db = sqlite3.connect(path, isolation_level=None)
    for i, m in enumerate(MIGRATIONS[:version]):
        db.execute("BEGIN")
        for stmt in _split_sql(m):
            db.execute(stmt)
        db.execute(f"PRAGMA user_version = {i + 1}")
        db.execute("COMMIT")
    return db


def _rows(n, base=0, jid=0x42):
    # Some rows lack a uid, a peak RSS or CPU figures (unknowns are summed apart), and
    # one job's rows of a source all lack nvcsw.
    return [proc_row(UsageRecord(
        "bsdacct" if i % 11 == 0 else "taskstats", 300 + (base + i) % 500,
        start_ticks=1000 + base + i, uid=None if i % 5 == 0 else 7 + i % 3,
        comm=f"c{i % 4}", start_time=1_800_000_000.0 + base + i,
        end_time=1_800_000_000.5 + base + i + (i % 3) * 1800,
        cpu_user_us=None if i % 13 == 0 else 10 + i, cpu_system_us=i, elapsed_us=100,
        max_rss_kb=None if i % 7 == 0 else 50 + i % 7, max_vm_kb=90, read_bytes=i,
        write_bytes=2 * i, minflt=1, nvcsw=None if i % 11 == 0 else 3),
        (jid + i % 4 if i % 4 else jid) if i % 2 else None)
        for i in range(n)]


def _plan(db, sql, n):
    return " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, [1] * n))


def test_upgrade_to_schema_7_keeps_rows_sums_and_the_unique_key(tmp_path):
    path = str(tmp_path / "elsa.db")
    db = _store_at(path, 6)
    db.execute("INSERT INTO members(boot_id, pid, start_ticks, jid, joined, how) "
               "VALUES ('b1', 200, 5000, 66, 1.0, 'fork')")
    old_rows = _rows(50)
    db.executemany(INSERT_PROC, old_rows)
    before = [db.execute(q).fetchall() for q in SUMS]
    migrate(db, path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 7
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                        "AND name NOT LIKE 'sqlite_%'")}
    assert not {"members_pid", "proc_usage_end", "proc_usage_pid_end"} & indexes
    assert {"proc_usage_key", "members_jid"} <= indexes
    assert [db.execute(q).fetchall() for q in SUMS] == before
    # A record read again after a crash is still ignored, and still not summed twice.
    db.executemany(INSERT_PROC, old_rows[:10])
    assert db.execute("SELECT COUNT(*) FROM proc_usage").fetchone() == (50,)
    assert [db.execute(q).fetchall() for q in SUMS] == before
    assert db.execute(usage.HISTORY_SQL, ("b1", 200, 4990, 5010, 5000)).fetchone() == (66,)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_every_lookup_by_pid_or_time_still_uses_an_index(tmp_path):
    path = str(tmp_path / "elsa.db")
    db = _store_at(path, len(MIGRATIONS))
    members = "sqlite_autoindex_members_1"
    assert members in _plan(db, usage.HISTORY_SQL, 5)
    assert members in _plan(db, usage.PARENT_SQL, 5)
    assert members in _plan(db, usage.ATTRIBUTE_SQL, 2)
    # The reports' and billing's time ranges.
    assert "proc_usage_key (end_time>? AND end_time<?)" in _plan(
        db, "SELECT uid FROM proc_usage WHERE jid IS NULL AND end_time >= ? AND end_time < ?",
        2)


def test_the_apps_recorder_creates_its_pid_index_on_the_writer_thread(tmp_path):
    from elsa import config
    from elsa.apps.recorder import AppRecorder
    from elsa.core.listener import ListenerContext
    from elsa.core.store import Store
    from elsa.kernel.procfs import ProcFS

    store = Store(str(tmp_path / "state"))
    try:
        ctx = ListenerContext(config=config.parse({}, "test"), procfs=ProcFS(), store=store,
                              boot_id="b", host_id=1, job_of=lambda pid: None,
                              add_timer=lambda *a: None, source_priority={},
                              sources_held=lambda: False)
        options = config.validate_table({"enabled": True}, config.section_options("apps"),
                                        where="apps", path="test")
        rec = AppRecorder(ctx, {**options, "packages": "off"})
        rec.start()
        store.flush()
        db = sqlite3.connect(store.path)  # (a plan alone does not reload a changed schema)
        assert "proc_usage_pid_end" in _plan(
            db, "SELECT id FROM proc_usage WHERE pid = ? AND end_time BETWEEN ? - 5 AND ? + 5",
            3)
        db.close()
        rec.stop()
    finally:
        store.close()


@pytest.mark.parametrize("batch", [DROP_TRIGGERS_MIN, 20])
def test_bulk_batches_sum_like_the_triggers_and_keep_them(tmp_path, batch):
    """A writer batch large enough drops proc_usage's triggers for its insert: the
    totals equal the per-row triggers', the triggers are back after the commit, and
    a batch that fails leaves them as they were."""
    rows = _rows(2 * batch) + _rows(5)  # the last 5 are duplicates: ignored either way
    sums = []
    for bulk in (False, True):
        path = str(tmp_path / f"{bulk}.db")
        db = sqlite3.connect(path, isolation_level=None)
        migrate(db, path)
        triggers = db.execute(TRIGGERS).fetchall()
        for i in range(0, len(rows), batch):
            db.execute("BEGIN")
            if bulk:
                live_bulk(db, rows[i:i + batch])
            else:
                db.executemany(INSERT_PROC, rows[i:i + batch])
            db.execute("COMMIT")
        assert db.execute(TRIGGERS).fetchall() == triggers
        sums.append([db.execute(q).fetchall() for q in SUMS])
        if bulk:
            db.execute("BEGIN")
            with pytest.raises(sqlite3.Error):
                _bulk_in_transaction(db, lambda d: d.execute("INSERT INTO nowhere VALUES (1)"))
            db.execute("ROLLBACK")
            assert db.execute(TRIGGERS).fetchall() == triggers
            # Another connection's insert is summed by the triggers as before.
            other = sqlite3.connect(path, isolation_level=None)
            other.execute(INSERT_PROC, _rows(1, base=10_000)[0])
            assert other.execute("SELECT SUM(processes) FROM usage_rollup").fetchone() == (
                2 * batch + 1,)
            other.close()
        db.close()
    assert sums[0] == sums[1]
    assert sum(r[2] for r in sums[0][0]) == batch  # half of the rows are in a job
    assert any(r[10] is None for r in sums[0][0])  # and a job's nvcsw stayed unknown
