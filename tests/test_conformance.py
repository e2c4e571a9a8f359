"""The conformance suite (elsa.testing) against the three built-in backends, for real.

cgroup2 and cpuset run under private bases (``<cgroup2 mount>/elsa-test-<random>``
and ``<v1 cpuset mount>/elsa-test-<random>``); after each test no job cgroup may
be left, and the bases are removed.
"""

from __future__ import annotations

import os
import uuid

import pytest

from elsa.kernel.cgroupfs import CgroupFS
from elsa.testing import BackendConformance, BackendUnderTest, elsa_harness  # noqa: F401

pytestmark = pytest.mark.root


def _subdirs(path: str):
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    except FileNotFoundError:
        return []


def cgroup_bases(tag: str):
    """Private test bases under the real mounts, and a check/cleanup for them."""
    fs = CgroupFS()
    suffix = f"elsa-test-{tag}-{uuid.uuid4().hex[:8]}"
    v2 = os.path.join(fs.cgroup2_mount() or "/nonexistent", suffix)
    v1_mount = fs.cpuset_v1_mount()
    v1 = os.path.join(v1_mount, suffix) if v1_mount else ""
    return v2, v1


def make_check(*bases: str):
    def check() -> None:
        leftovers = {b: _subdirs(b) for b in bases if b}
        for b in bases:
            if b and os.path.isdir(b) and not _subdirs(b):
                os.rmdir(b)
        assert not any(leftovers.values()), f"cgroups left behind: {leftovers}"
        assert not any(os.path.exists(b) for b in bases if b)
    return check


@pytest.fixture(params=["cnproc", "cgroup2", "cpuset"])
def elsa_backend(request):
    name = request.param
    if name == "cnproc":
        yield BackendUnderTest("cnproc")
        return
    v2, v1 = cgroup_bases(name)
    if name == "cgroup2":
        but = BackendUnderTest("cgroup2", config=f'base = "{v2}"', check_clean=make_check(v2))
    else:
        if not v1:
            pytest.skip("no v1 cpuset hierarchy on this machine")
        # CPU 1 only: the pinning must be visible in every member.
        but = BackendUnderTest("cpuset", config=f'base = "{v2}"\nv1_base = "{v1}"\n'
                               'cpus = "1"\nmems = "0"', check_clean=make_check(v2, v1))
    yield but
    # Even if a test failed half-way, leave nothing behind (rmdir only: never remove a
    # cgroup that still holds processes).
    for b in (v2, v1 if name == "cpuset" else ""):
        if b and os.path.isdir(b):
            for sub in _subdirs(b):
                try:
                    os.rmdir(os.path.join(b, sub))
                except OSError:
                    pass
            try:
                os.rmdir(b)
            except OSError:
                pass


class TestBuiltinBackends(BackendConformance):
    pass
