#!/usr/bin/env python3
"""Memory: elsad's RSS while it tracks 100,000 live processes (issue 6).

pid_max on the benchmark machine is 32768 (and a real population of 100,000
processes would need far more memory than the daemon's), so the population is
synthetic: a child process starts a real elsad ``Daemon`` in-process (default
config: backend auto, with a private cgroup base that the benchmark removes,
store, control socket, proc-connector subscription and self-test, exactly as
``elsad`` does), makes one real job holding itself, and
replays 100,000 fork events into the job manager through the same
``JobManager.on_fork`` the event loop calls, with synthetic child pids above
pid_max so they can never collide with real processes. The store's writer
thread commits the membership rows as it does in the daemon (flushed every
5,000 events, as the event loop would let it). RSS is read from
/proc/self/status (VmRSS) after the replay and a garbage collection.

Target: RSS <= 40 MB with 100,000 tracked processes.
Reproduce: ``sudo python3 benchmarks/bench_memory.py [--processes N]`` (needs root
for the proc-connector subscription).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_overhead import _cgroup2_mount, _rmtree_cgroup  # noqa: E402

from elsa.kernel.procfs import ProcFS  # noqa: E402

TARGET_MB = 40.0
REPRODUCE = "sudo python3 benchmarks/bench_memory.py"


def _status_kb(field: str) -> int:
    """A "NNN kB" field of this process's /proc status (VmRSS, VmHWM)."""
    value = ProcFS().status_field(os.getpid(), field)
    return int(value.split()[0]) if value else 0


def child(processes: int, cgroup_base: str) -> Dict[str, Any]:
    """Run inside the measured process: a real Daemon plus replayed fork events."""
    from elsa import config as config_mod
    from elsa import logsetup
    from elsa.core.daemon import Daemon
    from elsa.plugins import PluginHost, build_plugin_manager

    logsetup.configure("warning", stream=sys.stderr)
    gc.collect()
    rss_imports = _status_kb("VmRSS")
    work = tempfile.mkdtemp(prefix="elsa-bench-mem-")
    table: Dict[str, Any] = {"socket": f"{work}/elsad.sock", "state_dir": f"{work}/state",
                              "log_level": "warning"}
    if cgroup_base:  # where auto picks cgroup2: the job's cgroup goes under the bench's own
        table["backends"] = {"cgroup2": {"base": cgroup_base}}
    cfg = config_mod.parse(table, f"{work}/elsa.toml")
    host = PluginHost(build_plugin_manager(blocked=cfg.disabled_plugins))
    gc.collect()
    rss_plugins = _status_kb("VmRSS")
    daemon = Daemon(cfg, host)
    daemon.start()
    gc.collect()
    rss_idle = _status_kb("VmRSS")
    manager = daemon.manager
    assert manager is not None and daemon.store is not None
    job = manager.create(name="memory-bench", owner_uid=0)
    me = os.getpid()
    manager.attach(job.jid, me)
    with open("/proc/sys/kernel/pid_max") as fh:
        first = int(fh.read()) + 1  # above pid_max: no real process can have these pids
    t0 = time.monotonic()
    ts = time.monotonic_ns()
    on_fork = manager.on_fork
    for i in range(processes):
        pid = first + i
        on_fork(me, pid, pid, ts)
        if i % 5000 == 4999:
            daemon.store.flush(60)
    daemon.store.flush(60)
    replay_s = time.monotonic() - t0
    gc.collect()
    tracked = len(manager.index)
    rss = _status_kb("VmRSS")
    hwm = _status_kb("VmHWM")
    daemon.stop("benchmark done")
    return {"processes": processes, "tracked": tracked, "rss_imports_kb": rss_imports,
            "rss_plugins_kb": rss_plugins, "rss_idle_kb": rss_idle,
            "rss_kb": rss, "hwm_kb": hwm, "replay_s": round(replay_s, 2), "workdir": work}


def run(processes: int = 100_000) -> List[Dict[str, Any]]:
    if os.geteuid() != 0:
        raise SystemExit("bench_memory: needs root (proc-connector subscription)")
    mount = _cgroup2_mount()
    base = f"{mount}/elsa-bench-mem-{os.getpid()}" if mount else ""
    try:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                              str(processes), "--cgroup-base", base],
                             capture_output=True, text=True, timeout=600)
    finally:
        if base:
            _rmtree_cgroup(base)  # the job's cgroup (emptied when the child exited) and the base
    if res.returncode != 0:
        raise SystemExit(f"bench_memory: measuring process failed:\n{res.stderr[-3000:]}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", m["workdir"]], check=False)
    if m["tracked"] < processes:
        raise SystemExit(f"bench_memory: only {m['tracked']} of {processes} processes tracked")
    rss_mb = m["rss_kb"] / 1024
    idle_mb = m["rss_idle_kb"] / 1024
    per_proc = (m["rss_kb"] - m["rss_idle_kb"]) * 1024 / processes
    return [{
        "metric": f"elsad RSS with {processes:,} tracked processes (synthetic fork events "
                  f"replayed in-process; idle {idle_mb:.1f} MB, {per_proc:.0f} B/process, "
                  f"peak {m['hwm_kb'] / 1024:.1f} MB)",
        "unit": "MB", "elsa": round(rss_mb, 1), "peer": None, "peer_name": "",
        "ratio": None, "target": f"<= {TARGET_MB:g} MB", "passed": rss_mb <= TARGET_MB,
        "reproduce": REPRODUCE,
        # Where the memory goes, for whoever tries to bring it down.
        "detail": {"rss_after_core_imports_mb": round(m["rss_imports_kb"] / 1024, 1),
                   "rss_after_plugin_load_mb": round(m["rss_plugins_kb"] / 1024, 1),
                   "rss_daemon_started_mb": round(idle_mb, 1),
                   "bytes_per_tracked_process": round(per_proc),
                   "replay_seconds": m["replay_s"]},
    }]


def main(argv: Sequence[str] = ()) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=100_000)
    ap.add_argument("--child", type=int, metavar="N", help=argparse.SUPPRESS)
    ap.add_argument("--cgroup-base", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(list(argv))
    if args.child is not None:
        print(json.dumps(child(args.child, args.cgroup_base)))
        return []
    rows = run(args.processes)
    for r in rows:
        print(f"{r['metric']}: {r['elsa']} {r['unit']} "
              f"(target {r['target']}: {'PASS' if r['passed'] else 'FAIL'})")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
