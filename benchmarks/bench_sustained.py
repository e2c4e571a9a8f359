#!/usr/bin/env python3
"""Sustained overhead: a long fork/exec-heavy workload with elsad on its
default configuration against no elsad (issue 18).

The burst hold (docs/daemon.md) leaves the kernel's queues unread for up to
``burst_hold`` seconds and catches up afterwards; a workload that runs for
minutes outlasts it, so what elsad costs per process competes with the
workload. Two workloads, each taking about ``--seconds`` per run:

- ``make -j2`` of a C project this benchmark generates (gcc, cc1, as, ld:
  a real build's fork/exec pattern), sized in an unmeasured calibration run
  without elsad; a run's figure is its wall time;
- ``stress-ng --fork 2 --timeout`` ``--seconds``: a run lasts that long
  whatever the machine's speed, and its figure is the wall time per fork
  operation (stress-ng's bogo-ops count, from its ``--yaml`` metrics). A
  ratio of time per operation is the ratio of the walls of one fixed amount
  of work. Fixed-length runs keep the benchmark within run_all's budget: a
  fixed count of operations sized by a short probe would make the runs'
  length follow the VM's fork rate, which drifts by ~25 % within a minute.

Each runs in paired rounds (ABBA order, as bench_overhead.py) in a job of an
elsad with no ``[sources]`` table and no ``backend`` key: the defaults
(docs/daemon.md: backend ``auto``, taskstats and cgroupstat on), with a
private cgroup base, socket and state dir. Printed per workload: the median
of the rounds' ratios of those figures (target <= 1.05; the "elsa" and "peer"
columns are their medians: seconds for the build, ms per 1,000 fork operations
for the storm) and elsad's CPU per process, both per process of
the job (the proc connector's member forks) and per process started on the
whole machine (/proc/stat ``processes``: taskstats and the proc connector
report every process, other users' too), and as a share of the workload's
own CPU time (user + system of the command and its children, from the
rusage of the reaped run). Both workloads keep the two CPUs busy, so wall
time grows with that share: the target needs elsad's CPU below ~5 % of the
workload's, whatever the machine's speed in that run. The last burst hold of
a run leaves up to ``burst_hold`` seconds of its accounting to after its end,
which a longer run would pay for inside: a run with elsad is charged that CPU
at the rate its own CPU took wall (``Run.charged_wall``; the uncharged ratio
is in ``detail``).

The fork storm's rounds also run it with ``benchmarks/minreader.c`` alone
(reported, no target): a C reader that subscribes to the same two interfaces and
only drains them in batches. Its ratio is the floor of any per-process
accounting from user space on this machine (the kernel's cost of sending the
messages plus the cheapest reading); elsad's ratio above it is elsad's work.

    sudo python3 benchmarks/bench_sustained.py                 # run_all's default size
    sudo python3 benchmarks/bench_sustained.py --seconds 60 --reps 4   # the issue's 60 s runs
    sudo python3 benchmarks/bench_sustained.py --json          # rows as JSON lines, every round
    sudo python3 benchmarks/bench_sustained.py --fold-ms 10    # + stress-ng with short
                                                              # processes folded (a site's option)
    sudo python3 benchmarks/bench_sustained.py --job-totals-only  # + stress-ng with no
                                                     # per-process records (a site's option)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_overhead as bo  # also puts the repository on the path

from elsa.kernel import cnproc
from elsa.kernel.procfs import ProcFS

TARGET = 1.05
SECONDS = 15.0  # per run: run_all's default fits its budget (6 runs per workload)
# Six pairs (three of each ABBA order); the ratio is the median of the pairs' ratios:
# one pair of 15 s runs swings by +-5 % on this VM, and the runs without elsad drifted
# by 20 % within one benchmark (17 to 14 s), which a ratio of medians mixes in. Two
# runs of four pairs each, back to back, gave 1.144 and 1.044 for the same code.
REPS = 6
REPRODUCE = "sudo python3 benchmarks/bench_sustained.py --seconds 60 --reps 4"
NOBODY_UID = 65534


class DefaultElsad(bo.Elsad):
    """elsad with the default backend and sources: only the private paths set."""

    def __init__(self, work: str, cgroup_base: Optional[str], extra: str = "") -> None:
        super().__init__(work, "cgroup2", cgroup_base, ())
        text = (f'socket = "{self.sock}"\nstate_dir = "{work}/state"\n'
                f'log_level = "warning"\n{extra}')
        if cgroup_base:
            # Only where auto picks cgroup2; the table is validated by that backend alone.
            text += f'[backends.cgroup2]\nbase = "{cgroup_base}"\n'
        with open(self.cfg, "w") as fh:
            fh.write(text)


def write_project(path: str, files: int) -> None:
    """A C project of *files* small translation units and a Makefile."""
    os.makedirs(path, exist_ok=True)
    for i in range(files):
        with open(os.path.join(path, f"u{i}.c"), "w") as fh:
            fh.write(f"#include <stdio.h>\n#include <string.h>\n"
                     f"int f{i}(const char *s) {{ char b[64]; strncpy(b, s, 63); b[63] = 0;"
                     f" return (int)strlen(b) + {i}; }}\n")
    with open(os.path.join(path, "main.c"), "w") as fh:
        fh.write("int main(void) { return 0; }\n")
    objs = " ".join(f"u{i}.o" for i in range(files))
    with open(os.path.join(path, "Makefile"), "w") as fh:
        fh.write(f"OBJS = {objs}\nprog: main.o $(OBJS)\n\t$(CC) -o $@ main.o $(OBJS)\n"
                 f"%.o: %.c\n\t$(CC) -O0 -c -o $@ $<\nclean:\n\trm -f prog *.o\n")
    os.chown(path, NOBODY_UID, NOBODY_UID)
    for name in os.listdir(path):
        os.chown(os.path.join(path, name), NOBODY_UID, NOBODY_UID)


def workload_run(cmd: List[str], daemon: Optional[bo.Elsad]) -> Tuple[float, float]:
    """(wall s, the workload's own CPU s) of one run of *cmd*: its user and system
    time with its children's, from this process's reaped children (the run's
    launcher is the only child reaped meanwhile)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = bo.run_once(cmd, daemon)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


class Run(NamedTuple):
    """One measured run of a workload."""

    wall: float  # s, the workload's
    reader_cpu: float  # s, of what read the kernel's messages (elsad: its catch-up included)
    deferred_cpu: float  # s of that used after the workload ended (elsad's last hold)
    members: int  # processes of the job
    machine: int  # processes started on the machine
    work: float  # s, the workload's own CPU

    def charged_wall(self) -> float:
        """The wall with elsad's catch-up after the run charged as the run's own CPU
        was: the last burst hold defers up to ``burst_hold`` seconds of a run's
        accounting past its end (15–21 % of elsad's CPU in a 15 s storm), and a run that
        lasted longer would have paid for it inside. That CPU, over the CPUs the
        run kept busy (its own CPU and elsad's, over its wall), is the wall it
        would have taken."""
        busy = (self.work + self.reader_cpu - self.deferred_cpu) / self.wall
        return self.wall + self.deferred_cpu / max(busy, 1.0)


def figures(runs: Sequence[Tuple[Run, float]]) -> List[float]:
    """Each run's figure: its wall, charged its catch-up (:meth:`Run.charged_wall`; none
    is deferred without elsad), over the work it did."""
    return [r.charged_wall() / done for r, done in runs]


def total(runs: Sequence[Tuple[Run, float]], field: str) -> Any:
    """The sum of one field of *runs*."""
    return sum(getattr(r, field) for r, _ in runs)


def measure(cmd: List[str], daemon: Optional[bo.Elsad],
            prepare: Optional[List[str]]) -> Run:
    """One run of *cmd*, in a job of *daemon* when one is given."""
    if prepare:
        subprocess.run(prepare, check=True, stdout=subprocess.DEVNULL)
    if daemon is None:
        p0 = ProcFS().forks()
        wall, work = workload_run(cmd, None)
        return Run(wall, 0.0, 0.0, 0, ProcFS().forks() - p0, work)
    daemon.start()
    try:
        assert daemon.proc is not None
        st0 = bo.wait_quiet(daemon)
        cpu0 = bo.cpu_seconds(daemon.proc.pid)
        p0 = ProcFS().forks()
        wall, work = workload_run(cmd, daemon)
        ended = bo.cpu_seconds(daemon.proc.pid)
        st1 = bo.wait_quiet(daemon)
        procs = ProcFS().forks() - p0
        cpu1 = bo.cpu_seconds(daemon.proc.pid)
        members = st1["counters"]["member_forks"] - st0["counters"]["member_forks"]
    finally:
        daemon.stop()
    return Run(wall, cpu1 - cpu0, cpu1 - ended, members, procs, work)


def measure_floor(cmd: List[str], reader: str) -> Run:
    """One run of *cmd* with benchmarks/minreader.c reading the proc connector and
    taskstats meanwhile: the kernel's cost of the messages plus the cheapest reading
    of them, what any per-process accounting from user space pays. The reader drains
    every 50 ms, so nothing of it is left after the run."""
    with open("/sys/devices/system/cpu/online") as fh:
        cpus = fh.read().strip()
    # The proc connector events elsad asks for, where the kernel filters them.
    events = cnproc.NEEDED_EVENTS if cnproc.kernel_filters(os.uname().release) else 0
    proc = subprocess.Popen([reader, "50", cpus, str(events)], stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(0.3)  # its subscriptions; it has no readiness signal (not measured)
        p0 = ProcFS().forks()
        wall, work = workload_run(cmd, None)
        procs = ProcFS().forks() - p0
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    cpu = float(err.rsplit("cpu", 1)[1].split()[0]) if "cpu" in err else 0.0
    return Run(wall, cpu, 0.0, 0, procs, work)


def bogo_ops(path: str) -> int:
    """The operations a stress-ng run with ``--yaml`` *path* completed; the file is
    removed so that the next run cannot be read in its place."""
    try:
        with open(path) as fh:
            text = fh.read()
        os.unlink(path)
    except OSError as exc:
        raise SystemExit(f"bench_sustained: stress-ng wrote no metrics to {path}: {exc}"
                         ) from exc
    match = re.search(r"^\s*bogo-ops:\s*(\d+)\s*$", text, re.M)
    if match is None or int(match.group(1)) == 0:
        raise SystemExit(f"bench_sustained: no bogo-ops count in {path}: {text[-300:]!r}")
    return int(match.group(1))


def paired_ratio(runs: List[float], peers: List[float]) -> float:
    """The median of each round's ratio (a run over the peer run next to it)."""
    return statistics.median(r / p for r, p in zip(runs, peers))


#: A site's option for fork-heavy nodes, measured on request: no taskstats source, so
#: no per-process records; a cgroup job's totals still come from cgroupstat.
JOB_TOTALS_ONLY = "[sources.taskstats]\nenabled = false\n"


def run(seconds: float = SECONDS, reps: int = REPS, fold_ms: int = 0,
        job_totals_only: bool = False) -> List[Dict[str, Any]]:
    if os.geteuid() != 0:
        raise SystemExit("bench_sustained: needs root (elsad)")
    for tool in ("stress-ng", "setpriv", "make", "gcc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_sustained: needs {tool} "
                             "(apt-get install stress-ng make gcc)")
    work = tempfile.mkdtemp(prefix="elsa-bench-sustained-")
    os.chmod(work, 0o755)
    mount = bo._cgroup2_mount()
    base = f"{mount}/elsa-bench-sustained-{os.getpid()}" if mount else None
    daemon = DefaultElsad(work, base)
    # A site's options for fork-heavy nodes, measured on request (not the default):
    # (elsad, its config as printed, the command that reproduces the row).
    options: List[Tuple[bo.Elsad, str, str]] = []
    for flag, name, toml, label in (
            (fold_ms, "fold", f"[thresholds]\nmin_cpu_ms = {fold_ms}\n",
             f"--fold-ms {fold_ms}"),
            (job_totals_only, "totals", JOB_TOTALS_ONLY, "--job-totals-only")):
        if flag:
            os.makedirs(os.path.join(work, name), mode=0o755)
            options.append((DefaultElsad(os.path.join(work, name), base, toml),
                            "default config + " + toml.strip().replace("\n", " "),
                            f"sudo python3 benchmarks/bench_sustained.py {label}"))
    proj = os.path.join(work, "proj")
    t_start = time.monotonic()
    ok = False
    rows: List[Dict[str, Any]] = []
    try:
        # Calibration (unmeasured, no elsad): size each workload to *seconds*.
        write_project(proj, 40)
        clean = ["make", "-s", "-C", proj, "clean"]
        make = ["make", "-s", "-j2", "-C", proj]
        wall = measure(make, None, clean).wall
        files = max(40, int(40 * seconds / max(wall, 0.1)))
        shutil.rmtree(proj)
        write_project(proj, files)
        # The stress runs write their metrics as nobody.
        metrics_dir = os.path.join(work, "metrics")
        os.makedirs(metrics_dir, mode=0o755)
        os.chown(metrics_dir, NOBODY_UID, NOBODY_UID)
        metrics = os.path.join(metrics_dir, "stress-ng.yaml")
        # --metrics-brief: with -q (or without a metrics option) the YAML has no counts.
        storm_s = max(1, round(seconds))  # stress-ng takes whole seconds
        stress = ["stress-ng", "--fork", "2", "--timeout", f"{storm_s}s", "--metrics-brief",
                  "--yaml", metrics]
        storm = f"stress-ng --fork 2 for {storm_s} s"
        reader = os.path.join(work, "minreader")
        subprocess.run(["gcc", "-O2", "-o", reader, os.path.join(bo.HERE, "minreader.c")],
                       check=True)
        # (name, command, preparation, elsad, its config, the work a run did: a run's
        # figure is its wall over that; unit, scale of the printed figures).
        Load = Tuple[str, List[str], Optional[List[str]], bo.Elsad, str, Callable[[], float],
                     str, float]

        def forks() -> float:
            return bogo_ops(metrics)

        loads: List[Load] = [
            (f"make -j2 ({files} C files)", make, clean, daemon, "default config",
             lambda: 1.0, "s", 1.0)]
        for elsad, config in [(daemon, "default config")] + [o[:2] for o in options]:
            loads.append((storm, stress, None, elsad, config, forks, "ms per 1,000 forks", 1e6))
        for name, cmd, prep, elsad, config, amount, unit, scale in loads:
            # Each condition's runs, with the work each did (the build: 1, so its
            # figure is its wall).
            runs: Dict[str, List[Tuple[Run, float]]] = {"elsa": [], "peer": [], "floor": []}
            # The fork storm's rounds also run the floor (default config's row only).
            with_floor = cmd is stress and elsad is daemon
            for rep in range(reps):
                order = ["peer", "elsa"] if rep % 2 == 0 else ["elsa", "peer"]
                if with_floor:
                    order.insert(1, "floor")
                for cond in order:
                    r = (measure_floor(cmd, reader) if cond == "floor" else
                         measure(cmd, elsad if cond == "elsa" else None, prep))
                    runs[cond].append((r, amount()))

            # The workload's own CPU per run, by condition: this VM's speed drifts between
            # runs, and on two busy CPUs wall grows with what elsad takes from the workload.
            work = {cond: [r.work for r, _ in rs] for cond, rs in runs.items()}
            walls = {cond: [r.wall for r, _ in rs] for cond, rs in runs.items()}
            elsa, peer, floor = (figures(runs[c]) for c in ("elsa", "peer", "floor"))
            uncharged = [r.wall / done for r, done in runs["elsa"]]
            cpu, deferred, members, machine = (
                total(runs["elsa"], f) for f in ("reader_cpu", "deferred_cpu", "members",
                                                 "machine"))
            floor_cpu, floor_procs = (total(runs["floor"], f) for f in ("reader_cpu", "machine"))
            e, p_ = statistics.median(elsa), statistics.median(peer)
            ratio = paired_ratio(elsa, peer)
            per_member = 1e6 * cpu / members if members else None
            per_machine = 1e6 * cpu / machine if machine else None
            elsa_work = sum(work["elsa"])
            share = 100 * cpu / elsa_work if elsa_work else None
            late = round(100 * deferred / cpu) if cpu else 0
            rows.append({
                "metric": (f"sustained overhead: {name}, elsad {config} (median of "
                           f"{len(elsa)} paired ratios; elsad CPU "
                           f"{per_member if per_member is None else round(per_member)} us per "
                           f"job process, "
                           f"{per_machine if per_machine is None else round(per_machine)} us per "
                           f"process on the machine, "
                           f"{share if share is None else round(share, 1)} % of the "
                           f"workload's own CPU; the {late} % of it used after the runs "
                           f"charged to them)"),
                "unit": unit, "elsa": round(e * scale, 3), "peer": round(p_ * scale, 3),
                "peer_name": "no elsad", "ratio": round(ratio, 3),
                # The issue's target is the default config's; an option is reported.
                "target": f"<= {TARGET}" if elsad is daemon else "reported",
                "passed": ratio <= TARGET if elsad is daemon else True,
                "reproduce": (REPRODUCE if elsad is daemon else
                              next(cmd for d, _, cmd in options if d is elsad)),
                "detail": {"ratio_of_median_walls": round(e / p_, 3),
                           "ratio_uncharged": round(paired_ratio(uncharged, peer), 3),
                           "elsad_cpu_s_after_runs": round(deferred, 2),
                           "elsa_runs": [round(x * scale, 3) for x in elsa],
                           "peer_runs": [round(x * scale, 3) for x in peer],
                           "elsa_walls_s": [round(x, 2) for x in walls["elsa"]],
                           "peer_walls_s": [round(x, 2) for x in walls["peer"]],
                           "elsad_cpu_s": round(cpu, 2), "job_processes": members,
                           "machine_processes": machine,
                           "elsad_cpu_us_per_job_process": per_member and round(per_member, 1),
                           "elsad_cpu_us_per_machine_process":
                               per_machine and round(per_machine, 1),
                           "elsad_cpu_pct_of_workload_cpu": share and round(share, 2),
                           "workload_cpu_s_elsa_runs": [round(x, 2) for x in work["elsa"]],
                           "workload_cpu_s_peer_runs": [round(x, 2) for x in work["peer"]]},
            })
            if floor:
                f = statistics.median(floor)
                per_floor = 1e6 * floor_cpu / floor_procs if floor_procs else None
                floor_work = sum(work["floor"])
                floor_share = round(100 * floor_cpu / floor_work, 1) if floor_work else None
                rows.append({
                    "metric": (f"sustained floor: {name} with benchmarks/minreader.c reading "
                               f"the proc connector and taskstats and nothing else (median "
                               f"of {len(floor)} paired ratios; reader CPU "
                               f"{per_floor if per_floor is None else round(per_floor, 1)} us "
                               f"per process, {floor_share} % of the workload's own "
                               f"CPU): the kernel's cost + the cheapest reading"),
                    "unit": unit, "elsa": round(f * scale, 3), "peer": round(p_ * scale, 3),
                    "peer_name": "no elsad", "ratio": round(paired_ratio(floor, peer), 3),
                    "target": "reported",
                    "passed": True, "reproduce": REPRODUCE,
                    "detail": {"floor_runs": [round(x * scale, 3) for x in floor],
                               "peer_runs": [round(x * scale, 3) for x in peer],
                               "floor_walls_s": [round(x, 2) for x in walls["floor"]],
                               "machine_processes": floor_procs,
                               "reader_cpu_s": round(floor_cpu, 3),
                               "workload_cpu_s_floor_runs": [round(x, 2) for x in work["floor"]]},
                })
        ok = True
    finally:
        daemon.stop()
        for option, _, _ in options:
            option.stop()
        if base:
            bo._rmtree_cgroup(base)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench_sustained: failed; elsad's log and state kept in {work}",
                  file=sys.stderr)
    for r in rows:
        r["detail"]["benchmark_seconds"] = round(time.monotonic() - t_start, 1)
    return rows


def main(argv: Sequence[str] = ()) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=SECONDS,
                    help=f"length of each run: the stress-ng runs' --timeout, the build's "
                         f"size when run without elsad (default {SECONDS:g})")
    ap.add_argument("--reps", type=int, default=REPS,
                    help=f"paired rounds per workload (default {REPS})")
    ap.add_argument("--fold-ms", type=int, default=0,
                    help="also run stress-ng with [thresholds] min_cpu_ms = N (a site's "
                         "option for fork-heavy nodes; reported, not the target)")
    ap.add_argument("--job-totals-only", action="store_true",
                    help="also run stress-ng with [sources.taskstats] enabled = false: no "
                         "per-process records, cgroup job totals only (a site's option; "
                         "reported, not the target)")
    ap.add_argument("--json", action="store_true",
                    help="print each row as a JSON line, with every round's walls")
    args = ap.parse_args(list(argv))
    rows = run(args.seconds, args.reps, args.fold_ms, args.job_totals_only)
    for r in rows:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
            continue
        print(f"{r['metric']}: elsa {r['elsa']} {r['unit']}, no elsad {r['peer']} {r['unit']}, "
              f"ratio {r['ratio']} "
              f"(target {r['target']}: {'PASS' if r['passed'] else 'FAIL'})")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
