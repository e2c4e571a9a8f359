#!/usr/bin/env python3
"""Idle cost: how often elsad on its default configuration wakes, and the CPU
it uses, while nothing happens (no client, no job, the machine quiet).

A node's daemon is idle most of its life, and each wake-up of an idle CPU
costs more than the work it does (50-120 µs of CPU on the development VM for
a ``select`` that times out). elsad leaves descriptors that deliver batches
unwatched for a window after each read and has timers with nothing to do skip
their wake-up (docs/daemon.md, "How it works"). Measured over ``--seconds``:
the voluntary context switches of all elsad's threads (a sleeping thread that
wakes counts one; /proc/PID/task/TID/status) and their CPU time
(/proc/PID/task/TID/schedstat), after elsad answered ``status`` and a second passed.
Processes the rest of the machine starts meanwhile wake it too (the proc
connector), so run it on a quiet machine.

    sudo python3 benchmarks/bench_idle.py [--seconds 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_overhead as bo  # also puts the repository on the path
import bench_sustained as bs

from elsa.kernel.procfs import ProcFS

TARGET_WAKEUPS = 3.0  # per second, all threads (tests/test_loop.py checks the same)
REPRODUCE = "sudo python3 benchmarks/bench_idle.py"



def run(seconds: float = 20.0) -> List[Dict[str, Any]]:
    if os.geteuid() != 0:
        raise SystemExit("bench_idle: needs root (elsad)")
    work = tempfile.mkdtemp(prefix="elsa-bench-idle-")
    mount = bo._cgroup2_mount()
    base = f"{mount}/elsa-bench-idle-{os.getpid()}" if mount else None
    daemon = bs.DefaultElsad(work, base)
    daemon.start()
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        bo.wait_quiet(daemon)
        time.sleep(1.0)  # the last request's connection closes and its commit passes
        procfs = ProcFS()
        (w0, c0), t0 = procfs.wakeups_and_cpu(pid), time.monotonic()
        time.sleep(seconds)  # the measured idle period
        (w1, c1), t1 = procfs.wakeups_and_cpu(pid), time.monotonic()
    finally:
        daemon.stop()
        if base:
            bo._rmtree_cgroup(base)
        shutil.rmtree(work, ignore_errors=True)
    span = t1 - t0
    per_s = (w1 - w0) / span
    cpu_ms = (c1 - c0) / 1e6 / span
    detail = {"seconds": round(span, 1), "wakeups": w1 - w0, "cpu_s": round((c1 - c0) / 1e9, 4)}
    return [
        {"metric": "idle elsad, default config: wake-ups per second, all threads",
         "unit": "/s", "elsa": round(per_s, 2), "peer": None, "peer_name": "-",
         "ratio": None, "target": f"<= {TARGET_WAKEUPS:g}", "passed": per_s <= TARGET_WAKEUPS,
         "reproduce": REPRODUCE, "detail": detail},
        {"metric": "idle elsad, default config: CPU per second, all threads",
         "unit": "ms/s", "elsa": round(cpu_ms, 2), "peer": None, "peer_name": "-",
         "ratio": None, "target": "reported", "passed": True, "reproduce": REPRODUCE,
         "detail": detail},
    ]


def main(argv: Sequence[str] = ()) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(list(argv))
    rows = run(args.seconds)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['metric']}: {r['elsa']} {r['unit']} "
                  f"(target {r['target']}: {'PASS' if r['passed'] else 'FAIL'})")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
