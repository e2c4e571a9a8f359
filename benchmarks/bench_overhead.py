#!/usr/bin/env python3
"""Workload overhead: wall time of fork/exec-heavy workloads with and without elsad (issue 6).

Three workloads, each run as user nobody (stress-ng refuses --exec as root)
from a launcher that waits on stdin, so the clock starts only when the
workload is released:

- ``stress-ng --fork 2 --fork-ops N``   (fork and exit as fast as possible)
- ``stress-ng --exec 2 --exec-ops N --exec-max 1``   (fork and exec)
- a shell loop running ``/bin/true`` N times (fork + exec of a small binary)

Condition "peer": elsad is not running. Condition "elsa": elsad runs with
every source on (taskstats, cgroupstat, bsdacct in managed mode, i.e. kernel
BSD accounting writing a record at every exit) and the cgroup2 backend where
a cgroup2 mount exists (else cnproc); the launcher is put in a job before it
is released, so every process of the workload is a job member the daemon
indexes and stores. Each workload runs in pairs, one run per condition and
elsad started afresh for its run; the order alternates (ABBA...) over
``--reps`` rounds, after one unmeasured warm-up run of each workload, and the
median wall time of each condition is compared. After its run, the benchmark
waits until elsad has caught up (no burst hold on, its events drained, its
CPU idle) before stopping it. elsad runs with its defaults, burst hold
included (docs/daemon.md): the CPU it used, catching up included, is in the
last row.

Target: wall time with elsad / without <= 1.05 (each workload and overall).
Reproduce: ``sudo python3 benchmarks/bench_overhead.py [--reps 20]`` (needs root
and Debian's stress-ng). The machine must be otherwise idle: on a shared
2-core VM, other load shows up as noise in both conditions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from elsa.client import Client  # noqa: E402
from elsa.errors import DaemonUnavailable  # noqa: E402
from elsa.kernel.cgroupfs import CgroupFS  # noqa: E402
from elsa.kernel.procfs import ProcFS  # noqa: E402

TARGET = 1.05
#: Seconds after which no new round starts (run_all stops a benchmark at 240 s;
#: a round of the three workloads takes 6-15 s on the 2-core machine).
BUDGET_S = 180.0
MIN_REPS = 4
REPRODUCE = "sudo python3 benchmarks/bench_overhead.py"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]
ALL_SOURCES = ("taskstats", "cgroupstat", "bsdacct")


def workloads(fork_ops: int, exec_ops: int, loops: int) -> List[Tuple[str, List[str]]]:
    return [
        (f"stress-ng --fork 2 --fork-ops {fork_ops}",
         ["stress-ng", "--fork", "2", "--fork-ops", str(fork_ops), "-q"]),
        # --exec-max 1: one exec'ed child per bogo-op (the default, 4096, makes each
        # op a burst of thousands of processes and the run minutes long).
        (f"stress-ng --exec 2 --exec-ops {exec_ops} --exec-max 1",
         ["stress-ng", "--exec", "2", "--exec-ops", str(exec_ops), "--exec-max", "1", "-q"]),
        (f"sh loop: /bin/true x {loops}",
         ["sh", "-c", f'i=0; while [ $i -lt {loops} ]; do /bin/true; i=$((i+1)); done']),
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process *pid*."""
    return sum(ProcFS().cpu_times(pid))


def _cgroup2_mount() -> Optional[str]:
    return CgroupFS().cgroup2_mount()  # the backend's own mountinfo reading


def _rmtree_cgroup(path: str) -> None:
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        sub = os.path.join(path, name)
        if os.path.isdir(sub):
            _rmtree_cgroup(sub)
    try:
        os.rmdir(path)
    except OSError:
        pass


class Elsad:
    """elsad from this tree, every source on, private socket/state/cgroup base."""

    def __init__(self, work: str, backend: str, cgroup_base: Optional[str],
                 sources: Sequence[str] = ALL_SOURCES, nice: int = 0) -> None:
        self.work = work
        self.sock = os.path.join(work, "elsad.sock")
        self.cfg = os.path.join(work, "elsa.toml")
        text = (f'backend = "{backend}"\nsocket = "{self.sock}"\n'
                f'state_dir = "{work}/state"\n'
                f'log_level = "{os.environ.get("ELSA_BENCH_LOG_LEVEL", "warning")}"\n'
                + (f"nice = {nice}\n" if nice else "")
                + "".join(f"[sources.{name}]\n" for name in sources))
        if backend == "cgroup2" and cgroup_base:
            text += f'[backends.cgroup2]\nbase = "{cgroup_base}"\n'
        with open(self.cfg, "w") as fh:
            fh.write(text)
        self.proc: Optional[subprocess.Popen] = None
        self.cprofile = ""  # cProfile output file of elsad's event thread, if set

    def client(self) -> Client:
        """A fresh connection: elsad closes connections idle for idle_timeout (30 s),
        and a workload run under load may take longer than that."""
        return Client(self.sock, timeout=60)

    def start(self) -> None:
        log = open(os.path.join(self.work, "elsad.log"), "ab")
        prof = ["-m", "cProfile", "-o", self.cprofile] if self.cprofile else []
        self.proc = subprocess.Popen([sys.executable, *prof, "-m", "elsa.elsad", "-c", self.cfg],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.client() as client:
                    client.status()
                return
            except DaemonUnavailable:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench_overhead: elsad did not start; log: "
                                     + open(os.path.join(self.work, "elsad.log")).read()[-2000:]
                                     ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def wait_quiet(daemon: Elsad, timeout: float = 60.0) -> Dict[str, Any]:
    """Until elsad has caught up: no burst hold on (docs/daemon.md), its event
    counter still, and under 20 ms of CPU used in the last 0.2 s (the held
    accounting records are decoded and stored after the events)."""
    assert daemon.proc is not None
    deadline = time.monotonic() + timeout
    last = (-1, -1.0)
    with daemon.client() as client:
        while True:
            st = client.status()
            now = (st["events"], cpu_seconds(daemon.proc.pid))
            if ((not st.get("hold", {}).get("active") and now[0] == last[0]
                 and now[1] - last[1] < 0.02) or time.monotonic() > deadline):
                return st
            last = now
            time.sleep(0.2)


def _ts_lost(st: Dict[str, Any]) -> int:
    return int(st.get("sources", {}).get("taskstats", {}).get("lost_enobufs", 0) or 0)


def run_once(cmd: List[str], daemon: Optional[Elsad]) -> float:
    """Wall seconds of *cmd* (as nobody), in a job when *daemon* is given."""
    # Dirty pages of the previous run (elsad's store and pacct file) would be
    # written back during this one, whichever condition it is.
    os.sync()
    launcher = subprocess.Popen(["sh", "-c", 'read go; exec "$@"', "sh", *NOBODY, *cmd],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, cwd="/tmp")
    try:
        if daemon is not None:
            with daemon.client() as client:
                client.create(name="overhead", pids=[launcher.pid])
        assert launcher.stdin is not None
        t0 = time.monotonic()
        launcher.stdin.write(b"go\n")
        launcher.stdin.close()
        launcher.wait()
        wall = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    if launcher.returncode != 0:
        err = launcher.stderr.read().decode(errors="replace") if launcher.stderr else ""
        raise SystemExit(f"bench_overhead: {' '.join(cmd)} failed ({launcher.returncode}): {err}")
    return wall


def run(reps: int = 20, fork_ops: int = 5000, exec_ops: int = 300, loops: int = 2000,
        backend: Optional[str] = None,
        sources: Sequence[str] = ALL_SOURCES, nice: int = 0,
        budget: float = BUDGET_S) -> List[Dict[str, Any]]:
    if os.geteuid() != 0:
        raise SystemExit("bench_overhead: needs root (elsad, BSD accounting)")
    for tool in ("stress-ng", "setpriv"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_overhead: needs {tool} (apt-get install stress-ng)")
    loads = workloads(fork_ops, exec_ops, loops)
    work = tempfile.mkdtemp(prefix="elsa-bench-overhead-")
    os.chmod(work, 0o755)
    mount = _cgroup2_mount()
    backend = backend or ("cgroup2" if mount else "cnproc")
    base = f"{mount}/elsa-bench-{os.getpid()}" if mount and backend == "cgroup2" else None
    daemon = Elsad(work, backend, base, sources, nice)
    what = ("every source on" if set(sources) == set(ALL_SOURCES)
            else f"sources: {', '.join(sources) or 'none'}") + (f", nice {nice}" if nice else "")
    walls: Dict[str, Dict[str, List[float]]] = {n: {"elsa": [], "peer": []} for n, _ in loads}
    elsa_cpu = 0.0
    lost = 0
    lost_ts = 0
    t_start = time.monotonic()
    ok = False
    try:
        # One unmeasured run of each workload first: the first run after a
        # pause is the slowest (caches, page tables), and it would fall on
        # the no-elsad side (rep 0 starts with it).
        for _, cmd in loads:
            run_once(cmd, None)
        for rep in range(reps):
            # Stop after a whole ABBA quad once the time budget is spent (a busy
            # machine runs each pair slower): the median of fewer rounds
            # rather than run_all's per-benchmark limit killing the run.
            if (rep >= MIN_REPS and rep % 2 == 0 and budget
                    and time.monotonic() - t_start > budget):
                break
            for name, cmd in loads:
                # Pairs, in ABBA order: the two runs of a pair are seconds
                # apart, so the VM's drifting speed hits both conditions alike.
                order = ("peer", "elsa") if rep % 2 == 0 else ("elsa", "peer")
                for cond in order:
                    if cond == "peer":
                        walls[name]["peer"].append(run_once(cmd, None))
                        continue
                    daemon.start()
                    assert daemon.proc is not None
                    st0 = wait_quiet(daemon)
                    cpu0 = cpu_seconds(daemon.proc.pid)
                    walls[name]["elsa"].append(run_once(cmd, daemon))
                    st1 = wait_quiet(daemon)
                    elsa_cpu += cpu_seconds(daemon.proc.pid) - cpu0
                    lost += sum(st1["lost_events"].values()) - sum(st0["lost_events"].values())
                    lost_ts += (_ts_lost(st1) - _ts_lost(st0))
                    daemon.stop()
        ok = True
    finally:
        daemon.stop()
        if base:
            _rmtree_cgroup(base)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench_overhead: failed; elsad's log and state kept in {work}",
                  file=sys.stderr)
    elapsed = time.monotonic() - t_start
    rows = []
    total_elsa = total_peer = 0.0
    for name, _ in loads:
        e = statistics.median(walls[name]["elsa"])
        p = statistics.median(walls[name]["peer"])
        total_elsa += e
        total_peer += p
        ratio = e / p
        rows.append({
            "metric": f"workload overhead: {name} "
                      f"(median wall of {len(walls[name]['elsa'])})",
            "unit": "s", "elsa": round(e, 3), "peer": round(p, 3), "peer_name": "no elsad",
            "ratio": round(ratio, 3), "target": f"<= {TARGET}", "passed": ratio <= TARGET,
            "reproduce": REPRODUCE,
            "detail": {"elsa_runs": [round(x, 3) for x in walls[name]["elsa"]],
                       "peer_runs": [round(x, 3) for x in walls[name]["peer"]]},
        })
    ratio = total_elsa / total_peer
    rows.append({
        "metric": f"workload overhead, all three workloads (elsad {backend} backend, {what}; "
                  f"elsad used {elsa_cpu:.1f} CPU s, lost {lost} events, "
                  f"{lost_ts} taskstats overflows)",
        "unit": "s", "elsa": round(total_elsa, 3), "peer": round(total_peer, 3),
        "peer_name": "no elsad", "ratio": round(ratio, 3), "target": f"<= {TARGET}",
        "passed": ratio <= TARGET, "reproduce": REPRODUCE,
        "detail": {"backend": backend, "sources": list(sources),
                   "elsad_cpu_s": round(elsa_cpu, 2), "lost_events": lost,
                   "benchmark_seconds": round(elapsed, 1)},
    })
    return rows


def main(argv: Sequence[str] = ()) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20,
                    help="most rounds of each condition (median)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, metavar="S",
                    help=f"start no new round after S seconds, after at least {MIN_REPS} "
                         f"rounds (default {BUDGET_S:g}; 0: run every round)")
    ap.add_argument("--fork-ops", type=int, default=5000)
    ap.add_argument("--exec-ops", type=int, default=300)
    ap.add_argument("--loops", type=int, default=2000, help="iterations of the shell loop")
    ap.add_argument("--backend", choices=("cnproc", "cgroup2"),
                    help="grouping backend (default: cgroup2 where mounted, else cnproc)")
    ap.add_argument("--sources", default=",".join(ALL_SOURCES),
                    help="comma-separated sources to enable (default: all; '' for none), "
                         "to find which one costs what")
    ap.add_argument("--nice", type=int, default=0,
                    help="elsad's nice value (config key 'nice'; default 0)")
    args = ap.parse_args(list(argv))
    sources = [x for x in args.sources.split(",") if x]
    rows = run(args.reps, args.fork_ops, args.exec_ops, args.loops, args.backend, sources,
               args.nice, args.budget)
    for r in rows:
        print(f"{r['metric']}: elsa {r['elsa']} {r['unit']}, {r['peer_name']} {r['peer']}, "
              f"ratio {r['ratio']} (target {r['target']}: {'PASS' if r['passed'] else 'FAIL'})")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
