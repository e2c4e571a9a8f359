"""Jobs per second through the control socket with the cgroup2 backend.

One job = ``create`` (mkdir of the job cgroup, durable store insert) with a
freshly forked child attached (write to cgroup.procs, durable membership), the
child then execs ``/bin/true`` inside the job, exits, and the job ends by
itself (last member exited: the cgroup is removed). Several client processes
run this loop concurrently, as a batch system's launchers would; the clock
stops when elsad reports no running job.

Peer: the kernel alone doing mkdir + rmdir of a cgroup v2 directory, the floor
of any cgroup-per-job design. Target: >= 2,000 jobs/s (issue 4).

Run as root: ``python3 benchmarks/bench_cgroup_jobs.py [--jobs N] [--clients K]``.
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
from elsa.core.cgroupfs import CgroupFS

TARGET = 2000.0
REPRODUCE = "sudo python3 benchmarks/bench_cgroup_jobs.py"


def kernel_mkdir_rmdir(mount: str, n: int = 5000) -> float:
    path = os.path.join(mount, f"elsa-bench-peer-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    for _ in range(n):
        os.mkdir(path)
        os.rmdir(path)
    return n / (time.perf_counter() - t0)


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
        mode: str = "fork") -> Dict[str, float]:
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
            spy = subprocess.Popen(["py-spy", "record", "-p", str(daemon.pid), "-o", profile,
                                    "-f", "raw", "-r", "250"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # let it attach before the clock starts
        per = jobs // clients
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        kids = []
        for _ in range(clients):
            pid = os.fork()
            if pid == 0:
                _client_loop(sock, per, ready_w, go_r, mode)
            kids.append(pid)
        for _ in kids:
            os.read(ready_r, 1)
        cpu0 = _cpu_seconds(daemon.pid)
        split0 = _cpu_split(daemon.pid)
        t0 = time.perf_counter()
        os.write(go_w, b"g" * clients)
        for pid in kids:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise SystemExit(f"client failed with status {status}")
        with Client(sock, timeout=30) as c:
            while c.call("list"):
                time.sleep(0.001)
            elapsed = time.perf_counter() - t0
            st = c.status()
        cpu = _cpu_seconds(daemon.pid) - cpu0
        split1 = _cpu_split(daemon.pid)
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


def launch_ceiling(jobs: int, clients: int, mode: str) -> float:
    """The launchers alone (no daemon): process starts/s this machine allows."""
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


def _cpu_split(pid: int) -> Tuple[float, float]:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / tck, int(f[12]) / tck


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: Optional[List[str]] = None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--mode", choices=("fork", "join"), default="join",
                    help="fork: a waiting child is attached; join: the launcher joins, "
                         "then posix_spawns true (like elsa-jobmng run)")
    ap.add_argument("--profile", default="", help="write py-spy folded stacks of elsad here")
    ap.add_argument("--cprofile", default="", help="run elsad under cProfile, stats to here")
    args = ap.parse_args(argv if argv is not None else [])
    if os.geteuid() != 0:
        raise SystemExit("run as root (elsad needs the proc connector and cgroupfs)")
    mount = CgroupFS().cgroup2_mount()
    assert mount is not None
    peer = kernel_mkdir_rmdir(mount)
    ceiling = launch_ceiling(min(args.jobs, 2000), args.clients, args.mode)
    res = run(args.jobs, args.clients, args.profile, args.cprofile, args.mode)
    rows = [
        {"metric": "cgroup2 jobs/s (create + attach + exec true + auto end, via socket)",
         "elsa": round(res["rate"], 1), "peer": round(peer, 1),
         "ratio": round(res["rate"] / peer, 3), "target": TARGET,
         "passed": res["rate"] >= TARGET and res["left_behind"] == 0,
         "reproduce": REPRODUCE + f" --jobs {args.jobs} --clients {args.clients} "
                                  f"--mode {args.mode}",
         "unit": "jobs/s (peer: kernel cgroup mkdir+rmdir/s)"},
        {"metric": f"launchers alone, no elsad ({args.mode}: start true and reap it)",
         "elsa": round(res["rate"], 1), "peer": round(ceiling, 1),
         "ratio": round(res["rate"] / ceiling, 3), "target": None, "passed": True,
         "reproduce": REPRODUCE, "unit": "jobs/s vs process starts/s"},
        {"metric": "elsad CPU per job", "elsa": round(res["daemon_cpu_per_job_us"], 1),
         "peer": None, "ratio": None, "target": None, "passed": True,
         "reproduce": REPRODUCE, "unit": "µs"},
    ]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    print(json.dumps({"detail": res}))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
