#!/usr/bin/env python3
"""Where the per-source CPU totals of a job differ, measured on this kernel.

Runs each workload alone in a fresh cgroup and compares, for the same
processes: the cgroup's ``cpu.stat`` usage (the scheduler's precise run time,
charged until the last instruction of every member), the sum of the taskstats
exit records (tick-sampled ``ac_utime + ac_stime``, and ELSA's figure:
``cpu_run_virtual_total``, the run time the scheduler had booked when the
record was taken, completed for tasks that never slept; elsa/kernel/taskstats.py
``run_before_record_ns``), and with ``--pacct`` the BSD accounting records of
a private acct(2) file. Each row also has the hypervisor's steal time on all
CPUs during the run (/proc/stat): the scheduler's clock leaves steal out, so
cpu.stat does, but the completion (``etime - cpu_delay_total``) holds what fell
while a task ran, so ELSA's figure can exceed cpu.stat by up to that much.

With ``--trace`` a tracefs instance records sched_switch and
sched_process_exit (emitted right after taskstats_exit() in do_exit()), which
splits each process's precise run time at the moment its record was taken:
"before" is what a perfect record could hold, "after" is the exit teardown
(exit_mm, exit_files, exit_notify, ... the final schedule) no record can.

Needs root. ``--pacct`` switches the kernel's one accounting file: run it
under ``flock /tmp/elsa-kacct.lock``; the file active before is restored.

    python3 benchmarks/cpu_sources_gap.py [--runs 3] [--pacct] [--trace]
        [--cpu-quota US] [--workload NAME ...] [--json]

The table and what it shows are in docs/accounting.md, "CPU of a job: the rules,
and why sources differ".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from elsa.kernel import pacct, taskstats
from elsa.kernel.cgroupfs import CgroupFS
from elsa.kernel.procfs import ProcFS
from elsa.kernel.taskstats_socket import TaskstatsSocket

HERE = os.path.dirname(os.path.abspath(__file__))
TRACEFS = "/sys/kernel/tracing"
V1_CPU = "/sys/fs/cgroup/cpu"

#: name -> (description, argv with {spinfork} for the compiled helper)
WORKLOADS: Dict[str, Tuple[str, List[str]]] = {
    "fork-storm": ("stress-ng --fork 1 --fork-ops 3000",
                   ["stress-ng", "--fork", "1", "--fork-ops", "3000", "-q"]),
    "fork-exit": ("spinfork: 3000 children that exit at once",
                  ["{spinfork}", "3000", "0", "0"]),
    "fork-10ms": ("spinfork: 200 children computing 10 ms each",
                  ["{spinfork}", "200", "10000", "0"]),
    "exec-true": ("sh: 300 runs of /bin/true",
                  ["sh", "-c", "for i in $(seq 300); do /bin/true; done"]),
    "loop-2s": ("spinfork: one process computing 2 s", ["{spinfork}", "0", "0", "2000000"]),
}


def build_spinfork(tmp: str) -> str:
    out = os.path.join(tmp, "spinfork")
    subprocess.run(["cc", "-O2", "-o", out, os.path.join(HERE, "spinfork.c")], check=True)
    return out


def read_cpu_stat(cg: str) -> Dict[str, int]:
    with open(os.path.join(cg, "cpu.stat")) as fh:
        return {k: int(v) for k, v in (line.split() for line in fh)}


def settled_usage(cg: str, timeout: float = 5.0) -> Dict[str, int]:
    """cpu.stat once the last member's final slice is charged: the parent's
    wait() returns at exit_notify(), before the child's last schedule."""
    deadline = time.monotonic() + timeout
    prev = read_cpu_stat(cg)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        cur = read_cpu_stat(cg)
        if cur["usage_usec"] == prev["usage_usec"]:
            return cur
        prev = cur
    return prev


def descendants(top: int, parent_of: Dict[int, int]) -> Set[int]:
    """top and every pid whose ppid chain leads to it (records arrive child first)."""
    tree = {top}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent_of.items():
            if pid not in tree and ppid in tree:
                tree.add(pid)
                grew = True
    return tree


def acct_on(path: Optional[str]) -> None:
    from elsa_plugins.bsdacct import _libc_acct
    _libc_acct(path)


def active_acct_file(candidates: Sequence[str] = ("/var/log/account/pacct",
                                                   "/var/account/pacct")) -> Optional[str]:
    """Which of *candidates* the kernel writes now (one short child tells)."""
    from elsa_plugins.bsdacct import BsdAcctSource
    return BsdAcctSource()._probe(list(candidates))


class Trace:
    """A private tracefs instance with sched_switch and sched_process_exit."""

    EVENTS = ("sched/sched_switch", "sched/sched_process_exit")
    LINE = re.compile(r"\s(\d+\.\d+): (sched_switch|sched_process_exit): (.*)$")

    def __init__(self) -> None:
        if not os.path.isdir(os.path.join(TRACEFS, "instances")):
            raise SystemExit(f"--trace needs tracefs at {TRACEFS} (mount -t tracefs nodev "
                             f"{TRACEFS})")
        self.dir = os.path.join(TRACEFS, "instances", f"elsa-cpugap-{os.getpid()}")
        os.mkdir(self.dir)
        self._w("trace_clock", "mono")
        self._w("buffer_size_kb", "16384")
        # Only this process and its descendants (the workload): a busy machine's
        # every context switch would overflow the buffer and lose intervals.
        self._w("options/event-fork", "1")
        self._w("set_event_pid", str(os.getpid()))
        for ev in self.EVENTS:
            self._w(f"events/{ev}/enable", "1")

    def _w(self, name: str, value: str) -> None:
        with open(os.path.join(self.dir, name), "w") as fh:
            fh.write(value)

    def start(self) -> None:
        self._w("trace", "")
        self._w("tracing_on", "1")

    def stop(self) -> List[Tuple[float, str, str]]:
        self._w("tracing_on", "0")
        for cpu in os.listdir(os.path.join(self.dir, "per_cpu")):
            with open(os.path.join(self.dir, "per_cpu", cpu, "stats")) as fh:
                lost = dict(line.split(":", 1) for line in fh if ":" in line)
            if int(lost.get("overrun", "0")) or int(lost.get("dropped events", "0")):
                raise SystemExit(f"trace buffer of {cpu} overran: {lost}")
        out = []
        with open(os.path.join(self.dir, "trace")) as fh:
            for line in fh:
                m = self.LINE.search(line)
                if m:
                    out.append((float(m.group(1)), m.group(2), m.group(3)))
        return out

    def close(self) -> None:
        self._w("tracing_on", "0")
        os.rmdir(self.dir)


_SW = re.compile(r"prev_pid=(\d+) .*==> next_comm=.* next_pid=(\d+) ")
_EXIT = re.compile(r"pid=(\d+) ")


def split_runtime(events: List[Tuple[float, str, str]],
                  pids: Set[int]) -> Tuple[Dict[int, float], Dict[int, float]]:
    """Precise on-CPU seconds of each of *pids* before and after its record
    (sched_process_exit), from the sched_switch intervals."""
    on_since: Dict[int, float] = {}
    before: Dict[int, float] = {}
    after: Dict[int, float] = {}
    for ts, kind, rest in events:
        if kind == "sched_process_exit":
            m = _EXIT.search(rest)
            pid = int(m.group(1)) if m else -1
            if pid in pids and pid in on_since:
                # The record is taken while the task runs: split its slice there.
                before[pid] = before.get(pid, 0.0) + ts - on_since[pid]
                on_since[pid] = ts
                after[pid] = 0.0
            continue
        m = _SW.search(rest)
        if not m:
            continue
        prev, nxt = int(m.group(1)), int(m.group(2))
        if prev in pids and prev in on_since:
            side = after if prev in after else before
            side[prev] = side.get(prev, 0.0) + ts - on_since.pop(prev)
        if nxt in pids:
            on_since[nxt] = ts
    return before, after


def limit_cpu(cg: str, quota_us: int) -> Optional[str]:
    """Hold the members of cgroup2 *cg* to *quota_us* of CPU per 100 ms: its
    cpu.max where its parent enables the cpu controller; else (hybrid hosts) a
    cgroup of the v1 cpu hierarchy, whose path is returned for them to join."""
    with open(os.path.join(os.path.dirname(cg), "cgroup.subtree_control")) as fh:
        if "cpu" in fh.read().split():
            with open(os.path.join(cg, "cpu.max"), "w") as fh2:
                fh2.write(f"{quota_us} 100000")
            return None
    v1 = os.path.join(V1_CPU, os.path.basename(cg))
    os.mkdir(v1)
    for knob, value in (("cpu.cfs_period_us", 100000), ("cpu.cfs_quota_us", quota_us)):
        with open(os.path.join(v1, knob), "w") as fh:
            fh.write(str(value))
    return v1


def run_once(name: str, argv: List[str], sock: TaskstatsSocket, cg_root: str,
             pacct_file: Optional[str], trace: Optional[Trace],
             cpu_quota_us: int = 0) -> Dict[str, object]:
    cg = os.path.join(cg_root, f"elsa-cpugap-{os.getpid()}-{name}")
    os.mkdir(cg)
    v1 = None
    try:
        if cpu_quota_us:
            v1 = limit_cpu(cg, cpu_quota_us)
        joins = [d for d in (cg, v1) if d]
        sock.receive_tuples()  # drop what other processes left queued
        pacct_start = os.path.getsize(pacct_file) if pacct_file else 0
        if trace:
            trace.start()

        def join() -> None:
            for d in joins:
                with open(os.path.join(d, "cgroup.procs"), "w") as fh:
                    fh.write("0")

        steal0 = ProcFS().steal_cpu_seconds()
        proc = subprocess.Popen(argv, preexec_fn=join, stdout=subprocess.DEVNULL)
        proc.wait()
        usage = settled_usage(cg)
        steal = ProcFS().steal_cpu_seconds() - steal0
        events = trace.stop() if trace else []
        tuples = sock.receive_tuples()
    finally:
        os.rmdir(cg)
        if v1:
            os.rmdir(v1)
    recs = [taskstats.TaskRecord(*t) for t in tuples]
    by_pid = {r.tgid: r for r in recs if r.last_of_group}
    tree = descendants(proc.pid, {r.tgid: r.ppid for r in by_pid.values()})
    mine = [by_pid[p] for p in tree if p in by_pid]
    n = len(mine)
    row: Dict[str, object] = {
        "workload": name, "processes": n, "cgroup_us": usage["usage_usec"],
        "elsa_us": sum(sum(r.cpu_adjusted_us()) for r in mine),
        "tick_us": sum(r.utime_us + r.stime_us for r in mine),
        "run_us": sum(r.cpu_run_ns for r in mine) // 1000,
        # All CPUs' steal over the run: the most of it that can be in "elsa_us".
        "steal_us": round(steal * 1e6),
    }
    # The forking parent's run time per child: fork() and the reaping wait()
    # are charged to it, before its own record, so every source has them.
    children: Dict[int, int] = {}
    for r in mine:
        children[r.ppid] = children.get(r.ppid, 0) + 1
    forker = max(children, key=lambda k: children[k]) if children else 0
    if children.get(forker, 0) > 1 and forker in by_pid:
        row["fork_us_per_child"] = by_pid[forker].cpu_run_ns / 1000 / children[forker]
    if pacct_file:
        with open(pacct_file, "rb") as fh:
            fh.seek(pacct_start)
            acct = pacct.decode(fh.read(), path=pacct_file).records()
        a_by_pid = {a.pid: a for a in acct}
        a_tree = descendants(proc.pid, {a.pid: a.ppid for a in acct})
        arecs = [a_by_pid[p] for p in a_tree if p in a_by_pid]
        row["pacct_processes"] = len(arecs)
        # None when accounting was taken away from our file (another tool).
        row["pacct_us"] = sum(a.utime_us + a.stime_us for a in arecs) if arecs else None
    if trace:
        before, after = split_runtime(events, tree)
        row["traced_before_us"] = int(sum(before.values()) * 1e6)
        row["traced_after_us"] = int(sum(after.values()) * 1e6)
        row["after_us_per_exit"] = sum(after.values()) * 1e6 / max(len(after), 1)
        # Run time before the record that ELSA's figure lacks (booked late);
        # from the short-lived children, whose whole life the trace saw.
        kids = [r for r in mine if r.ppid == forker and r.tgid in after
                and children[forker] > 1]
        if kids:
            row["late_us_per_exit"] = sum(before.get(r.tgid, 0.0) * 1e6 - r.cpu_run_ns / 1000
                                          for r in kids) / len(kids)
    return row


COLUMNS = [("workload", "workload"), ("processes", "procs"), ("cgroup_us", "cgroup s"),
           ("elsa_us", "taskstats s"), ("tick_us", "ticks s"), ("pacct_us", "pacct s"),
           ("traced_before_us", "before s"), ("traced_after_us", "after s"),
           ("late_us_per_exit", "late µs/child"), ("after_us_per_exit", "after µs/exit"),
           ("fork_us_per_child", "fork µs/child"), ("steal_us", "steal s")]


def fmt_table(rows: Sequence[Dict[str, object]]) -> str:
    """Markdown table; seconds with the difference to cpu.stat, µs per exit."""
    present = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in present) + " |",
             "|" + "---|" * len(present)]
    for r in rows:
        cells = []
        for key, _h in present:
            v = r.get(key)
            if v is None:
                cells.append("-")
            elif key in ("workload", "processes"):
                cells.append(str(v))
            elif key.endswith("per_exit") or key.endswith("per_child"):
                cells.append(f"{v:.0f}")
            else:
                sec = f"{v / 1e6:.3f}"  # type: ignore[operator]
                if key in ("elsa_us", "tick_us", "pacct_us"):
                    sec += f" ({(v - r['cgroup_us']) / r['cgroup_us'] * 100:+.0f} %)"  # type: ignore[operator]
                cells.append(sec)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                    help="default: all")
    ap.add_argument("--pacct", action="store_true",
                    help="also a private acct(2) file (run under flock /tmp/elsa-kacct.lock)")
    ap.add_argument("--trace", action="store_true",
                    help="split each process's run time at its record (tracefs)")
    ap.add_argument("--cpu-quota", type=int, default=0, metavar="US",
                    help="hold each workload to US µs of CPU per 100 ms (CFS bandwidth)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (cgroups, taskstats listener, acct(2))")
    cg_root = CgroupFS().cgroup2_mount()
    if cg_root is None:
        raise SystemExit("no cgroup v2 hierarchy mounted")
    tmp = tempfile.mkdtemp(prefix="elsa-cpugap-")
    spinfork = build_spinfork(tmp)
    sock = TaskstatsSocket()
    sock.register()
    trace = Trace() if args.trace else None
    previous: Optional[str] = None
    pacct_file = None
    if args.pacct:
        previous = active_acct_file()
        pacct_file = os.path.join(tmp, "pacct")
        open(pacct_file, "wb").close()
        acct_on(pacct_file)
    rows = []
    try:
        for name in args.workload or list(WORKLOADS):
            if WORKLOADS[name][1][0] == "stress-ng" and not shutil.which("stress-ng"):
                print(f"skip {name}: stress-ng not installed", file=sys.stderr)
                continue
            cmd = [a.replace("{spinfork}", spinfork) for a in WORKLOADS[name][1]]
            for _ in range(args.runs):
                rows.append(run_once(name, cmd, sock, cg_root, pacct_file, trace,
                                     args.cpu_quota))
    finally:
        # Restore only what we still own: another tool that took accounting
        # over meanwhile keeps it (and our rows after that have no pacct figure).
        if pacct_file and active_acct_file([pacct_file]) == pacct_file:
            acct_on(previous)
        elif pacct_file:
            print("kernel accounting was taken over during the run; left as it is",
                  file=sys.stderr)
        if trace:
            trace.close()
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    ctx = {"kernel": os.uname().release, "cpu_quota_us": args.cpu_quota,
           "task_delayacct": open("/proc/sys/kernel/task_delayacct").read().strip()}
    if args.json:
        print(json.dumps({"context": ctx, "rows": rows}, indent=1))
    else:
        quota = f", CPU quota {args.cpu_quota} µs per 100 ms" if args.cpu_quota else ""
        print(f"kernel {ctx['kernel']}, kernel.task_delayacct={ctx['task_delayacct']}{quota}")
        print(fmt_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
