"""The central PostgreSQL schema: versioned migrations, roles, row security, partitions.

Applied by ``elsa central migrate`` only (a node checks the version and refuses
to ship to a database at another one; it never migrates). Tables mirror the
node's store with a ``host`` column in front of each key, so a record re-sent
after a crash or timeout meets its own key and is skipped.

Roles (created here, NOLOGIN groups; members are made by ``add-node`` and by
the site for readers):

* ``elsa_node``: INSERT (and UPDATE of its own job snapshots, application
  records and gaps) on rows whose host is the caller's, by row-level security keyed by
  ``elsa_nodes`` (login role -> host). No DELETE, no access to other hosts' rows.
* ``elsa_reader``: SELECT on everything.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, List, Optional, Tuple

from elsa.apps import record
from elsa.core.usage import ROLLUP_SUMS, folded_mem_kb_sum
from elsa.errors import ElsaError

#: The rollup's one ON CONFLICT clause: process rows and folded rows add up alike
#: (the central twin of elsa.core.usage.ROLLUP_ACCUMULATE). A sum skips unknowns, as
#: SUM() does: NULL while no record added to it measured the figure (migration 3; until
#: then the columns were NOT NULL and the triggers counted unknowns as 0, where the
#: sums below are the same).
_ROLLUP_ACCUMULATE = (
    "\n        ON CONFLICT (bucket, host, prio, source, uid, comm) DO UPDATE SET\n"
    "            processes = usage_rollup.processes + excluded.processes,\n"
    + "".join(f"            {c} = COALESCE(usage_rollup.{c} + excluded.{c}, usage_rollup.{c},"
              f" excluded.{c}),\n" for c in ROLLUP_SUMS)
    + "            max_rss_kb = GREATEST(usage_rollup.max_rss_kb, excluded.max_rss_kb);\n")


def _rollup_function(name: str, processes: str, mem: str) -> str:
    """The statement trigger function *name* that adds the rows a statement inserted to
    the hourly rollup (migration 3: unknown figures stay NULL); *processes* and *mem*:
    how the table's rows count processes and sum memory."""
    return r"""
    CREATE OR REPLACE FUNCTION """ + name + r"""() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = public AS $$
    BEGIN
        INSERT INTO usage_rollup
        SELECT host, floor(end_time / 3600)::bigint,
               CASE source WHEN 'taskstats' THEN 1 WHEN 'bsdacct' THEN 2 ELSE 9 END,
               source, COALESCE(uid, -1), comm, """ + processes + """,
               sum(cpu_user_us), sum(cpu_system_us), sum(elapsed_us), max(max_rss_kb),
               """ + mem + """, sum(read_bytes), sum(write_bytes), sum(minflt), sum(majflt)
        FROM new_rows GROUP BY 1, 2, 3, 4, 5, 6
    """ + _ROLLUP_ACCUMULATE + r"""
        RETURN NULL;
    END $$;
    """


def _node_rows(*tables: str, may: str) -> str:
    """Row security of tables the nodes write: a node role sees and writes (*may*:
    the statements it needs besides SELECT; never DELETE) only rows whose host
    ``elsa_nodes`` binds to it; the reader role reads every row."""
    out = []
    for t in tables:
        out.append(f"""
    ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;
    CREATE POLICY node_own ON {t} FOR ALL TO elsa_node
        USING (host = (SELECT elsa_my_host())) WITH CHECK (host = (SELECT elsa_my_host()));
    CREATE POLICY reader_all ON {t} FOR SELECT TO elsa_reader USING (true);
    GRANT SELECT, {may} ON {t} TO elsa_node;
    GRANT SELECT ON {t} TO elsa_reader;""")
    return "".join(out) + "\n"


#: Migration i upgrades schema version i -> i+1. Append only.
MIGRATIONS: List[str] = [
    # 1: the accounting tables, roles and policies.
    r"""
    CREATE TABLE elsa_schema (version INTEGER NOT NULL);
    INSERT INTO elsa_schema VALUES (0);
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'elsa_node') THEN
            CREATE ROLE elsa_node NOLOGIN;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'elsa_reader') THEN
            CREATE ROLE elsa_reader NOLOGIN;
        END IF;
    END $$;
    CREATE TABLE elsa_nodes (
        host TEXT PRIMARY KEY,
        role NAME NOT NULL UNIQUE,
        added TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    -- Site-wide settings the reports read, as a node's store has them: the
    -- sources' priorities ('usage.priority', JSON), merged from the nodes.
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    -- The host the connected node role may write as (NULL for anyone else).
    CREATE FUNCTION elsa_my_host() RETURNS TEXT LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public
        AS $$ SELECT host FROM elsa_nodes WHERE role = session_user $$;
    CREATE FUNCTION elsa_merge_priorities(p TEXT) RETURNS void LANGUAGE sql
        SECURITY DEFINER SET search_path = public AS $$
        INSERT INTO meta VALUES ('usage.priority', p) ON CONFLICT (key) DO UPDATE
        SET value = (meta.value::jsonb || excluded.value::jsonb)::text
        WHERE meta.value::jsonb <> (meta.value::jsonb || excluded.value::jsonb) $$;
    CREATE TABLE jobs (
        host TEXT NOT NULL,
        jid BIGINT NOT NULL,
        name TEXT NOT NULL,
        owner_uid INTEGER NOT NULL,
        tags TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        ended DOUBLE PRECISION,
        state TEXT NOT NULL,
        backend TEXT NOT NULL,
        params TEXT NOT NULL,
        PRIMARY KEY (host, jid)
    );
    CREATE INDEX jobs_created ON jobs (created);
    CREATE INDEX jobs_jid ON jobs (jid);
    CREATE TABLE job_usage (
        host TEXT NOT NULL,
        jid BIGINT NOT NULL,
        source TEXT NOT NULL,
        processes BIGINT, cpu_user_us BIGINT, cpu_system_us BIGINT, elapsed_us BIGINT,
        max_rss_kb BIGINT, max_vm_kb BIGINT, read_bytes BIGINT, write_bytes BIGINT,
        read_chars BIGINT, write_chars BIGINT, minflt BIGINT, majflt BIGINT, nvcsw BIGINT,
        nivcsw BIGINT, coremem_kb_us BIGINT, virtmem_kb_us BIGINT,
        incomplete TEXT,
        updated DOUBLE PRECISION,
        extra TEXT,
        PRIMARY KEY (host, jid, source)
    );
    CREATE INDEX job_usage_jid ON job_usage (jid);
    -- Monthly partitions by end_time (epoch seconds): a site drops or archives
    -- a month with DETACH PARTITION. The default partition catches anything
    -- outside the months created so far.
    CREATE TABLE proc_usage (
        host TEXT NOT NULL,
        source TEXT NOT NULL,
        jid BIGINT,
        pid INTEGER NOT NULL,
        start_ticks BIGINT,
        start_time DOUBLE PRECISION,
        end_time DOUBLE PRECISION NOT NULL,
        ppid INTEGER, uid INTEGER, gid INTEGER,
        comm TEXT NOT NULL DEFAULT '',
        exit_code INTEGER,
        cpu_user_us BIGINT, cpu_system_us BIGINT, elapsed_us BIGINT, max_rss_kb BIGINT,
        max_vm_kb BIGINT, read_bytes BIGINT, write_bytes BIGINT, read_chars BIGINT,
        write_chars BIGINT, minflt BIGINT, majflt BIGINT, nvcsw BIGINT, nivcsw BIGINT,
        coremem_kb_us BIGINT, virtmem_kb_us BIGINT,
        extra TEXT,
        UNIQUE NULLS NOT DISTINCT (host, source, pid, start_time, end_time)
    ) PARTITION BY RANGE (end_time);
    CREATE TABLE proc_usage_default PARTITION OF proc_usage DEFAULT;
    CREATE INDEX proc_usage_jid ON proc_usage (jid);
    CREATE INDEX proc_usage_end ON proc_usage (end_time);
    CREATE TABLE usage_rollup (
        host TEXT NOT NULL,
        bucket BIGINT NOT NULL,
        prio INTEGER NOT NULL,
        source TEXT NOT NULL,
        uid INTEGER NOT NULL,
        comm TEXT NOT NULL,
        processes BIGINT NOT NULL,
        cpu_user_us BIGINT NOT NULL,
        cpu_system_us BIGINT NOT NULL,
        elapsed_us BIGINT NOT NULL,
        max_rss_kb BIGINT,
        mem_kb_sum BIGINT NOT NULL,
        read_bytes BIGINT NOT NULL,
        write_bytes BIGINT NOT NULL,
        minflt BIGINT NOT NULL,
        majflt BIGINT NOT NULL,
        PRIMARY KEY (bucket, host, prio, source, uid, comm)
    );
    -- Small process records a node folded ([thresholds]): one row per job,
    -- source, user, command and hour, keyed by the node's own row id.
    CREATE TABLE proc_folded (
        host TEXT NOT NULL,
        id BIGINT NOT NULL,
        source TEXT NOT NULL,
        jid BIGINT, uid INTEGER, gid INTEGER,
        comm TEXT NOT NULL DEFAULT '',
        start_time DOUBLE PRECISION,
        end_time DOUBLE PRECISION NOT NULL,
        folded BIGINT NOT NULL,
        mem_kb_sum BIGINT NOT NULL,
        cpu_user_us BIGINT, cpu_system_us BIGINT, elapsed_us BIGINT,
        read_bytes BIGINT, write_bytes BIGINT, read_chars BIGINT, write_chars BIGINT,
        minflt BIGINT, majflt BIGINT, nvcsw BIGINT, nivcsw BIGINT,
        coremem_kb_us BIGINT, virtmem_kb_us BIGINT,
        max_rss_kb BIGINT, max_vm_kb BIGINT,
        PRIMARY KEY (host, id)
    );
    CREATE INDEX proc_folded_jid ON proc_folded (jid);
    CREATE INDEX proc_folded_end ON proc_folded (end_time);
    -- uid -> name as each node's passwd had it when it shipped.
    CREATE TABLE host_users (
        host TEXT NOT NULL,
        uid INTEGER NOT NULL,
        name TEXT NOT NULL,
        PRIMARY KEY (host, uid)
    );
    -- Site user mapping applied at report time: (host, uid) or (host, user name)
    -- -> site user and account. host '*' matches every host.
    CREATE TABLE user_map (
        host TEXT NOT NULL,
        uid INTEGER,
        user_name TEXT,
        site_user TEXT NOT NULL,
        account TEXT,
        CHECK ((uid IS NULL) <> (user_name IS NULL)),
        UNIQUE NULLS NOT DISTINCT (host, uid, user_name)
    );
    -- The hourly rollup follows inserted rows once per statement (COPY or
    -- INSERT); ON CONFLICT DO NOTHING leaves skipped rows out of new_rows, so
    -- a re-sent record is never counted twice.
    CREATE FUNCTION elsa_rollup() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = public AS $$
    BEGIN
        INSERT INTO usage_rollup
        SELECT host, floor(end_time / 3600)::bigint,
               CASE source WHEN 'taskstats' THEN 1 WHEN 'bsdacct' THEN 2 ELSE 9 END,
               source, COALESCE(uid, -1), comm, count(*),
               sum(COALESCE(cpu_user_us, 0)), sum(COALESCE(cpu_system_us, 0)),
               sum(COALESCE(elapsed_us, 0)), max(max_rss_kb),
               sum(COALESCE(max_rss_kb, max_vm_kb, 0)), sum(COALESCE(read_bytes, 0)),
               sum(COALESCE(write_bytes, 0)), sum(COALESCE(minflt, 0)),
               sum(COALESCE(majflt, 0))
        FROM new_rows GROUP BY 1, 2, 3, 4, 5, 6
    """ + _ROLLUP_ACCUMULATE + r"""
        RETURN NULL;
    END $$;
    CREATE TRIGGER proc_usage_rollup AFTER INSERT ON proc_usage
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION elsa_rollup();
    CREATE FUNCTION elsa_rollup_folded() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = public AS $$
    BEGIN
        INSERT INTO usage_rollup
        SELECT host, floor(end_time / 3600)::bigint,
               CASE source WHEN 'taskstats' THEN 1 WHEN 'bsdacct' THEN 2 ELSE 9 END,
               source, COALESCE(uid, -1), comm, sum(folded),
               sum(COALESCE(cpu_user_us, 0)), sum(COALESCE(cpu_system_us, 0)),
               sum(COALESCE(elapsed_us, 0)), max(max_rss_kb), sum(mem_kb_sum),
               sum(COALESCE(read_bytes, 0)), sum(COALESCE(write_bytes, 0)),
               sum(COALESCE(minflt, 0)), sum(COALESCE(majflt, 0))
        FROM new_rows GROUP BY 1, 2, 3, 4, 5, 6
    """ + _ROLLUP_ACCUMULATE + r"""
        RETURN NULL;
    END $$;
    CREATE TRIGGER proc_folded_rollup AFTER INSERT ON proc_folded
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
        EXECUTE FUNCTION elsa_rollup_folded();

    """ + _node_rows("proc_usage", "proc_folded", may="INSERT")
    + _node_rows("jobs", "job_usage", "host_users", may="INSERT, UPDATE") + r"""
    ALTER TABLE usage_rollup ENABLE ROW LEVEL SECURITY;
    CREATE POLICY reader_all ON usage_rollup FOR SELECT TO elsa_reader USING (true);
    GRANT SELECT ON usage_rollup TO elsa_reader;

    GRANT SELECT ON elsa_schema TO elsa_node, elsa_reader;
    GRANT SELECT ON elsa_nodes, user_map TO elsa_reader;
    GRANT EXECUTE ON FUNCTION elsa_my_host() TO elsa_node;
    REVOKE EXECUTE ON FUNCTION elsa_merge_priorities(TEXT) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION elsa_merge_priorities(TEXT) TO elsa_node;
    GRANT SELECT ON meta TO elsa_reader;
    """,
    # 2: application records (the node's app_runs, elsa/apps/record.py). A record
    # changes after it is first shipped (an open image closed at its exit), so a
    # node may UPDATE its own.
    f"""
    CREATE TABLE {record.TABLE} (
        host TEXT NOT NULL,
        {(',' + chr(10) + '        ').join(f'{n} {t}' for n, t, _ in record.COLUMNS)},
        PRIMARY KEY (host, {', '.join(record.KEY)})
    );
    CREATE INDEX app_runs_exec_time ON {record.TABLE} (exec_time);
    CREATE INDEX app_runs_jid ON {record.TABLE} (jid) WHERE jid IS NOT NULL;
    """ + _node_rows(record.TABLE, may="INSERT, UPDATE"),
]

#: 3: a figure no record measured is NULL in the hourly rollup, never 0 (docs/accounting.md),
#: as on the nodes (store migration 13). The sums the rollup held stay where they can be
#: right: a sum of known figures is the same under both rules, and only a group in which
#: no record measured a figure reads 0 where it should read NULL. Such a 0 becomes NULL
#: where the group's rows are all in the database (their count, proc_usage's and
#: proc_folded's, is the group's processes) and none of them has the figure; where rows
#: are gone (a month's partition detached) it cannot be told from a measured 0 and stays.
_GROUP = "host, floor(end_time / 3600)::bigint AS bucket, source, COALESCE(uid, -1) AS uid, comm"
_ROLLUP_KEY = ("host", "bucket", "source", "uid", "comm")
MIGRATIONS.append(
    "    ALTER TABLE usage_rollup "
    + ", ".join(f"ALTER COLUMN {c} DROP NOT NULL" for c in ROLLUP_SUMS) + ";\n"
    + _rollup_function("elsa_rollup", "count(*)",
                       "sum(COALESCE(max_rss_kb, max_vm_kb))")
    + _rollup_function("elsa_rollup_folded", "sum(folded)",
                       f"sum({folded_mem_kb_sum()})")
    + """
    WITH parts AS (
        SELECT """ + _GROUP + """, count(*) AS n, """ + ", ".join(
            f"sum({c}) AS {c}" if c != "mem_kb_sum" else
            "sum(COALESCE(max_rss_kb, max_vm_kb)) AS mem_kb_sum" for c in ROLLUP_SUMS) + """
        FROM proc_usage GROUP BY 1, 2, 3, 4, 5
        UNION ALL
        SELECT """ + _GROUP + """, sum(folded), """ + ", ".join(
            f"sum({c})" if c != "mem_kb_sum" else f"sum({folded_mem_kb_sum()})"
            for c in ROLLUP_SUMS) + """
        FROM proc_folded GROUP BY 1, 2, 3, 4, 5),
    known AS (
        SELECT """ + ", ".join(_ROLLUP_KEY) + """, sum(n) AS n, """ + ", ".join(
            f"sum({c}) AS {c}" for c in ROLLUP_SUMS) + """
        FROM parts GROUP BY """ + ", ".join(_ROLLUP_KEY) + """)
    UPDATE usage_rollup AS r SET """ + ", ".join(
        f"{c} = CASE WHEN r.{c} = 0 AND k.{c} IS NULL THEN NULL ELSE r.{c} END"
        for c in ROLLUP_SUMS) + """
    FROM known AS k
    WHERE """ + " AND ".join(f"k.{c} = r.{c}" for c in _ROLLUP_KEY) + """
      AND k.n = r.processes AND (""" + " OR ".join(f"r.{c} = 0" for c in ROLLUP_SUMS) + """);
    """)

#: 4: the nodes' gaps (elsa.core.usage, "its gaps": the intervals in which a source missed
#: records), so that the central reports read the hours a gap overlaps process by process
#: as the node's own do. A node upserts its own gaps (an extended gap: the same key, a later
#: end); the end only grows, so a gap re-sent after a restart never shrinks one.
MIGRATIONS.append("""
    CREATE TABLE gaps (
        host TEXT NOT NULL,
        source TEXT NOT NULL,
        start_time DOUBLE PRECISION NOT NULL,
        end_time DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (host, source, start_time)
    );
    """ + _node_rows("gaps", may="INSERT, UPDATE"))

VERSION = len(MIGRATIONS)
MONTHS_AHEAD = 3


def _month_start(year: int, month: int) -> dt.datetime:
    return dt.datetime(year + (month - 1) // 12, (month - 1) % 12 + 1, 1,
                       tzinfo=dt.timezone.utc)


def month_bounds(when: dt.datetime, ahead: int) -> List[Tuple[str, float, float]]:
    """(partition name, start, end) of the month of *when* and *ahead* months after (UTC)."""
    out = []
    for i in range(-1, ahead + 1):
        lo = _month_start(when.year, when.month + i)
        hi = _month_start(when.year, when.month + i + 1)
        out.append((f"proc_usage_{lo:%Y_%m}", lo.timestamp(), hi.timestamp()))
    return out


def schema_version(conn: Any) -> int:
    """The database's schema version (0: never migrated)."""
    row = conn.execute("SELECT to_regclass('elsa_schema') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    return conn.execute("SELECT version FROM elsa_schema").fetchone()[0]


def migrate(conn: Any, months_ahead: int = MONTHS_AHEAD,
            now: dt.datetime = None) -> Tuple[int, int, List[str]]:  # type: ignore[assignment]
    """Bring the database to :data:`VERSION` and create the monthly partitions from
    last month to *months_ahead* ahead. Returns (from, to, partitions created)."""
    with conn.transaction():
        # One migrator at a time (two admins, or cron overlapping a manual run).
        conn.execute("SELECT pg_advisory_xact_lock(7355608)")
        before = schema_version(conn)
        if before > VERSION:
            raise ElsaError(f"central database is at schema {before}, newer than this ELSA "
                            f"({VERSION}); upgrade ELSA on this host")
        for i in range(before, VERSION):
            conn.execute(MIGRATIONS[i])
            conn.execute("UPDATE elsa_schema SET version = %s", (i + 1,))
        created = []
        when = now or dt.datetime.now(dt.timezone.utc)
        for name, lo, hi in month_bounds(when, months_ahead):
            exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]
            if not exists:
                _create_partition(conn, name, lo, hi)
                created.append(name)
    return before, VERSION, created


def _create_partition(conn: Any, name: str, lo: float, hi: float) -> None:
    """The usage partition *name* for [lo, hi). Rows the default partition holds for
    it (a node's clock ahead, months of migrate missed) move into it: PostgreSQL
    refuses to create a partition over them. It is made apart, filled and attached,
    so no insert trigger counts them in the rollup a second time."""
    bounds = f"FOR VALUES FROM ({lo!r}) TO ({hi!r})"
    # No node adds such a row between the move and the attach. The parent first (with
    # its partitions), as a node's INSERT and CREATE ... PARTITION OF lock: no deadlock.
    conn.execute("LOCK TABLE proc_usage IN ACCESS EXCLUSIVE MODE")
    held = conn.execute("SELECT count(*) FROM proc_usage_default WHERE end_time >= %s AND "
                        "end_time < %s", (lo, hi)).fetchone()[0]
    if not held:
        conn.execute(f"CREATE TABLE {name} PARTITION OF proc_usage {bounds}")
        return
    conn.execute(f"CREATE TABLE {name} (LIKE proc_usage INCLUDING DEFAULTS)")
    conn.execute(f"WITH moved AS (DELETE FROM proc_usage_default WHERE end_time >= %s AND "
                 f"end_time < %s RETURNING *) INSERT INTO {name} SELECT * FROM moved", (lo, hi))
    conn.execute(f"ALTER TABLE proc_usage ATTACH PARTITION {name} {bounds}")


_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def add_node(conn: Any, host: str, role: str, password: Optional[str] = None,
             rebind: bool = False) -> Optional[str]:
    """Create login *role* for node *host* (member of elsa_node). A *role* bound to
    another host moves to *host* when *rebind*, and is refused otherwise. Returns
    the host the role moved from (None: it did not move)."""
    if not _ROLE.match(role):
        raise ElsaError(f"role name {role!r}: use lower-case letters, digits and '_' "
                        "(at most 63), starting with a letter")
    from psycopg import sql

    with conn.transaction():
        row = conn.execute("SELECT host FROM elsa_nodes WHERE role = %s FOR UPDATE",
                           (role,)).fetchone()
        was = row[0] if row is not None and row[0] != host else None
        if was is not None:
            if not rebind:
                raise ElsaError(
                    f"role {role} is bound to host {was!r} already (host names that differ "
                    f"only in case, '-' or '.' get the same default role); give host {host!r} "
                    f"a role of its own: --role {role[:55]}_2, say")
            conn.execute("DELETE FROM elsa_nodes WHERE role = %s", (role,))
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        ident = sql.Identifier(role)
        if not exists:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE elsa_node").format(ident))
        else:
            conn.execute(sql.SQL("GRANT elsa_node TO {}").format(ident))
        if password is not None:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(password)))
        conn.execute("INSERT INTO elsa_nodes(host, role) VALUES (%s, %s) ON CONFLICT (host) "
                     "DO UPDATE SET role = excluded.role", (host, role))
    return was


def map_user(conn: Any, host: str, who: str, site_user: str, account: str = None) -> None:  # type: ignore[assignment]
    """Map ``uid@host`` (who is digits) or ``user@host`` to a site user and account."""
    uid = int(who) if who.isdigit() else None
    name = None if uid is not None else who
    with conn.transaction():
        conn.execute("INSERT INTO user_map(host, uid, user_name, site_user, account) "
                     "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (host, uid, user_name) DO UPDATE "
                     "SET site_user = excluded.site_user, account = excluded.account",
                     (host, uid, name, site_user, account))


#: Columns a node ships, per table, at this schema version (the node's own
#: tables may hold more; what is not listed here stays local).
#: Application records: every column of the node's record (the key included).
APP_COLUMNS = record.NAMES
PROC_COLUMNS = ("source", "jid", "pid", "start_ticks", "start_time", "end_time", "ppid", "uid",
                "gid", "comm", "exit_code", "cpu_user_us", "cpu_system_us", "elapsed_us",
                "max_rss_kb", "max_vm_kb", "read_bytes", "write_bytes", "read_chars",
                "write_chars", "minflt", "majflt", "nvcsw", "nivcsw", "coremem_kb_us",
                "virtmem_kb_us", "extra")
FOLDED_COLUMNS = ("source", "jid", "uid", "gid", "comm", "start_time", "end_time", "folded",
                  "mem_kb_sum", "cpu_user_us", "cpu_system_us", "elapsed_us", "read_bytes",
                  "write_bytes", "read_chars", "write_chars", "minflt", "majflt", "nvcsw",
                  "nivcsw", "coremem_kb_us", "virtmem_kb_us", "max_rss_kb", "max_vm_kb")
JOB_COLUMNS = ("jid", "name", "owner_uid", "tags", "created", "ended", "state", "backend",
               "params")
JOB_USAGE_COLUMNS = ("jid", "source", "processes", "cpu_user_us", "cpu_system_us",
                     "elapsed_us", "max_rss_kb", "max_vm_kb", "read_bytes", "write_bytes",
                     "read_chars", "write_chars", "minflt", "majflt", "nvcsw", "nivcsw",
                     "coremem_kb_us", "virtmem_kb_us", "incomplete", "updated", "extra")
