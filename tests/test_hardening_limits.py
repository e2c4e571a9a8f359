"""A non-root user cannot lift the cgroup limits that confine their process.

On the real cgroup v2 hierarchy (hybrid here, pure v2 in the VM test): a
private parent cgroup with a limit holds an unprivileged user's process.
``attach`` of that process to a job elsewhere is refused with the reason;
``create --pid`` (what ``elsa-jobmng run`` does) nests the job's cgroup below
the limited one, so the limit still applies; root may move anything.

The limit is pids.max where the pids controller can be enabled for the test's
cgroups (pure v2), else cgroup.max.descendants (a core file: on this hybrid
host the v2 hierarchy has no resource controller to enable).
"""

from __future__ import annotations

import os
import uuid

import pytest

from elsa.kernel.cgroupfs import CgroupFS
from tests.conftest import wait_for
from tests.test_control_auth import (  # noqa: F401  (fixtures)
    accounts,
    as_user,
    attempt,
    shared_dir,
    user_proc,
)

pytestmark = pytest.mark.root

FS = CgroupFS()
MOUNT = FS.cgroup2_mount() or ""


def v2_of(pid: int) -> str:
    return os.path.normpath(MOUNT + (FS.own_cgroup(pid) or "/"))


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _rmtree_empty(path: str) -> None:
    if not os.path.isdir(path):
        return
    for e in os.scandir(path):
        if e.is_dir():
            _rmtree_empty(e.path)
    os.rmdir(path)


@pytest.fixture
def limited_area():
    if not MOUNT:
        pytest.skip("no cgroup2 mount")
    top = os.path.join(MOUNT, f"elsa-test-limits-{uuid.uuid4().hex[:8]}")
    os.mkdir(top)
    limited = os.path.join(top, "limited")
    try:
        if "pids" in FS.controllers(top):
            _write(os.path.join(top, "cgroup.subtree_control"), "+pids")
            os.mkdir(limited)
            _write(os.path.join(limited, "pids.max"), "50")
            limit = "pids.max=50"
        else:
            os.mkdir(limited)
            _write(os.path.join(limited, "cgroup.max.descendants"), "5")
            limit = "cgroup.max.descendants=5"
        yield top, limited, limit
    finally:
        wait_for(lambda: not _populated(top), 10, what="the test's cgroups to empty")
        _rmtree_empty(top)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _populated(path: str) -> bool:
    return "populated 1" in _read(os.path.join(path, "cgroup.events"))


def test_non_root_cannot_lift_limits_but_runs_nested_below_them(
        shared_dir, elsad, spawned, accounts, limited_area):  # noqa: F811
    a, _b, _gid, _group = accounts
    top, limited, limit = limited_area
    d = elsad("cgroup2", workdir=shared_dir,
              extra=f'[backends.cgroup2]\nbase = "{top}/elsa"\nkill_timeout = 5\n')
    p1, p2 = user_proc(spawned, a), user_proc(spawned, a)
    for p in (p1, p2):
        _write(os.path.join(limited, "cgroup.procs"), str(p.pid))
        assert v2_of(p.pid) == limited
    # A job in the usual place (created without a process), then attach: refused.
    plain = as_user(a, attempt(d.socket, "create", name="plain"))["ok"]
    r = as_user(a, attempt(d.socket, "attach", jid=plain["jid"], pids=[p1.pid]))
    assert r["code"] == "permission-denied"
    assert f"{limited}: {limit}" in r["message"] and "would leave the limits" in r["message"]
    assert v2_of(p1.pid) == limited  # not moved
    # create --pid (elsa-jobmng run): the job's cgroup is nested below the limit.
    nested = as_user(a, attempt(d.socket, "create", name="nested", pids=[p1.pid]))["ok"]
    path = v2_of(p1.pid)
    assert os.path.dirname(path) == limited and os.path.basename(path).startswith("elsa-")
    with d.client() as c:
        assert p1.pid in c.pids(nested["jid"])
    # The user's other process in the same limited cgroup may join that job.
    assert as_user(a, attempt(d.socket, "attach", jid=nested["jid"], pids=[p2.pid]))["ok"]
    assert v2_of(p2.pid) == path
    # Root may move anything, limits or not.
    with d.client() as c:
        c.call("attach", jid=plain["jid"], pids=[p2.pid])
        assert v2_of(p2.pid).startswith(f"{top}/elsa/")
        # Ending the nested job returns its process to the limited cgroup and
        # removes the nested cgroup.
        c.call("end", jid=nested["jid"])
        wait_for(lambda: not os.path.isdir(path), 10, what="the nested cgroup to go")
        assert v2_of(p1.pid) == limited
        c.call("end", jid=plain["jid"])
    for p in (p1, p2):
        p.kill()
        p.wait(5)
    d.stop()
