#!/usr/bin/env python3
"""Event path: elsad vs forkstat CPU in the same fork storm (issue 2).

Two C forkers (benchmarks/forker.c) fork-and-reap as fast as the kernel lets
them while elsad (tracking both forkers in a job, so every event is real
work: index update, store write) and ``forkstat -e fork,exec,exit`` (output to
/dev/null) listen to the same events. CPU seconds are read from
/proc/PID/stat (utime + stime, all threads) before and after.

Target: elsad CPU / forkstat CPU <= 1.0 and 0 events lost.
Reproduce: ``sudo python3 benchmarks/bench_forkstorm.py [--forks N]``
(needs root, gcc and Debian's forkstat).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from elsa.client import Client  # noqa: E402

sys.path.insert(0, HERE)
from bench_overhead import _cgroup2_mount, _rmtree_cgroup, cpu_seconds  # noqa: E402


def build_forker(workdir: str) -> str:
    exe = os.path.join(workdir, "forker")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "forker.c")], check=True)
    return exe


def wait_quiet(client: Client, timeout: float = 60.0) -> Dict:
    """Until elsad's event counter stops moving (it drained its socket) and
    no burst hold is on (docs/daemon.md)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        st = client.status()
        if st["events"] == last and not st.get("hold", {}).get("active"):
            return st
        last = st["events"]
        time.sleep(0.3)
    return client.status()


def run(forks: int = 20000, forkers: int = 2) -> List[Dict]:
    if os.geteuid() != 0:
        raise SystemExit("bench_forkstorm: needs root (proc connector)")
    if not shutil.which("forkstat"):
        raise SystemExit("bench_forkstorm: needs forkstat (apt-get install forkstat)")
    work = tempfile.mkdtemp(prefix="elsa-bench-fork-")
    exe = build_forker(work)
    cfg = os.path.join(work, "elsa.toml")
    sock = os.path.join(work, "elsad.sock")
    mount = _cgroup2_mount()
    base = f"{mount}/elsa-bench-fork-{os.getpid()}" if mount else None
    with open(cfg, "w") as fh:
        fh.write(f'socket = "{sock}"\nstate_dir = "{work}/state"\nlog_level = "warning"\n')
        if base:  # where auto picks cgroup2: a private base, removed at the end
            fh.write(f'[backends.cgroup2]\nbase = "{base}"\n')
    prefix = os.environ.get("ELSA_BENCH_WRAP", "").split()  # e.g. a profiler
    elsad = subprocess.Popen([*prefix, sys.executable, "-m", "elsa.elsad", "-c", cfg],
                             stdout=subprocess.DEVNULL, stderr=open(f"{work}/elsad.log", "w"))
    fstat = subprocess.Popen(["forkstat", "-e", "fork,exec,exit"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    procs = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = Client(sock)
                client.status()
                break
            except Exception:
                if time.monotonic() > deadline or elsad.poll() is not None:
                    raise SystemExit("elsad did not start; see " + work) from None
                time.sleep(0.05)
        procs = [subprocess.Popen([exe, str(forks)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(forkers)]
        client.create(name="forkstorm", pids=[p.pid for p in procs])
        time.sleep(1.0)  # let forkstat finish its start-up scan before measuring
        st0 = client.status()
        e0, f0 = cpu_seconds(elsad.pid), cpu_seconds(fstat.pid)
        t0 = time.monotonic()
        for p in procs:
            p.stdin.write("x")
            p.stdin.close()
        rates = []
        for p in procs:
            out = p.stdout.read().split()
            p.wait()
            rates.append(float(out[2]))
        wall = time.monotonic() - t0
        st1 = wait_quiet(client)
        e1, f1 = cpu_seconds(elsad.pid), cpu_seconds(fstat.pid)
        # The job ended by itself when both forkers exited (job_end = last-exit).
        client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        fstat.terminate()
        elsad.terminate()
        fstat.wait(10)
        elsad.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        if base:
            _rmtree_cgroup(base)
    events = st1["events"] - st0["events"]
    # ENOBUFS: events that reached our socket and did not fit because we fell
    # behind -- elsad's fault, target 0. Sequence gaps without ENOBUFS are
    # events the kernel dropped for every listener (nlmsg_new(GFP_NOWAIT)
    # failing in cn_netlink_send_mult); elsad detects them and resyncs.
    lost = st1["lost_events"]["enobufs"] - st0["lost_events"]["enobufs"]
    kernel_dropped = st1["lost_events"]["seq_gap"] - st0["lost_events"]["seq_gap"]
    resyncs = st1["resyncs"] - st0["resyncs"]
    elsa_cpu, peer_cpu = e1 - e0, f1 - f0
    ratio = elsa_cpu / peer_cpu if peer_cpu else float("inf")
    reproduce = "sudo python3 benchmarks/bench_forkstorm.py"
    return [
        {"metric": f"event path CPU, {forkers} forkers x {forks} forks "
                   f"({sum(rates):.0f} forks/s, {events} events, {wall:.1f} s)",
         "unit": "CPU s", "elsa": round(elsa_cpu, 3), "peer": round(peer_cpu, 3),
         "peer_name": "forkstat", "ratio": round(ratio, 3), "target": "<= 1.0",
         "passed": ratio <= 1.0, "reproduce": reproduce},
        {"metric": "events lost to elsad falling behind (ENOBUFS) in the fork storm",
         "unit": "events", "elsa": lost, "peer": None, "peer_name": "", "ratio": None,
         "target": "0", "passed": lost == 0, "reproduce": reproduce},
        {"metric": "events the kernel dropped for all listeners (seq gaps), "
                   f"detected and resynced ({resyncs} resyncs)",
         "unit": "events", "elsa": kernel_dropped, "peer": None, "peer_name": "",
         "ratio": None, "target": "detected", "passed": True, "reproduce": reproduce},
    ]


def print_rows(rows: List[Dict]) -> None:
    for r in rows:
        print(f"{r['metric']}: elsa {r['elsa']} {r['unit']}"
              + (f", {r['peer_name']} {r['peer']}, ratio {r['ratio']}" if r["peer"] is not None
                 else "")
              + f" (target {r['target']}: {'PASS' if r['passed'] else 'FAIL'})")


def main(argv: List[str] = ()) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--forks", type=int, default=20000, help="forks per forker")
    ap.add_argument("--forkers", type=int, default=2)
    args = ap.parse_args(list(argv))
    rows = run(args.forks, args.forkers)
    print_rows(rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
