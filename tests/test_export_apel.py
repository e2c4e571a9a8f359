"""`elsa export apel`: every message ELSA writes passes a strict reader of
APEL's rules (tests/apel_strict.py); figures and units are the store's; bad
jobs are left out whole with a line saying why; each job goes out once."""

from __future__ import annotations

import calendar
import json
import os
import pwd
import sqlite3
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from elsa.core.schema import migrate
from elsa.report.cli import main
from tests import apel_strict

NOW = 1_764_000_000.0  # 2025-11-24T16:00Z; every job ended before the test runs
ME = pwd.getpwuid(os.getuid()).pw_name


def _free_uid() -> int:
    uid = 61_234
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


NO_USER = _free_uid()


def make_store(path: Path, jobs: List[Dict[str, Any]]) -> str:
    """A real store (the daemon's schema) holding *jobs* with cgroupstat usage."""
    db_path = str(path / "elsa.db")
    db = sqlite3.connect(db_path, isolation_level=None)
    migrate(db, db_path)
    for j in jobs:
        db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, 'cgroup2', ?)",
                   (j["jid"], j.get("name", "job"), j.get("uid", os.getuid()),
                    json.dumps(j.get("tags", {})), j["start"], j.get("end"),
                    "ended" if j.get("end") else "running", json.dumps(j.get("params", {}))))
        if j.get("cpu_user_us") is not None:
            db.execute("INSERT INTO job_usage(jid, source, processes, cpu_user_us, "
                       "cpu_system_us, max_rss_kb, read_bytes, write_bytes, updated) "
                       "VALUES (?, 'cgroupstat', ?, ?, ?, ?, ?, ?, ?)",
                       (j["jid"], j.get("procs", 3), j["cpu_user_us"], j["cpu_system_us"],
                        j.get("rss_kb"), 4096, 8192, j.get("end") or j["start"]))
    db.close()
    return db_path


def _job(jid: int, start: float, wall: float, cpu_u: Optional[int] = 1_500_000,
         cpu_s: int = 499_999, **kw: Any) -> Dict[str, Any]:
    return dict(jid=jid, start=start, end=start + wall, cpu_user_us=cpu_u,
                cpu_system_us=cpu_s, rss_kb=20480 + jid, **kw)


@pytest.fixture
def store(tmp_path: Path) -> str:
    jobs = [
        _job(1, NOW - 7200, 3600.4, tags={"job_id": "slurm-77", "partition": "short",
                                           "account": "atlas"}),
        _job(2, NOW - 3000, 100.6, name="x", params={"cpus": "0-3,6"}),
        _job(3, NOW - 2000, 10, uid=NO_USER),               # no user name: left out
        _job(4, NOW - 1000, 10, cpu_u=None),                # CPU unknown: left out
        dict(jid=5, start=NOW - 500, end=None),             # still running: left out
    ]
    return make_store(tmp_path, jobs)


def _messages(d: Path) -> List[str]:
    return [p.read_text() for p in sorted(d.iterdir()) if not p.name.startswith(".")]


def _all_records(msgs: List[str], want: str) -> List[Dict[str, Any]]:
    out = []
    for m in msgs:
        kind, recs, rejects = apel_strict.parse_message(m)
        assert kind == want
        assert rejects == [], rejects
        assert len(recs) <= 1000
        out.extend(recs)
    return out


def test_job_records_pass_apel_rules(store, tmp_path, capsys):
    out = tmp_path / "outgoing"
    assert main(["export", "apel", "--db", store, "--site", "ELSA-TEST", "--outgoing",
                 str(out), "--path-type", "directory"]) == 0
    cap = capsys.readouterr()
    recs = {r["LocalJobId"]: r for r in _all_records(_messages(out), "job")}
    assert set(recs) == {"slurm-77", "0x0000000000000002"}
    r = recs["slurm-77"]
    assert r["Site"] == "ELSA-TEST"
    assert r["LocalUserId"] == ME
    assert r["WallDuration"] == 3600                     # whole seconds
    assert r["CpuDuration"] == 2                         # 1.999999 s rounds to 2
    assert r["StartTime"] == int(NOW - 7200) and r["EndTime"] == int(NOW - 7200 + 3600.4)
    assert r["MemoryReal"] == 20481                      # kB
    assert r["Queue"] == "short" and r["VO"] == "atlas"
    assert r["SubmitHost"] and r["MachineName"]
    assert recs["0x0000000000000002"]["Processors"] == 5
    # The bad ones: a clear line each, never half a record.
    assert "0x0000000000000003 not exported: uid" in cap.err
    assert "no passwd entry" in cap.err
    assert "0x0000000000000004 not exported: no accounting source measured its CPU" in cap.err
    assert "0x0000000000000005 not exported: it has not ended yet" in cap.err
    assert "2 job records in 1 messages" in cap.out


def test_each_job_once_unless_again(store, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["export", "apel", "--db", store, "--site", "S", "--outgoing", str(out),
            "--json"]
    assert main(argv + ["--since", str(NOW - 3000)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["records"] == 1                         # job 2 only (job 1 ended earlier)
    assert main(argv) == 0                               # overlapping, wider: only job 1
    second = json.loads(capsys.readouterr().out)
    assert second["records"] == 1
    assert main(argv) == 0                               # a rerun: nothing new
    assert json.loads(capsys.readouterr().out)["records"] == 0
    assert main(argv + ["--again"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 2
    msgs = apel_strict.read_dirq(str(out))               # a dirq queue, as ssmsend reads it
    assert len(msgs) == 3
    ids = [r["LocalJobId"] for r in _all_records(msgs, "job")]
    assert sorted(ids) == sorted(["0x0000000000000002", "slurm-77", "0x0000000000000002",
                                  "slurm-77"])


def test_at_most_1000_records_a_message(tmp_path, capsys):
    jobs = [_job(i, NOW - 90_000 + i, 60) for i in range(1, 2502)]
    db = make_store(tmp_path, jobs)
    out = tmp_path / "out"
    assert main(["export", "apel", "--db", db, "--site", "S", "--outgoing", str(out),
                 "--path-type", "directory"]) == 0
    msgs = _messages(out)
    assert [len(apel_strict.parse_message(m)[1]) for m in msgs] == [1000, 1000, 501]
    assert len({r["LocalJobId"] for r in _all_records(msgs, "job")}) == 2501


def test_summary_per_month_user_vo(tmp_path, capsys):
    oct31 = calendar.timegm((2025, 10, 31, 23, 0, 0))
    jobs = [_job(1, oct31 - 100, 50, tags={"account": "atlas"}),        # October, atlas
            _job(2, oct31 - 90, 30, tags={"account": "atlas"}),         # October, atlas
            _job(3, oct31 - 80, 7200, tags={"account": "atlas"}),       # ends in November
            _job(4, oct31 - 70, 30, tags={"account": "cms"}),           # October, cms
            _job(5, oct31 - 60, 30, uid=NO_USER)]                       # no user: out
    db = make_store(tmp_path, jobs)
    out = tmp_path / "out"
    assert main(["export", "apel", "--summary", "--db", db, "--site", "S", "--outgoing",
                 str(out), "--path-type", "directory"]) == 0
    assert "0x0000000000000005 not exported" in capsys.readouterr().err
    recs = _all_records(_messages(out), "summary")
    got = {(r["Year"], r["Month"], r["VO"]): r for r in recs}
    assert set(got) == {(2025, 10, "atlas"), (2025, 11, "atlas"), (2025, 10, "cms")}
    a = got[(2025, 10, "atlas")]
    assert a["NumberOfJobs"] == 2 and a["WallDuration"] == 80 and a["CpuDuration"] == 4
    assert a["GlobalUserName"] == ME
    assert a["EarliestEndTime"] == int(oct31 - 60) and a["LatestEndTime"] == int(oct31 - 50)


def test_service_level_both_or_neither(store, tmp_path, capsys):
    cfg = tmp_path / "elsa.toml"
    cfg.write_text('[export.apel]\nservice_level_type = "hepscore23"\n')
    assert main(["export", "apel", "--config", str(cfg), "--db", store, "--site", "S",
                 "--outgoing", str(tmp_path / "o")]) == 2
    assert "service_level_type and service_level go together" in capsys.readouterr().err
    cfg.write_text('[export.apel]\nservice_level_type = "hepscore23"\nservice_level = 12.5\n'
                   '[export.apel.global_user_names]\n' + f'{ME} = "/DC=org/CN=Someone"\n')
    out = tmp_path / "o2"
    assert main(["export", "apel", "--config", str(cfg), "--db", store, "--site", "S",
                 "--outgoing", str(out), "--path-type", "directory"]) == 0
    recs = _all_records(_messages(out), "job")
    assert {(r["ServiceLevelType"], r["ServiceLevel"]) for r in recs} == {("hepscore23", 12.5)}
    assert {r["GlobalUserName"] for r in recs} == {"/DC=org/CN=Someone"}


def test_strict_reader_rejects_what_apel_rejects():
    good = ("APEL-individual-job-message: v0.3\nSite: S\nSubmitHost: h\nLocalJobId: 1\n"
            "WallDuration: 10\nCpuDuration: 5\nStartTime: 1000\nEndTime: 1010\n%%\n")
    assert apel_strict.parse_message(good)[2] == []
    for bad, why in ((good.replace("Site: S", "site: S"), "unknown field"),
                     (good.replace("CpuDuration: 5", "CpuDuration: 5.5"), "invalid value"),
                     (good.replace("CpuDuration: 5\n", ""), "missing mandatory"),
                     (good.replace("LocalJobId: 1", "LocalJobId: none"), "missing mandatory"),
                     (good.replace("%%", "ServiceLevel: 3\n%%"), "one without the other"),
                     (good.replace("EndTime: 1010", "EndTime: 999"), "before StartTime")):
        assert why in apel_strict.parse_message(bad)[2][0]
