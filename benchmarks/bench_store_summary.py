"""`elsa summary --by user` over a store holding 10M process records vs GNU
`sa -m` on the equivalent 10M-record pacct, same run. Target ratio <= 1.0.

The pacct is made by bench_pacct_summary.make_pacct; the store gets the same
records (same formulas) generated inside SQLite and aggregated by the
store's own bulk path (aggregator.bulk_insert), because pushing 10M rows
through Python's sqlite3 binding alone takes minutes. The benchmark checks the
two are equivalent (per-user process counts and CPU totals) before timing.
Both are cached in $ELSA_BENCH_CACHE (default /var/tmp/elsa-bench).

    python3 benchmarks/bench_store_summary.py [--records N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pacct_summary import (
    COMMANDS,
    T0,
    USERS,
    best_time,
    cache_dir,
    elsa_cmd,
    make_pacct,
    print_rows,
    row,
    store_cache_dir,
)

REPRO = "python3 benchmarks/bench_store_summary.py"
SECONDS_PER_RECORD = 0.3


def build_store(path: str, n: int) -> None:
    from elsa.core.aggregator import bulk_insert
    from elsa.report.importer import open_for_import

    if os.path.exists(path):
        os.unlink(path)
    db = open_for_import(path)
    ms = int(SECONDS_PER_RECORD * 1000)
    chunk = 1_000_000
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        sql = f"""
            INSERT INTO proc_usage(source, pid, start_time, end_time, ppid, uid, gid, comm,
                                   exit_code, cpu_user_us, cpu_system_us, elapsed_us,
                                   max_vm_kb, minflt, majflt)
            WITH RECURSIVE c(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM c WHERE i < {hi - 1})
            SELECT 'bsdacct', 1000 + i % 4000000, {T0} + (i * {ms}) / 1000,
                   {T0} + (i * {ms}) / 1000 + (i % 1000) / 100.0, 1,
                   1000 + (i * 7) % {USERS}, 100, 'cmd' || ((i * 13) % {COMMANDS}), 0,
                   (i % 200) * 10000, (i % 50) * 10000, (i % 1000) * 10000,
                   1000 + i % 5000, i % 300, 0
            FROM c"""
        bulk_insert(db, lambda db, sql=sql: db.execute(sql))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("ANALYZE")
    db.close()


def check_equivalent(db_path: str, n: int) -> None:
    import numpy as np

    i = np.arange(n, dtype=np.int64)
    uid = 1000 + (i * 7) % USERS
    want_n = np.bincount(uid - 1000, minlength=USERS)
    want_cpu = np.bincount(uid - 1000, weights=(i % 200) * 10000, minlength=USERS)
    out = subprocess.run(elsa_cmd() + ["summary", "--by", "user", "--json", "--db", db_path],
                         capture_output=True, text=True, check=True).stdout
    got = {r["uid"]: r for r in json.loads(out)}
    for u in range(USERS):
        r = got[1000 + u]
        assert r["processes"] == want_n[u], (u, r["processes"], want_n[u])
        assert r["cpu_user_us"] == int(want_cpu[u]), (u, r["cpu_user_us"], want_cpu[u])


def pacct_and_store(records: int) -> Tuple[str, str]:
    """The cached pacct file and the store of the same *records* (built on first use):
    (pacct path, store path). GNU sa is the peer of every benchmark that uses them."""
    if shutil.which("sa") is None:
        raise SystemExit("GNU sa (Debian/Ubuntu package 'acct') is needed as the peer")
    pacct_path = os.path.join(cache_dir(), f"pacct-{records}.bin")
    if not os.path.exists(pacct_path) or os.path.getsize(pacct_path) != records * 64:
        make_pacct(pacct_path, records, SECONDS_PER_RECORD)
    return pacct_path, cached_store(records)


def cached_store(records: int) -> str:
    """The path of the store of *records* generated process rows, built on first use."""
    db_path = os.path.join(store_cache_dir(f"store-{records}"), "elsa.db")
    marker = db_path + ".complete"
    if not os.path.exists(marker):
        os.makedirs(os.path.dirname(db_path), exist_ok=True)
        t = time.perf_counter()
        build_store(db_path, records)
        with open(marker, "w") as fh:
            fh.write(f"built in {time.perf_counter() - t:.1f} s\n")
    return db_path


def main(records: int = 10_000_000, runs: int = 3) -> List[Dict[str, Any]]:
    pacct_path, db_path = pacct_and_store(records)
    check_equivalent(db_path, records)
    peer = best_time(["sa", "-m", pacct_path], runs)
    elsa = best_time(elsa_cmd() + ["summary", "--by", "user", "--db", db_path], runs)
    rows = [row(f"store {records // 1_000_000}M records, summary --by user", elsa, peer, 1.0,
                REPRO)]
    # A window cutting through hours: the rollup plus the edge rows.
    since, until = T0 + 1800, T0 + int(records * SECONDS_PER_RECORD) // 2 + 1800
    elsa_w = best_time(elsa_cmd() + ["summary", "--by", "user", "--db", db_path,
                                     "--since", str(since), "--until", str(until)], runs)
    rows.append(row(f"store {records // 1_000_000}M, --by user with --since/--until", elsa_w,
                    peer, 1.0, REPRO))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print_rows(main(a.records, a.runs))
