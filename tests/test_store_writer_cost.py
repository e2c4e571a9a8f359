"""The store writer's cost per process: migration 7's indexes, and usage rows added
to the sums per batch instead of by per-row triggers (elsa/core/schema.py,
elsa/core/aggregator.py). Every lookup keeps an index, an existing store upgrades,
and the sums stay those of the triggers."""

import sqlite3

import pytest

from elsa.core import usage
from elsa.core.aggregator import INSERT_PROC, add_to_sums, bulk_insert, live_bulk, proc_row
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


@pytest.mark.parametrize("batch", [1, 7, 400])
def test_batches_sum_like_the_triggers_of_schema_6(tmp_path, batch):
    """Rows inserted in batches of any size (the store writer's runner), with
    duplicates, sum to what schema 6's per-row triggers made of them; a batch that
    fails adds nothing; bulk_insert and add_to_sums (ad-hoc writers) agree."""
    rows = _rows(800) + _rows(5)  # the last 5 are duplicates: ignored either way
    old = _store_at(str(tmp_path / "old.db"), 6)
    old.executemany(INSERT_PROC, rows)
    want = [old.execute(q).fetchall() for q in SUMS]
    assert sum(r[2] for r in want[0]) == 400  # half of the rows are in a job
    assert any(r[10] is None for r in want[0])  # and a job's nvcsw stayed unknown

    path = str(tmp_path / "new.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path)
    assert db.execute(TRIGGERS).fetchall() == [
        r for r in old.execute(TRIGGERS).fetchall() if r[0] != "proc_usage_rollup"
        and r[0] != "proc_usage_job"]  # only proc_folded's are left
    for i in range(0, len(rows), batch):
        db.execute("BEGIN")
        live_bulk(db, rows[i:i + batch])
        db.execute("COMMIT")
    assert [db.execute(q).fetchall() for q in SUMS] == want
    db.execute("BEGIN")
    new = _rows(1, base=5000)[0]
    with pytest.raises(sqlite3.Error):
        live_bulk(db, [new, new[:-1]])  # the second row is one column short
    db.execute("ROLLBACK")
    assert [db.execute(q).fetchall() for q in SUMS] == want

    other = str(tmp_path / "other.db")
    db2 = sqlite3.connect(other, isolation_level=None)
    migrate(db2, other)
    bulk_insert(db2, lambda d: d.executemany(INSERT_PROC, rows[:300]))
    db2.execute("BEGIN")
    db2.executemany(INSERT_PROC, rows[300:])
    add_to_sums(db2, 300)
    db2.execute("COMMIT")
    assert [db2.execute(q).fetchall() for q in SUMS] == want
