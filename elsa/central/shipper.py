"""Ships the node's store to the central PostgreSQL, from a thread of its own.

The node's SQLite store is the spool. Each round reads the next process rows
and application records (by rowid, after persisted marks), the ended jobs
whose snapshot changed, and the gaps (intervals in which a source missed
records) new or extended since they were sent, sends them in ONE PostgreSQL
transaction, and only after that transaction committed advances the local
marks (through the store's writer). A round that
is cut off (crash, timeout, server stop) is sent again; every central key
starts with this node's host, so a re-sent record meets its own key and is
skipped (``ON CONFLICT DO NOTHING``), and a job snapshot or an application
record is an upsert of the same values. An application record changes after
it is written (an ``open`` image is closed later); the node's store writes
every change as a new row (``INSERT OR REPLACE``: a new rowid), so the change
comes after the mark and replaces the shipped record by its natural key.

The event path never waits on any of this: elsad's loop only asks
:meth:`Shipper.status`, which returns figures the thread already computed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sqlite3
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from elsa.apps import record
from elsa.central import node_name, schema
from elsa.central.conn import check_url, connect, read_password_file, redact
from elsa.config import Option, non_negative, positive
from elsa.core.usage import PRIORITY_KEY, Gap, load_gaps
from elsa.errors import ElsaError, StoreError
from elsa.logsetup import structlog
from elsa.report.connect import readonly_uri
from elsa.users import user_name

log = structlog.get_logger("elsa.central")

OPTIONS: Dict[str, Option] = {
    "url": Option(str, "", "Central PostgreSQL (libpq URL or 'service=NAME'). Empty: do not "
                  "ship. Put no password here: use password_file or libpq's password file."),
    "password_file": Option(str, "", "File holding the node role's password (root-only, mode "
                            "600). Empty: libpq's own (~/.pgpass, PGPASSFILE, service file)."),
    "host": Option(str, "", "This node's name in the central store (must match its role's "
                   "'elsa central add-node'). Empty: the host name."),
    "batch_rows": Option(int, 20000, "Process rows per shipping transaction.", check=positive),
    "interval": Option(float, 5.0, "Seconds between rounds when nothing is waiting.",
                       check=positive),
    "retry_max": Option(float, 300.0, "Longest wait (seconds) between retries while the "
                        "server fails; the wait doubles from 1 s.", check=positive),
    "keep_local_days": Option(float, 0.0, "Prune SHIPPED records older than this many days "
                              "from the local store (unshipped ones never). 0: keep all.",
                              check=non_negative),
}

MARK_KEY = "central.proc_id"
FOLDED_MARK_KEY = "central.folded_id"
APP_MARK_KEY = "central.app_id"
#: Ended jobs are compared with their shipped snapshot this long after they
#: end: a source's final figures or an incomplete flag may come after the end.
#: (Tags are compared with the shipped ones at any time: store table central_jobs.)
RECHECK_S = 600.0
PRUNE_EVERY_S = 3600.0
_APP_UID = 1 + record.INDEX["uid"]  # in a row read by _read_apps


class Shipper:
    """The shipping thread of one elsad. ``store`` is the daemon's :class:`Store`."""

    def __init__(self, section: Dict[str, Any], store: Any) -> None:
        self.url: str = section["url"]
        self.password_file: str = section["password_file"]
        self.host: str = node_name(section)
        self.batch_rows: int = section["batch_rows"]
        self.interval: float = section["interval"]
        self.retry_max: float = section["retry_max"]
        self.keep_days: float = section["keep_local_days"]
        self.store = store
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elsa-central", daemon=True)
        self._conn: Any = None
        self._local: Optional[sqlite3.Connection] = None
        # Read-ahead of the next batch (its own connection, on the pool's thread).
        self._reader: Optional[sqlite3.Connection] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "elsa-central-read")
        self._ahead: Optional[Tuple[int, concurrent.futures.Future]] = None
        self._mark = 0
        self._folded_mark = 0
        self._app_mark = 0
        self._sigs: Dict[int, str] = {}
        # After a start or an error, a round may re-send rows whose commit this
        # node did not see: then (and on a unique violation) rows go in with
        # ON CONFLICT DO NOTHING; otherwise with a plain INSERT, which costs the
        # server ~40 % less per row (no speculative insertion).
        self._careful = True
        self._last_prune = 0.0
        self._sent_users: Set[int] = set()
        self._sent_prios: Optional[str] = None
        # (source, start) -> end of the gaps the central store holds as they are in the
        # node's store: only new or extended ones are sent. Empty after a start: all are
        # sent once more, an upsert that changes nothing there.
        self._sent_gaps: Dict[Tuple[str, float], float] = {}
        self._backlog_at = -1e9
        self._st: Dict[str, Any] = {
            "enabled": True, "url": redact(self.url), "host": self.host, "connected": False,
            "backlog_records": None, "backlog_jobs": None, "backlog_apps": None,
            "oldest_age_s": None,
            "failing": False, "last_error": None, "last_error_at": None, "last_shipped_at": None,
            "shipped_records": 0, "shipped_jobs": 0, "shipped_apps": 0, "shipped_gaps": 0,
            "rounds": 0,
            "retry_in_s": None,
            "pruned_records": 0,
        }

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> Shipper:
        self._thread.start()
        log.info("central shipping on", url=redact(self.url), host=self.host)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._pool.shutdown(wait=True)
        for c in (self._conn, self._local, self._reader):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass

    def status(self) -> Dict[str, Any]:
        return dict(self._st)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if self._local is None:
                    self._open_local()
                self._backlog()
                if self._conn is None:
                    self._connect()
                more = self._round()
                self._prune()
                self._backlog(every=0.0 if not more else 2.0)
                backoff = 1.0
                self._st["retry_in_s"] = None
                self._st["failing"] = False
                if not more:
                    self._wake.wait(self.interval)
                    self._wake.clear()
            except Exception as exc:
                self._error(exc)
                try:
                    self._backlog(every=0.0)
                except sqlite3.Error:
                    pass  # the figures stay as they were; the next round retries
                self._drop_conn()
                self._careful = True
                self._st["retry_in_s"] = backoff
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, self.retry_max)

    def _error(self, exc: BaseException) -> None:
        msg = exc.message if isinstance(exc, ElsaError) else f"{type(exc).__name__}: {exc}"
        msg = redact(msg.strip())
        if msg != self._st["last_error"] or not self._st["failing"]:
            log.warning("central shipping failed; records stay in the local store",
                        error=msg, url=redact(self.url))
        self._st["last_error"] = msg
        self._st["last_error_at"] = time.time()
        self._st["failing"] = True

    def _drop_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
        self._st["connected"] = False

    def _open_local(self) -> None:
        uri = readonly_uri(self.store.path)
        self._local = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
        self._reader = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
        row = self._local.execute("SELECT value FROM meta WHERE key = ?", (MARK_KEY,)).fetchone()
        self._mark = int(row[0]) if row else 0
        row = self._local.execute("SELECT value FROM meta WHERE key = ?",
                                  (FOLDED_MARK_KEY,)).fetchone()
        self._folded_mark = int(row[0]) if row else 0
        row = self._local.execute("SELECT value FROM meta WHERE key = ?",
                                  (APP_MARK_KEY,)).fetchone()
        self._app_mark = int(row[0]) if row else 0
        self._sigs = dict(self._local.execute("SELECT jid, sig FROM central_jobs"))

    def _connect(self) -> None:
        password = read_password_file(self.password_file) if self.password_file else None
        conn = connect(self.url, what="ship to the central store", password=password,
                       autocommit=False)
        try:
            # "Shipped" must survive a server crash: a site's synchronous_commit =
            # off would acknowledge commits that a crash then loses.
            conn.execute("SET synchronous_commit = on")
            conn.commit()
            try:
                version = schema.schema_version(conn)
            except Exception as exc:
                raise StoreError(
                    f"central store {redact(self.url)}: role {conn.info.user!r} cannot read the "
                    f"schema version ({str(exc).strip()}); is it a node role? ('elsa central "
                    f"add-node {self.host} --role {conn.info.user}')") from exc
            finally:
                conn.rollback()
            if version != schema.VERSION:
                raise StoreError(
                    f"central store {redact(self.url)} is at schema {version}; this node ships "
                    f"schema {schema.VERSION}: run 'elsa central migrate' there (nodes never "
                    "migrate it)")
            mine = conn.execute("SELECT elsa_my_host()").fetchone()[0]
            conn.rollback()
            user = conn.info.user
            if mine is None:
                raise StoreError(
                    f"central store: role {user!r} is not a node role; run 'elsa central "
                    f"add-node {self.host} --role {user}' with an administrator's URL")
            if mine != self.host:
                raise StoreError(
                    f"central store: role {user!r} may write as host {mine!r}, but this node "
                    f"is {self.host!r}; run 'elsa central add-node {self.host} --role {user}' "
                    "or set [central] host")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._st["connected"] = True
        self._sent_users.clear()
        self._sent_prios = None
        log.info("central store connected", url=redact(self.url), host=self.host)

    # -- one round -----------------------------------------------------------------------------
    def _round(self) -> bool:
        """Ship one batch; True when more is waiting."""
        local = self._local
        assert local is not None and self._conn is not None
        rows = None
        if self._ahead is not None:
            after, fut = self._ahead
            self._ahead = None
            got = fut.result()
            if after == self._mark:  # not after a failed round
                rows = got
        local.execute("BEGIN")
        try:
            if rows is None:
                rows = self._read_rows(local, self._mark)
            folded = self._read_folded(local)
            apps = self._read_apps(local, self._app_mark)
            batch_jids = {r[2] for r in rows if r[2] is not None}
            batch_jids |= {r[2] for r in folded if r[2] is not None}
            jobs, usage, sigs = self._changed_jobs(local, batch_jids)
            gaps = self._changed_gaps(local)
        finally:
            local.execute("COMMIT")
        prios = self._priorities(local)
        if not rows and not folded and not jobs and not apps and prios is None and not gaps:
            self._book_jobs(sigs)  # tags set again to what was shipped: nothing to send
            return False
        if len(rows) >= self.batch_rows:
            # Read the next batch while the server works on this one.
            assert self._reader is not None
            self._ahead = (rows[-1][0], self._pool.submit(self._read_rows, self._reader,
                                                           rows[-1][0]))
        uids = ({r[8] for r in rows if r[8] is not None} | {j[2] for j in jobs}
                | {r[3] for r in folded if r[3] is not None}
                | {a[_APP_UID] for a in apps if a[_APP_UID] is not None})
        self._send(rows, jobs, usage, uids - self._sent_users, prios, folded, apps, gaps)
        # PostgreSQL committed: now, and only now, the records count as shipped.
        self._sent_users |= uids
        self._sent_gaps.update(((src, start), end) for src, start, end in gaps)
        if prios is not None:
            self._sent_prios = prios
        if folded:
            self._folded_mark = folded[-1][0]
            self.store.submit("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              (FOLDED_MARK_KEY, str(self._folded_mark)))
        if apps:
            self._app_mark = apps[-1][0]
            self.store.submit("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              (APP_MARK_KEY, str(self._app_mark)))
        if rows:
            self._mark = rows[-1][0]
            self.store.submit("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              (MARK_KEY, str(self._mark)))
        now = self._book_jobs(sigs)
        self._careful = False
        self._st["shipped_records"] += len(rows)
        self._st["shipped_jobs"] += len(jobs)
        self._st["shipped_apps"] += len(apps)
        self._st["shipped_gaps"] += len(gaps)  # new or extended ones (all, after a start)
        self._st["rounds"] += 1
        self._st["last_shipped_at"] = now
        return self.batch_rows <= max(len(rows), len(folded), len(apps))

    def _book_jobs(self, sigs: Dict[int, Tuple[str, str]]) -> float:
        """Record the job snapshots (signature, tags) now central; returns the time."""
        now = time.time()
        if sigs:
            self.store.submit_many(
                "INSERT OR REPLACE INTO central_jobs(jid, sig, shipped, tags) VALUES "
                "(?, ?, ?, ?)", [(j, s, now, t) for j, (s, t) in sigs.items()])
            self._sigs.update((j, s) for j, (s, _) in sigs.items())
        return now

    def _read_rows(self, conn: sqlite3.Connection, after: int) -> List[Sequence[Any]]:
        return conn.execute(f"SELECT id, {', '.join(schema.PROC_COLUMNS)} FROM proc_usage "
                            "WHERE id > ? ORDER BY id LIMIT ?", (after, self.batch_rows)
                            ).fetchall()

    def _read_folded(self, conn: sqlite3.Connection) -> List[Sequence[Any]]:
        """Folded small records ([thresholds]) after their mark."""
        try:
            return conn.execute(f"SELECT id, {', '.join(schema.FOLDED_COLUMNS)} FROM "
                                "proc_folded WHERE id > ? ORDER BY id LIMIT ?",
                                (self._folded_mark, self.batch_rows)).fetchall()
        except sqlite3.OperationalError:  # a store without [thresholds]' table
            return []

    def _read_apps(self, conn: sqlite3.Connection, after: int) -> List[Tuple[Any, ...]]:
        """Application records after their mark, as (id, *record columns). ``open``
        ones too: the node's reports count them, so the site's do; the closed
        record replaces them later."""
        return record.rows_after(conn, after, self.batch_rows, finished_only=False)

    def _changed_jobs(self, local: sqlite3.Connection, batch_jids: Set[int]
                      ) -> Tuple[List[Sequence[Any]], List[Sequence[Any]],
                                 Dict[int, Tuple[str, str]]]:
        """Ended jobs never shipped, recently ended, retagged since shipped, or touched
        by this batch, whose snapshot (job row and usage rows) differs from what was
        shipped. Returns (job rows, usage rows, {jid: (signature, tags)} to book),
        booking also the jobs whose tags came back to the shipped snapshot's."""
        import hashlib  # here, not at the top: OpenSSL's 3.5 MB only in a shipping elsad

        jcols = ", ".join(schema.JOB_COLUMNS)
        # jid -> the tags last shipped (NULL: unknown), for the jobs to compare.
        shipped_tags: Dict[int, Optional[str]] = dict(local.execute(
            "SELECT j.jid, c.tags FROM jobs j LEFT JOIN central_jobs c ON c.jid = j.jid "
            "WHERE j.ended IS NOT NULL AND (j.ended > ? OR c.jid IS NULL "
            "OR c.tags IS NOT j.tags)", (time.time() - RECHECK_S,)))
        cand = list(shipped_tags)
        extra = [j for j in batch_jids if j not in shipped_tags]
        for i in range(0, len(extra), 500):
            part = extra[i:i + 500]
            cand.extend(r[0] for r in local.execute(
                f"SELECT jid FROM jobs WHERE ended IS NOT NULL AND jid IN "
                f"({', '.join('?' * len(part))})", part))
        jobs: List[Sequence[Any]] = []
        usage: List[Sequence[Any]] = []
        sigs: Dict[int, Tuple[str, str]] = {}
        tags_at = schema.JOB_COLUMNS.index("tags")
        ucols = ", ".join(schema.JOB_USAGE_COLUMNS)
        for i in range(0, len(cand), 500):
            part = cand[i:i + 500]
            marks = ", ".join("?" * len(part))
            jrows = {r[0]: r for r in local.execute(
                f"SELECT {jcols} FROM jobs WHERE jid IN ({marks})", part)}
            urows: Dict[int, List[Sequence[Any]]] = {}
            for r in local.execute(f"SELECT {ucols} FROM job_usage WHERE jid IN ({marks}) "
                                   "ORDER BY jid, source", part):
                urows.setdefault(r[0], []).append(r)
            for jid, jr in jrows.items():
                ur = urows.get(jid, [])
                sig = hashlib.sha1(json.dumps([jr, ur], default=str).encode()).hexdigest()
                if self._sigs.get(jid) == sig:
                    if shipped_tags.get(jid, jr[tags_at]) != jr[tags_at]:
                        sigs[jid] = (sig, jr[tags_at])
                    continue
                sigs[jid] = (sig, jr[tags_at])
                jobs.append(jr)
                usage.extend(ur)
        return jobs, usage, sigs

    def _changed_gaps(self, local: sqlite3.Connection) -> List[Gap]:
        """The node's gaps the central store does not hold as they are: new ones, and
        extended ones (a later end under the same source and start)."""
        return [g for g in load_gaps(local) if self._sent_gaps.get(g[:2]) != g[2]]

    def _priorities(self, local: sqlite3.Connection) -> Optional[str]:
        """The node's source priorities (store meta) when not yet sent on this connection."""
        row = local.execute("SELECT value FROM meta WHERE key = ?", (PRIORITY_KEY,)).fetchone()
        if row is None or row[0] == self._sent_prios:
            return None
        return row[0]

    def _send(self, rows: List[Sequence[Any]], jobs: List[Sequence[Any]],
              usage: List[Sequence[Any]], new_uids: Set[int],
              prios: Optional[str] = None, folded: Sequence[Sequence[Any]] = (),
              apps: Sequence[Sequence[Any]] = (), gaps: Sequence[Gap] = ()) -> None:
        conn = self._conn
        host = self.host
        cols = schema.PROC_COLUMNS
        try:
            with conn.transaction():
                # One sender per host at a time: a node restarted after SIGKILL may
                # race the server-side transaction its dead predecessor left open.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("elsa:" + host,))
                if rows:
                    # COPY cannot write a table under row security: stage the batch
                    # in a temporary table (no WAL, no index), then one INSERT.
                    conn.execute("CREATE TEMP TABLE IF NOT EXISTS elsa_stage "
                                 "(LIKE proc_usage) ON COMMIT DELETE ROWS")
                    with conn.cursor().copy(
                            f"COPY elsa_stage (host, {', '.join(cols)}) FROM STDIN") as cp:
                        for r in rows:
                            cp.write_row((host, *r[1:]))
                    conn.execute(f"INSERT INTO proc_usage (host, {', '.join(cols)}) "
                                 f"SELECT host, {', '.join(cols)} FROM elsa_stage"
                                 + (" ON CONFLICT DO NOTHING" if self._careful else ""))
                if folded:
                    fc = schema.FOLDED_COLUMNS
                    with conn.cursor() as cur:
                        cur.executemany(
                            f"INSERT INTO proc_folded (host, id, {', '.join(fc)}) VALUES "
                            f"(%s, {', '.join(['%s'] * (len(fc) + 1))}) "
                            "ON CONFLICT (host, id) DO NOTHING", [(host, *f) for f in folded])
                if apps:
                    self._send_apps(apps)
                if jobs:
                    jc = schema.JOB_COLUMNS
                    with conn.cursor() as cur:
                        cur.executemany(
                            f"INSERT INTO jobs (host, {', '.join(jc)}) VALUES "
                            f"(%s, {', '.join(['%s'] * len(jc))}) ON CONFLICT (host, jid) "
                            "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in jc[1:]),
                            [(host, *j) for j in jobs])
                if usage:
                    uc = schema.JOB_USAGE_COLUMNS
                    with conn.cursor() as cur:
                        cur.executemany(
                            f"INSERT INTO job_usage (host, {', '.join(uc)}) VALUES "
                            f"(%s, {', '.join(['%s'] * len(uc))}) "
                            "ON CONFLICT (host, jid, source) DO UPDATE SET "
                            + ", ".join(f"{c} = excluded.{c}" for c in uc[2:]),
                            [(host, *u) for u in usage])
                if prios is not None:
                    conn.execute("SELECT elsa_merge_priorities(%s)", (prios,))
                if gaps:
                    # An extended gap keeps its key: its end is updated, and only ever
                    # grows (a re-sent older version changes nothing).
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO gaps (host, source, start_time, end_time) VALUES "
                            "(%s, %s, %s, %s) ON CONFLICT (host, source, start_time) DO UPDATE "
                            "SET end_time = excluded.end_time "
                            "WHERE gaps.end_time < excluded.end_time",
                            [(host, *g) for g in gaps])
                if new_uids:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO host_users (host, uid, name) VALUES (%s, %s, %s) "
                            "ON CONFLICT (host, uid) DO UPDATE SET name = excluded.name",
                            [(host, u, user_name(u)) for u in sorted(new_uids)])
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.errors.UniqueViolation) and not self._careful:
                # Rows sent before whose commit this node did not see: skip them.
                self._careful = True
                return self._send(rows, jobs, usage, new_uids, prios, folded, apps, gaps)
            if isinstance(exc, psycopg.errors.DiskFull):
                raise StoreError(f"central store {redact(self.url)}: the server's disk is "
                                 f"full ({str(exc).strip()}); records wait locally") from exc
            if isinstance(exc, psycopg.Error):
                raise StoreError(f"central store {redact(self.url)}: {str(exc).strip()}; "
                                 "records wait locally") from exc
            raise

    def _send_apps(self, apps: Sequence[Sequence[Any]]) -> None:
        """Upsert application records by (host, record key): a re-sent one
        replaces itself, a changed one (closed, figures added) its old version."""
        conn = self._conn
        cols = ", ".join(schema.APP_COLUMNS)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS elsa_stage_apps "
                     f"(LIKE {record.TABLE}) ON COMMIT DELETE ROWS")
        with conn.cursor().copy(f"COPY elsa_stage_apps (host, {cols}) FROM STDIN") as cp:
            for a in apps:
                cp.write_row((self.host, *a[1:]))
        key = ("host", *record.KEY)
        conn.execute(f"INSERT INTO {record.TABLE} (host, {cols}) SELECT host, {cols} FROM "
                     f"elsa_stage_apps ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
                     + ", ".join(f"{c} = excluded.{c}" for c in schema.APP_COLUMNS
                                 if c not in key))

    # -- figures and pruning -------------------------------------------------------------------
    def _backlog(self, every: float = 2.0) -> None:
        # Counting a large backlog takes a while: not on every round while draining.
        now = time.monotonic()
        local = self._local
        if local is None or now - self._backlog_at < every:
            return
        self._backlog_at = now
        local.execute("BEGIN")
        try:
            n, first = local.execute("SELECT COUNT(*), MIN(id) FROM proc_usage WHERE id > ?",
                                     (self._mark,)).fetchone()
            oldest = None
            if first is not None:
                oldest = local.execute("SELECT end_time FROM proc_usage WHERE id = ?",
                                       (first,)).fetchone()[0]
            # Jobs never shipped, or retagged since (their age: never-shipped ones only).
            jobs, jold = local.execute(
                "SELECT COUNT(*), MIN(CASE WHEN c.jid IS NULL THEN j.ended END) FROM jobs j "
                "LEFT JOIN central_jobs c ON c.jid = j.jid WHERE j.ended IS NOT NULL AND "
                "(c.jid IS NULL OR c.tags IS NOT j.tags)").fetchone()
            apps, afirst = local.execute(f"SELECT COUNT(*), MIN(id) FROM {record.TABLE} "
                                         "WHERE id > ?", (self._app_mark,)).fetchone()
            aold = None
            if afirst is not None:
                aold = local.execute(f"SELECT COALESCE(end_time, exec_time) FROM "
                                     f"{record.TABLE} WHERE id = ?", (afirst,)).fetchone()[0]
        finally:
            local.execute("COMMIT")
        olds = [t for t in (oldest, jold, aold) if t is not None]
        self._st["backlog_records"] = n
        self._st["backlog_jobs"] = jobs
        self._st["backlog_apps"] = apps
        self._st["oldest_age_s"] = round(time.time() - min(olds), 1) if olds else None

    def _prune(self) -> None:
        if self.keep_days <= 0 or time.time() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = time.time()
        cutoff = time.time() - self.keep_days * 86400
        local = self._local
        assert local is not None
        # Never the newest row: SQLite would hand its rowid out again, below the mark.
        (n,) = local.execute(
            "SELECT COUNT(*) FROM proc_usage WHERE id <= ? AND end_time < ? AND id < "
            "(SELECT MAX(id) FROM proc_usage)", (self._mark, cutoff)).fetchone()
        self.store.submit("DELETE FROM proc_usage WHERE id <= ? AND end_time < ? AND id < "
                          "(SELECT MAX(id) FROM proc_usage)", (self._mark, cutoff))
        self.store.submit("DELETE FROM proc_folded WHERE id <= ? AND end_time < ? AND id < "
                          "(SELECT MAX(id) FROM proc_folded)", (self._folded_mark, cutoff))
        # Open application records (end_time NULL) stay: elsad carries them on.
        (na,) = local.execute(
            f"SELECT COUNT(*) FROM {record.TABLE} WHERE id <= ? AND end_time < ? AND id < "
            f"(SELECT MAX(id) FROM {record.TABLE})", (self._app_mark, cutoff)).fetchone()
        self.store.submit(f"DELETE FROM {record.TABLE} WHERE id <= ? AND end_time < ? AND "
                          f"id < (SELECT MAX(id) FROM {record.TABLE})", (self._app_mark, cutoff))
        # Jobs whose last snapshot was shipped and no unshipped row refers to.
        done = ("SELECT c.jid FROM central_jobs c JOIN jobs j ON j.jid = c.jid "
                "WHERE j.ended < ? AND c.shipped > j.ended AND NOT EXISTS "
                "(SELECT 1 FROM proc_usage p WHERE p.jid = c.jid AND p.id > ?)")
        for table in ("job_usage", "members", "jobs"):
            self.store.submit(f"DELETE FROM {table} WHERE jid IN ({done})", (cutoff, self._mark))
        self._st["pruned_records"] += n + na
        log.info("pruned shipped records", records=n, app_records=na,
                 older_than_days=self.keep_days)


def check_config(section: Mapping[str, Any], path: str) -> None:
    """What of ``[central]`` can be checked without the server (elsad --check-config
    and start): the URL's syntax and the password file."""
    if not section["url"]:
        return
    check_url(section["url"], f"{path}: key 'central.url'")
    if section["password_file"]:
        read_password_file(section["password_file"], f"{path}: key 'central.password_file':")


def start_shipper(config: Any, store: Any) -> Optional[Shipper]:
    """The composition root's hook: a running shipper when ``[central] url`` is set."""
    from elsa.config import SECTIONS

    if "central" not in SECTIONS:
        return None
    section = dict(config.section("central"))
    if not section["url"]:
        return None
    if os.environ.get("PGPASSWORD"):
        log.warning("PGPASSWORD is set in elsad's environment; prefer [central] password_file")
    return Shipper(section, store).start()
