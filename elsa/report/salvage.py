"""``elsa store-salvage``: copy what is readable of a damaged store into a new one.

SQLite reports a damaged page (SQLITE_CORRUPT, "database disk image is
malformed") only when a query touches it, so the copy walks each table in
rowid order and, where a read fails, searches for the first rowid past the
damaged range (doubling the step, then bisecting back), so the rows after it
are kept.

The readable rows are copied into a new store of the damaged one's schema, its
triggers off (a copy, not new records), which is then migrated as the store
would have been: an older store's rollup rows change with the schema (store
migration 13 merges the rows schemas 2 to 6 filed per source priority, and
turns the 0s no record measured into NULL), so copying them into the current
schema would count them beside their rebuilt twins, or bring the 0s back.
Then the rollups (``usage_rollup``, ``job_usage``) are summed anew from the
per-process and folded rows that survived, as the store's writer sums its
batches, and the rollup rows that were readable replace the rebuilt ones,
since a rollup may hold records whose ``proc_usage`` rows were on a damaged
page or pruned. The damaged file is kept beside the new one
(``elsa.db.damaged-<time>``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from elsa.core import jobid
from elsa.core import store as store_mod
from elsa.core.aggregator import add_to_sums
from elsa.core.schema import MIGRATIONS, migrate
from elsa.errors import StoreError
from elsa.report.connect import readonly_uri

#: Copied first, in this order; then every other table of the schema; then
#: the rollups, rebuilt from the rows copied before and replaced by readable rows.
FIRST_TABLES = ("meta", "jobs", "members", "proc_usage", "proc_folded")
ROLLUP_TABLES = ("usage_rollup", "job_usage")
_BATCH = 1000


def _rows_from(db: sqlite3.Connection, table: str, cols: str, after: int
               ) -> Tuple[List[Tuple[Any, ...]], bool]:
    """Rows with rowid > *after* (up to _BATCH); the flag is False when the
    read hit damage (the rows before it are returned)."""
    out: List[Tuple[Any, ...]] = []
    try:
        for row in db.execute(f"SELECT rowid, {cols} FROM {table} WHERE rowid > ? "
                              "ORDER BY rowid LIMIT ?", (after, _BATCH)):
            out.append(row)
    except sqlite3.DatabaseError:
        return out, False
    return out, True


def _readable_from(db: sqlite3.Connection, table: str, after: int) -> bool:
    try:
        db.execute(f"SELECT rowid FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 1",
                   (after,)).fetchall()
        return True
    except sqlite3.DatabaseError:
        return False


def _skip_damage(db: sqlite3.Connection, table: str, last: int) -> Optional[int]:
    """The smallest rowid bound past *last* from which reading works again,
    or None when none does."""
    step = 1
    while not _readable_from(db, table, last + step):
        step *= 2
        if last + step > 2 ** 63 - 1:
            return None
    lo, hi = last + step // 2, last + step  # lo fails (or is last), hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _readable_from(db, table, mid):
            hi = mid
        else:
            lo = mid
    return hi


def _walk(db: sqlite3.Connection, table: str, cols: str, lost: List[str]
          ) -> Iterator[Tuple[Any, ...]]:
    last = -(2 ** 63)
    while True:
        rows, ok = _rows_from(db, table, cols, last)
        for row in rows:
            yield row[1:]
        if rows:
            last = rows[-1][0]
        if ok:
            if len(rows) < _BATCH:
                return
            continue
        nxt = _skip_damage(db, table, last)
        lost.append(f"{table}: rows after rowid {last}"
                    + (f" up to {nxt}" if nxt is not None else " to the end") + " unreadable")
        if nxt is None:
            return
        last = nxt


def _has_rowid(db: sqlite3.Connection, table: str) -> bool:
    try:
        db.execute(f"SELECT rowid FROM {table} LIMIT 0")
        return True
    except sqlite3.OperationalError:
        return False
    except sqlite3.DatabaseError:
        return True  # damaged, but a rowid table: walk it


def _columns(db: sqlite3.Connection, table: str) -> List[str]:
    return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]


def salvage(path: str) -> Dict[str, Any]:
    """Rebuild the store at *path* from what is readable; returns counts and
    the damaged ranges. The store must not be in use (stop elsad first)."""
    if not os.path.exists(path):
        raise StoreError(f"no store at {path}; pass --state-dir or --db")
    # The store is renamed and a new one written: a running elsad's connection would
    # follow the renamed file, and its later writes would never reach the new store.
    state_dir = os.path.dirname(os.path.abspath(path))
    holder = store_mod.running_elsad(state_dir)
    if holder is not None:
        who = f"elsad (pid {holder})" if holder.isdigit() else "elsad"
        raise StoreError(f"{who} is running on {state_dir}; stop it first (systemctl stop "
                         "elsad), then run store-salvage again")
    new = path + ".salvage"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(new + suffix):
            os.unlink(new + suffix)
    try:
        src = sqlite3.connect(readonly_uri(path), uri=True)
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        (version,) = src.execute("PRAGMA user_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"store {path}: its schema is unreadable ({exc}); nothing can be "
                         "salvaged from it: move it away and start with an empty store") from exc
    if version > len(MIGRATIONS):
        src.close()
        raise StoreError(f"store {path} has schema version {version} but this ELSA knows "
                         f"only up to {len(MIGRATIONS)}: salvage it with the ELSA that wrote it")
    old = os.umask(0o077)
    try:
        dst = sqlite3.connect(new, isolation_level=None)
    finally:
        os.umask(old)
    dst.execute("PRAGMA journal_mode=WAL")
    # The damaged store's own schema first (0: not a store ELSA made; the current one).
    migrate(dst, new, target=version or None)
    counts: Dict[str, int] = {}
    lost: List[str] = []
    dst.execute("BEGIN")
    triggers = dst.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
                           ).fetchall()
    for name, _sql in triggers:
        dst.execute(f"DROP TRIGGER {name}")
    schema = [r[0] for r in dst.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY rootpage")]
    order = ([t for t in FIRST_TABLES if t in schema]
             + [t for t in schema if t not in FIRST_TABLES and t not in ROLLUP_TABLES]
             + [t for t in ROLLUP_TABLES if t in schema])
    for table in order:
        try:
            have = _columns(src, table)
        except sqlite3.DatabaseError:
            lost.append(f"{table}: table unreadable")
            continue
        cols = [c for c in _columns(dst, table) if c in have]
        if not cols:
            continue
        sql = (f"INSERT OR IGNORE INTO {table}({', '.join(cols)}) "
               f"VALUES ({', '.join('?' * len(cols))})")
        n = 0
        if table in ROLLUP_TABLES or not _has_rowid(src, table):
            # WITHOUT ROWID: read in key order until the damage
            try:
                for row in src.execute(f"SELECT {', '.join(cols)} FROM {table}"):
                    dst.execute(sql, row)
                    n += 1
            except sqlite3.DatabaseError:
                lost.append(f"{table}: rows after the first {n} unreadable"
                            + (" (rebuilt from the process rows that survived)"
                               if table in ROLLUP_TABLES else ""))
        else:
            for row in _walk(src, table, ", ".join(cols), lost):
                dst.execute(sql, row)
                n += 1
        counts[table] = n
    for _name, sql in triggers:
        dst.execute(sql)
    dst.execute("COMMIT")
    migrate(dst, new)
    dst.execute("BEGIN")
    _resum_rollups(dst)
    _keep_jid_counter_ahead(dst)
    dst.execute("COMMIT")
    problems = [r[0] for r in dst.execute("PRAGMA quick_check").fetchall() if r[0] != "ok"]
    dst.close()
    src.close()
    if problems:
        raise StoreError(f"the salvaged store {new} failed its check ({problems[0]}); "
                         f"{path} was left as it was")
    damaged = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    for suffix in ("-wal", "-shm", ""):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, damaged + suffix)
    os.replace(new, path)
    store_mod.secure_store_files(os.path.dirname(os.path.abspath(path)))
    return {"store": path, "damaged_copy": damaged, "rows": counts, "unreadable": lost}


def _resum_rollups(db: sqlite3.Connection) -> None:
    """Sum the rollups anew from the records copied (proc_usage as the store writer
    does, proc_folded through its triggers, by inserting its rows again), then put
    back the rollup rows that were readable over the rebuilt ones."""
    for table in ROLLUP_TABLES:
        db.execute(f"CREATE TEMP TABLE readable_{table} AS SELECT * FROM {table}")
        db.execute(f"DELETE FROM {table}")
    add_to_sums(db)
    db.execute("CREATE TEMP TABLE folded_copy AS SELECT * FROM proc_folded")
    db.execute("DELETE FROM proc_folded")
    db.execute("INSERT INTO proc_folded SELECT * FROM folded_copy")
    db.execute("DROP TABLE folded_copy")
    for table in ROLLUP_TABLES:
        db.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM readable_{table}")
        db.execute(f"DROP TABLE readable_{table}")


def _keep_jid_counter_ahead(db: sqlite3.Connection) -> None:
    """Job ids must never be handed out twice: when the counter's meta row was
    lost, reserve past the highest job id that survived."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (jobid.META_KEY,)).fetchone()
    reserved = int(row[0]) if row else 0
    (top,) = db.execute("SELECT max(jid & ?) FROM jobs",
                        ((1 << jobid.COUNTER_BITS) - 1,)).fetchone()
    if top is not None and top + jobid.BLOCK > reserved:
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                   (jobid.META_KEY, str(top + jobid.BLOCK)))


def format_result(result: Dict[str, Any]) -> Sequence[str]:
    lines = [f"{result['store']}: rebuilt; the damaged file is {result['damaged_copy']}"]
    lines += [f"  {t}: {n} rows kept" for t, n in result["rows"].items()]
    lines += [f"  lost: {x}" for x in result["unreadable"]]
    return lines
