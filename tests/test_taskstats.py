"""taskstats adapter: golden v16 messages, thread folding, live kernel queries."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from elsa.core import taskstats as T
from tests.support import taskstats_golden_messages

DATA = Path(__file__).parent / "data"


def test_golden_v16_messages_decode_to_expected_values():
    msgs = [T.decode_messages(d, 0)[0] for d in taskstats_golden_messages()]
    assert [len(m) for m in msgs] == [1, 1, 1]
    tasks = [m[0].task for m in msgs]
    assert [t.pid for t in tasks] == [12430, 12431, 12429]
    assert {t.tgid for t in tasks} == {12429} and {t.ppid for t in tasks} == {12379}
    assert {t.version for t in tasks} == {16} and {t.comm for t in tasks} == {"python3"}
    leader = tasks[2]
    assert leader.last_of_group and not tasks[0].last_of_group
    assert (leader.utime_us, leader.stime_us, leader.hiwater_rss_kb) == (47964, 12000, 13548)
    assert (leader.btime, leader.etime_us, leader.read_char, leader.nvcsw) == (
        1795304663, 70123, 1362944, 11)
    # Only the last thread's message carries the (delay-only) per-tgid struct.
    assert [m[0].tgid_stats is not None for m in msgs] == [False, False, True]


def test_threads_fold_into_their_process():
    folder = T.ThreadFolder()
    tasks = [T.decode_messages(d, 10**12)[0][0].task for d in taskstats_golden_messages()]
    assert folder.add(tasks[0]) is None and folder.add(tasks[1]) is None
    proc = folder.add(tasks[2])
    assert proc is not None and folder.pending == {}
    assert proc.pid == proc.tgid == 12429 and proc.threads == 3
    assert proc.utime_us == 4000 + 8000 + 47964
    assert proc.hiwater_rss_kb == 13548  # the shared mm's peak, not a sum
    u = proc.to_usage()
    assert u.pid == 12429 and u.extra["threads"] == 3 and u.extra["tick_utime_us"] == 59964
    # CPU is the precise runtime (cpu_run_virtual_total) split by the tick ratio.
    assert proc.cpu_run_ns == 6564902 + 6234270 + 55417947
    assert u.cpu_user_us + u.cpu_system_us == proc.cpu_run_ns // 1000


def test_lost_last_thread_expires_as_partial():
    folder = T.ThreadFolder()
    tasks = [T.decode_messages(d, 0)[0][0].task for d in taskstats_golden_messages()]
    folder.add(tasks[0], now=100.0)
    assert folder.expire(30.0, now=110.0) == []
    (p,) = folder.expire(30.0, now=131.0)
    assert p.pid == 12429 and p.threads == 1


def test_old_struct_versions_are_refused():
    buf = struct.pack("=H", 7) + bytes(400)
    with pytest.raises(T.UnsupportedVersion, match="version 7"):
        T.decode_stats(buf)


def test_v15_layout_is_decoded_from_its_own_offsets():
    # v15 inserted delay max/min pairs in the middle; ac_pid sits 48 bytes later.
    base_pid_off = 128
    buf = bytearray(700)
    struct.pack_into("=H", buf, 0, 15)
    struct.pack_into("=I", buf, base_pid_off + 48, 4321)
    struct.pack_into("=I", buf, 368 + 96, 4300)  # ac_tgid after six pairs
    rec = T.decode_stats(bytes(buf))
    assert rec.pid == 4321 and rec.tgid == 4300


@pytest.mark.root
def test_live_query_of_this_process():
    s = T.TaskstatsSocket()
    try:
        rec = s.query_pid(os.getpid())
    finally:
        s.close()
    stat = open("/proc/self/stat").read()
    fields = stat[stat.rfind(")") + 2:].split()
    assert rec.version >= 8 and rec.pid == rec.tgid == os.getpid()
    assert rec.ppid == os.getppid() and rec.comm == stat[stat.find("(") + 1:stat.rfind(")")]
    # Start time from etime and the receive time: within a few ticks of /proc's.
    assert abs(rec.start_ticks - int(fields[19])) <= 5


@pytest.mark.root
def test_live_listener_folds_a_multithreaded_process():
    s = T.TaskstatsSocket()
    s.register()
    folder = T.ThreadFolder()
    try:
        code = ("import threading\n"
                "def f():\n    sum(range(1_500_000))\n"
                "ts = [threading.Thread(target=f) for _ in range(3)]\n"
                "[t.start() for t in ts]\n[t.join() for t in ts]\n")
        p = subprocess.Popen(["python3", "-c", code])
        _, _, ru = os.wait4(p.pid, 0)
        got = None
        deadline = time.monotonic() + 5
        while got is None and time.monotonic() < deadline:
            for m in s.receive():
                if m.task is not None and m.task.tgid == p.pid:
                    got = folder.add(m.task) or got
            if got is None:
                time.sleep(0.005)
    finally:
        s.close()
    assert got is not None, "no folded exit record for the test process"
    assert got.threads == 4 and got.pid == p.pid
    cpu = sum(got.cpu_adjusted_us())
    ru_cpu = (ru.ru_utime + ru.ru_stime) * 1e6
    assert cpu == pytest.approx(ru_cpu, rel=0.02, abs=20_000)
    assert s.enobufs == 0
