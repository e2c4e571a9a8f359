"""The store writer's cost per process: migration 7's indexes, migration 8's members
key in start order, and usage rows added to the sums per batch instead of by per-row
triggers (elsa/core/schema.py, elsa/core/aggregator.py). Every lookup keeps an index,
an existing store upgrades, a batch of new members rewrites as many pages whatever
the history holds, and the sums stay those of the triggers."""

import sqlite3

import pytest

from elsa.core import attribution
from elsa.core.aggregator import INSERT_PROC, add_to_sums, bulk_insert, live_bulk, proc_row
from elsa.core.schema import MIGRATIONS, migrate
from elsa.core.source import UsageRecord
from elsa.core.store import INSERT_MEMBER, LEFT_ALIVE_SQL, LIVE_MEMBERS_SQL

SUMS = ("SELECT jid, source, processes, cpu_user_us, cpu_system_us, elapsed_us, max_rss_kb, "
        "max_vm_kb, read_bytes, write_bytes, nvcsw, minflt FROM job_usage ORDER BY jid, source",
        "SELECT bucket, source, uid, comm, processes, cpu_user_us, cpu_system_us, elapsed_us, "
        "max_rss_kb, mem_kb_sum, read_bytes FROM usage_rollup ORDER BY 1, 2, 3, 4")
TRIGGERS = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"


def _store_at(path, version):
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path, target=version)
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


MEMBERS = "SELECT * FROM members ORDER BY pid, start_ticks"


def test_upgrade_to_schemas_7_and_8_keeps_rows_sums_and_the_unique_keys(tmp_path):
    path = str(tmp_path / "elsa.db")
    db = _store_at(path, 6)
    db.execute("INSERT INTO members(boot_id, pid, start_ticks, jid, joined, how) "
               "VALUES ('b1', 200, 5000, 66, 1.0, 'fork')")
    db.execute("INSERT INTO members VALUES ('b1', 201, 4000, 66, 1.5, 9.0, 3, 'attach', 1)")
    members = db.execute(MEMBERS).fetchall()
    old_rows = _rows(50)
    db.executemany(INSERT_PROC, old_rows)
    before = [db.execute(q).fetchall() for q in SUMS]
    migrate(db, path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 13
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                        "AND name NOT LIKE 'sqlite_%'")}
    assert not {"members_pid", "proc_usage_end", "proc_usage_pid_end"} & indexes
    assert {"proc_usage_key", "members_jid", "members_live", "members_left"} <= indexes
    assert db.execute(MEMBERS).fetchall() == members
    with pytest.raises(sqlite3.IntegrityError):  # one row per stay, as before
        db.execute("INSERT INTO members(boot_id, pid, start_ticks, jid, joined, how) "
                   "VALUES ('b1', 200, 5000, 66, 2.0, 'fork')")
    # Migration 13: the one hour's group none of whose rows has a user CPU figure (pid
    # 300's, alone in its group) reads unknown where schema 6's trigger counted 0.
    group = (500000, "bsdacct", -1, "c0", 1)
    assert [r[5] for r in before[1] if r[:5] == group] == [0]
    before[1] = [r[:5] + (None,) + r[6:] if r[:5] == group else r for r in before[1]]
    assert [db.execute(q).fetchall() for q in SUMS] == before
    # A record read again after a crash is still ignored, and still not summed twice.
    db.executemany(INSERT_PROC, old_rows[:10])
    assert db.execute("SELECT COUNT(*) FROM proc_usage").fetchone() == (50,)
    assert [db.execute(q).fetchall() for q in SUMS] == before
    assert db.execute(attribution.HISTORY_SQL, ("b1", 200, 4990, 5010, 5000)).fetchone() == (66,)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_every_lookup_by_pid_or_time_still_uses_an_index(tmp_path):
    path = str(tmp_path / "elsa.db")
    db = _store_at(path, len(MIGRATIONS))
    key = "sqlite_autoindex_members_1 (boot_id=? AND start_ticks>? AND start_ticks<?)"
    assert key in _plan(db, attribution.HISTORY_SQL, 5)
    assert key in _plan(db, attribution.ATTRIBUTE_SQL, 2)
    # Not the key back from the child's start: the live members by pid, the others
    # by when they left.
    parent = _plan(db, attribution.PARENT_SQL, 5)
    assert "members_live (pid=?)" in parent and "members_left (left>?)" in parent
    # The carried rows by their end's window, each checked for a member row by the key.
    carried = "proc_usage_key (end_time>? AND end_time<?)"
    assert parent.count("autoindex") == 1 and carried in parent
    assert parent.index(carried) < parent.index("autoindex")
    assert carried in _plan(db, attribution.CARRIED_SQL, 6)
    assert carried in _plan(db, attribution.ATTRIBUTE_SQL, 2)
    for sql, n in ((attribution.HISTORY_SQL, 5), (attribution.PARENT_SQL, 5),
                   (attribution.ATTRIBUTE_SQL, 2), (attribution.CARRIED_SQL, 6)):
        assert "SCAN m" not in _plan(db, sql, n) and "SCAN proc_usage" not in _plan(db, sql, n)
    # Recovery at every start: the live members and those that left a job alive.
    assert "members_live" in _plan(db, LIVE_MEMBERS_SQL, 0)
    assert "members_detached (boot_id=?)" in _plan(db, LEFT_ALIVE_SQL, 1)
    # The reports' and billing's time ranges.
    assert "proc_usage_key (end_time>? AND end_time<?)" in _plan(
        db, "SELECT uid FROM proc_usage WHERE jid IS NULL AND end_time >= ? AND end_time < ?",
        2)


def _member_batch_pages(path, version, history, pid_space=2048, batch=1000):
    """WAL pages one commit of *batch* new members (pids in sequence, as the kernel
    hands them out, wrapping at *pid_space*) writes into a store of schema *version*
    at *path* holding *history* earlier members."""
    db = _store_at(str(path), version)
    db.execute("PRAGMA journal_mode=WAL")
    rows = [("b1", 300 + i % pid_space, 1000 + i, 7, 1.0 + i, "fork", 1.5 + i, 0, 0)
            for i in range(history + batch)]
    db.execute("BEGIN")
    db.executemany(INSERT_MEMBER, rows[:history])
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("BEGIN")
    db.executemany(INSERT_MEMBER, rows[history:])
    db.execute("COMMIT")
    pages = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    db.close()
    return pages


@pytest.mark.parametrize("version", [7, len(MIGRATIONS)])
def test_a_batch_of_members_rewrites_as_many_pages_whatever_the_history(tmp_path, version):
    """With the members' key in start order (migration 8), the pages a batch of new
    members rewrites do not grow with the history; schema 7's key by pid (the
    expected failure) rewrites a page per few rows of the history within the
    batch's pid range."""
    small = _member_batch_pages(tmp_path / "small.db", version, history=2_000)
    large = _member_batch_pages(tmp_path / "large.db", version, history=60_000)
    if version == 7:
        assert large > 3 * small
    else:
        assert large <= small + 10, (small, large)


def test_no_index_orders_proc_usage_by_pid_with_or_without_the_apps_recorder(tmp_path):
    """The recorder matches exit records in memory: a store it ran on has no
    pid-ordered index on proc_usage, and the one an earlier recorder built at its
    start (on a schema-8 store) goes at the upgrade."""
    from elsa import config
    from elsa.apps.recorder import AppRecorder
    from elsa.core.listener import ListenerContext
    from elsa.core.store import Store
    from elsa.kernel.procfs import ProcFS

    def indexes(path: str) -> set:
        db = sqlite3.connect(path)
        try:
            return {r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'proc_usage'")}
        finally:
            db.close()

    state = tmp_path / "state"
    state.mkdir()
    path = str(state / "elsa.db")
    db = sqlite3.connect(path)
    migrate(db, path, target=8)
    db.execute("CREATE INDEX proc_usage_pid_end ON proc_usage(pid, end_time)")
    db.commit()
    db.close()
    assert "proc_usage_pid_end" in indexes(path)
    store = Store(str(state))
    try:
        ctx = ListenerContext(config=config.parse({}, "test"), procfs=ProcFS(), store=store,
                              boot_id="b", host_id=1, job_of=lambda pid: None,
                              add_timer=lambda *a, **k: None, source_priority={},
                              sources_held=lambda: False)
        options = config.validate_table({"enabled": True}, config.section_options("apps"),
                                        where="apps", path="test")
        rec = AppRecorder(ctx, {**options, "packages": "off"})
        rec.start()
        store.flush()
        assert store.path == path
        assert indexes(path) == {"proc_usage_key", "proc_usage_jid"}
        rec.stop()
    finally:
        store.close()


@pytest.mark.parametrize("batch", [1, 7, 400])
def test_batches_sum_like_the_triggers_of_schema_6(tmp_path, batch):
    """Rows inserted in batches of any size (the store writer's runner), with
    duplicates, sum to what schema 6's per-row triggers made of them (after migration
    13: unknowns NULL); a batch that fails adds nothing; bulk_insert and add_to_sums
    (ad-hoc writers) agree."""
    rows = _rows(800) + _rows(5)  # the last 5 are duplicates: ignored either way
    # and a record with no figures at all, alone in its hour's group of the rollup
    rows.append(proc_row(UsageRecord("x", 77, start_ticks=1, uid=3, comm="z",
                                     start_time=1_800_000_000.0, end_time=1_800_000_001.0),
                         None))
    old_path = str(tmp_path / "old.db")
    old = _store_at(old_path, 6)
    old.executemany(INSERT_PROC, rows)
    # Schema 6's triggers counted a figure no row of an hour's group measured as 0 in
    # usage_rollup; migration 13 makes it NULL from the rows, as the batches sum it.
    migrate(old, old_path)
    want = [old.execute(q).fetchall() for q in SUMS]
    assert sum(r[2] for r in want[0]) == 400  # half of the rows are in a job
    assert any(r[10] is None for r in want[0])  # and a job's nvcsw stayed unknown
    assert [r[4:] for r in want[1] if r[1] == "x"] == [(1,) + (None,) * 6]

    path = str(tmp_path / "new.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path)
    # Only proc_folded's triggers are left.
    assert [r[0] for r in db.execute(TRIGGERS)] == ["proc_folded_job", "proc_folded_rollup"]
    assert db.execute(TRIGGERS).fetchall() == old.execute(TRIGGERS).fetchall()
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
