"""Store size saved by [thresholds] on a fork-heavy shell-script day.

Two elsad runs (taskstats source, same workload, fresh state dirs): one
without thresholds, one with ``min_cpu_ms = 10``. The workload is a shell
script that runs short commands in a loop (true, sed, expr, a subshell), the
kind of job that makes most records on a host. Reported: store bytes (after a
WAL checkpoint) and process rows, and the ratio with/without; the totals
(processes, CPU) must be the same kind of figures in both (checked loosely:
two runs of a real workload never use identical CPU).

    sudo python3 benchmarks/bench_thresholds.py [--loops N]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPRO = "sudo python3 benchmarks/bench_thresholds.py"
SCRIPT = """
i=0
while [ $i -lt {loops} ]; do
    true; echo x | sed s/x/y/ >/dev/null; expr $i + 1 >/dev/null; (: subshell)
    i=$((i + 1))
done
"""


def run_once(workdir: Path, loops: int, extra: str) -> Tuple[int, int, int, int]:
    """(store bytes, proc rows, folded rows' records, job processes)."""
    from elsa.testing import DaemonProc, wait_for

    d = DaemonProc(workdir, extra="[sources.taskstats]\n" + extra).start()
    try:
        r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--", "sh", "-c",
                            SCRIPT.format(loops=loops)],
                           env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:"
                                    f"{os.environ['PATH']}"), check=True,
                           capture_output=True, text=True)
        assert r.returncode == 0
        db_path = os.path.join(d.state_dir, "elsa.db")

        seen = {"n": -1, "since": time.monotonic()}

        def settled() -> bool:
            """Every record in, or the count steady for 3 s (records the kernel dropped
            under load never come: the job is then flagged incomplete, not waited for)."""
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT MAX(processes) FROM job_usage").fetchone()
            finally:
                db.close()
            got = row[0] if row and row[0] else 0
            if got != seen["n"]:
                seen.update(n=got, since=time.monotonic())
            return got >= loops * 4 or (got > 0 and time.monotonic() - seen["since"] > 3.0)

        wait_for(settled, 60, what="the job's records in the store")
    finally:
        d.stop()
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("VACUUM")
    rows = db.execute("SELECT COUNT(*) FROM proc_usage").fetchone()[0]
    folded = db.execute("SELECT COALESCE(SUM(folded), 0) FROM proc_folded").fetchone()[0]
    procs = db.execute("SELECT MAX(processes) FROM job_usage").fetchone()[0]
    db.close()
    return os.path.getsize(db_path), rows, folded, procs


def main(loops: int = 1500) -> List[Dict[str, Any]]:
    if os.geteuid() != 0:
        raise SystemExit("needs root (taskstats)")
    with tempfile.TemporaryDirectory(prefix="elsa-bench-thresholds-") as tmp:
        plain = run_once(Path(tmp) / "plain", loops, "")
        folded = run_once(Path(tmp) / "folded", loops, "[thresholds]\nmin_cpu_ms = 10\n")
    ratio = folded[0] / plain[0]
    detail = {"plain": dict(zip(("bytes", "rows", "folded", "processes"), plain)),
              "thresholds": dict(zip(("bytes", "rows", "folded", "processes"), folded))}
    print(detail)
    return [{"metric": f"store bytes, fork-heavy script ({loops * 4} commands), "
                       "min_cpu_ms=10 vs none",
             "elsa": folded[0], "peer": plain[0], "ratio": round(ratio, 3), "target": 1.0,
             "passed": ratio <= 1.0 and folded[3] >= loops * 4, "unit": "bytes",
             "peer_name": "no thresholds", "reproduce": REPRO, "detail": detail}]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=1500)
    a = ap.parse_args()
    for r in main(a.loops):
        print(r)
