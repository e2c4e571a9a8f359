"""`elsa ja`'s live figures: a running process's from /proc (ProcFS.live_usage) and a
job cgroup's (the cgroupstats adapter), on written roots and on the real kernel."""

from __future__ import annotations

import os
import time

from elsa.kernel.procfs import ProcFS
from elsa.report.ja import cgroup_counters, live_process

TICKS = os.sysconf("SC_CLK_TCK")


def _write_process(root, pid: int, io: bool = True, hwm: bool = True) -> None:
    d = root / str(pid)
    d.mkdir()
    fields = ["S", "7"] + ["0"] * 9 + [str(2 * TICKS), str(TICKS)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (my prog) " + " ".join(fields) + "\n")
    (d / "status").write_text("Name:\tmy prog\n" + ("VmHWM:\t  2048 kB\n" if hwm else "")
                              + "Threads:\t1\n")
    if io:
        # The process's own I/O is its threads'; /proc/PID/io adds its reaped children's.
        (d / "io").write_text("rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 5000\n"
                              "write_bytes: 9000\ncancelled_write_bytes: 0\n")
        (d / "task" / str(pid)).mkdir(parents=True)
        (d / "task" / str(pid) / "io").write_text(
            "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\n"
            "write_bytes: 8192\ncancelled_write_bytes: 0\n")


def test_live_process_from_a_written_proc(tmp_path):
    _write_process(tmp_path, 42)
    assert live_process(42, str(tmp_path)) == {
        "pid": 42, "ppid": 7, "comm": "my prog", "running": True, "cpu_user_us": 2_000_000,
        "cpu_system_us": 1_000_000, "max_rss_kb": 2048, "read_bytes": 4096,
        "write_bytes": 8192}
    # Another user's process: io is not readable; a zombie has no VmHWM.
    _write_process(tmp_path, 43, io=False, hwm=False)
    p = live_process(43, str(tmp_path))
    assert p is not None and p["cpu_user_us"] == 2_000_000
    assert p["max_rss_kb"] is None and p["read_bytes"] is None and p["write_bytes"] is None
    assert live_process(44, str(tmp_path)) is None  # gone


def test_live_usage_of_this_process():
    spent = time.thread_time() + 0.05
    while time.thread_time() < spent:
        pass
    u = ProcFS().live_usage(os.getpid())
    assert u is not None
    assert u.pid == os.getpid() and u.ppid == os.getppid()
    assert u.cpu_user_us + u.cpu_system_us >= 50_000
    assert u.max_rss_kb is not None and u.max_rss_kb > 1000
    assert u.read_bytes is not None  # our own io file is readable


def test_live_io_leaves_out_the_children_a_process_waited_for(tmp_path):
    # The real kernel: a shell whose dd child wrote 8 MiB and was reaped. Its
    # /proc/PID/io holds the dd's bytes, which dd's own record counts; ja sums
    # both, so the shell's live figure must be its own.
    import subprocess

    from tests.conftest import wait_for

    target = tmp_path / "out"
    sh = subprocess.Popen(["sh", "-c", f"dd if=/dev/zero of={target} bs=1M count=8 "
                           "conv=fsync 2>/dev/null; exec sleep 30"])
    try:
        def whole_written() -> int:
            with open(f"/proc/{sh.pid}/io") as fh:
                return int(fh.read().split()[11])

        # The dd was reaped once the shell's whole figure holds its bytes (before
        # the exec of sleep, which keeps the pid and its counters).
        wait_for(lambda: whole_written() >= 8 << 20, 30, what="the dd to be reaped")
        u = live_process(sh.pid)
        assert u is not None and u["write_bytes"] is not None
        assert u["write_bytes"] < 1 << 20, u
    finally:
        sh.kill()
        sh.wait()


def test_cgroup_counters_from_a_written_cgroup(tmp_path):
    (tmp_path / "cpu.stat").write_text("usage_usec 30\nuser_usec 20\nsystem_usec 10\n")
    (tmp_path / "memory.peak").write_text("4194304\n")
    (tmp_path / "io.stat").write_text("8:0 rbytes=100 wbytes=200 rios=1 wios=2\n"
                                      "8:16 rbytes=1 wbytes=2 rios=1 wios=1\n")
    assert cgroup_counters(str(tmp_path)) == {
        "cpu_user_us": 20, "cpu_system_us": 10, "max_rss_kb": 4096, "read_bytes": 101,
        "write_bytes": 202}
    # Controllers not enabled: their files are absent, their figures unknown.
    (tmp_path / "memory.peak").unlink()
    (tmp_path / "io.stat").unlink()
    assert cgroup_counters(str(tmp_path)) == {
        "cpu_user_us": 20, "cpu_system_us": 10, "max_rss_kb": None, "read_bytes": None,
        "write_bytes": None}
    (tmp_path / "cpu.stat").unlink()
    assert cgroup_counters(str(tmp_path)) is None
    assert cgroup_counters(str(tmp_path / "removed")) is None


def test_summary_takes_the_processes_figures_a_cgroup_lacks(tmp_path):
    # A hybrid host: the job cgroup has cpu.stat but no memory.peak or io.stat
    # (those controllers are bound to v1). The peak RSS and I/O the processes
    # measured are reported, not '-'; the CPU is still the cgroup's.
    from elsa.report.ja import build

    (tmp_path / "cpu.stat").write_text("usage_usec 30\nuser_usec 20\nsystem_usec 10\n")
    reply = {"job": {"jid": 1, "created": time.time() - 5, "state": "running",
                     "params": {"cgroup_path": str(tmp_path)}, "pids": [os.getpid()]}}
    rep = build(reply, None)
    s = rep["summary"]
    assert rep["figures_from"] == "cgroup"
    assert (s["cpu_user_us"], s["cpu_system_us"]) == (20, 10)
    assert s["max_rss_kb"] is not None and s["max_rss_kb"] > 1000  # this process's VmHWM
    assert s["read_bytes"] is not None and s["write_bytes"] is not None


def test_charge_so_far_prices_the_memory_integral_as_the_bill_does(tmp_path, monkeypatch):
    # The bill prices a job's mem_integral from its stored coremem_kb_us; ja's
    # "charge so far" left it out (its summary holds the MiB-s display figure),
    # and said nothing about a rate it could not price.
    from elsa import config
    from elsa.billing import rates
    from elsa.report import ja

    cfg = tmp_path / "elsa.toml"
    cfg.write_text('[billing]\ntimezone = "UTC"\n[billing.rates]\nmem_integral = 1\n'
                   'mem_peak = 1\n[billing.nonprime]\nmem_integral = 1\nmem_peak = 1\n')
    billing = rates.from_config(config.load(str(cfg)))
    usage = {"processes": 1, "cpu_user_us": 1, "cpu_system_us": 0,
             "coremem_kb_us": 3600 * 1024 * 10 ** 6}  # 1 MiB-hour; no peak RSS measured
    monkeypatch.setattr(ja, "_finished", lambda jid, db, processes, *sock: {
        "processes": [], "folded": [], "usage": usage, "why": None, "incomplete": {}})
    now = 1_800_000_000.0
    reply = {"job": {"jid": 1, "created": now - 10, "state": "running", "params": {},
                     "pids": []}}
    rep = ja.build(reply, "unused.db", now=now, billing=billing)
    assert rep["summary"]["coremem_mib_s"] == 3600
    assert rep["charge"] == "1.00"
    assert any("mem_peak" in n for n in rep["notes"]), rep["notes"]


def test_summary_says_when_a_running_members_io_is_not_readable(monkeypatch):
    # Another user's process in the job (a setuid helper): its /proc/PID/io is not
    # readable, so the bytes read and written are those of the others only.
    from elsa.report import ja

    procs = {1: dict(pid=1, ppid=0, comm="sh", running=True, cpu_user_us=1, cpu_system_us=1,
                     max_rss_kb=10, read_bytes=100, write_bytes=200),
             2: dict(pid=2, ppid=1, comm="suid", running=True, cpu_user_us=1,
                     cpu_system_us=1, max_rss_kb=10, read_bytes=None, write_bytes=None)}
    monkeypatch.setattr(ja, "live_process", lambda pid: procs.get(pid))
    reply = {"job": {"jid": 1, "created": time.time() - 5, "state": "running",
                     "params": {}, "pids": [1, 2]}}
    rep = ja.build(reply, None)
    assert rep["summary"]["write_bytes"] == 200
    assert any("1 running process" in n for n in rep["notes"]), rep["notes"]
