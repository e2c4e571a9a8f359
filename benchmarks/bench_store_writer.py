#!/usr/bin/env python3
"""The store writer's CPU per process as the history grows (issue 18).

Every process of a job leaves the store writer a ``members`` row and a
``proc_usage`` row. A store keeps its history for months (a busy server's
month is about 10 million processes), so what a batch costs must not grow with
what the store already holds. This benchmark runs the writer's own statements
(``INSERT_MEMBER``, and ``INSERT_PROC`` through its runner, which adds the rows
to the sums) on a connection opened as elsad opens the store, in batches of
2,000 processes (a fork storm's 0.25 s batch), with pids handed out in
sequence and wrapping at 32768 as the kernel does on this machine's
``pid_max``. It measures the writer's CPU per process on a new store and on
one with ``--history`` processes, their batches alternating (a VM's speed
drifts between minutes), for the current schema and for schema 7, whose
members key began with the pid (the peer: the same statements, the key
before migration 8).

Rows: the current schema's CPU per process with the history against a new
store (target <= 1.25: the cost does not grow with the history), against
schema 7 with the same history (reported), and how long the schema-7 store
then takes to upgrade (reported: elsad's first start after an upgrade).

    python3 benchmarks/bench_store_writer.py                 # 1,000,000 of history
    python3 benchmarks/bench_store_writer.py --history 3000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from elsa.core.aggregator import INSERT_PROC, proc_row  # noqa: E402
from elsa.core.schema import MIGRATIONS, migrate  # noqa: E402
from elsa.core.store import INSERT_MEMBER, connect, execute_writes  # noqa: E402
from elsa.core.usage import UsageRecord  # noqa: E402

TARGET = 1.25
BATCH = 2000
PID_MAX = 32768
#: Batches measured on each store, alternating; their CPU is summed (auto-checkpoints
#: included).
MEASURED = 10
BOOT = "5f0c3a52-8d1e-4c6b-9a7e-2b4d6f8a0c1e"
REPRODUCE = "python3 benchmarks/bench_store_writer.py"


class Writer:
    """A store of one schema version and the next processes to write into it."""

    def __init__(self, path: str, version: int) -> None:
        self.db = connect(path)
        migrate(self.db, path, target=version)
        self.n = 0

    def batch(self, size: int = BATCH) -> Tuple[List[Sequence[Any]], List[Sequence[Any]]]:
        members: List[Sequence[Any]] = []
        rows: List[Sequence[Any]] = []
        for _ in range(size):
            i = self.n
            self.n += 1
            pid = 300 + i % (PID_MAX - 300)
            start = 1_000_000 + i
            t = 1_800_000_000.0 + i / 8000  # a fork storm's 8,000 processes a second
            members.append((BOOT, pid, start, 7, t, "fork", t + 0.001, 0, 0))
            rows.append(proc_row(UsageRecord(
                "taskstats", pid, start_ticks=start, ppid=pid - 1, uid=65534, gid=65534,
                comm="stress-ng-fork", start_time=t, end_time=t + 0.001, exit_code=0,
                cpu_user_us=10, cpu_system_us=200, elapsed_us=1000, max_rss_kb=3000,
                max_vm_kb=40000, read_bytes=0, write_bytes=0, read_chars=120, write_chars=0,
                minflt=50, majflt=0, nvcsw=1, nivcsw=0, coremem_kb_us=100,
                virtmem_kb_us=1000), 7))
        return members, rows

    def commit(self, members: List[Sequence[Any]], rows: List[Sequence[Any]]) -> None:
        """One batch as the store writer commits it (Store._commit_batch)."""
        self.db.execute("BEGIN")
        self.db.executemany(INSERT_MEMBER, members)
        execute_writes(self.db, INSERT_PROC, rows)
        self.db.execute("COMMIT")

    def grow(self, history: int) -> None:
        """Unmeasured: write processes until the store holds *history* of them."""
        while self.n < history:
            self.commit(*self.batch(min(20 * BATCH, history - self.n)))

    def batch_cpu_us(self) -> float:
        """CPU µs of committing one batch of new processes."""
        members, rows = self.batch()
        t0 = time.process_time()
        self.commit(members, rows)
        return (time.process_time() - t0) * 1e6


def measure(version: int, history: int, work: str) -> Tuple[float, float, float]:
    """(CPU µs per process on a new store, after *history* processes, seconds the
    migrations to the current schema then take) for *version*.

    The two stores' batches alternate, so that both figures are taken under the
    same machine speed (on a VM it drifts between minutes by more than the
    target's margin)."""
    new = Writer(os.path.join(work, f"schema{version}-new.db"), version)
    path = os.path.join(work, f"schema{version}.db")
    w = Writer(path, version)
    try:
        new.grow(20 * BATCH)
        w.grow(history)
        fresh = grown = 0.0
        for _ in range(MEASURED):
            fresh += new.batch_cpu_us()
            grown += w.batch_cpu_us()
        t0 = time.monotonic()
        migrate(w.db, path)  # what the first start of this ELSA does to that store
        return fresh / (MEASURED * BATCH), grown / (MEASURED * BATCH), time.monotonic() - t0
    finally:
        new.db.close()
        w.db.close()


def run(history: int = 1_000_000) -> List[Dict[str, Any]]:
    work = tempfile.mkdtemp(prefix="elsa-bench-writer-")
    t0 = time.monotonic()
    try:
        fresh, grown, _ = measure(len(MIGRATIONS), history, work)
        old_fresh, old_grown, upgrade = measure(7, history, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    detail = {"history": history, "batch": BATCH, "pid_max": PID_MAX,
              "schema": len(MIGRATIONS), "new_store_us": round(fresh, 2),
              "with_history_us": round(grown, 2), "schema7_new_store_us": round(old_fresh, 2),
              "schema7_with_history_us": round(old_grown, 2),
              "upgrade_from_schema7_s": round(upgrade, 2),
              "benchmark_seconds": round(time.monotonic() - t0, 1),
              "sqlite": sqlite3.sqlite_version}
    hist = f"{history:,}"
    growth = grown / fresh
    return [
        {"metric": f"store writer CPU per process with {hist} processes of history vs a new "
                   f"store (members + proc_usage rows, batches of {BATCH:,}, pids wrapping at "
                   f"{PID_MAX})",
         "unit": "µs", "elsa": round(grown, 2), "peer": round(fresh, 2),
         "peer_name": "new store", "ratio": round(growth, 3), "target": f"<= {TARGET}",
         "passed": growth <= TARGET, "reproduce": REPRODUCE, "detail": detail},
        {"metric": f"store writer CPU per process with {hist} processes of history vs "
                   "schema 7 (members keyed by pid first)",
         "unit": "µs", "elsa": round(grown, 2), "peer": round(old_grown, 2),
         "peer_name": "schema 7", "ratio": round(grown / old_grown, 3), "target": None,
         "passed": True, "reproduce": REPRODUCE, "detail": detail},
        {"metric": f"upgrade of that schema-7 store ({hist} processes) to schema "
                   f"{len(MIGRATIONS)} at elsad's first start (members rewritten)",
         "unit": "s", "elsa": round(upgrade, 2), "peer": None, "ratio": None,
         "target": None, "passed": True, "reproduce": REPRODUCE, "detail": detail},
    ]


def main(argv: Sequence[str] = ()) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--history", type=int, default=1_000_000,
                    help="processes already in the store (default 1,000,000)")
    args = ap.parse_args(list(argv))
    rows = run(args.history)
    for r in rows:
        verdict = "" if r["target"] is None else (
            f" (target {r['target']}: {'PASS' if r['passed'] else 'FAIL'})")
        vs = "" if r["peer"] is None else f" vs {r['peer']}"
        ratio = "" if r["ratio"] is None else f", ratio {r['ratio']}"
        print(f"{r['metric']}: {r['elsa']}{vs} {r['unit']}{ratio}{verdict}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
