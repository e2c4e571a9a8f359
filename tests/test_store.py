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
