"""The store's schema: its migrations, applied in order.

Migrations are a list of SQL scripts; ``PRAGMA user_version`` says how many
ran. A store newer than this code is refused instead of being misread.
"""

from __future__ import annotations

import sqlite3
import time
from typing import List, Optional

from elsa.apps.record import MIGRATION as APPS_MIGRATION
from elsa.core.thresholds import FOLDED_JOB_TRIGGER, FOLDED_ROLLUP_TRIGGER
from elsa.core.thresholds import MIGRATION as THRESHOLDS_MIGRATION
from elsa.core.usage import (
    JOB_USAGE_ACCUMULATE,
    ROLLUP_ACCUMULATE,
    ROLLUP_SUMS,
    SUM_METRICS,
    folded_mem_kb_sum,
)
from elsa.errors import StoreError
from elsa.kernel import sdnotify
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.store")

#: Schema migrations; index i upgrades user_version i -> i+1. Append only.
#: A job's totals per source follow each per-process row as it is inserted.
JOB_TRIGGER = """
    CREATE TRIGGER proc_usage_job AFTER INSERT ON proc_usage
    WHEN NEW.jid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM meta WHERE key = 'usage.bulk')
    BEGIN
        INSERT INTO job_usage VALUES (
            NEW.jid, NEW.source, 1, NEW.cpu_user_us, NEW.cpu_system_us, NEW.elapsed_us,
            NEW.max_rss_kb, NEW.max_vm_kb, NEW.read_bytes, NEW.write_bytes, NEW.read_chars,
            NEW.write_chars, NEW.minflt, NEW.majflt, NEW.nvcsw, NEW.nivcsw,
            NEW.coremem_kb_us, NEW.virtmem_kb_us, NULL, NEW.end_time, NULL)
        """ + JOB_USAGE_ACCUMULATE + """;
    END;
    """

#: The members table's columns (migration 1; migration 8 rebuilds it with another key).
MEMBERS_COLUMNS = """
        boot_id TEXT NOT NULL,
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        jid INTEGER NOT NULL,
        joined REAL NOT NULL,
        left REAL,                     -- NULL while the process is a live member
        exit_code INTEGER,
        how TEXT NOT NULL,             -- fork | attach | resync | recover
        detached INTEGER NOT NULL DEFAULT 0,"""

#: The jobs table's columns (migration 1, which adds a had_members flag after them;
#: migration 10 rebuilds the table without it).
JOBS_COLUMNS = """
        jid INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        owner_uid INTEGER NOT NULL,
        tags TEXT NOT NULL,            -- JSON object
        created REAL NOT NULL,
        ended REAL,
        state TEXT NOT NULL,
        backend TEXT NOT NULL,
        -- params: JSON object (backend parameters); on its own line, since migration 1
        -- puts a comma after the last column
        params TEXT NOT NULL"""

MIGRATIONS: List[str] = [
    # 1: jobs, membership history, metadata.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE jobs (""" + JOBS_COLUMNS + """,
        had_members INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE members (""" + MEMBERS_COLUMNS + """
        PRIMARY KEY (boot_id, pid, start_ticks, jid)
    );
    CREATE INDEX members_jid ON members(jid);
    CREATE INDEX members_live ON members(left) WHERE left IS NULL;
    """,
    # -- 2: accounting usage (issue 5; owned by elsa/core/aggregator.py) --------------
    # proc_usage: one row per process per source (units: µs, KiB, bytes). The
    # unique key makes re-reading a record after a crash harmless (INSERT OR
    # IGNORE), and the triggers fire only for rows really inserted, so the
    # pre-aggregated usage_rollup (hourly, per uid and command: what
    # `elsa summary --by user|command` reads) and job_usage (per job and source)
    # never count a record twice. The WHEN guard lets a bulk import
    # (aggregator.bulk_insert) aggregate a whole chunk with one GROUP BY instead.
    """
    CREATE TABLE proc_usage (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        jid INTEGER,
        pid INTEGER NOT NULL,
        start_ticks INTEGER,
        start_time REAL,
        end_time REAL NOT NULL,
        ppid INTEGER,
        uid INTEGER,
        gid INTEGER,
        comm TEXT NOT NULL DEFAULT '',
        exit_code INTEGER,
        cpu_user_us INTEGER,
        cpu_system_us INTEGER,
        elapsed_us INTEGER,
        max_rss_kb INTEGER,
        max_vm_kb INTEGER,
        read_bytes INTEGER,
        write_bytes INTEGER,
        read_chars INTEGER,
        write_chars INTEGER,
        minflt INTEGER,
        majflt INTEGER,
        nvcsw INTEGER,
        nivcsw INTEGER,
        coremem_kb_us INTEGER,
        virtmem_kb_us INTEGER,
        extra TEXT
    );
    CREATE UNIQUE INDEX proc_usage_key ON proc_usage(source, pid, start_time, end_time);
    CREATE INDEX proc_usage_jid ON proc_usage(jid) WHERE jid IS NOT NULL;
    CREATE INDEX proc_usage_end ON proc_usage(end_time);
    CREATE INDEX members_pid ON members(pid);
    CREATE TABLE usage_rollup (
        bucket INTEGER NOT NULL,
        prio INTEGER NOT NULL,
        source TEXT NOT NULL,
        uid INTEGER NOT NULL,
        comm TEXT NOT NULL,
        processes INTEGER NOT NULL,
        cpu_user_us INTEGER NOT NULL,
        cpu_system_us INTEGER NOT NULL,
        elapsed_us INTEGER NOT NULL,
        max_rss_kb INTEGER,
        mem_kb_sum INTEGER NOT NULL,
        read_bytes INTEGER NOT NULL,
        write_bytes INTEGER NOT NULL,
        minflt INTEGER NOT NULL,
        majflt INTEGER NOT NULL,
        PRIMARY KEY (bucket, prio, source, uid, comm)
    ) WITHOUT ROWID;
    CREATE TABLE job_usage (
        jid INTEGER NOT NULL,
        source TEXT NOT NULL,
        processes INTEGER,
        cpu_user_us INTEGER,
        cpu_system_us INTEGER,
        elapsed_us INTEGER,
        max_rss_kb INTEGER,
        max_vm_kb INTEGER,
        read_bytes INTEGER,
        write_bytes INTEGER,
        read_chars INTEGER,
        write_chars INTEGER,
        minflt INTEGER,
        majflt INTEGER,
        nvcsw INTEGER,
        nivcsw INTEGER,
        coremem_kb_us INTEGER,
        virtmem_kb_us INTEGER,
        incomplete TEXT,
        updated REAL,
        extra TEXT,
        PRIMARY KEY (jid, source)
    ) WITHOUT ROWID;
    CREATE TRIGGER proc_usage_rollup AFTER INSERT ON proc_usage
    WHEN NOT EXISTS (SELECT 1 FROM meta WHERE key = 'usage.bulk')
    BEGIN
        INSERT INTO usage_rollup VALUES (
            CAST(NEW.end_time / 3600 AS INTEGER),
            CASE NEW.source WHEN 'taskstats' THEN 1 WHEN 'bsdacct' THEN 2 ELSE 9 END,
            NEW.source, COALESCE(NEW.uid, -1), NEW.comm, 1,
            COALESCE(NEW.cpu_user_us, 0), COALESCE(NEW.cpu_system_us, 0),
            COALESCE(NEW.elapsed_us, 0), NEW.max_rss_kb,
            COALESCE(NEW.max_rss_kb, NEW.max_vm_kb, 0),
            COALESCE(NEW.read_bytes, 0), COALESCE(NEW.write_bytes, 0),
            COALESCE(NEW.minflt, 0), COALESCE(NEW.majflt, 0))
        """ + ROLLUP_ACCUMULATE + """;
    END;
    """ + JOB_TRIGGER,
    # -- end of migration 2 (issue 5) ---------------------------------------------------
    # 3: folded small records ([thresholds]; owned by elsa/core/thresholds.py).
    THRESHOLDS_MIGRATION,
    # 4: application records (app_runs; owned by elsa/apps/record.py).
    APPS_MIGRATION,
    # 5: each job-level reading (a cgroup's counters every cgroupstat interval) is also kept
    # as one point of the job's time series: the web job page draws it.
    """
    CREATE TABLE job_samples (
        jid INTEGER NOT NULL,
        t REAL NOT NULL,
        cpu_us INTEGER,                -- CPU used so far (user + system)
        mem_bytes INTEGER,             -- memory in use at t
        PRIMARY KEY (jid, t)
    );
    """,
]


#: Sums skip unknowns (usage.JOB_USAGE_ACCUMULATE): a job's row flagged incomplete before
#: its first record held no figures, and the first records' sums stayed NULL. The job
#: triggers take the clause again, and the rows that lost their figures so are recounted.
_RECOUNT = ("processes",) + SUM_METRICS
JOB_SUMS_MIGRATION = (
    "DROP TRIGGER proc_usage_job;\n" + JOB_TRIGGER
    + "DROP TRIGGER proc_folded_job;\n" + FOLDED_JOB_TRIGGER + """
    UPDATE job_usage SET """ + ", ".join(f"{c} = t.{c}" for c in _RECOUNT) + """
    FROM (SELECT jid, source, COUNT(*) AS processes, """
    + ", ".join(f"SUM({c}) AS {c}" for c in SUM_METRICS) + """
          FROM proc_usage WHERE jid IN (SELECT jid FROM job_usage WHERE processes IS NULL
                                        AND incomplete IS NOT NULL)
          GROUP BY jid, source) AS t
    WHERE job_usage.processes IS NULL AND job_usage.incomplete IS NOT NULL
      AND t.jid = job_usage.jid AND t.source = job_usage.source;
    """)
MIGRATIONS.append(JOB_SUMS_MIGRATION)

#: Every process adds a row to each index of members and proc_usage in the writer's
#: transaction, and an index ordered by pid takes its new entries all over the tree (pids
#: cycle through pid_max), so each commit rewrites a page per few rows where an index in
#: time order rewrites its last pages only. members' primary key (boot_id, pid, ...)
#: already serves every lookup by pid, and proc_usage's unique key leads with end_time,
#: so it serves the time ranges of the reports and billing as well. proc_usage_pid_end
#: serves only the application recorder (migration 9).
#:
#: The per-row triggers that added each proc_usage row to usage_rollup and job_usage go:
#: SQLite sets up a trigger's program for every row inserted even when its WHEN clause
#: is false, which cost the writer's batches a quarter of their insert. Every writer of
#: proc_usage rows adds them to the sums itself, in the same transaction
#: (elsa.core.aggregator.add_to_sums: live_bulk, the store writer's runner for
#: INSERT_PROC; bulk_insert, elsa import-acct's).
MIGRATIONS.append("""
    DROP INDEX members_pid;
    DROP INDEX proc_usage_end;
    DROP INDEX proc_usage_pid_end;
    DROP INDEX proc_usage_key;
    CREATE UNIQUE INDEX proc_usage_key ON proc_usage(end_time, source, pid, start_time);
    DROP TRIGGER proc_usage_rollup;
    DROP TRIGGER proc_usage_job;
    DELETE FROM meta WHERE key = 'usage.bulk';
    """)

#: members' primary key leads with the start instead of the pid: (boot_id, pid, ...) was
#: the one pid-ordered index left (migration 7), and a batch's new rows, whose pids are
#: spread over pid_max, went to as many places in it as the history holds rows per pid.
#: With pid_max 32768 the writer's CPU per process grew from 5 to 11 µs at 650,000 rows
#: and to 17 µs at 2.6 million (docs/accounting.md, "Store writes"); new processes
#: start in time order, so the key now takes them at its end. Lookups by pid go through
#: the start (the stored history: a start window), or through the two partial indexes
#: that split the members by whether they have left: the live ones by pid (few), the
#: others by when they left (a parent alive at its child's start left after it). The
#: few members that left a job alive (detached) have their own index: recovery reads
#: them at every start, which read the boot's whole history through the old key.
MIGRATIONS.append("""
    CREATE TABLE members_by_start (""" + MEMBERS_COLUMNS + """
        PRIMARY KEY (boot_id, start_ticks, pid, jid)
    );
    INSERT INTO members_by_start SELECT * FROM members ORDER BY boot_id, start_ticks;
    DROP TABLE members;
    ALTER TABLE members_by_start RENAME TO members;
    CREATE INDEX members_jid ON members(jid);
    CREATE INDEX members_live ON members(pid) WHERE left IS NULL;
    CREATE INDEX members_left ON members(left, pid) WHERE left IS NOT NULL;
    CREATE INDEX members_detached ON members(boot_id) WHERE detached = 1;
    """)


#: The application recorder takes a process's exit record from the rows the aggregator
#: stores, in memory (elsa/apps/recorder.py), instead of joining proc_usage by pid: the
#: pid-ordered index it built when it started goes, and with it a cost that every
#: process paid at insert, growing with the history (docs/accounting.md, "Store writes").
MIGRATIONS.append("""
    DROP INDEX IF EXISTS proc_usage_pid_end;
    """)

#: Whether a job ever had a member is whether a member row of it exists (member rows are
#: never deleted; Store.running_jobs asks members_jid): the jobs table's own flag, which
#: cost an UPDATE per job, goes. The table is rebuilt because ALTER TABLE ... DROP COLUMN
#: needs SQLite 3.35; the jobs of a store are few next to its process rows.
MIGRATIONS.append("""
    CREATE TABLE jobs_without_flag (""" + JOBS_COLUMNS + """
    );
    INSERT INTO jobs_without_flag
        SELECT jid, name, owner_uid, tags, created, ended, state, backend, params FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_without_flag RENAME TO jobs;
    CREATE INDEX jobs_state ON jobs(state);
    """)


#: Jobs newest first (the web's jobs page, `elsa jobs`' order) read the index instead
#: of sorting every job of the store: the first page of 100,000 jobs took 0.16 s of
#: SQLite's sort on the 2-core machine. One index entry per job; the central store has
#: the same index (elsa/central/schema.py).
MIGRATIONS.append("""
    CREATE INDEX jobs_created ON jobs(created);
    """)


#: The central shipper's bookkeeping (elsa/central/shipper.py), per ended job: the
#: signature of the snapshot shipped, when, and the tags it had. A tag may change at any
#: time after the end (elsa-jobmng tag), and the shipper compares each job's tags with
#: the ones shipped. A store that shipped before has the table already (elsad of schema
#: 11 made it when shipping started), with tags unknown (NULL): its jobs are compared
#: once more.
MIGRATIONS.append("""
    CREATE TABLE IF NOT EXISTS central_jobs
        (jid INTEGER PRIMARY KEY, sig TEXT NOT NULL, shipped REAL NOT NULL);
    ALTER TABLE central_jobs ADD COLUMN tags TEXT;
    """)


#: usage_rollup's figures may be NULL: a figure no record of the group measured (a
#: bsdacct record has no I/O bytes) is unknown, not 0 (docs/accounting.md). Migration 2
#: made them NOT NULL and every writer counted an unknown as 0; SQLite cannot drop a
#: constraint, so the table is rebuilt (one row per hour, source, uid and command).
#:
#: The figures it held stay where they can be right: a sum of known figures is the
#: same under both rules, and only a group in which no record measured a figure reads
#: 0 where it should read NULL. So a 0 becomes NULL where the group's records are all
#: still in the store (their count, proc_usage's and proc_folded's, is the group's
#: processes) and none of them has the figure; where records were pruned
#: ([central] keep_local_days) a 0 cannot be told from a measured 0 and stays. That
#: takes one GROUP BY over the rollup's rows and the records together: one sort, where
#: grouping the records apart and joining them to the rollup took 58 s against 33 s
#: (3 million records in 2.8 million groups, on the development VM). A
#: record brings only whether it has each figure (0 or 1, which SQLite stores in no
#: bytes). Rows the per-row triggers of schemas 2 to 6 filed under their source's
#: priority merge into the one priority add_to_sums files under (0; not read: reports
#: rank sources by their specs' priority).
_ROLLUP_FIGURES = ("cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb", "mem_kb_sum",
                   "read_bytes", "write_bytes", "minflt", "majflt")  # the table's order


def _records_part(table: str, count: str, mem: str) -> str:
    """The rollup key of each record of *table*, how many processes it stands for, and
    whether it has each summed figure (*mem*: its memory figure)."""
    has = ", ".join(f"{mem if c == 'mem_kb_sum' else c} IS NOT NULL" for c in ROLLUP_SUMS)
    return (f"SELECT CAST(end_time / 3600 AS INTEGER), source, COALESCE(uid, -1), comm, "
            f"NULL, {', '.join(['NULL'] * len(_ROLLUP_FIGURES))}, {count}, {has} FROM {table}")


def _rebuilt_figure(c: str) -> str:
    if c not in ROLLUP_SUMS:
        return f"MAX({c})"
    return (f"CASE WHEN SUM({c}) = 0 AND SUM(n) = SUM(processes) AND SUM(has_{c}) = 0 "
            f"THEN NULL ELSE SUM({c}) END")


NULLABLE_ROLLUP_MIGRATION = ("""
    DROP TRIGGER proc_folded_rollup;
    CREATE TABLE usage_rollup_nullable (
        bucket INTEGER NOT NULL,
        prio INTEGER NOT NULL,
        source TEXT NOT NULL,
        uid INTEGER NOT NULL,
        comm TEXT NOT NULL,
        processes INTEGER NOT NULL,
        cpu_user_us INTEGER,
        cpu_system_us INTEGER,
        elapsed_us INTEGER,
        max_rss_kb INTEGER,
        mem_kb_sum INTEGER,
        read_bytes INTEGER,
        write_bytes INTEGER,
        minflt INTEGER,
        majflt INTEGER,
        PRIMARY KEY (bucket, prio, source, uid, comm)
    ) WITHOUT ROWID;
    INSERT INTO usage_rollup_nullable
    SELECT bucket, 0, source, uid, comm, SUM(processes), """ + ", ".join(
        _rebuilt_figure(c) for c in _ROLLUP_FIGURES) + """
    FROM (SELECT bucket, source, uid, comm, processes, """ + ", ".join(_ROLLUP_FIGURES) + """,
                 0 AS n, """ + ", ".join(f"NULL AS has_{c}" for c in ROLLUP_SUMS) + """
          FROM usage_rollup
          UNION ALL """ + _records_part("proc_usage", "1", "COALESCE(max_rss_kb, max_vm_kb)")
    + """
          UNION ALL """ + _records_part("proc_folded", "folded", folded_mem_kb_sum()) + """)
    GROUP BY bucket, source, uid, comm
    HAVING COUNT(processes) > 0;
    DROP TABLE usage_rollup;
    ALTER TABLE usage_rollup_nullable RENAME TO usage_rollup;
    """ + FOLDED_ROLLUP_TRIGGER)
MIGRATIONS.append(NULLABLE_ROLLUP_MIGRATION)


def migrate(db: sqlite3.Connection, path: str, target: Optional[int] = None) -> None:
    """Bring the store *db* (at *path*) to the current schema, one transaction
    per migration. Used by the daemon's :class:`Store` and by ``elsa
    import-acct``, which opens the store without a writer thread. *target*: stop
    at that schema instead (the tests and benchmarks that compare with an older one)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StoreError(f"store {path} has schema version {version} but this ELSA "
                         f"knows only up to {len(MIGRATIONS)}; upgrade ELSA or point "
                         "state_dir elsewhere")
    for i in range(version, len(MIGRATIONS) if target is None else target):
        db.execute("BEGIN IMMEDIATE")  # outside the try: nothing to roll back if it fails
        db.set_progress_handler(_StartTimeout(f"migrating store {path} to schema {i + 1}"),
                                10_000)
        try:
            for stmt in _split_sql(MIGRATIONS[i]):
                db.execute(stmt)
            db.execute(f"PRAGMA user_version = {i + 1}")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.execute("ROLLBACK")
            raise StoreError(f"store {path}: migration to schema {i + 1} failed: "
                             f"{exc}") from None
        finally:
            db.set_progress_handler(None, 0)
        log.info("store migrated", path=path, schema=i + 1)


#: A migration that rewrites a table takes seconds per million rows (migration 8 on
#: members: 3.6 s for one million, 11.6 s for three million on the development VM), and
#: systemd kills a Type=notify service that has not sent READY=1 within TimeoutStartSec
#: (90 s by default), in the middle of the transaction, again at every restart. While a
#: migration runs elsad asks for more time (sd_notify(3) EXTEND_TIMEOUT_USEC) every
#: EXTEND_EVERY_S; elsewhere (no $NOTIFY_SOCKET) this sends nothing.
EXTEND_EVERY_S = 10.0
EXTEND_BY_S = 60


class _StartTimeout:
    """SQLite progress handler: the start-up time extension, at most every EXTEND_EVERY_S."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.sent = -EXTEND_EVERY_S

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self.sent >= EXTEND_EVERY_S:
            self.sent = now
            sdnotify.notify(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_S * 1_000_000}",
                            f"STATUS={self.status}")
        return 0  # go on


def _split_sql(script: str) -> List[str]:
    # executescript() would COMMIT our transaction; split into statements
    # ourselves. sqlite3.complete_statement() knows that the ';' inside a
    # trigger's BEGIN ... END does not end the CREATE TRIGGER (migration 2).
    out: List[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return [s for s in out if s.rstrip(";").strip()]
