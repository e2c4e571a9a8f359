"""PostgreSQL fixture and helpers shared by the central store tests."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from elsa.apps import record
from elsa.apps.recorder import INSERT as INSERT_APP
from elsa.central import schema
from elsa.central.pgserver import PgServer
from elsa.central.shipper import OPTIONS, Shipper
from elsa.config import validate_table
from elsa.core.aggregator import INSERT_PROC
from elsa.core.model import Job
from elsa.core.store import Store
from elsa.core.thresholds import INSERT_FOLDED
from elsa.testing import wait_for

psycopg = pytest.importorskip("psycopg")

NOW = time.time()


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    srv = PgServer().init().start()
    try:
        with psycopg.connect(srv.admin_url, autocommit=True) as c:
            schema.migrate(c)
        yield srv
    finally:
        srv.destroy()


def admin(pg: PgServer, db: str = "postgres") -> Any:
    return psycopg.connect(pg.admin_url.replace("/postgres?", f"/{db}?"), autocommit=True)


def add_node(pg: PgServer, host: str, db: str = "postgres") -> str:
    role = f"elsa_node_{host}"
    with admin(pg, db) as c:
        schema.add_node(c, host, role, f"pw-{host}")
    return pg.tcp_url(role, f"pw-{host}", db)


def fresh_db(pg: PgServer, name: str) -> None:
    with admin(pg) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name}")
        c.execute(f"CREATE DATABASE {name}")
    with admin(pg, name) as c:
        schema.migrate(c)


def assert_reader_reads_only(pg: PgServer, db: str, table: str, rows: int,
                             update: str) -> None:
    """A member of elsa_reader sees the *rows* of every host in *table* and may change
    none of them (*update*: a statement that tries)."""
    role = f"{db}_reader"
    with admin(pg, db) as c:
        c.execute(f"DROP ROLE IF EXISTS {role}")
        c.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'r' IN ROLE elsa_reader")
    with psycopg.connect(pg.tcp_url(role, "r", db), autocommit=True) as r:
        assert r.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == rows
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            r.execute(update)


def fill_store(state: Path, seed: int, jobs: int = 5, procs: int = 300) -> Store:
    rnd = random.Random(seed)
    st = Store(str(state))
    base = NOW - 3 * 86400
    for j in range(jobs):
        jid = (seed << 32) | (j + 1)
        created = base + j * 7200
        st.insert_job(Job(jid=jid, name=f"job{j}", owner_uid=1000 + j % 2,
                          tags=(("queue", "q" + str(j % 2)),), created=created, ended=None,
                          state="running", backend="cnproc"))
        rows = []
        for p in range(procs):
            end = created + rnd.uniform(1, 7000)
            rows.append(("taskstats", jid, 1000 + p, p, end - 1.5, end, 1, 1000 + p % 3, 100,
                         rnd.choice(["cc1", "make", "sh"]), 0, rnd.randrange(10**6),
                         rnd.randrange(10**5), 1_500_000, rnd.randrange(1, 10**5), 20000,
                         rnd.randrange(10**6), rnd.randrange(10**6), 0, 0, 5, 0, 1, 1, None,
                         None, None))
        st.submit_many(INSERT_PROC, rows)
        # Small records folded by [thresholds]: one row per job, source, user, command, hour.
        st.submit_many(INSERT_FOLDED, [
            ("taskstats", jid, 1000 + k, 100, "tiny", created + 60 * k, created + 60 * k + 1,
             10 + k, 500, 1000 * k, 200, 3000, 1, 2, 0, 0, 5, 0, 1, 1, None, None, 300, None)
            for k in range(3)])
        st.end_job(jid, created + 7100, "ended")
    st.flush()
    return st


def app_row(seed: int, i: int, jids: Sequence[Optional[int]] = (None,), open_: bool = False,
            **over: Any) -> Tuple[Any, ...]:
    """One application record (elsa/apps/record.py columns) of node *seed*. Times
    are multiples of 1/4 s so sums are exact in both stores."""
    rnd = random.Random(seed * 100003 + i)
    path, pkg = rnd.choice([("/usr/bin/gcc-12", ("gcc-12", "12.2.0-14")),
                            ("/usr/bin/python3.11", ("python3.11", "3.11.2-6")),
                            ("/home/ann/bin/sim", (None, None)), (None, (None, None))])
    exec_time = round(NOW - 3 * 86400 + rnd.randrange(4 * 86400)) + rnd.randrange(4) / 4
    row = {n: None for n in record.NAMES}
    row.update(host_id=seed, boot_id=f"boot-{seed}", pid=1000 + i, start_ticks=5000 + i,
               exec_ns=10**9 * i + 7, hostname=f"h{seed}", jid=rnd.choice(list(jids)),
               ppid=1, exec_time=exec_time, exe_path=path,
               path_status="resolved" if path else "gone",
               comm=(path or "/x/mystery").rsplit("/", 1)[1][:15], uid=1000 + rnd.randrange(3),
               euid=1000, gid=100, egid=100, package=pkg[0], package_version=pkg[1])
    if open_:
        row.update(end_reason="open")
    else:
        row.update(end_time=exec_time + rnd.randrange(1, 4000) / 4, end_reason="exit",
                   exit_code=0, exit_signal=0, cpu_user_us=rnd.randrange(10**7),
                   cpu_system_us=rnd.randrange(10**6), max_rss_kb=rnd.randrange(1, 10**6),
                   read_bytes=rnd.randrange(10**8), write_bytes=rnd.randrange(10**8),
                   figures_source="taskstats")
    row.update(over)
    return tuple(row.values())


def fill_apps(store: Store, seed: int, n: int, jids: Sequence[Optional[int]] = (None,),
              open_every: int = 10) -> List[Tuple[Any, ...]]:
    """*n* application records through the recorder's own statement; every
    *open_every*-th one still open (an image running when elsad stopped)."""
    rows = [app_row(seed, i, jids, open_=i % open_every == 0) for i in range(n)]
    store.submit_many(INSERT_APP, rows)
    store.flush()
    return rows


def shipper(store: Store, url: str, host: str, **kw: Any) -> Shipper:
    sec = validate_table({"url": url, "host": host, "interval": 0.2, "retry_max": 1.0, **kw},
                         OPTIONS, where="central", path="<test>")
    return Shipper(sec, store)


def drained(sh: Shipper) -> bool:
    s = sh.status()
    return (s["backlog_records"] == 0 and s["backlog_jobs"] == 0 and s["backlog_apps"] == 0
            and not s["failing"])


def ship_all(store: Store, url: str, host: str, **kw: Any) -> Dict[str, Any]:
    """Ship *store* to *url* as node *host* until nothing is left, then stop;
    the shipper's last status."""
    sh = shipper(store, url, host, **kw).start()
    try:
        wait_for(lambda: drained(sh), 30, what="the backlog to drain")
    finally:
        sh.stop()
    return sh.status()


def central_job_totals(pg: PgServer, db: str = "postgres") -> Dict[Tuple[str, int], Tuple]:
    with admin(pg, db) as c:
        return {(h, j): (n, cu, cs) for h, j, n, cu, cs in c.execute(
            "SELECT host, jid, count(*), sum(cpu_user_us), sum(cpu_system_us) "
            "FROM proc_usage GROUP BY host, jid")}


def local_job_totals(store: Store, host: str) -> Dict[Tuple[str, int], Tuple]:
    return {(host, j): (n, cu, cs) for j, n, cu, cs in store.db.execute(
        "SELECT jid, count(*), sum(cpu_user_us), sum(cpu_system_us) FROM proc_usage "
        "GROUP BY jid")}
