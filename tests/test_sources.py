"""Source plugins against the real kernel (issue 5 "Must show"): CPU agreement
of taskstats, cgroup cpu.stat and getrusage; bsdacct managed mode (switch,
rotate without loss, restore); restart mid-stream without loss or doubles."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from typing import List

import pytest

from elsa.core.model import Job
from elsa.core.source import SourceContext, UsageRecord
from elsa.kernel import cgroupstats, pacct
from elsa.kernel import taskstats as T
from elsa.kernel.cgroupfs import CgroupFS
from elsa.kernel.procfs import ProcFS
from elsa.kernel.taskstats_socket import TaskstatsSocket

WORKERS = 4
ROOT_CODE = f"""
import json, os, resource, subprocess, sys
burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass"
ps = [subprocess.Popen([sys.executable, "-S", "-c", burn]) for _ in range({WORKERS})]
for p in ps:
    p.wait()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({{"children_us": (ru.ru_utime + ru.ru_stime) * 1e6,
                   "pids": [p.pid for p in ps]}}))
"""


def _ctx(tmp_path, options, emitted: List[UsageRecord], jobs=()):
    return SourceContext(options=options, procfs=ProcFS(), state_dir=str(tmp_path),
                         emit=emitted.extend, jobs=lambda: list(jobs))


@pytest.mark.root
def test_job_cpu_agrees_across_taskstats_cgroup_and_getrusage(tmp_path):
    mount = CgroupFS().cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount")
    from elsa_plugins.cgroupstat import CgroupStatSource

    cg = os.path.join(mount, f"elsa-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(cg)
    sock = TaskstatsSocket()
    sock.register()
    folder = T.ThreadFolder()
    try:
        def join() -> None:
            with open(os.path.join(cg, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))

        root = subprocess.Popen([sys.executable, "-S", "-c", ROOT_CODE], preexec_fn=join,
                                stdout=subprocess.PIPE)
        out = root.stdout.read()
        _, _, ru = os.wait4(root.pid, 0)
        report = json.loads(out)
        job_pids = {root.pid, *report["pids"]}
        procs = {}
        deadline = time.monotonic() + 5
        while len(procs) < len(job_pids) and time.monotonic() < deadline:
            for m in sock.receive():
                if m.task is not None and m.task.tgid in job_pids:
                    done = folder.add(m.task)
                    if done is not None:
                        procs[done.tgid] = done
            time.sleep(0.005)
        # The cgroupstat source's final reading (as job_ending takes it).
        emitted: List[UsageRecord] = []
        src = CgroupStatSource()
        src.start(_ctx(tmp_path, {"interval": 10.0, "mount": ""}, emitted))
        job = Job(jid=1, name="t", owner_uid=0, tags=(), created=0, ended=None,
                  state="running", backend="cgroup2", params={"cgroup_path": cg})
        src.job_ending(job)
        cpu_stat = cgroupstats.read_stats(cg)
    finally:
        sock.close()
        os.rmdir(cg)
    assert sock.enobufs == 0
    # The process count equals what the workload started (root + workers).
    assert set(procs) == job_pids and len(procs) == WORKERS + 1
    ts_workers = sum(sum(procs[p].cpu_adjusted_us()) for p in report["pids"])
    ts_job = sum(sum(p.cpu_adjusted_us()) for p in procs.values())
    rusage_job = (ru.ru_utime + ru.ru_stime) * 1e6  # root + its waited children
    (reading,) = emitted
    cg_job = reading.cpu_user_us + reading.cpu_system_us
    assert ts_workers == pytest.approx(report["children_us"], rel=0.02)
    assert ts_job == pytest.approx(rusage_job, rel=0.02)
    assert cpu_stat.cpu_usage_us == pytest.approx(ts_job, rel=0.02)
    assert cg_job == pytest.approx(cpu_stat.cpu_usage_us, rel=0.02)
    assert ts_workers >= WORKERS * 0.3e6 * 0.98


@pytest.mark.root
def test_bsdacct_managed_mode_switches_rotates_without_loss_and_restores(tmp_path):
    from elsa_plugins import bsdacct

    previous = bsdacct.BsdAcctSource()._probe(["/var/log/account/pacct",
                                                "/var/account/pacct"])
    emitted: List[UsageRecord] = []
    src = bsdacct.BsdAcctSource()
    opts = {"mode": "managed", "file": "", "rotate_size": 1, "keep_files": 0,
            "interval": 1.0, "ownership_check": 10.0,
            "probe_files": ["/var/log/account/pacct"]}
    src.start(_ctx(tmp_path, opts, emitted))
    try:
        assert src.switched_on and src.previous == previous
        mine = []
        for _ in range(4):
            p = subprocess.Popen(["true"])
            p.wait()
            mine.append(p.pid)
            src.poll()  # rotate_size 1: every poll after a record switches files
    finally:
        src.stop()
    assert src.rotations >= 3
    got = [r.pid for r in emitted if r.pid in mine]
    assert sorted(got) == sorted(mine)  # every record once, across the rotations
    # Switched back: a process exiting now is not written to our files.
    before = sum(os.path.getsize(os.path.join(src.dir, n)) for n in os.listdir(src.dir)
                 if n.startswith("pacct."))
    subprocess.run(["true"])
    after = sum(os.path.getsize(os.path.join(src.dir, n)) for n in os.listdir(src.dir)
                if n.startswith("pacct."))
    assert after == before


def _count(db_path: str):
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT COUNT(*), COUNT(DISTINCT pid) FROM proc_usage "
                              "WHERE source = 'bsdacct' AND pid >= 900000").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return (0, 0)


@pytest.mark.root
def test_restart_mid_stream_loses_and_doubles_nothing(elsad, tmp_path):
    from tests.conftest import wait_for

    f = tmp_path / "ext.pacct"
    f.touch()
    extra = (f'[sources.bsdacct]\nmode = "external"\nfile = "{f}"\ninterval = 0.05\n')
    d = elsad(extra=extra)
    db_path = os.path.join(d.state_dir, "elsa.db")
    recs = [pacct.AcctRecord(offset=0, flag=0, tty=0, exitcode=0, uid=0, gid=0,
                             pid=900_000 + i, ppid=1, btime=int(time.time()) - 60,
                             etime=1.0, utime=1, stime=0, mem=100, io=0, rw=0, minflt=0,
                             majflt=0, comm="synthetic") for i in range(3000)]
    data = pacct.encode(recs)
    with open(f, "ab") as fh:
        fh.write(data[:64 * 1000 + 17])  # ends mid-record
    wait_for(lambda: _count(db_path)[0] >= 1000, 20, what="first 1000 records")
    with open(f, "ab") as fh:
        fh.write(data[64 * 1000 + 17:64 * 2000])
    time.sleep(0.03)  # let it be mid-way through the second batch
    d.kill9()         # no clean stop: offsets may be behind the store
    with open(f, "ab") as fh:
        fh.write(data[64 * 2000:])
    d2 = elsad(extra=extra, workdir=tmp_path)
    wait_for(lambda: _count(db_path)[0] >= 3000, 20, what="all 3000 records")
    time.sleep(0.3)
    assert _count(db_path) == (3000, 3000)
    st = d2.call("status")
    assert st["sources"]["bsdacct"]["corrupt"] == 0


def test_bsdacct_external_file_that_does_not_exist_is_told_until_it_appears(tmp_path):
    """A typo in [sources.bsdacct] file, or psacct not running: the follower waits for
    the file, and nothing said so (no warning, status clean), so bsdacct silently
    had no records. status names the file and what to check until it appears."""
    from elsa.config import validate_table
    from elsa_plugins import bsdacct

    path = tmp_path / "account" / "pacct"
    opts = validate_table({"mode": "external", "file": str(path)}, bsdacct.OPTIONS,
                          where="sources.bsdacct", path="test")
    src = bsdacct.BsdAcctSource()
    src.start(_ctx(tmp_path, opts, []))
    try:
        problem = src.status()["last_problem"]
        assert problem.startswith(f"{path} does not exist (yet): no bsdacct records until "
                                  "it appears"), problem
        assert "[sources.bsdacct] file" in problem, problem
        src.poll()
        assert src.status()["last_problem"] == problem  # still missing
        path.parent.mkdir()
        path.touch()
        src.poll()
        assert src.status()["last_problem"] == ""
    finally:
        src.stop()
