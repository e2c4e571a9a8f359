"""Store: the batched writer's accounting of merged membership writes."""

import time

from elsa.core.store import Store


def test_flush_returns_after_repeated_joins_of_one_pending_member(tmp_path):
    store = Store(str(tmp_path), batch_interval=5.0)  # the writer sleeps: rows stay pending
    try:
        store.add_member("boot", 1, 100, 5, 1.0, "fork")
        store.add_member("boot", 1, 100, 5, 2.0, "attach")  # same stay, again
        store.close_member("boot", 1, 100, 5, 3.0, 0)
        t = time.monotonic()
        store.flush(timeout=3.0)  # raised StoreError after 3 s when counts were lost
        assert time.monotonic() - t < 1.0
        rows = store.db.execute("SELECT joined, how, left, exit_code FROM members").fetchall()
        assert rows == [(2.0, "attach", 3.0, 0)]
    finally:
        store.close()


def test_schema_newer_than_code_is_refused(tmp_path):
    import pytest

    from elsa.errors import StoreError

    Store(str(tmp_path)).close()
    import sqlite3
    db = sqlite3.connect(str(tmp_path / "elsa.db"))
    db.execute("PRAGMA user_version = 999")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 999"):
        Store(str(tmp_path))


def test_import_path_migrates_and_refuses_newer_schema_like_the_daemon(tmp_path):
    import sqlite3

    import pytest

    from elsa.core.schema import MIGRATIONS
    from elsa.errors import StoreError
    from elsa.report.importer import open_for_import

    path = str(tmp_path / "elsa.db")
    db = open_for_import(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    db.execute("PRAGMA user_version = 999")
    db.close()
    with pytest.raises(StoreError, match="schema version 999"):
        open_for_import(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 999


def test_a_long_migration_asks_systemd_for_more_start_up_time(tmp_path, monkeypatch):
    """Under systemd (Type=notify) a migration that rewrites a large table would outlast
    TimeoutStartSec: while it runs, elsad sends EXTEND_TIMEOUT_USEC (and a STATUS) to
    $NOTIFY_SOCKET, here a real datagram socket read by a thread as systemd would;
    nothing once it is done."""
    import socket
    import sqlite3
    import threading

    from elsa.core import schema
    from elsa.core.store import INSERT_MEMBER

    path = str(tmp_path / "elsa.db")
    db = sqlite3.connect(path, isolation_level=None)
    schema.migrate(db, path, target=7)
    db.execute("BEGIN")
    db.executemany(INSERT_MEMBER, [("b", 300 + i, 1000 + i, 7, 1.0, "fork", 2.0, 0, 0)
                                   for i in range(20_000)])
    db.execute("COMMIT")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    got = []

    def systemd():
        while True:
            msg = sock.recv(4096)
            if msg == b"bye":
                return
            got.append(msg.decode())

    reader = threading.Thread(target=systemd, daemon=True)
    reader.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setattr(schema, "EXTEND_EVERY_S", 0.0)  # every progress call sends
    try:
        schema.migrate(db, path)
        schema.sdnotify.notify("migrated")
        db.execute("SELECT COUNT(*) FROM members m JOIN members n ON n.jid = m.jid "
                   "WHERE m.pid < 400").fetchone()  # the handler went with the migration
        schema.sdnotify.notify("bye")
        reader.join(10)
        assert not reader.is_alive()
        assert got[-1] == "migrated" and len(got) > 2
        assert set(got[:-1]) == {f"EXTEND_TIMEOUT_USEC={schema.EXTEND_BY_S * 1_000_000}\n"
                                 f"STATUS=migrating store {path} to schema 8"}
        assert db.execute("SELECT COUNT(*) FROM members").fetchone() == (20_000,)
    finally:
        sock.close()
        db.close()


def test_idle_writer_sleeps_and_the_next_write_wakes_it(tmp_path):
    """With nothing to write the writer waits for a write instead of waking every
    batch interval; each way of writing wakes it, and the write is committed one
    batch interval later (no flush, no kick: nothing else would wake it)."""
    from elsa.testing import wait_for

    store = Store(str(tmp_path), batch_interval=0.05)
    try:
        writes = [
            lambda: store.submit("INSERT INTO meta VALUES ('k1', 'v')"),
            lambda: store.submit_many("INSERT INTO meta VALUES (?, 'v')", [("k2",), ("k3",)]),
            lambda: store.add_member("boot", 1, 100, 5, 1.0, "fork"),
        ]
        status = f"/proc/self/task/{store._writer.native_id}/status"

        def wakeups() -> int:
            with open(status) as fh:
                return next(int(line.split()[1]) for line in fh
                            if line.startswith("voluntary_ctxt_switches:"))
        for write in writes:
            wait_for(lambda: store._asleep, 5, interval=0.01, what="the writer asleep")
            before = wakeups()
            time.sleep(0.2)  # four batch intervals with nothing to write
            assert wakeups() == before and store._asleep
            write()
            mark = store.mark()
            wait_for(lambda mark=mark: store.is_committed(mark), 5, interval=0.01,
                     what="the write committed without a flush")
    finally:
        store.close()


def test_running_jobs_had_members_is_whether_a_member_row_exists(tmp_path):
    """Recovery ends a running job that had members and has none left, and keeps one
    that never had any (its creator may still attach): the member rows tell which."""
    from elsa.core.model import Job

    store = Store(str(tmp_path))
    try:
        for jid in (1, 2, 3):
            store.insert_job(Job(jid=jid, name=f"j{jid}", owner_uid=0, tags=(),
                                 created=float(jid), ended=None, state="running",
                                 backend="cnproc"))
        store.add_member("boot", 1, 100, 5, 1.0, "attach")
        store.close_member("boot", 1, 100, 5, 2.0, 0)  # had one; it left
        store.add_member("boot", 3, 300, 7, 1.0, "attach")
        store.flush()
        assert [(job.jid, had) for job, had in store.running_jobs()] == [
            (1, True), (2, False), (3, True)]
    finally:
        store.close()


def test_migration_10_drops_the_had_members_flag_and_keeps_every_job(tmp_path):
    import sqlite3

    from elsa.core import schema
    from elsa.core.store import connect

    path = str(tmp_path / "elsa.db")
    db = connect(path)
    schema.migrate(db, path, target=9)
    db.execute("INSERT INTO jobs VALUES (1, 'a', 1000, '{\"k\": \"v\"}', 1.5, NULL, "
               "'running', 'cgroup2', '{\"cgroup_path\": \"/x\"}', 1)")
    db.execute("INSERT INTO jobs VALUES (2, 'b', 0, '{}', 2.5, 3.5, 'ended', 'cnproc', '{}', 0)")
    db.execute("INSERT INTO members(boot_id, pid, start_ticks, jid, joined, how) "
               "VALUES ('b', 10, 5, 1, 1.6, 'attach')")
    schema.migrate(db, path)
    cols = [r[1] for r in db.execute("PRAGMA table_info(jobs)")]
    assert "had_members" not in cols
    assert db.execute("SELECT * FROM jobs ORDER BY jid").fetchall() == [
        (1, "a", 1000, '{"k": "v"}', 1.5, None, "running", "cgroup2", '{"cgroup_path": "/x"}'),
        (2, "b", 0, "{}", 2.5, 3.5, "ended", "cnproc", "{}")]
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'jobs_state'").fetchone()
    db.close()
    store = Store(str(tmp_path))
    try:
        assert [(job.jid, had) for job, had in store.running_jobs()] == [(1, True)]
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == \
        len(schema.MIGRATIONS)


def test_migration_12_keeps_the_shippers_bookkeeping_and_adds_shipped_tags(tmp_path):
    from elsa.core import schema
    from elsa.core.store import connect

    old = ("CREATE TABLE central_jobs (jid INTEGER PRIMARY KEY, sig TEXT NOT NULL, "
           "shipped REAL NOT NULL)")
    for shipped_before in (True, False):
        path = str(tmp_path / f"elsa-{shipped_before}.db")
        db = connect(path)
        schema.migrate(db, path, target=11)
        if shipped_before:  # elsad at schema 11 made the table when shipping started
            db.execute(old)
            db.execute("INSERT INTO central_jobs VALUES (7, 'abc', 2.5)")
        schema.migrate(db, path)
        assert [r[1] for r in db.execute("PRAGMA table_info(central_jobs)")] == \
            ["jid", "sig", "shipped", "tags"]
        assert db.execute("SELECT * FROM central_jobs").fetchall() == \
            ([(7, "abc", 2.5, None)] if shipped_before else [])
        db.close()
