"""cgroupfs adapter: parsers (golden samples), error translation, and the layouts this
machine cannot produce (pure cgroup v2 with systemd delegation, the v2 cpuset
controller) through an injected fake tree.

The fake-tree tests are MOCKS of the kernel: plain directories and files stand
in for cgroupfs, because this hybrid host binds cpuset/cpu/memory to v1 and is
not run by systemd. Everything that can run for real does so in
test_cgroup2.py, test_cpuset.py and test_conformance.py.
"""

from __future__ import annotations

import errno
import os
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elsa.backends.cgroup2 import Cgroup2Backend
from elsa.backends.cpuset import CpusetBackend
from elsa.core.backend import BackendContext
from elsa.core.model import Job, JobLimits
from elsa.errors import BackendError, PrivilegeError, ProcessGone
from elsa.kernel.cgroupfs import (
    CgroupFS,
    cpu_quota_us,
    parse_cpu_max,
    parse_mountinfo,
    parse_proc_cgroup,
    translate,
)
from elsa.kernel.cgroupstats import format_cpulist, parse_cpulist, parse_flat_keyed
from elsa.kernel.procfs import ProcFS

# This machine's mount table (hybrid: v1 controllers + cgroup2 at .../unified).
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# A Fedora/RHEL 9 style pure-v2 host (optional fields before the separator).
PURE_V2 = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 \
rw,seclabel,nsdelegate,memory_recursiveprot
"""


def test_mountinfo_hybrid_and_pure_v2() -> None:
    hybrid = parse_mountinfo(HYBRID)
    assert [m.fstype for m in hybrid].count("cgroup") == 3
    v2 = [m for m in hybrid if m.fstype == "cgroup2"]
    assert v2[0].mount_point == "/sys/fs/cgroup/unified"
    cpuset = [m for m in hybrid if "cpuset" in m.super_options]
    assert cpuset[0].mount_point == "/sys/fs/cgroup/cpuset"
    pure = parse_mountinfo(PURE_V2)
    assert pure[1].fstype == "cgroup2" and pure[1].mount_point == "/sys/fs/cgroup"
    assert "nsdelegate" in pure[1].super_options


def test_mountinfo_escapes_and_garbage() -> None:
    text = "50 31 0:40 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\nnot a mount line\n"
    (m,) = parse_mountinfo(text)
    assert m.mount_point == "/mnt/with space"


def test_discovery_from_injected_mountinfo(tmp_path: Path) -> None:
    (tmp_path / "mi").write_text(HYBRID)
    fs = CgroupFS(mountinfo=str(tmp_path / "mi"), fs_root="/fake")
    assert fs.cgroup2_mount() == "/fake/sys/fs/cgroup/unified"
    assert fs.cpuset_v1_mount() == "/fake/sys/fs/cgroup/cpuset"
    (tmp_path / "mi").write_text(PURE_V2)
    assert fs.cgroup2_mount() == "/fake/sys/fs/cgroup"
    assert fs.cpuset_v1_mount() is None


def test_live_discovery_matches_kernel() -> None:
    fs = CgroupFS()
    with open("/proc/self/mountinfo") as fh:
        text = fh.read()
    want = [line.split()[4] for line in text.splitlines() if " - cgroup2 " in line]
    assert fs.cgroup2_mount() == (want[0] if want else None)
    assert fs.own_cgroup() is not None or not want


def test_limits_set_skips_the_no_limit_values(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.high").write_text("max\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")  # a quota of "max": no limit
    (tmp_path / "pids.max").write_text("64\n")
    (tmp_path / "io.max").write_text("")
    (tmp_path / "hugetlb.2MB.max").write_text("2097152\n")
    (tmp_path / "cpuset.cpus").write_text("0-1\n")
    (tmp_path / "memory.current").write_text("4096\n")  # a reading, not a limit
    assert CgroupFS().limits_set(str(tmp_path)) == [
        ("cpuset.cpus", "0-1"), ("hugetlb.2MB.max", "2097152"),
        ("memory.max", "1073741824"), ("pids.max", "64")]
    assert CgroupFS().limits_set(str(tmp_path / "removed")) == []


def test_proc_cgroup() -> None:
    parsed = parse_proc_cgroup("9:name=systemd:/\n3:cpuset:/x\n1:cpu,cpuacct:/y\n0::/a/b\n")
    assert parsed[""] == "/a/b" and parsed["cpuset"] == "/x"
    assert parsed["cpu"] == parsed["cpuacct"] == "/y"


def test_flat_keyed() -> None:
    assert parse_flat_keyed("populated 1\nfrozen 0\n") == {"populated": 1, "frozen": 0}


@pytest.mark.parametrize("text,expected", [
    ("", set()), ("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-1,4,6-7", {0, 1, 4, 6, 7}),
    (" 1 ", {1}),
])
def test_cpulist(text: str, expected: set) -> None:
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize("bad", ["a", "3-1", "-1", "1,,2", "1-"])
def test_cpulist_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(bad)


@given(st.sets(st.integers(min_value=0, max_value=300)))
def test_cpulist_roundtrip(cpus: set) -> None:
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_translate_names_rule_and_remedy() -> None:
    e = translate(OSError(errno.EBUSY, "Device or resource busy"), "remove cgroup", "/x/y")
    assert isinstance(e, BackendError) and "/x/y" in e.message and "detach or kill" in e.message
    e = translate(OSError(errno.EOPNOTSUPP, "nope"), "move process 5", "/x/cgroup.procs")
    assert "no internal processes" in e.message
    e = translate(OSError(errno.ENOSPC, "No space"), "move process 5", "/c/cgroup.procs")
    assert "cpuset.cpus and cpuset.mems" in e.message
    assert isinstance(translate(OSError(errno.EACCES, "x"), "w", "/p"), PrivilegeError)
    assert isinstance(translate(OSError(errno.ESRCH, "x"), "w", "/p"), ProcessGone)


# -- fake trees (MOCK: the kernel's cgroupfs is simulated with plain files) ------------------

CORE_FILES = {"cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n",
              "cgroup.freeze": "0\n", "cgroup.kill": "", "cgroup.subtree_control": "",
              "cpu.stat": "usage_usec 0\n"}


class FakeV2(CgroupFS):
    """MOCK: mkdir creates the core files the kernel would, plus what *extra* says
    (e.g. cpuset files when the parent enabled the controller)."""

    def __init__(self, root: Path, controllers: str, cgroup: str, **kw) -> None:
        (root / "mountinfo").write_text(PURE_V2)
        proc = root / "proc" / "self"
        proc.mkdir(parents=True)
        (proc / "cgroup").write_text(f"0::{cgroup}\n")
        super().__init__(mountinfo=str(root / "mountinfo"), proc_root=str(root / "proc"),
                         fs_root=str(root), **kw)
        self.controllers_text = controllers
        mount = root / "sys" / "fs" / "cgroup"
        mount.mkdir(parents=True)
        self._populate(str(mount))
        cur = mount
        for part in cgroup.strip("/").split("/"):
            if part:
                cur = cur / part
                cur.mkdir()
                self._populate(str(cur))

    def _populate(self, path: str) -> None:
        for name, text in CORE_FILES.items():
            Path(path, name).write_text(text)
        Path(path, "cgroup.controllers").write_text(self.controllers_text + "\n")
        # (The kernel's files of a controller appear where the parent enables it;
        # listing them wherever it is available is close enough here.)
        if "cpu" in self.controllers_text.split():
            Path(path, "cpu.max").write_text("max 100000\n")
        if "memory" in self.controllers_text.split():
            Path(path, "memory.max").write_text("max\n")
        if "cpuset" in self.controllers_text.split():
            for name, text in {"cpuset.cpus": "", "cpuset.mems": "",
                               "cpuset.cpus.effective": "0-3\n",
                               "cpuset.mems.effective": "0\n"}.items():
                Path(path, name).write_text(text)

    def mkdir(self, path: str, exist_ok: bool = True) -> bool:
        created = super().mkdir(path, exist_ok)
        if created:
            self._populate(path)
        return created

    def move(self, path: str, pid: int) -> None:
        with open(os.path.join(path, "cgroup.procs"), "a") as fh:
            fh.write(f"{pid}\n")


def _ctx(tmp_path: Path, fs: CgroupFS, **options) -> BackendContext:
    from elsa.backends.cgroup2 import CGROUP2_OPTIONS
    from elsa.backends.cpuset import CPUSET_OPTIONS
    from elsa.config import validate_table

    schema = CPUSET_OPTIONS if "cpus" in options or "mode" in options else CGROUP2_OPTIONS
    opts = validate_table(options, schema, where="backends.x", path="test")
    return BackendContext(options=opts, procfs=ProcFS(), state_dir=str(tmp_path / "state"),
                          extra={"cgroupfs": fs})


def _job(jid: int, params=None) -> Job:
    return Job(jid=jid, name="t", owner_uid=0, tags=(), created=0.0, ended=None,
               state="running", backend="x", params=params or {})


def test_pure_v2_systemd_delegation_fake_tree(tmp_path: Path) -> None:
    """MOCK tree: pure v2 at /sys/fs/cgroup, elsad in a delegated service cgroup."""
    unit = "/system.slice/elsad.service"
    fs = FakeV2(tmp_path, "cpu memory io pids", unit)
    b = Cgroup2Backend()
    b.start(_ctx(tmp_path, fs, delegation="yes"))
    service = tmp_path / "sys/fs/cgroup/system.slice/elsad.service"
    assert b.base == str(service) and b.delegated
    # The daemon left its cgroup for a leaf ("no internal processes")...
    assert (service / "daemon" / "cgroup.procs").read_text().split() == [str(os.getpid())]
    # ...and the controllers were enabled for the job cgroups beside it.
    assert b.enabled == ["cpu", "memory", "io", "pids"] and b.missing == []
    params = b.create_job(_job(0x10))
    assert params["cgroup_path"] == str(service / "0x0000000000000010")
    assert b.status()["base"] == str(service)
    b.stop()


def test_pure_v2_auto_delegation_needs_systemd_and_xattr(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """MOCK tree: 'auto' uses the own cgroup only when systemd runs us and marked it
    delegated (trusted.delegate xattr, systemd >= 251); else <mount>/elsa."""
    unit = "/system.slice/elsad.service"
    fs = FakeV2(tmp_path, "cpu memory", unit)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    b = Cgroup2Backend()
    b.start(_ctx(tmp_path, fs))
    assert b.base == str(tmp_path / "sys/fs/cgroup/elsa") and not b.delegated
    assert b.missing == ["io", "pids"]
    b.stop()
    service = tmp_path / "sys/fs/cgroup/system.slice/elsad.service"
    try:
        os.setxattr(service, "trusted.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"this filesystem has no trusted xattrs ({exc.strerror})")
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    b = Cgroup2Backend()
    b.start(_ctx(tmp_path, fs))
    assert b.base == str(service) and b.delegated
    b.stop()


def test_base_outside_mount_refused(tmp_path: Path) -> None:
    fs = FakeV2(tmp_path, "", "/")
    b = Cgroup2Backend()
    with pytest.raises(BackendError, match="not below the cgroup2 mount"):
        b.start(_ctx(tmp_path, fs, base="/etc/elsa"))


def test_v2_cpuset_controller_fake_tree(tmp_path: Path) -> None:
    """MOCK tree: the v2 cpuset controller is available (not on this hybrid host)."""
    fs = FakeV2(tmp_path, "cpuset cpu memory", "/")
    b = CpusetBackend()
    b.start(_ctx(tmp_path, fs, cpus="", mode="auto"))
    assert b.mode == "v2" and "cpuset" in b.enabled
    assert b.status()["allowed_cpus"] == "0-3"
    with pytest.raises(BackendError, match="allowed CPUs: 0-3") as info:
        b.validate_params({"cpus": "2-7"})
    assert "4-7" in info.value.message
    with pytest.raises(BackendError, match="allowed memory nodes: 0"):
        b.validate_params({"mems": "1"})
    with pytest.raises(BackendError, match="cpus and mems"):
        b.validate_params({"cpu": "1"})
    params = b.validate_params({"cpus": "3,1-2"})
    assert params == {"cpus": "1-3", "mems": "0"}
    out = b.create_job(_job(0x20, params))
    job_dir = Path(out["cgroup_path"])
    assert (job_dir / "cpuset.cpus").read_text() == "1-3"
    assert (job_dir / "cpuset.mems").read_text() == "0"
    assert "cpuset_path" not in out  # no v1 twin
    b.stop()


def test_v2_mode_refused_without_controller(tmp_path: Path) -> None:
    fs = FakeV2(tmp_path, "cpu", "/")
    b = CpusetBackend()
    with pytest.raises(BackendError, match="mode = 'v2'"):
        b.start(_ctx(tmp_path, fs, mode="v2"))


def test_delegate_subgroup_daemon_leaf_fake_tree(tmp_path: Path) -> None:
    """MOCK tree: systemd >= 254 with DelegateSubgroup=daemon already put elsad in
    <service>/daemon; the base is the service cgroup, jobs beside the leaf."""
    fs = FakeV2(tmp_path, "cpu memory", "/system.slice/elsad.service/daemon")
    b = Cgroup2Backend()
    b.start(_ctx(tmp_path, fs, delegation="yes"))
    assert b.base == str(tmp_path / "sys/fs/cgroup/system.slice/elsad.service")
    b.stop()


@pytest.mark.root
def test_reading_a_removed_cgroup_means_empty_not_an_error(tmp_path):
    """elsad may remove a job's cgroup (last member gone) while someone reads it:
    kernfs answers ENODEV for an open file of a removed cgroup, ENOENT after."""
    from elsa.kernel.cgroupfs import CgroupFS

    fs = CgroupFS()
    mount = fs.cgroup2_mount()
    assert mount, "no cgroup2 mount"
    path = os.path.join(mount, f"elsa-test-gone-{os.getpid()}")
    os.mkdir(path)
    fh = open(os.path.join(path, "cgroup.events"), "rb")
    try:
        os.rmdir(path)
        with pytest.raises(OSError) as exc:  # the kernel behaviour the adapter must absorb
            os.pread(fh.fileno(), 4096, 0)
        assert exc.value.errno == errno.ENODEV
    finally:
        fh.close()
    assert fs.populated(path) is False
    assert fs.procs(path) == []
    # The race itself (removal between open and read inside populated()) cannot
    # be timed here: SIMULATED by raising the very error the kernel gave above.
    import builtins

    real_open = builtins.open

    def open_removed(file, *a, **kw):
        if str(file).startswith(path):
            raise OSError(exc.value.errno, os.strerror(exc.value.errno), str(file))
        return real_open(file, *a, **kw)

    builtins.open = open_removed
    try:
        assert fs.populated(path) is False
        assert fs.procs(path) == []
    finally:
        builtins.open = real_open


# -- job limits: cpu.max and memory.max ------------------------------------------------------

def test_cpu_max_golden_lines() -> None:
    assert parse_cpu_max("150000 100000\n") == Decimal("1.5")
    assert parse_cpu_max("50000 100000") == Decimal("0.5")
    assert parse_cpu_max("max 100000\n") is None  # no quota
    for bad in ("", "x 100000", "100000 0", "1 2 3"):
        with pytest.raises(ValueError):
            parse_cpu_max(bad)
    assert cpu_quota_us(Decimal("2")) == 200000
    assert cpu_quota_us(Decimal("0.01")) == 1000
    with pytest.raises(ValueError, match="smallest CPU quota the kernel takes"):
        cpu_quota_us(Decimal("0.005"))
    with pytest.raises(ValueError, match="largest CPU quota the kernel takes"):
        cpu_quota_us(Decimal("1e30"))


def test_read_limits_of_files_and_of_a_gone_cgroup(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    (tmp_path / "memory.max").write_text("268435456\n")
    fs = CgroupFS()
    assert fs.read_limits(str(tmp_path)) == JobLimits(Decimal("2.5"), 268435456)
    assert fs.read_limits(str(tmp_path), cpu=False) == JobLimits(None, 268435456)
    (tmp_path / "memory.max").write_text("max\n")
    assert fs.read_limits(str(tmp_path)) == JobLimits(Decimal("2.5"), None)
    # Not there (the cgroup is gone, or no memory controller): nothing known.
    assert fs.read_limits(str(tmp_path / "gone")) is None


def test_cgroup2_limits_written_kept_and_read_at_end_fake_tree(tmp_path: Path) -> None:
    """MOCK tree: pure v2 with the cpu and memory controllers (this hybrid host binds
    them to v1; the real kernel does this in the qemu guest, tests/vm). The job keeps
    what its cgroup holds at creation, and what it holds at its end."""
    fs = FakeV2(tmp_path, "cpu memory io pids", "/")
    b = Cgroup2Backend()
    b.start(_ctx(tmp_path, fs))
    params = b.validate_params({"cpu_limit": "1.5", "memory_limit": str(256 << 20)})
    assert params == {"cpu_limit": "1.5", "memory_limit": str(256 << 20)}
    out = b.create_job(_job(0x30, params))
    path = Path(out["cgroup_path"])
    assert (path / "cpu.max").read_text() == "150000 100000"
    assert (path / "memory.max").read_text() == str(256 << 20)
    assert out == {"cgroup_path": str(path), **params}
    # Changed by hand while the job runs: the end reading replaces the creation's,
    # a limit taken away goes (None).
    (path / "memory.max").write_text(f"{512 << 20}\n")
    (path / "cpu.max").write_text("max 100000\n")
    assert b.end_job(_job(0x30, out)) == {"cpu_limit": None, "memory_limit": str(512 << 20)}
    # A job created without limits keeps none, unless its cgroup gets some.
    out = b.create_job(_job(0x31))
    assert out == {"cgroup_path": str(tmp_path / "sys/fs/cgroup/elsa/0x0000000000000031")}
    (Path(out["cgroup_path"]) / "cpu.max").write_text("50000 100000\n")
    assert b.end_job(_job(0x31, out)) == {"cpu_limit": "0.5", "memory_limit": None}
    b.stop()


def test_cgroup2_refuses_limits_it_cannot_set_fake_tree(tmp_path: Path) -> None:
    """MOCK tree: only the cpu controller; bad values; a job nested below a process's
    limited cgroup (no controllers there)."""
    fs = FakeV2(tmp_path, "cpu", "/")
    b = Cgroup2Backend()
    b.start(_ctx(tmp_path, fs))
    assert b.validate_params({"cpu_limit": "2"}) == {"cpu_limit": "2"}
    with pytest.raises(BackendError, match="the memory controller is not enabled for job "
                                           "cgroups below .*available there: cpu"):
        b.validate_params({"memory_limit": str(1 << 30)})
    for bad, msg in (({"cpu_limit": "0"}, "not a number of cores"),
                     ({"cpu_limit": "lots"}, "not a number of cores"),
                     ({"cpu_limit": "0.001"}, "smallest CPU quota"),
                     ({"cpus": "0-1"}, "takes job parameters cpu_limit and memory_limit")):
        with pytest.raises(BackendError, match=msg):
            b.validate_params(bad)
    nested = _job(0x32, {"cpu_limit": "1", "nest_under": str(tmp_path / "sys/fs/cgroup")})
    with pytest.raises(BackendError, match="cannot give the job limits \\(cpu_limit\\)"):
        b.create_job(nested)
    b.stop()
    (tmp_path / "m").mkdir()
    fs2 = FakeV2(tmp_path / "m", "cpu memory", "/")
    b = Cgroup2Backend()
    b.start(_ctx(tmp_path / "m", fs2))
    with pytest.raises(BackendError, match="less than a page"):
        b.validate_params({"memory_limit": "100"})
    b.stop()
