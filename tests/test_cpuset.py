"""cpuset backend on the real kernel (v1 cpuset hierarchy on this hybrid host):
members run only on the job's CPUs, lists outside the allowed set are refused
naming it, defaults come from [backends.cpuset]. The v2 cpuset controller path
is covered with an injected fake tree in test_cgroupfs.py (this host cannot
produce it).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from elsa.client import RequestFailed
from elsa.kernel.cgroupfs import CgroupFS
from elsa.kernel.cgroupstats import format_cpulist, parse_cpulist
from elsa.testing import BackendUnderTest, Harness, wait_for

pytestmark = pytest.mark.root

FS = CgroupFS()


def allowed_list(pid: int) -> str:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


@pytest.fixture
def harness(tmp_path: Path):
    v2m, v1m = FS.cgroup2_mount(), FS.cpuset_v1_mount()
    if not v2m or not v1m:
        pytest.skip("needs cgroup2 and the v1 cpuset hierarchy")
    online = parse_cpulist(open("/sys/devices/system/cpu/online").read())
    if 1 not in online:
        pytest.skip("needs CPU 1")
    tag = uuid.uuid4().hex[:8]
    v2, v1 = os.path.join(v2m, f"elsa-test-cs-{tag}"), os.path.join(v1m, f"elsa-test-cs-{tag}")
    h = Harness(BackendUnderTest("cpuset", config=f'base = "{v2}"\nv1_base = "{v1}"\n'
                                 'cpus = "1"'), tmp_path / "d")
    h.online = online  # type: ignore[attr-defined]
    yield h
    h.close()
    for b in (v2, v1):
        if os.path.isdir(b):
            left = [e.name for e in os.scandir(b) if e.is_dir()]
            os.rmdir(b)
            assert not left, f"left behind in {b}: {left}"


def test_members_run_only_on_job_cpus(harness: Harness) -> None:
    d = harness.start()
    h = harness.helper()
    before = allowed_list(h.pid)
    with d.client() as c:
        job = c.create(name="pin", pids=[h.pid], params={"cpus": "1"})
        assert job["params"]["cpus"] == "1" and job["params"]["mems"] == "0"
        assert allowed_list(h.pid) == "1"
        (child,) = h.cmd("child")["pids"]
        wait_for(lambda: child in c.pids(job["jid"]), 5, what="child joins")
        assert allowed_list(child) == "1"
        st = c.status()["backend_status"]
        assert st["cpuset_mode"] == "v1" and st["allowed_cpus"] == format_cpulist(
            harness.online)  # type: ignore[attr-defined]
        # Detach gives the process its CPUs back.
        c.detach([h.pid])
        assert allowed_list(h.pid) == before


def test_default_cpus_from_config(harness: Harness) -> None:
    d = harness.start()
    h = harness.helper()
    with d.client() as c:
        job = c.create(name="default", pids=[h.pid])
        assert job["params"]["cpus"] == "1"  # [backends.cpuset] cpus = "1"
        assert allowed_list(h.pid) == "1"
        assert open(os.path.join(job["params"]["cpuset_path"], "cpuset.cpus")).read().strip() \
            == "1"


@pytest.mark.parametrize("params,message", [
    ({"cpus": "0-63"}, "allowed CPUs: "),
    ({"cpus": "one"}, "not a list"),
    ({"mems": "5"}, "allowed memory nodes: 0"),
    ({"cores": "1"}, "takes job parameters cpus and mems"),
])
def test_invalid_lists_refused_naming_allowed_set(harness: Harness, params, message) -> None:
    d = harness.start()
    with d.client() as c:
        with pytest.raises(RequestFailed) as info:
            c.create(name="bad", params=params)
        assert info.value.code == "backend"
        assert message in info.value.message
        if "cpus" in params and params["cpus"] == "0-63":
            assert format_cpulist(harness.online) in info.value.message  # type: ignore
        assert c.list() == []
