"""Central store (PostgreSQL) speed, same run, against PostgreSQL itself and SQLite.

1. Ingest: one node's shipper sends N process rows from its SQLite store into
   the central store (as its node role: staging COPY, INSERT under row
   security, hourly rollup trigger), against the ceiling: the superuser's
   server-side ``COPY proc_usage FROM 'file'`` of the very same rows into an
   identical empty database. Targets: time ratio <= 2.0 (rate >= 0.5 of COPY)
   and >= 50,000 rows/s.
2. ``elsa summary --by user`` over M process records in PostgreSQL against the
   same report over the same records in a node's SQLite store (both through
   the console script, best of 3). Target: ratio <= 2.0.
3. Application records: one node ships A records (staging COPY, upsert by the
   record's key under row security) against the server's own COPY of the same
   rows into an identical empty database; reported (a node writes a few
   hundred a second at most, elsa/apps).

A private server (initdb/pg_ctl, Debian's postgresql) is started and removed.
The SQLite store of M records is bench_store_summary's (cached); the central
copy is generated inside PostgreSQL with the same formulas and checked equal
(by the two reports' figures), in a cluster kept in the same cache
($ELSA_BENCH_CACHE, default /var/tmp/elsa-bench: 3.6 GB for 10M records).

    sudo python3 benchmarks/bench_central.py [--ingest-rows N] [--records M] [--app-records A]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_pacct_summary import COMMANDS, T0, USERS, best_time, elsa_cmd, row
from bench_store_summary import SECONDS_PER_RECORD, build_store, cached_store

REPRO = "sudo python3 benchmarks/bench_central.py"


def _admin(srv: Any, db: str) -> Any:
    import psycopg

    return psycopg.connect(srv.admin_url.replace("/postgres?", f"/{db}?"), autocommit=True)


def _fresh(srv: Any, db: str) -> None:
    from elsa.central import schema

    with _admin(srv, "postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {db}")
        c.execute(f"CREATE DATABASE {db}")
    with _admin(srv, db) as c:
        schema.migrate(c)


def _ship_all(srv: Any, db: str, store: Any) -> float:
    """Seconds one node's shipper takes to send all of *store* into fresh database *db*."""
    from elsa.central import schema
    from elsa.central.shipper import OPTIONS, Shipper
    from elsa.config import validate_table

    _fresh(srv, db)
    with _admin(srv, db) as c:
        schema.add_node(c, "bench", "elsa_node_bench", "bench-pw")
    sec = validate_table({"url": srv.tcp_url("elsa_node_bench", "bench-pw", db),
                          "host": "bench"}, OPTIONS, where="central", path="<bench>")
    sh = Shipper(sec, store)
    sh._open_local()
    sh._connect()
    t = time.perf_counter()
    while sh._round():
        pass
    took = time.perf_counter() - t
    sh.stop()
    return took


def ingest(srv: Any, n: int) -> List[Dict[str, Any]]:
    from elsa.core.store import Store

    work = tempfile.mkdtemp(prefix="elsa-bench-central-")
    build_store(os.path.join(work, "elsa.db"), n)
    store = Store(work)
    ours = _ship_all(srv, "ingest", store)
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    dump = os.path.join(srv.root, "rows.copy")
    with _admin(srv, "ingest") as c:
        got = c.execute("SELECT count(*) FROM proc_usage").fetchone()[0]
        assert got == n, (got, n)
        c.execute(f"COPY (SELECT * FROM proc_usage) TO '{dump}'")
    _fresh(srv, "ceiling")
    with _admin(srv, "ceiling") as c:
        t = time.perf_counter()
        c.execute(f"COPY proc_usage FROM '{dump}'")
        ceiling = time.perf_counter() - t
    rate = n / ours
    r1 = row(f"central ingest {n:,} rows vs server COPY (time)", ours, ceiling, 2.0, REPRO)
    r1["detail"] = {"rows_per_s": round(rate), "copy_rows_per_s": round(n / ceiling),
                    "rate_ratio": round(ceiling / ours, 3)}
    r2 = {"metric": "central ingest rows/s (one node)", "elsa": round(rate), "peer": None,
          "ratio": None, "target": 50000, "passed": rate >= 50000, "reproduce": REPRO,
          "unit": "rows/s"}
    return [r1, r2]


def _app_rows(n: int) -> Any:
    """*n* ended application records of one boot, three binaries, three users."""
    from elsa.apps import record

    base = time.time() - 86400
    for i in range(n):
        r = dict.fromkeys(record.NAMES)
        path = ("/usr/bin/gcc-12", "/usr/bin/python3.11", "/home/ann/bin/sim")[i % 3]
        r.update(host_id=1, boot_id="bench-boot", pid=1000 + i % 30000, start_ticks=i,
                 exec_ns=i * 1000, hostname="bench", jid=(1 << 32) | (i // 200 + 1), ppid=1,
                 exec_time=base + i * 0.25, end_time=base + i * 0.25 + 1.5,
                 end_reason="exit", exe_path=path, exe_dev=2049, exe_ino=1000 + i % 3,
                 exe_deleted=0, path_status="resolved", comm=path.rsplit("/", 1)[1][:15],
                 uid=1000 + i % 3, euid=1000 + i % 3, gid=100, egid=100, exit_code=0,
                 exit_signal=0, cpu_user_us=i % 997 * 1000, cpu_system_us=i % 89 * 100,
                 max_rss_kb=20000 + i % 5000, read_bytes=i % 7 * 4096,
                 write_bytes=i % 11 * 4096, figures_source="taskstats")
        yield tuple(r.values())


def ingest_apps(srv: Any, n: int) -> List[Dict[str, Any]]:
    from elsa.apps.recorder import INSERT
    from elsa.core.store import Store

    work = tempfile.mkdtemp(prefix="elsa-bench-central-apps-")
    store = Store(work)
    rows = list(_app_rows(n))
    for i in range(0, n, 20000):
        store.submit_many(INSERT, rows[i:i + 20000])
    store.flush()
    ours = _ship_all(srv, "apps", store)
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    dump = os.path.join(srv.root, "apps.copy")
    with _admin(srv, "apps") as c:
        got, size = c.execute("SELECT count(*), pg_total_relation_size('app_runs') "
                              "FROM app_runs").fetchone()
        assert got == n, (got, n)
        c.execute(f"COPY (SELECT * FROM app_runs) TO '{dump}'")
    _fresh(srv, "apps_ceiling")
    with _admin(srv, "apps_ceiling") as c:
        t = time.perf_counter()
        c.execute(f"COPY app_runs FROM '{dump}'")
        ceiling = time.perf_counter() - t
    r = {"metric": f"central ingest {n:,} application records vs server COPY (time)",
         "elsa": round(ours, 4), "peer": round(ceiling, 4), "ratio": round(ours / ceiling, 3),
         "target": "reported", "passed": True, "reproduce": REPRO, "unit": "s",
         "detail": {"records_per_s": round(n / ours), "copy_records_per_s": round(n / ceiling),
                    "bytes_per_record": round(size / n)}}
    return [r]


def summary_server(records: int) -> Any:
    """A started PostgreSQL cluster whose database ``summary`` holds *records*
    generated process rows, kept in the benchmark cache between runs (filling it
    took ~100 s of run_all's budget), keyed by the PostgreSQL major version and
    both store schemas. The caller stops it."""
    from bench_pacct_summary import store_cache_dir

    from elsa.central import schema
    from elsa.central.pgserver import PgServer, pg_bindir

    major = os.path.basename(os.path.dirname(pg_bindir() or "pg"))
    root = store_cache_dir(f"central-{records}-pg{major}-central{schema.VERSION}")
    marker = os.path.join(root, "complete")
    if os.path.exists(marker):
        return PgServer(root=root).start()
    # An interrupted fill starts again; the caches of older schemas go (3.6 GB each).
    for stale in glob.glob(os.path.join(os.path.dirname(root), f"central-{records}-*")):
        shutil.rmtree(stale, ignore_errors=True)
    srv = PgServer(root=root).init().start()
    try:
        t = time.perf_counter()
        fill_summary(srv, records)
        with open(marker, "w") as fh:
            fh.write(f"filled in {time.perf_counter() - t:.1f} s\n")
    except BaseException:
        srv.stop("immediate")
        raise
    return srv


def fill_summary(srv: Any, records: int) -> None:
    """Create database ``summary`` and generate *records* process rows in it with
    bench_store_summary's formulas (checked against its SQLite store by summary())."""
    _fresh(srv, "summary")
    ms = int(SECONDS_PER_RECORD * 1000)
    chunk = 1_000_000

    def load(chunks: List[Tuple[int, int]]) -> None:
        with _admin(srv, "summary") as c:
            for lo, hi in chunks:
                c.execute(f"""
                    INSERT INTO proc_usage(host, source, pid, start_time, end_time, ppid, uid, gid,
                                           comm, exit_code, cpu_user_us, cpu_system_us,
                                           elapsed_us, max_vm_kb, minflt, majflt)
                    SELECT 'bench', 'bsdacct', 1000 + i % 4000000, {T0} + (i * {ms}) / 1000,
                           {T0} + (i * {ms}) / 1000 + (i % 1000) / 100.0, 1,
                           1000 + (i * 7) % {USERS}, 100, 'cmd' || ((i * 13) % {COMMANDS}), 0,
                           (i % 200) * 10000, (i % 50) * 10000, (i % 1000) * 10000,
                           1000 + i % 5000, i % 300, 0
                    FROM generate_series({lo}::bigint, {hi}::bigint) AS i""")

    # Two connections, one per core: 10M rows took 147 s in one, 97 s in two on the
    # 2-core VM. Each loads its half in time order, so statements running at once
    # roll up into different hours and never wait on each other's rollup rows (the
    # one hour the halves share is in the first half's last chunk and the second
    # half's first, which run at opposite ends of the load).
    chunks = [(lo, min(records, lo + chunk) - 1) for lo in range(0, records, chunk)]
    half = (len(chunks) + 1) // 2
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(load, chunks[:half]), pool.submit(load, chunks[half:])]:
            f.result()
    with _admin(srv, "summary") as c:
        c.execute("VACUUM ANALYZE")


def summary(records: int, runs: int) -> List[Dict[str, Any]]:
    db_path = cached_store(records)
    srv = summary_server(records)
    try:
        return summary_rows(srv, db_path, records, runs)
    finally:
        srv.stop()


def summary_rows(srv: Any, db_path: str, records: int, runs: int) -> List[Dict[str, Any]]:
    url = srv.admin_url.replace("/postgres?", "/summary?")
    # Same figures from both stores (users as uid@host centrally: compare by uid).
    outs = []
    for db in (db_path, url):
        out = subprocess.run(elsa_cmd() + ["summary", "--by", "user", "--json", "--db", db],
                             capture_output=True, text=True, check=True).stdout
        outs.append(sorted((r["processes"], r["cpu_user_us"], r["cpu_system_us"])
                           for r in json.loads(out)))
    assert outs[0] == outs[1], "central and SQLite summaries differ"
    sqlite_t = best_time(elsa_cmd() + ["summary", "--by", "user", "--db", db_path], runs)
    pg_t = best_time(elsa_cmd() + ["summary", "--by", "user", "--db", url], runs)
    since, until = T0 + 1800, T0 + int(records * SECONDS_PER_RECORD) // 2 + 1800
    window = ["--since", str(since), "--until", str(until)]
    sqlite_w = best_time(elsa_cmd() + ["summary", "--by", "user", "--db", db_path] + window,
                         runs)
    pg_w = best_time(elsa_cmd() + ["summary", "--by", "user", "--db", url] + window, runs)
    size = f"{records / 1e6:g}M"
    return [row(f"central summary --by user, {size} records vs SQLite", pg_t, sqlite_t, 2.0,
                REPRO),
            row(f"central summary {size}, --since/--until vs SQLite", pg_w, sqlite_w, 2.0,
                REPRO)]


def main(ingest_rows: int = 200_000, records: int = 10_000_000,
         runs: int = 3, app_records: int = 100_000) -> List[Dict[str, Any]]:
    from elsa.central.pgserver import PgServer

    srv = PgServer().init().start()
    try:
        rows = ingest(srv, ingest_rows) + ingest_apps(srv, app_records)
    finally:
        srv.destroy()
    return rows + summary(records, runs)


if __name__ == "__main__":
    from bench_pacct_summary import print_rows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ingest-rows", type=int, default=200_000)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--app-records", type=int, default=100_000)
    a = ap.parse_args()
    rows = main(a.ingest_rows, a.records, a.runs, a.app_records)
    print_rows(rows)
    for r in rows:
        if r.get("detail"):
            print(r["metric"], r["detail"])
