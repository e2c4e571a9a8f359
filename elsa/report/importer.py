"""``elsa import-acct``: bring pacct files into the store (ELSA's original
"accounting file + job file" path).

Records are decoded with the vectorized pacct decoder, inserted in one
transaction per file and summed with one GROUP BY (aggregator.bulk_insert),
and attributed to jobs from the persisted membership history by the one
attribution rule (elsa.core.attribution: the same boot, pid and start time within
pacct's 2 s tolerance; then the ppid rule for records of processes no
membership names). Importing a file
twice, or a file elsad already read, adds nothing: the store's unique key
ignores records it holds.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Dict, List, Sequence

from elsa.core.aggregator import INSERT_PROC, bulk_insert
from elsa.core.attribution import ATTRIBUTE_SQL, attribute_imported_by_parent
from elsa.core.usage import priorities_of, save_priorities
from elsa.errors import StoreError
from elsa.kernel import pacct

SOURCE = "bsdacct"
NOTADB = 26  # SQLITE_NOTADB: the file has no SQLite header


def open_for_import(db_path: str) -> sqlite3.Connection:
    """Open (creating and migrating if needed) the store at *db_path*."""
    from elsa.core.schema import migrate

    if os.path.isdir(db_path):
        raise StoreError(f"cannot open store {db_path}: it is a directory; give the store "
                         "file (<state_dir>/elsa.db) with --db, or the directory with "
                         "--state-dir")
    d = os.path.dirname(os.path.abspath(db_path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as exc:
        what = ("a path component is a file, not a directory"
                if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror or exc)
        raise StoreError(f"cannot open store {db_path}: cannot create its directory {d}: "
                         f"{what}; give --db a path in a writable directory") from exc
    db = None
    try:
        db = sqlite3.connect(db_path, timeout=60.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        migrate(db, db_path)
        _save_source_priority(db)
    except (sqlite3.Error, OSError) as exc:
        if db is not None:
            db.close()
        raise _store_error(db_path, exc) from exc
    except StoreError:
        if db is not None:
            db.close()
        raise
    return db


def _store_error(db_path: str, exc: BaseException) -> StoreError:
    """What an import that could not open or write the store tells the user."""
    from elsa.core.store import is_corruption, salvage_hint

    d = os.path.dirname(os.path.abspath(db_path))
    if getattr(exc, "sqlite_errorcode", None) == NOTADB:
        hint = ("it is not an SQLite database: check the path given with --db (an ELSA store "
                "is <state_dir>/elsa.db)")
    elif isinstance(exc, sqlite3.Error) and is_corruption(exc):
        hint = salvage_hint(db_path)
    elif os.path.exists(db_path) and not os.access(db_path, os.R_OK | os.W_OK):
        hint = "import-acct writes the store: run it as the store's owner (root for elsad's)"
    elif not os.access(d, os.W_OK | os.X_OK):
        hint = (f"import-acct creates files in {d}: run it as the directory's owner, or give "
                "--db a path in a writable directory")
    else:
        hint = "check the path given with --db or --state-dir, and free disk space"
    return StoreError(f"cannot open store {db_path}: {exc}; {hint}")


def _save_source_priority(db: sqlite3.Connection) -> None:
    """The imported records' source ranks as its spec says (the reports read it)."""
    from elsa.plugins import PluginHost, build_plugin_manager

    specs = PluginHost(build_plugin_manager()).sources()
    if SOURCE in specs:
        save_priorities(db, db.execute, priorities_of({SOURCE: specs[SOURCE]}))


def rows_of(dec: pacct.Decoded, source: str = SOURCE) -> List[tuple]:
    """proc_usage rows for decoded records; identical to what the daemon's
    bsdacct source writes for the same records (so the unique key matches)."""
    return pacct.usage_rows(dec, source)


def import_files(db_path: str, files: Sequence[str], attribute: bool = True
                 ) -> List[Dict[str, Any]]:
    db = open_for_import(db_path)
    results = []
    try:
        for f in files:
            try:
                dec = pacct.read_file(f)
            except pacct.AccountingFormatError as exc:
                results.append({"file": f, "records": 0, "inserted": 0, "attributed": 0,
                                "problems": [exc.message]})
                continue
            try:
                inserted, attributed = _import_one(db, rows_of(dec), attribute)
            except sqlite3.Error as exc:
                raise _store_error(db_path, exc) from exc
            results.append({"file": f, "records": dec.count, "inserted": inserted,
                            "attributed": attributed,
                            "problems": [p.message for p in dec.problems]})
    finally:
        db.close()
    return results


def _import_one(db: sqlite3.Connection, rows: List[tuple], attribute: bool) -> tuple:
    attributed = 0

    def after(db: sqlite3.Connection, lo: int, hi: int) -> None:
        nonlocal attributed
        if attribute:
            db.execute(ATTRIBUTE_SQL, (lo, hi))
            attribute_imported_by_parent(db, lo, hi)
            attributed = db.execute("SELECT COUNT(*) FROM proc_usage WHERE id > ? AND id <= ? "
                                    "AND jid IS NOT NULL", (lo, hi)).fetchone()[0]

    lo, hi = bulk_insert(db, lambda db: db.executemany(INSERT_PROC, rows), after)
    return hi - lo, attributed
