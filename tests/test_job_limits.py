"""Job limits (CPU cores, memory bytes) as one typed model: its job parameters, the
cores a job is allowed, the limits a backend reads at a job's end kept with the job,
and what `elsa eff` and `elsa bill`'s core_hours make of them.

The kernel side (cpu.max, memory.max of a real job cgroup) is tested in
tests/test_cgroup2.py and, on a pure cgroup v2 host, in tests/vm.
"""

from __future__ import annotations

import json
import os
import sqlite3
from decimal import Decimal
from typing import Dict, Mapping, Optional

from elsa.backends.cnproc import CnprocBackend
from elsa.core.manager import JobManager
from elsa.core.model import Job, JobLimits, cores_allowed
from elsa.core.store import Store
from elsa.kernel.procfs import ProcFS


def test_params_round_trip_and_bad_values_are_no_limit() -> None:
    limits = JobLimits(cpus=Decimal("1.5"), memory=1 << 30)
    assert limits.params() == {"cpu_limit": "1.5", "memory_limit": str(1 << 30)}
    assert JobLimits.from_params(limits.params()) == limits
    assert JobLimits(cpus=Decimal(150000) / Decimal(100000)).params() == {"cpu_limit": "1.5"}
    assert JobLimits(cpus=Decimal(100000) / Decimal(300000)).params() == \
        {"cpu_limit": "0.333333"}
    assert JobLimits(cpus=Decimal(2)).params() == {"cpu_limit": "2"}
    assert JobLimits().params() == {}
    # Stored jobs are read, never refused: what is not a positive number is no limit.
    for bad in ("", "max", "0", "-1", "NaN", "Infinity", "1.5x", None, True):
        assert JobLimits.from_params({"cpu_limit": bad, "memory_limit": bad}) == JobLimits()
    assert JobLimits.from_params({"memory_limit": "1.5"}).memory is None


def test_cores_allowed_is_the_smaller_of_cpuset_and_quota() -> None:
    assert cores_allowed({}) is None
    assert cores_allowed({"cpus": "0-3,8"}) == 5
    assert cores_allowed({"cpu_limit": "1.5"}) == Decimal("1.5")
    assert cores_allowed({"cpus": "0-3", "cpu_limit": "1.5"}) == Decimal("1.5")
    assert cores_allowed({"cpus": "0", "cpu_limit": "4"}) == 1
    assert cores_allowed({"cpus": "garbage", "cpu_limit": "max"}) is None


class _EndReadsLimits(CnprocBackend):
    """A backend whose kernel object holds limits at the job's end (what cgroup2
    reads from cpu.max and memory.max: tests/test_cgroupfs.py)."""

    name = "cnproc"

    def __init__(self, at_end: Optional[Dict[str, Optional[str]]]) -> None:
        super().__init__()
        self.at_end = at_end

    def validate_params(self, params: Mapping[str, str]) -> Dict[str, str]:
        return dict(params)

    def end_job(self, job: Job) -> Optional[Dict[str, Optional[str]]]:
        return self.at_end


def _ended_params(tmp_path, created: Dict[str, str],
                  at_end: Optional[Dict[str, Optional[str]]]) -> Dict[str, str]:
    procfs = ProcFS()
    store = Store(str(tmp_path / "state"))
    try:
        m = JobManager(store=store, backend=_EndReadsLimits(at_end), procfs=procfs,
                       boot_id=procfs.boot_id())
        job = m.create(name="limits", owner_uid=os.getuid(), params=created)
        ended = m.end(job.jid)
        store.flush()
        row = store.job(job.jid)
        assert row is not None and dict(row.params) == dict(ended.params)
        return dict(row.params)
    finally:
        store.close()


def test_limits_read_at_the_end_are_stored_with_the_job(tmp_path) -> None:
    created = {"cpu_limit": "2", "memory_limit": str(1 << 30)}
    # Raised memory, quota taken away while the job ran: the end's figures stand.
    assert _ended_params(tmp_path / "a", created,
                         {"cpu_limit": None, "memory_limit": str(2 << 30)}) == \
        {"memory_limit": str(2 << 30)}
    # Nothing read at the end (no controller, cgroup gone): the creation's stay.
    assert _ended_params(tmp_path / "b", created, None) == created


def _eff(tmp_path, params: Dict[str, str], capsys) -> dict:
    from elsa.core.aggregator import add_to_sums
    from elsa.core.schema import migrate
    from elsa.report.cli import main

    path = str(tmp_path / "elsa.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path)
    t0 = 1_764_000_000.0
    db.execute("INSERT INTO jobs VALUES (7, 'lim', 0, '{}', ?, ?, 'ended', 'cgroup2', ?)",
               (t0, t0 + 100, json.dumps(params)))
    # 60 s of CPU over 100 s, 64 MiB peak.
    db.execute("INSERT INTO proc_usage(source, jid, pid, start_time, end_time, uid, comm, "
               "cpu_user_us, cpu_system_us, max_rss_kb) VALUES "
               "('taskstats', 7, 10, ?, ?, 0, 'x', 50000000, 10000000, 65536)",
               (t0, t0 + 100))
    add_to_sums(db)
    db.close()
    capsys.readouterr()
    assert main(["eff", "0x7", "--db", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eff_against_a_quota_and_a_memory_limit(tmp_path, capsys) -> None:
    e = _eff(tmp_path, {"cgroup_path": "/x", "cpu_limit": "0.75",
                        "memory_limit": str(256 << 20)}, capsys)
    assert e["cores"] == 0.75 and e["memory_limit_kb"] == 256 << 10
    assert e["cpu_efficiency"] == 60 / (100 * 0.75)
    assert e["memory_efficiency"] == 0.25 and e["memory_efficiency_why"] is None


def test_eff_of_a_job_without_limits_is_unchanged(tmp_path, capsys) -> None:
    e = _eff(tmp_path, {"cgroup_path": "/x"}, capsys)
    assert e["cores"] is None and e["memory_limit_kb"] is None
    assert e["cpu_efficiency"] is None and "no core limit" in e["cpu_efficiency_why"]
    assert e["memory_efficiency"] is None
    assert e["memory_efficiency_why"] == "the job has no memory limit"
    assert set(e) == {"jid", "name", "user", "state", "exit", "start", "end", "wall_s",
                      "cpu_s", "cpu_user_s", "cpu_system_s", "cores", "cpu_efficiency",
                      "cpu_efficiency_why", "max_rss_kb", "memory_limit_kb",
                      "memory_efficiency", "memory_efficiency_why"}


def test_core_hours_use_the_quota_cores() -> None:
    from elsa.billing.bill import quantities

    q = quantities({}, Decimal(7200), cores_allowed({"cpu_limit": "1.5"}), is_job=True)
    assert q["core_hours"] == Decimal(3)
    q = quantities({}, Decimal(7200), cores_allowed({}), is_job=True)
    assert q["core_hours"] is None
