"""elsad's own cost in ``status``: its CPU against the processes the machine started.

The kernel facts (/proc/stat's ``processes``, the per-thread CPU) are read from
the real kernel; a procfs root in a temporary directory checks the arithmetic
with figures the test chooses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from elsa.core.cost import EVENT_THREAD, SelfCost
from elsa.errors import KernelInterfaceError, ProcessGone
from elsa.kernel.procfs import ProcFS, line_value
from elsa.testing import wait_for


def _fork_and_reap(n: int) -> None:
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def test_forks_counts_the_processes_the_kernel_started():
    procfs = ProcFS()
    before = procfs.forks()
    _fork_and_reap(20)
    # Other processes on the machine fork too: at least ours.
    assert procfs.forks() - before >= 20


def test_forks_names_the_file_without_the_line(tmp_path):
    (tmp_path / "stat").write_text("cpu  1 2 3 4\nctxt 5\n")
    with pytest.raises(KernelInterfaceError, match=f"{tmp_path}/stat has no 'processes'"):
        ProcFS(str(tmp_path)).forks()


def test_busy_cpu_seconds_counts_a_burning_thread():
    procfs = ProcFS()
    before = procfs.busy_cpu_seconds()
    spent = time.thread_time() + 0.3
    while time.thread_time() < spent:
        pass
    # The machine was busy at least while this thread burned 0.3 s of CPU.
    assert procfs.busy_cpu_seconds() - before >= 0.25


def test_cpu_times_counts_a_thread_that_ended(tmp_path):
    procfs = ProcFS()
    user0, system0 = procfs.cpu_times(os.getpid())

    def burn() -> None:
        spent = time.thread_time() + 0.2
        while time.thread_time() < spent:
            pass

    t = threading.Thread(target=burn)
    t.start()
    t.join()
    user1, system1 = procfs.cpu_times(os.getpid())
    # The thread is gone; the process's figures keep what it used.
    assert (user1 + system1) - (user0 + system0) >= 0.15
    ticks = os.sysconf("SC_CLK_TCK")
    (tmp_path / "42").mkdir()
    fields = ["S"] + ["0"] * 10 + [str(3 * ticks), str(ticks)] + ["0"] * 30
    (tmp_path / "42" / "stat").write_text("42 (a) b) " + " ".join(fields) + "\n")
    assert ProcFS(str(tmp_path)).cpu_times(42) == (3.0, 1.0)
    with pytest.raises(ProcessGone, match=f"{tmp_path}/43/stat is gone"):
        ProcFS(str(tmp_path)).cpu_times(43)


def test_busy_cpu_seconds_leaves_out_idle_and_iowait(tmp_path):
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice
    (tmp_path / "stat").write_text(f"cpu  {ticks} 0 {ticks} 999999 888888 0 {ticks} {ticks} "
                                   f"{ticks} 0\ncpu0 1 2 3 4\nprocesses 7\n")
    assert ProcFS(str(tmp_path)).busy_cpu_seconds() == 4.0
    assert ProcFS(str(tmp_path)).steal_cpu_seconds() == 1.0
    (tmp_path / "stat").write_text("processes 7\n")
    with pytest.raises(KernelInterfaceError, match=f"{tmp_path}/stat has no 'cpu' line"):
        ProcFS(str(tmp_path)).busy_cpu_seconds()


def test_thread_cpu_follows_the_thread_that_burns():
    procfs = ProcFS()
    me = threading.get_native_id()
    before = procfs.thread_cpu(os.getpid())[me]
    done = threading.Event()
    other: dict = {}

    def idle() -> None:
        other["tid"] = threading.get_native_id()
        done.wait(10)

    t = threading.Thread(target=idle)
    t.start()
    try:
        x, deadline = 0, os.times().user + 0.3
        while os.times().user < deadline:  # 0.3 s of user time on this thread
            x += 1
        after = procfs.thread_cpu(os.getpid())
    finally:
        done.set()
        t.join()
    assert after[me][0] - before[0] >= 0.2
    assert sum(after[other["tid"]]) < 0.1     # the idle thread is counted on its own


def test_wakeups_count_each_sleep_of_each_thread_and_cpu_is_in_ns():
    procfs = ProcFS()
    before, cpu0 = procfs.wakeups_and_cpu(os.getpid())
    never, napped, done = threading.Event(), threading.Event(), threading.Event()

    def napper() -> None:
        for _ in range(20):  # 20 sleeps that time out: 20 wake-ups of this thread
            never.wait(0.002)
        napped.set()
        done.wait(10)
    t = threading.Thread(target=napper)
    t.start()
    try:
        x, deadline = 0, os.times().user + 0.05
        while os.times().user < deadline:  # some CPU on this thread meanwhile
            x += 1
        assert napped.wait(10)
        after, cpu1 = procfs.wakeups_and_cpu(os.getpid())  # the napper still lives
    finally:
        done.set()
        t.join()
    assert after - before >= 20
    assert cpu1 - cpu0 >= 40_000_000  # the 0.05 s of user time, at least, in ns


def test_line_value_finds_a_line_anywhere_and_only_at_a_line_start():
    data = b"Name:\tpython3\nUid:\t0\t1\t2\t3\nprocesses 42"
    assert line_value(data, b"Name:") == b"python3"  # the first line
    assert line_value(data, b"Uid:") == b"0\t1\t2\t3"
    assert line_value(data, b"processes ") == b"42"  # the last, with no newline
    assert line_value(data, b"ame:") is None and line_value(data, b"Gid:") is None


def test_argv_splits_cmdline_and_is_none_for_a_gone_process(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cmdline").write_bytes(b"sh\0-c\0echo a b\0")
    procfs = ProcFS(str(tmp_path))
    assert procfs.argv(7) == ["sh", "-c", "echo a b"]
    assert procfs.argv(8) is None


def test_wakeups_and_cpu_sum_the_threads_files(tmp_path):
    for tid, (switches, ns) in {7: (5, 1000), 9: (11, 250)}.items():
        task = tmp_path / "7" / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "status").write_text(f"Name:\tx\nvoluntary_ctxt_switches:\t{switches}\n"
                                     f"nonvoluntary_ctxt_switches:\t99\n")
        (task / "schedstat").write_text(f"{ns} 0 3\n")
    assert ProcFS(str(tmp_path)).wakeups_and_cpu(7) == (16, 1250)


def _fake_proc(root: Path, processes: int, ticks: int) -> None:
    (root / "stat").write_text(f"cpu  1 2 3 4\nprocesses {processes}\nprocs_running 1\n")
    task = root / str(os.getpid()) / "task" / str(threading.get_native_id())
    task.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 10 + [str(ticks), str(ticks // 2)] + ["0"] * 30
    (task / "stat").write_text(f"{os.getpid()} (elsa d) " + " ".join(fields) + "\n")


def test_status_divides_elsads_cpu_by_the_processes_started(tmp_path):
    _fake_proc(tmp_path, processes=1000, ticks=10)
    clock = iter([100.0, 110.0, 110.5, 111.0])
    cost = SelfCost(ProcFS(str(tmp_path)), clock=lambda: next(clock))
    cost.start()
    _fake_proc(tmp_path, processes=1250, ticks=40)   # 0.3 user + 0.15 system later
    st = cost.status()
    cpu = st["cpu_user_s"] + st["cpu_system_s"]
    assert st["seconds"] == 10.0 and st["processes_started"] == 250
    assert st["cpu_us_per_process"] == pytest.approx(cpu / 250 * 1e6, abs=0.1)
    assert st["cpu_percent"] == pytest.approx(100 * cpu / 10, abs=0.01)
    assert st["threads"] == {EVENT_THREAD: 0.45}
    # A poll within REFRESH_S gets the same figures without reading /proc again ...
    _fake_proc(tmp_path, processes=2000, ticks=40)
    assert cost.status() is st
    # ... and the next one reads it.
    assert cost.status()["processes_started"] == 1000


def test_status_without_proc_stat_still_answers(tmp_path):
    cost = SelfCost(ProcFS(str(tmp_path)))
    cost.start()
    st = cost.status()
    assert st["processes_started"] is None and st["cpu_us_per_process"] is None
    assert st["threads"] == {}


@pytest.mark.root
def test_elsad_reports_its_cpu_per_process_started(elsad):
    d = elsad()
    subprocess.run(["sh", "-c", "for i in $(seq 200); do /bin/true; done"], check=True)
    with d.client() as c:
        def counted() -> Optional[Dict[str, Any]]:
            cost = c.status()["cost"]  # at most REFRESH_S old
            return cost if cost["processes_started"] >= 200 else None

        cost = wait_for(counted, what="status to count the 200 processes")
    cpu = cost["cpu_user_s"] + cost["cpu_system_s"]
    assert cost["cpu_us_per_process"] == pytest.approx(
        cpu / cost["processes_started"] * 1e6, abs=0.1)
    assert {EVENT_THREAD, "elsa-store-writer"} <= set(cost["threads"])
    shown = subprocess.run(
        [sys.executable, "-m", "elsa.jobmng", "--socket", d.socket, "status"],
        capture_output=True, text=True, check=True).stdout
    assert "µs per process started on this machine" in shown, shown
