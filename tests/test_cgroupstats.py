"""cgroup v2 stat parsers. This host's cgroup2 hierarchy (hybrid, few v2
controllers) only has the core cpu.stat, so memory.peak/io.stat/... parsing is
tested on golden file samples written to a tmp dir; cpu.stat also live."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from elsa.errors import CgroupGone
from elsa.kernel import cgroupstats as C
from elsa.kernel.cgroupfs import CgroupFS

GOLDEN = {
    "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
                "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
    "memory.peak": "104857600\n",
    "memory.current": "4096\n",
    "memory.stat": "anon 1048576\nfile 2097152\npgfault 1500\npgmajfault 7\n",
    "memory.events": "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
    "io.stat": "8:0 rbytes=1000 wbytes=2000 rios=1 wios=2 dbytes=0 dios=0\n"
               "253:1 rbytes=24 wbytes=4096 rios=3 wios=4 dbytes=0 dios=0\n",
    "pids.peak": "12\n",
    "pids.current": "0\n",
}


def test_golden_files_parse(tmp_path):
    for name, text in GOLDEN.items():
        (tmp_path / name).write_text(text)
    st = C.read_stats(str(tmp_path))
    assert st.missing == ()
    assert (st.cpu_usage_us, st.cpu_user_us, st.cpu_system_us) == (2500000, 2000000, 500000)
    assert st.memory_peak == 104857600 and st.pids_peak == 12
    assert st.io_total("rbytes") == 1024 and st.io_total("wbytes") == 6096
    assert st.memory_events["oom_kill"] == 1
    u = st.to_usage(jid=7)
    assert (u.pid, u.jid, u.source) == (0, 7, "cgroupstat")
    assert u.max_rss_kb == 102400 and u.read_bytes == 1024 and u.write_bytes == 6096
    assert u.majflt == 7 and u.minflt == 1493
    assert u.extra["memory_events_oom_kill"] == 1 and u.extra["pids_peak"] == 12


def test_missing_controller_files_are_reported_not_fatal(tmp_path):
    (tmp_path / "cpu.stat").write_text(GOLDEN["cpu.stat"])
    st = C.read_stats(str(tmp_path))
    assert "memory.peak" in st.missing and "io.stat" in st.missing
    u = st.to_usage(jid=1)
    assert u.cpu_user_us == 2000000 and u.max_rss_kb is None and u.read_bytes is None


def test_files_of_controllers_not_enabled_are_not_read(tmp_path):
    """cgroup.controllers says which controllers' files exist: the others are
    reported missing without a lookup (a file left there is not read)."""
    for name, text in GOLDEN.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    st = C.read_stats(str(tmp_path))
    assert set(st.missing) == {"memory.peak", "memory.current", "memory.stat",
                               "memory.events", "pids.peak", "pids.current"}
    assert st.memory_peak is None and st.pids_peak is None
    assert st.cpu_user_us == 2000000 and st.io_total("rbytes") == 1024


def test_removed_cgroup_is_gone(tmp_path):
    with pytest.raises(CgroupGone):
        C.read_stats(str(tmp_path / "nope"))


def test_mountinfo_parsing(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text("22 1 0:21 / /proc rw - proc proc rw\n"
                  "41 31 0:38 / /sys/fs/cgroup/my\\040dir rw,relatime - cgroup2 cgroup2 rw\n")
    assert CgroupFS(mountinfo=str(mi)).cgroup2_mount() == "/sys/fs/cgroup/my dir"


@pytest.mark.root
def test_live_cpu_stat_of_a_test_cgroup():
    mount = CgroupFS().cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount")
    path = os.path.join(mount, f"elsa-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        def join() -> None:
            with open(os.path.join(path, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))

        p = subprocess.Popen(["python3", "-c", "sum(range(2_000_000))"], preexec_fn=join)
        _, _, ru = os.wait4(p.pid, 0)
        st = C.read_stats(path)
        enabled = set(open(os.path.join(path, "cgroup.controllers")).read().split())
        assert ("memory.peak" in st.missing) == ("memory" not in enabled)
        ru_us = (ru.ru_utime + ru.ru_stime) * 1e6
        assert st.cpu_usage_us == pytest.approx(ru_us, rel=0.02, abs=20_000)
    finally:
        os.rmdir(path)
