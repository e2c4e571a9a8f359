"""Per-job rules an owner cannot get around: freeze/thaw follow kill's
per-member rule, a per-user cap on running jobs, empty jobs that never had a
process end after a timeout, and an attach cannot move a process that took a
checked pid (pidfd)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

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


@pytest.fixture
def base():
    if not MOUNT:
        pytest.skip("no cgroup2 mount")
    path = os.path.join(MOUNT, f"elsa-test-jobs-{uuid.uuid4().hex[:8]}")
    yield path
    if os.path.isdir(path):
        wait_for(lambda: FS.events(path)["populated"] == 0, 10, what="the test cgroups to empty")
        for e in os.scandir(path):
            if e.is_dir():
                os.rmdir(e.path)
        os.rmdir(path)


def test_owner_cannot_freeze_a_job_holding_another_users_process(
        base, shared_dir, elsad, spawned, accounts):  # noqa: F811
    a, _b, _gid, _group = accounts
    d = elsad("cgroup2", workdir=shared_dir,
              extra=f'[backends.cgroup2]\nbase = "{base}"\nkill_timeout = 5\n')
    pa = user_proc(spawned, a)
    job = as_user(a, attempt(d.socket, "create", pids=[pa.pid]))["ok"]
    root_proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    spawned.append(root_proc)
    with d.client() as c:
        c.call("attach", jid=job["jid"], pids=[root_proc.pid])  # root may
    r = as_user(a, attempt(d.socket, "freeze", jid=job["jid"]))
    assert r["code"] == "permission-denied" and str(root_proc.pid) in r["message"]
    path = job["params"]["cgroup_path"]
    assert FS.events(path)["frozen"] == 0
    # Without the foreign member, the owner may.
    with d.client() as c:
        c.call("detach", pids=[root_proc.pid])
    assert as_user(a, attempt(d.socket, "freeze", jid=job["jid"]))["ok"]["frozen"] is True
    assert as_user(a, attempt(d.socket, "thaw", jid=job["jid"]))["ok"]["frozen"] is False


def test_per_user_cap_on_running_jobs(shared_dir, elsad, accounts):  # noqa: F811
    a, _b, _gid, _group = accounts
    d = elsad(workdir=shared_dir, extra="[limits]\nmax_jobs_per_user = 3\n")

    def make(n: int):
        out = []
        for _ in range(n):
            out.append(attempt(d.socket, "create")())
        return out

    got = as_user(a, lambda: make(4))
    assert [("ok" in r) for r in got] == [True, True, True, False]
    assert got[3]["code"] == "permission-denied"
    assert "max_jobs_per_user" in got[3]["message"]
    with d.client() as c:
        c.create(name="root is not capped")
        c.call("end", jid=got[0]["ok"]["jid"])
    assert "ok" in as_user(a, attempt(d.socket, "create"))  # one slot free again


def test_empty_job_that_never_had_a_process_ends(elsad, spawned):
    d = elsad(extra="[limits]\nempty_job_timeout = 1\n")
    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    spawned.append(p)
    with d.client() as c:
        empty = c.create(name="empty")
        used = c.create(name="used", pids=[p.pid])
        t = time.monotonic()
        done = c.wait(empty["jid"], timeout=20)
        assert done["ended"] is True and time.monotonic() - t < 15
        assert c.call("show", jid=used["jid"])["state"] == "running"


def test_attach_does_not_move_a_process_that_reused_the_pid(base, tmp_path: Path,
                                                          monkeypatch):
    """The checked process exits and another takes its pid (forced with
    ns_last_pid) between the check and the cgroup.procs write: the newcomer
    is moved back and the attach reports the process gone."""
    from elsa.backends.cgroup2 import CGROUP2_OPTIONS, Cgroup2Backend
    from elsa.config import validate_table
    from elsa.core.backend import BackendContext
    from elsa.core.model import Job
    from elsa.errors import ProcessGone
    from elsa.kernel.procfs import ProcFS

    b = Cgroup2Backend()
    b.start(BackendContext(options=validate_table({"base": base}, CGROUP2_OPTIONS,
                                                  where="b", path="t"),
                           procfs=ProcFS(), state_dir=str(tmp_path)))
    job = Job(jid=0x99, name="reuse", owner_uid=0, tags=(), created=0.0, ended=None,
              state="running", backend="cgroup2")
    job = Job(**{**job.__dict__, "params": b.create_job(job)})
    path = job.params["cgroup_path"]
    victim = subprocess.Popen(["sleep", "60"])
    info = ProcFS().info(victim.pid)
    before = os.path.normpath(MOUNT + (FS.own_cgroup(victim.pid) or "/"))
    newcomers = []
    real_move = b.fs.move

    def racing_move(target: str, pid: int) -> None:
        if target == path and not newcomers:
            victim.kill()
            victim.wait()
            for _ in range(50):  # other forks on the machine may take the pid first
                with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
                    fh.write(str(pid - 1))
                n = subprocess.Popen(["sleep", "60"])
                if n.pid == pid:
                    newcomers.append(n)
                    break
                n.kill()
                n.wait()
            else:
                pytest.skip("could not make a process take the pid (busy machine)")
        real_move(target, pid)

    monkeypatch.setattr(b.fs, "move", racing_move)
    try:
        with pytest.raises(ProcessGone, match="exited during the attach"):
            b.attach(job, info)
        (n,) = newcomers
        assert os.path.normpath(MOUNT + (FS.own_cgroup(n.pid) or "/")) == before
        assert not b.members_of_path(path)
    finally:
        for n in newcomers:
            n.kill()
            n.wait()
        b.end_job(job)
        b.stop()
