#!/usr/bin/env python3
"""elsad's CPU per 1,000 workload processes, per thread (issue 6).

Runs bench_overhead's three workloads (``--reps`` rounds) in a job of one
elsad with the given sources and prints the CPU seconds each elsad thread
(event loop "main", store writer) used per 1,000 member processes, and per
1,000 processes on the whole machine (taskstats records: other users'
processes cost elsad too). ``--sources ''`` gives the event path alone
(cn_proc, membership, member rows); ``--pyspy FILE`` / ``--perf FILE`` record
a profile meanwhile (py-spy's sampling inflates elsad's CPU several times:
use it for proportions only). Not a pass/fail benchmark (hence not
``bench_*``): the tool behind the per-stage figures in docs/accounting.md.

Run it from a directory without another ``elsa`` package: ``python -m``
puts the working directory first on elsad's path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_overhead as bo

from elsa.kernel.procfs import ProcFS  # bench_overhead put the repository on the path


def thread_cpu(pid: int) -> Dict[str, float]:
    """CPU seconds of each thread of *pid* ("main" for the event loop)."""
    return {"main" if tid == pid else f"thread:{tid}": u + s
            for tid, (u, s) in ProcFS().thread_cpu(pid).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", default=",".join(bo.ALL_SOURCES))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--fork-ops", type=int, default=5000)
    ap.add_argument("--exec-ops", type=int, default=300)
    ap.add_argument("--loops", type=int, default=2000)
    ap.add_argument("--backend", default="cgroup2", choices=("cgroup2", "cnproc"))
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--pyspy", default="", help="py-spy raw output file")
    ap.add_argument("--perf", default="", help="perf record output file")
    ap.add_argument("--cprofile", default="",
                    help="cProfile output file of elsad's event thread (inflates its CPU)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("profile_overhead: needs root")
    sources = [s for s in a.sources.split(",") if s]
    work = tempfile.mkdtemp(prefix="elsa-prof-")
    os.chmod(work, 0o755)
    mount = bo._cgroup2_mount()
    base: Optional[str] = (f"{mount}/elsa-prof-{os.getpid()}"
                           if mount and a.backend == "cgroup2" else None)
    d = bo.Elsad(work, a.backend, base, sources, a.nice)
    d.cprofile = os.path.abspath(a.cprofile) if a.cprofile else ""
    d.start()
    rec = None
    try:
        assert d.proc is not None
        bo.wait_quiet(d)
        with d.client() as c:
            st0 = c.status()
        cpu0 = thread_cpu(d.proc.pid)
        if a.pyspy:
            rec = subprocess.Popen(["py-spy", "record", "-p", str(d.proc.pid), "-f", "raw",
                                    "-o", a.pyspy, "-r", "200", "--threads"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif a.perf:
            rec = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-p",
                                    str(d.proc.pid), "-o", a.perf],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls = []
        for _ in range(a.reps):
            for _name, cmd in bo.workloads(a.fork_ops, a.exec_ops, a.loops):
                walls.append(round(bo.run_once(cmd, d), 2))
        bo.wait_quiet(d)
        # Records still held or queued for the writer: let them settle.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with d.client() as c:
                st1 = c.status()
            if not st1["sources"].get("aggregator", {}).get("held_now"):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # the writer's last batch
        with d.client() as c:
            st1 = c.status()
        cpu1 = thread_cpu(d.proc.pid)
        if rec is not None:
            rec.send_signal(2)
            rec.wait(60)
    finally:
        d.stop()
        if base:
            bo._rmtree_cgroup(base)
        shutil.rmtree(work, ignore_errors=True)
    procs = st1["counters"]["member_forks"] - st0["counters"]["member_forks"]
    ts = st1["sources"].get("taskstats", {}).get("records", 0) - st0["sources"].get(
        "taskstats", {}).get("records", 0)
    print(f"workload walls {walls}; member processes {procs}; "
          f"proc events {st1['events'] - st0['events']}; taskstats records {ts}")
    total = 0.0
    for k in sorted(cpu1):
        dv = cpu1[k] - cpu0.get(k, 0.0)
        total += dv
        print(f"  {k:24s} {dv:6.2f} s  {1000 * dv / max(procs, 1):6.3f} s/1000 member procs")
    line = f"  TOTAL {total:.2f} s  {1000 * total / max(procs, 1):.3f} s/1000 member procs"
    if ts:
        line += f"; {1000 * total / ts:.3f} s/1000 processes on the machine"
    print(line)
    agg = st1["sources"].get("aggregator")
    if agg:
        print("  aggregator", json.dumps({k: agg[k] for k in (
            "attributed", "unattributed", "held_total", "resolved_late",
            "resolved_from_history", "settled") if k in agg}))
    print("  lost", st1["lost_events"],
          "taskstats ENOBUFS", st1["sources"].get("taskstats", {}).get("lost_enobufs"))


if __name__ == "__main__":
    main()
