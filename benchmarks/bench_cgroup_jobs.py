"""Jobs per second through the control socket with the cgroup2 backend.

One job = a job cgroup created by elsad (``create``: mkdir, durable store
insert), one process running ``/bin/true`` inside it, and the job ending by
itself when its last process exited (the cgroup removed, the end stored).
Every ``create``/``attach`` reply is sent only once the store committed it.
K launcher processes run this loop concurrently, as a batch system's would;
the clock starts when they all start and stops when elsad reports no running
job (so every job has ended and its cgroup is gone).

Launchers (``--launcher``):

* ``c`` (default): benchmarks/launcher.c, so the launcher's own cost is a C
  program's, not CPython's. ``--mode clone`` (default): ``create`` an empty
  job, ``clone3(CLONE_INTO_CGROUP)`` true straight into its cgroup (no
  migration), ``attach`` it before reaping it; the attach of job k and the
  create of job k+1 travel in one write. ``--mode join``: ``create`` with the
  launcher's own pid (elsad migrates it into the job), spawn true inside,
  reap; joining the next job ends the previous one.
* ``python``: the launcher loop in Python (``--mode join`` as above with
  ``os.posix_spawn``, or ``--mode fork``: a forked child waits, is attached
  by ``create``, then execs true).

Peers, measured in the same run before elsad starts: the kernel alone doing
mkdir + rmdir of a cgroup v2 directory (the floor of any cgroup-per-job
design), the same launchers alone with no elsad (spawn true and reap it,
K in parallel: the most process starts/s the machine allows this launcher),
and (C launcher, clone mode) those launchers making each job's cgroup
themselves with no elsad: mkdir, clone3 true into it, reap, rmdir. That last
rate is the ceiling of any cgroup-per-job launcher on this machine; the gap
between it and elsad's rate is what elsad's work per job costs.
elsad's CPU per job is split into user and system time, and into the event
thread and the store's writer thread. Target: >= 2,000 jobs/s (issue 4).
The machine's busy CPU time over elsad's run (/proc/stat) less elsad's own is
what the launchers, true and the kernel took per job; the CPUs' time per job at
the target less that is what the target leaves elsad (a reported row).
``benchmarks/cgroup_floor.c`` measures the kernel cost of each per-job
cgroup operation on its own.

Run as root: ``python3 benchmarks/bench_cgroup_jobs.py [--jobs N] [--clients K]
[--launcher c|python] [--mode clone|join|fork]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from elsa.client import Client
from elsa.kernel.cgroupfs import CgroupFS
from elsa.kernel.procfs import ProcFS

TARGET = 2000.0
REPRODUCE = "sudo python3 benchmarks/bench_cgroup_jobs.py"
HERE = os.path.dirname(os.path.abspath(__file__))


def budget_row(res: Dict[str, object], how: str) -> Dict[str, object]:
    """What the target leaves elsad on this machine: at TARGET jobs/s its CPUs give
    cpus * 1e6 / TARGET µs of CPU per job, and the launchers, true and the kernel
    took the machine's CPU per job less elsad's in the same run."""
    cpus = os.cpu_count() or 1
    per_job = cpus * 1e6 / TARGET
    elsad = float(res["daemon_cpu_per_job_us"])  # type: ignore[arg-type]
    rest = float(res["machine_cpu_per_job_us"]) - elsad  # type: ignore[arg-type]
    budget = per_job - rest
    return {"metric": f"elsad CPU per job against what {TARGET:,.0f} jobs/s leaves it "
                      f"({cpus} CPUs give {per_job:,.0f} µs a job; the launchers, true and "
                      f"the kernel took {rest:,.0f} of them in elsad's run)",
            "elsa": round(elsad, 1), "peer": round(budget, 1),
            "peer_name": "the target's budget",
            "ratio": round(elsad / budget, 3) if budget > 0 else None, "target": None,
            "passed": True, "reproduce": f"{REPRODUCE} {how}", "unit": "µs per job"}


def build_launcher(workdir: str) -> str:
    exe = os.path.join(workdir, "launcher")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "launcher.c")], check=True)
    return exe


def _start_c_launchers(exe: str, mode: str, sock: str, per: int, clients: int
                       ) -> Tuple[List[subprocess.Popen], int]:
    """Start *clients* C launchers; return them and the fd that starts them all."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    kids = [subprocess.Popen([exe, mode, sock, str(per), str(ready_w), str(go_r)],
                             pass_fds=(ready_w, go_r), stdout=subprocess.PIPE)
            for _ in range(clients)]
    os.close(ready_w)
    os.close(go_r)
    for _ in kids:
        if os.read(ready_r, 1) != b"r":
            raise SystemExit("a launcher failed to start")
    os.close(ready_r)
    return kids, go_w


def _wait_c_launchers(kids: List[subprocess.Popen]) -> None:
    for k in kids:
        k.wait()
        if k.returncode != 0:
            raise SystemExit(f"launcher failed with status {k.returncode}")


def _c_launchers_rate(exe: str, mode: str, arg: str, jobs: int, clients: int) -> float:
    """Jobs/s of *clients* C launchers in a mode without elsad (*arg*: its second
    argument), started together."""
    per = jobs // clients
    c_kids, go_w = _start_c_launchers(exe, mode, arg, per, clients)
    t0 = time.perf_counter()
    os.write(go_w, b"g" * clients)
    _wait_c_launchers(c_kids)
    os.close(go_w)
    return per * clients / (time.perf_counter() - t0)


def kernel_mkdir_rmdir(mount: str, n: int = 5000) -> float:
    path = os.path.join(mount, f"elsa-bench-peer-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    for _ in range(n):
        os.mkdir(path)
        os.rmdir(path)
    return n / (time.perf_counter() - t0)


CGTOOLS_CONTROLLERS = "cpu,memory"


def cgroup_tools_rate(jobs: int, clients: int) -> Optional[float]:
    """Jobs/s of the tools a user would pick today for the same work, from
    cgroup-tools (libcgroup): ``cgcreate`` a cgroup, ``cgexec`` true in it,
    ``cgdelete`` it, K shell loops in parallel. None without cgroup-tools."""
    if not all(shutil.which(t) for t in ("cgcreate", "cgexec", "cgdelete")):
        return None
    base = f"elsa-bench-cgt-{uuid.uuid4().hex[:8]}"
    ctl = CGTOOLS_CONTROLLERS
    subprocess.run(["cgcreate", "-g", f"{ctl}:{base}"], check=True)
    per = max(1, jobs // clients)
    script = ('i=0; while [ $i -lt "$2" ]; do g="$1:$3/j$4_$i"; '
              'cgcreate -g "$g" && cgexec -g "$g" true && cgdelete -g "$g" || exit 1; '
              'i=$((i+1)); done')
    try:
        t0 = time.perf_counter()
        kids = [subprocess.Popen(["sh", "-c", script, "sh", ctl, str(per), base, str(k)])
                for k in range(clients)]
        failed = [k.wait() for k in kids]
        elapsed = time.perf_counter() - t0
        if any(failed):
            raise SystemExit("cgroup-tools peer: cgcreate/cgexec/cgdelete failed")
    finally:
        subprocess.run(["cgdelete", "-r", "-g", f"{ctl}:{base}"], check=False,
                       stderr=subprocess.DEVNULL)
        # cgdelete leaves a v1 memory cgroup behind when its rmdir races the
        # charges draining: remove what is left, leaves first.
        for c in ctl.split(","):
            top = f"/sys/fs/cgroup/{c}/{base}"
            for root, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(root)
                except OSError:
                    pass
    return per * clients / elapsed


def _client_loop(sock: str, n: int, ready_w: int, go_r: int, mode: str) -> None:
    """One launcher.

    mode "fork": fork a child that waits, put it in a new job, let it exec true.
    mode "join": the launcher joins a new job itself, then posix_spawns true (born
    inside, as ``elsa-jobmng run`` does); joining the next job takes it out of the
    previous one, which then ends (its true exited, its launcher left).
    """
    with Client(sock, timeout=60) as c:
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        if mode == "join":
            me = os.getpid()
            for _ in range(n):
                c.call("create", name="bench", pids=[me])
                os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)
            os._exit(0)
        for _ in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                os.read(r, 1)  # joined the job: now become `true`
                try:
                    os.execv("/bin/true", ["true"])
                finally:
                    os._exit(127)
            os.close(r)
            c.call("create", name="bench", pids=[pid])
            os.write(w, b"g")
            os.close(w)
            os.waitpid(pid, 0)
    os._exit(0)


def run(jobs: int = 4000, clients: int = 4, profile: str = "", cprofile: str = "",
        mode: str = "clone", launcher: str = "c", exe: str = "") -> Dict[str, float]:
    fs = CgroupFS()
    mount = fs.cgroup2_mount()
    if mount is None:
        raise SystemExit("no cgroup2 mount")
    tag = uuid.uuid4().hex[:8]
    base = os.path.join(mount, f"elsa-bench-{tag}")
    work = tempfile.mkdtemp(prefix="elsa-bench-")
    sock = os.path.join(work, "s.sock")
    cfg = os.path.join(work, "elsa.toml")
    with open(cfg, "w") as fh:
        fh.write(f'backend = "cgroup2"\nsocket = "{sock}"\nstate_dir = "{work}/state"\n'
                 f'log_level = "warning"\n[backends.cgroup2]\nbase = "{base}"\n')
    log = open(os.path.join(work, "elsad.log"), "wb")
    prof = ["-m", "cProfile", "-o", cprofile] if cprofile else []
    entry = os.environ.get("ELSA_BENCH_DAEMON")  # a wrapper script, for experiments
    cmd = [sys.executable, *prof, *([entry] if entry else ["-m", "elsa.elsad"]), "-c", cfg]
    daemon = subprocess.Popen(cmd,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(sock, timeout=2) as c:
                    c.status()
                break
            except Exception:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("elsad did not start: "
                                     + open(log.name).read()[-2000:]) from None
                time.sleep(0.05)
        spy = None
        if profile:  # py-spy (pip install py-spy) samples the daemon; "raw" = folded stacks
            # --nonblocking: pausing elsad 250 times a second would change what is measured
            spy = subprocess.Popen(["py-spy", "record", "-p", str(daemon.pid), "-o", profile,
                                    "-f", "raw", "-r", "250", "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # let it attach before the clock starts
        per = jobs // clients
        c_kids: List[subprocess.Popen] = []
        kids = []
        if launcher == "c":
            c_kids, go_w = _start_c_launchers(exe, mode, sock, per, clients)
        else:
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            for _ in range(clients):
                pid = os.fork()
                if pid == 0:
                    _client_loop(sock, per, ready_w, go_r, mode)
                kids.append(pid)
            for _ in kids:
                os.read(ready_r, 1)
        split0 = ProcFS().cpu_times(daemon.pid)
        threads0 = _thread_cpu(daemon.pid)
        machine0 = ProcFS().busy_cpu_seconds()
        t0 = time.perf_counter()
        os.write(go_w, b"g" * clients)
        _wait_c_launchers(c_kids)
        for pid in kids:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise SystemExit(f"client failed with status {status}")
        with Client(sock, timeout=30) as c:
            while c.call("list"):
                time.sleep(0.001)
            elapsed = time.perf_counter() - t0
            machine = ProcFS().busy_cpu_seconds() - machine0
            st = c.status()
        split1 = ProcFS().cpu_times(daemon.pid)
        cpu = sum(split1) - sum(split0)
        threads1 = _thread_cpu(daemon.pid)
        writer = sum(v - threads0.get(k, 0.0) for k, v in threads1.items()
                     if k != daemon.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        left = [e.name for e in os.scandir(base) if e.is_dir()] if os.path.isdir(base) else []
        return {"jobs": per * clients, "elapsed": elapsed, "rate": per * clients / elapsed,
                "daemon_cpu_per_job_us": cpu / (per * clients) * 1e6,
                # user: elsad's Python; system: the kernel work it asks for
                # (cgroup migration, mkdir/rmdir, socket wake-ups).
                "daemon_user_per_job_us": (split1[0] - split0[0]) / (per * clients) * 1e6,
                "daemon_system_per_job_us": (split1[1] - split0[1]) / (per * clients) * 1e6,
                # the store's writer thread (SQLite commits); the rest is the event thread
                "daemon_writer_thread_per_job_us": writer / (per * clients) * 1e6,
                # every CPU of the machine while the jobs ran: elsad, the launchers,
                # true, the kernel's threads
                "machine_cpu_per_job_us": machine / (per * clients) * 1e6,
                "deferred_removals": st["backend_status"]["deferred_removals"],
                "left_behind": len(left), "left_names": left[:5]}
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        if os.path.isdir(base):
            for e in os.scandir(base):
                if e.is_dir():
                    try:
                        os.rmdir(e.path)
                    except OSError:
                        pass
            os.rmdir(base)
        if not os.environ.get("ELSA_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def launch_ceiling(jobs: int, clients: int, mode: str, launcher: str = "python",
                   exe: str = "") -> float:
    """The launchers alone (no daemon): process starts/s this machine allows."""
    if launcher == "c":
        return _c_launchers_rate(exe, "alone", "-", jobs, clients)
    per = jobs // clients
    t0 = time.perf_counter()
    kids = []
    for _ in range(clients):
        pid = os.fork()
        if pid == 0:
            for _ in range(per):
                if mode == "join":
                    os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)
                    continue
                r, w = os.pipe()
                child = os.fork()
                if child == 0:
                    os.close(w)
                    os.read(r, 1)
                    os.execv("/bin/true", ["true"])
                os.close(r)
                os.write(w, b"g")
                os.close(w)
                os.waitpid(child, 0)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    return per * clients / (time.perf_counter() - t0)


def cgroup_ceiling(jobs: int, clients: int, exe: str, mount: str) -> float:
    """Jobs/s of the C launchers making each job's cgroup themselves, with no
    daemon (launcher.c ``cgalone``: mkdir, clone3 true into it, reap, rmdir):
    what a cgroup per job costs this machine before any accounting."""
    base = os.path.join(mount, f"elsa-bench-ceiling-{uuid.uuid4().hex[:8]}")
    os.mkdir(base)
    try:
        return _c_launchers_rate(exe, "cgalone", base, jobs, clients)
    finally:
        for e in os.scandir(base):  # only after a launcher failed
            if e.is_dir():
                os.rmdir(e.path)
        os.rmdir(base)


def _thread_cpu(pid: int) -> Dict[int, float]:
    """CPU seconds (user + system) of each thread of *pid*."""
    return {tid: u + s for tid, (u, s) in ProcFS().thread_cpu(pid).items()}


def main(argv: Optional[List[str]] = None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--launcher", choices=("c", "python"), default="c",
                    help="c: benchmarks/launcher.c (built with gcc); python: the loop in Python")
    ap.add_argument("--mode", choices=("clone", "join", "fork"), default=None,
                    help="clone (c only, the default): true is born in the job cgroup "
                         "(clone3 CLONE_INTO_CGROUP), then attached; join (the default for "
                         "python): the launcher joins, then spawns true (like elsa-jobmng "
                         "run); fork (python only): a waiting child is attached, then execs")
    ap.add_argument("--cgtools-jobs", type=int, default=600,
                    help="jobs of the cgroup-tools peer (cgcreate + cgexec + cgdelete; "
                         "0: skip)")
    ap.add_argument("--profile", default="", help="write py-spy folded stacks of elsad here")
    ap.add_argument("--cprofile", default="", help="run elsad under cProfile, stats to here")
    args = ap.parse_args(argv if argv is not None else [])
    if os.geteuid() != 0:
        raise SystemExit("run as root (elsad needs the proc connector and cgroupfs)")
    mode = args.mode or ("clone" if args.launcher == "c" else "join")
    if (args.launcher, mode) in (("c", "fork"), ("python", "clone")):
        raise SystemExit(f"--mode {mode} needs --launcher {'python' if mode == 'fork' else 'c'}")
    mount = CgroupFS().cgroup2_mount()
    assert mount is not None
    build_dir = tempfile.mkdtemp(prefix="elsa-bench-launcher-")
    try:
        exe = build_launcher(build_dir) if args.launcher == "c" else ""
        peer = kernel_mkdir_rmdir(mount)
        cgtools = (cgroup_tools_rate(args.cgtools_jobs, args.clients)
                   if args.cgtools_jobs else None)
        ceiling = launch_ceiling(min(args.jobs, 2000), args.clients, mode, args.launcher, exe)
        cg_ceiling = (cgroup_ceiling(min(args.jobs, 2000), args.clients, exe, mount)
                      if (args.launcher, mode) == ("c", "clone") else None)
        res = run(args.jobs, args.clients, args.profile, args.cprofile, mode, args.launcher,
                  exe)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    how = f"--jobs {args.jobs} --clients {args.clients} --launcher {args.launcher} --mode {mode}"
    rows = [
        {"metric": "cgroup2 jobs/s (create + attach + exec true + auto end, via socket)",
         "elsa": round(res["rate"], 1), "peer": round(peer, 1),
         "ratio": round(res["rate"] / peer, 3), "target": TARGET,
         "passed": res["rate"] >= TARGET and res["left_behind"] == 0,
         "reproduce": f"{REPRODUCE} {how}",
         "unit": "jobs/s (peer: kernel cgroup mkdir+rmdir/s)"},
        {"metric": f"launchers alone, no elsad ({args.launcher} launcher: start true and "
                   "reap it)",
         "elsa": round(res["rate"], 1), "peer": round(ceiling, 1),
         "ratio": round(res["rate"] / ceiling, 3), "target": None, "passed": True,
         "reproduce": f"{REPRODUCE} {how}", "unit": "jobs/s vs process starts/s"},
        {"metric": "cgroup-per-job ceiling, no elsad (c launchers: mkdir a cgroup, clone3 "
                   "true into it, reap, rmdir)",
         "elsa": round(res["rate"], 1), "peer": cg_ceiling and round(cg_ceiling, 1),
         "peer_name": "launchers with their own cgroups",
         "ratio": cg_ceiling and round(res["rate"] / cg_ceiling, 3), "target": None,
         "passed": True, "reproduce": f"{REPRODUCE} {how}", "unit": "jobs/s"},
        {"metric": f"elsad CPU per job (user {res['daemon_user_per_job_us']:.0f} + system "
                   f"{res['daemon_system_per_job_us']:.0f}; store writer thread "
                   f"{res['daemon_writer_thread_per_job_us']:.0f})",
         "elsa": round(res["daemon_cpu_per_job_us"], 1),
         "peer": None, "ratio": None, "target": None, "passed": True,
         "reproduce": f"{REPRODUCE} {how}", "unit": "µs"},
        budget_row(res, how),
    ]
    rows.insert(1, {
        "metric": f"cgroup2 jobs/s vs cgroup-tools (cgcreate + cgexec true + cgdelete, "
                  f"{args.clients} shell loops, controllers {CGTOOLS_CONTROLLERS})",
        "elsa": round(res["rate"], 1), "peer": cgtools and round(cgtools, 1),
        "peer_name": "cgroup-tools",
        "ratio": cgtools and round(res["rate"] / cgtools, 3), "target": None,
        "passed": cgtools is not None,
        "reproduce": f"{REPRODUCE} {how} --cgtools-jobs {args.cgtools_jobs}",
        "unit": "jobs/s"})
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    print(json.dumps({"detail": res}))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
