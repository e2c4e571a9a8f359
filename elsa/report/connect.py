"""The reports' connection to a store: a node's SQLite file or the site's
central PostgreSQL, behind one :class:`Db` adapter.

Queries (elsa.report.query and the other reports) are written once, with ``?``
placeholders; the adapter runs them and supplies the few expressions the two
dialects spell differently (hour buckets, tag lookup, the host column).
"""

from __future__ import annotations

import os
import re
import sqlite3
import urllib.parse
from typing import Any, Optional, Sequence, Tuple

from elsa.errors import StoreError
from elsa.users import user_name

#: The store schema that added the usage tables (store migration 2): older stores
#: have nothing to report.
USAGE_SCHEMA = 2
#: Seconds per bucket of the hourly rollup.
BUCKET = 3600


class Db:
    """A report connection: ``execute(sql, params)`` with ``?`` placeholders, and the
    expressions in which SQLite and PostgreSQL differ."""

    #: True when rows carry a host (the central store): reports show and filter it.
    central = False

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def host(self, alias: str = "") -> str:
        """The host column of the usage tables ('' where there is one host); *alias*:
        the table's, with its dot ("p.")."""
        return "''"

    def hour(self, col: str) -> str:
        """The hour bucket (epoch hours, floor) of epoch-seconds column *col*."""
        return f"CAST({col} / {BUCKET} AS INTEGER)"

    def tag(self, key_param: str = "?") -> str:
        """The value of the job tag named by *key_param* in jobs.tags (JSON text). A key is
        free text ('a.b', 'c[0]'): compared as written, never read as a JSON path."""
        return f"(SELECT value FROM json_each(tags) WHERE key = {key_param})"

    def user_label(self, host: str, uid: Optional[int]) -> Tuple[str, Optional[str]]:
        """(user, account) for *uid* on *host*."""
        return user_name(uid), None

    def has_folded(self) -> bool:
        """Whether the store has ``proc_folded`` (the central store always has)."""
        return True


class SqliteDb(Db):
    _folded: Optional[bool] = None

    def has_folded(self) -> bool:
        # Store migration 3 added the table; reports read stores from schema 2 on.
        if self._folded is None:
            self._folded = self.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'proc_folded'"
            ).fetchone() is not None
        return self._folded


def adapt(db: Any) -> Db:
    return db if isinstance(db, Db) else SqliteDb(db)


#: The start of a libpq ``key=value ...`` connection string ("host=db dbname=elsa",
#: "service=elsa"): what ``elsa central --url`` takes besides URLs.
_CONNINFO = re.compile(r"\s*[A-Za-z_]+\s*=")


def is_central(where: str) -> bool:
    """Whether *where* names the central store (a postgresql:// URL or a libpq
    ``key=value ...`` string) rather than a store file (one that exists is one)."""
    if where.startswith(("postgresql://", "postgres://")):
        return True
    return bool(_CONNINFO.match(where)) and not os.path.exists(where)


def open_db(where: str) -> Db:
    """A node's store file, or the central store when *where* is a postgresql:// URL
    (or a libpq ``service=NAME``)."""
    if is_central(where):
        from elsa.central.pgreport import open_central

        return open_central(where)
    return SqliteDb(open_store(where))


def readonly_uri(path: str) -> str:
    """The SQLite URI that opens the file *path* read-only: the path quoted, so
    that '#', '?' or '%' in it stay part of the file name."""
    return f"file:{urllib.parse.quote(path)}?mode=ro"


def read_error(path: str, exc: sqlite3.Error) -> StoreError:
    """What a report that could not read the store at *path* says: for a damaged
    store, the recovery command."""
    from elsa.core.store import is_corruption, salvage_hint

    if is_corruption(exc):
        return StoreError(f"store {path} is corrupt ({exc}); {salvage_hint(path)}")
    return StoreError(f"cannot read store {path}: {exc}")


def open_store(path: str, readonly: bool = True) -> sqlite3.Connection:
    """Open the store at *path* (a file) for reading."""
    parent = os.path.dirname(path) or "."
    if (os.path.exists(path) and not os.access(path, os.R_OK)) or (
            not os.path.exists(path) and os.path.isdir(parent)
            and not os.access(parent, os.X_OK)):
        # The store is private (0600, in a state dir of 0700 or 0711): SQLite would say
        # "unable to open database file", and a file in a dir we cannot search looks absent.
        raise StoreError(f"cannot read store {path}: permission denied; run the report as "
                         "the store's owner (root for elsad's), or give --socket (elsad's "
                         "socket) to have elsad run it for you (docs/security.md)")
    if not os.path.exists(path):
        raise StoreError(f"no store at {path}; is elsad's state_dir right (--state-dir or the "
                         "config's state_dir), or import pacct files with 'elsa import-acct'?")
    if os.path.isdir(path):
        raise StoreError(f"cannot read store {path}: it is a directory; give the store file "
                         "(<state_dir>/elsa.db) with --db, or the directory with --state-dir")
    try:
        if readonly:
            db = sqlite3.connect(readonly_uri(path), uri=True, timeout=30.0)
        else:
            db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        (version,) = db.execute("PRAGMA user_version").fetchone()
        # LIKE matches case as PostgreSQL's does: the reports' globs (elsa apps
        # --path/--package) answer the same on a node and on the central store.
        db.execute("PRAGMA case_sensitive_like = ON")
    except sqlite3.Error as exc:
        raise read_error(path, exc) from None
    if version < USAGE_SCHEMA:
        raise StoreError(f"store {path} has schema {version}, without usage tables; start "
                         "elsad (it migrates the store) or run 'elsa import-acct'")
    return db
