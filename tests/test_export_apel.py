"""`elsa export apel`: every message ELSA writes passes a strict reader of
APEL's rules (tests/apel_strict.py); figures and units are the store's; bad
jobs are left out whole with a line saying why; each job goes out once."""

from __future__ import annotations

import calendar
import json
import os
import pwd
import socket
import sqlite3
import subprocess
import sys
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


@pytest.fixture(autouse=True)
def apel_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every export here runs with a benchmark configured (APEL requires one)."""
    return apel_strict.use_config(tmp_path, monkeypatch)


@pytest.fixture
def store(tmp_path: Path) -> str:
    jobs = [
        _job(1, NOW - 7200, 3600.4, tags={"wlm_job_id": "slurm-77", "queue": "short",
                                           "account": "atlas"}),
        _job(2, NOW - 3000, 100.6, name="x", params={"cpus": "0-3,6"}),
        _job(3, NOW - 2000, 10, uid=NO_USER),               # no user name: no LocalUserId
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
    assert set(recs) == {"slurm-77", "0x0000000000000002", "0x0000000000000003"}
    r = recs["slurm-77"]
    assert r["Site"] == "ELSA-TEST"
    assert r["LocalUserId"] == ME
    assert r["WallDuration"] == 3600                     # whole seconds
    assert r["CpuDuration"] == 2                         # 1.999999 s rounds to 2
    assert r["StartTime"] == int(NOW - 7200) and r["EndTime"] == int(NOW - 7200 + 3600.4)
    assert r["MemoryReal"] == 20481                      # kB
    assert r["Queue"] == "short" and r["VO"] == "atlas"
    assert r["SubmitHost"] == r["MachineName"] == socket.gethostname()  # as central's host
    assert recs["0x0000000000000002"]["Processors"] == 5
    # APEL does not need LocalUserId: a uid without a passwd entry goes without it.
    assert "LocalUserId" not in recs["0x0000000000000003"]
    # The bad ones: a clear line each, never half a record.
    assert "0x0000000000000004 not exported: no accounting source measured its CPU" in cap.err
    assert "0x0000000000000005 not exported: it has not ended yet" in cap.err
    assert "3 job records in 1 messages" in cap.out


def test_each_job_once_unless_again(store, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["export", "apel", "--db", store, "--site", "S", "--outgoing", str(out),
            "--json"]
    assert main(argv + ["--since", str(NOW - 3000)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["records"] == 2                         # jobs 2, 3 (job 1 ended earlier)
    assert main(argv) == 0                               # overlapping, wider: only job 1
    second = json.loads(capsys.readouterr().out)
    assert second["records"] == 1
    assert main(argv) == 0                               # a rerun: nothing new
    assert json.loads(capsys.readouterr().out)["records"] == 0
    assert main(argv + ["--again"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 3
    msgs = apel_strict.read_dirq(str(out))               # a dirq queue, as ssmsend reads it
    assert len(msgs) == 3
    ids = [r["LocalJobId"] for r in _all_records(msgs, "job")]
    assert sorted(ids) == sorted(["0x0000000000000002", "0x0000000000000003", "slurm-77"] * 2)


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
            _job(5, oct31 - 60, 30, uid=NO_USER)]                       # no user name
    db = make_store(tmp_path, jobs)
    out = tmp_path / "out"
    assert main(["export", "apel", "--summary", "--db", db, "--site", "S", "--outgoing",
                 str(out), "--path-type", "directory"]) == 0
    assert "not exported" not in capsys.readouterr().err
    recs = _all_records(_messages(out), "summary")
    got = {(r["Year"], r["Month"], r.get("VO")): r for r in recs}
    assert set(got) == {(2025, 10, "atlas"), (2025, 11, "atlas"), (2025, 10, "cms"),
                        (2025, 10, None)}
    assert "GlobalUserName" not in got[(2025, 10, None)]         # no user name: no user
    assert got[(2025, 10, None)]["NumberOfJobs"] == 1
    a = got[(2025, 10, "atlas")]
    assert a["NumberOfJobs"] == 2 and a["WallDuration"] == 80 and a["CpuDuration"] == 4
    assert a["GlobalUserName"] == ME
    assert a["EarliestEndTime"] == int(oct31 - 60) and a["LatestEndTime"] == int(oct31 - 50)
    assert {r["Processors"] for r in recs} == {0}                # no cpuset: unknown, 0


def test_summary_per_processors_as_apel_keys_it(tmp_path, capsys):
    """APEL keys a summary by its Processors too (NOT NULL): jobs of different CPU
    counts are separate records, a job without one counts as 0 as APEL's client
    writes it; a summary without Processors would fail the whole message."""
    jobs = [_job(1, NOW - 900, 10, params={"cpus": "0-3"}),
            _job(2, NOW - 800, 20, params={"cpus": "4-7"}),
            _job(3, NOW - 700, 40, params={"cpus": "0"}),
            _job(4, NOW - 600, 80)]
    db = make_store(tmp_path, jobs)
    out = tmp_path / "out"
    assert main(["export", "apel", "--summary", "--month", "2025-11", "--db", db, "--site",
                 "S", "--outgoing", str(out), "--path-type", "directory"]) == 0
    recs = _all_records(_messages(out), "summary")
    got = {r["Processors"]: (r["NumberOfJobs"], r["WallDuration"]) for r in recs}
    assert got == {4: (2, 30), 1: (1, 40), 0: (1, 80)}


def test_service_level_is_required_both_type_and_value(store, tmp_path, capsys):
    """APEL's loader rejects a job message without ServiceLevelType/ServiceLevel (it
    makes them "custom" and 1 when parsing, then refuses "custom" when it re-checks
    the record to store it) and a summary message without them (ServiceLevel is
    NOT NULL in its Summaries table): both are required, and nothing is written
    without them."""
    cfg = tmp_path / "elsa.toml"
    for text, why in (("", ("[export.apel]: service_level_type and service_level are not "
                            "set; APEL rejects every message without them",
                            "set service_level_type (hepscore23, hepspec or si2k) and "
                            "service_level")),
                      ('[export.apel]\nservice_level_type = "hepscore23"\n',
                       ("service_level_type and service_level go together", "set both"))):
        cfg.write_text(text)
        for extra in ([], ["--summary"]):
            assert main(["export", "apel", "--config", str(cfg), "--db", store, "--site",
                         "S", "--outgoing", str(tmp_path / "o"), *extra]) == 2
            err = capsys.readouterr().err
            assert all(w in err for w in why), err
        assert not (tmp_path / "o").exists()
    cfg.write_text('[export.apel]\nservice_level_type = "hepscore23"\nservice_level = 12.5\n'
                   '[export.apel.global_user_names]\n' + f'{ME} = "/DC=org/CN=Someone"\n')
    out = tmp_path / "o2"
    assert main(["export", "apel", "--config", str(cfg), "--db", store, "--site", "S",
                 "--outgoing", str(out), "--path-type", "directory"]) == 0
    recs = _all_records(_messages(out), "job")
    assert {(r["ServiceLevelType"], r["ServiceLevel"]) for r in recs} == {("hepscore23", 12.5)}
    assert {r.get("GlobalUserName") for r in recs} == {"/DC=org/CN=Someone", None}


def test_strict_reader_rejects_what_apel_rejects():
    good = ("APEL-individual-job-message: v0.3\nSite: S\nSubmitHost: h\nLocalJobId: 1\n"
            "WallDuration: 10\nCpuDuration: 5\nStartTime: 1000\nEndTime: 1010\n"
            "ServiceLevelType: HEPscore23\nServiceLevel: 10.5\n%%\n")
    assert apel_strict.parse_message(good)[2] == []
    for bad, why in ((good.replace("Site: S", "site: S"), "unknown field"),
                     (good.replace("CpuDuration: 5", "CpuDuration: 5.5"), "invalid value"),
                     (good.replace("CpuDuration: 5\n", ""), "missing mandatory"),
                     (good.replace("LocalJobId: 1", "LocalJobId: none"), "missing mandatory"),
                     (good.replace("ServiceLevelType: HEPscore23\n", ""),
                      "missing mandatory"),
                     (good.replace("ServiceLevelType: HEPscore23\nServiceLevel: 10.5\n", ""),
                      "missing mandatory"),
                     (good.replace("HEPscore23", "custom"), "unknown ServiceLevelType"),
                     (good.replace("EndTime: 1010", "EndTime: 999"), "before StartTime"),
                     (good.replace("LocalJobId: 1", "LocalJobId: 1%%2"), "missing mandatory"),
                     (good.replace("LocalJobId: 1", "LocalJobId: 1\u2028"), "without a key"),
                     (good.replace("LocalJobId: 1", "LocalJobId: " + "1" * 256),
                      "longer than APEL's column")):
        assert why in apel_strict.parse_message(bad)[2][0]


BAD_VALUES = ("77%%88", "null", " NONE ", "", "a\nb", "a\rb", "a\u2028b", "x" * 256)


def test_tags_apel_cannot_take_are_left_out_not_the_message(tmp_path, capsys):
    """A tag value that would split the message (%%, a line break), read as NULL or
    overflow APEL's column costs that one field (LocalJobId: the JID), never the
    message: every record of it loads with APEL's rules, and a line says what was
    left out."""
    jobs = [_job(1, NOW - 9000, 60, tags={"wlm_job_id": "ok-1", "queue": "long",
                                          "account": "atlas"})]
    for i, bad in enumerate(BAD_VALUES, start=2):
        jobs.append(_job(i, NOW - 8000 + i, 60, tags={"wlm_job_id": bad, "queue": bad,
                                                      "account": bad}))
    db = make_store(tmp_path, jobs)
    for argv, kind in ((["--path-type", "directory"], "job"),
                       (["--summary", "--path-type", "directory"], "summary")):
        out = tmp_path / kind
        assert main(["export", "apel", "--db", db, "--site", "S", "--outgoing", str(out),
                     *argv]) == 0
        err = capsys.readouterr().err
        recs = _all_records(_messages(out), kind)        # no rejection: the whole message loads
        if kind == "summary":
            assert sum(r["NumberOfJobs"] for r in recs) == len(jobs)
            assert {r.get("VO") for r in recs} == {"atlas", None}
            continue
        by_id = {r["LocalJobId"]: r for r in recs}
        assert set(by_id) == {"ok-1"} | {f"0x{i:016x}" for i in range(2, len(jobs) + 1)}
        assert by_id["ok-1"]["Queue"] == "long" and by_id["ok-1"]["VO"] == "atlas"
        for i in range(2, len(jobs) + 1):
            r = by_id[f"0x{i:016x}"]
            assert "Queue" not in r and "VO" not in r
        assert "job 0x0000000000000002: its tag 'wlm_job_id' contains %%" in err
        assert "LocalJobId is the JID" in err and "Queue is not written" in err
        assert "which APEL reads as NULL" in err and "longer than 255" in err
        assert "contains a line break" in err
        assert "job 0x0000000000000005" not in err      # an empty tag is no tag: no line


def test_a_queue_longer_than_apels_queue_parameter_is_left_out(tmp_path, capsys):
    """APEL's loader stores a job through ReplaceJobRecord, whose queue parameter is
    VARCHAR(100): a longer Queue fails the whole message in MySQL's strict mode
    (checked with APEL's schemas/server.sql on MariaDB), while other names may take
    255 characters."""
    jobs = [_job(1, NOW - 900, 60, tags={"wlm_job_id": "j" * 101, "queue": "q" * 101,
                                         "account": "v" * 101}),
            _job(2, NOW - 800, 60, tags={"queue": "q" * 100})]
    db = make_store(tmp_path, jobs)
    out = tmp_path / "out"
    assert main(["export", "apel", "--db", db, "--site", "S", "--outgoing", str(out),
                 "--path-type", "directory"]) == 0
    err = capsys.readouterr().err
    recs = {r["LocalJobId"]: r for r in _all_records(_messages(out), "job")}
    assert "Queue" not in recs["j" * 101] and recs["j" * 101]["VO"] == "v" * 101
    assert recs["0x0000000000000002"]["Queue"] == "q" * 100
    assert ("job 0x0000000000000001: its tag 'queue' is longer than 100 characters "
            "(APEL's column); Queue is not written") in err


def test_config_values_apel_cannot_take_are_refused(store, tmp_path, capsys):
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(apel_strict.CONFIG + 'submit_host = "ce%%1"\n')
    assert main(["export", "apel", "--config", str(cfg), "--db", store, "--site", "S",
                 "--outgoing", str(tmp_path / "o")]) == 2
    assert "[export.apel] submit_host = 'ce%%1' contains %%" in capsys.readouterr().err
    assert main(["export", "apel", "--db", store, "--site", "null", "--outgoing",
                 str(tmp_path / "o")]) == 2
    assert "APEL reads as NULL" in capsys.readouterr().err


def test_summary_sums_exact_durations_and_rounds_once(tmp_path, capsys):
    jobs = [_job(i, NOW - 5000 + 10 * i, 0.3, cpu_u=200_000, cpu_s=100_000,
                 tags={"account": "sumtest"}) for i in range(1, 9)]
    db = make_store(tmp_path, jobs)
    out = tmp_path / "out"
    assert main(["export", "apel", "--summary", "--db", db, "--site", "S", "--outgoing",
                 str(out), "--path-type", "directory"]) == 0
    (rec,) = _all_records(_messages(out), "summary")
    assert rec["NumberOfJobs"] == 8
    assert rec["CpuDuration"] == 2 and rec["WallDuration"] == 2    # 2.4 s each, not 8 x 0


def _elsa(*argv: str, tz: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TZ=tz, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "elsa.report.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=120)


def test_summary_months_are_utc_months_on_any_node(tmp_path):
    """A summary replaces the month's summary at APEL: a window that covers only part
    of a UTC month (local dates on a CET node) writes no summary of it, and --month
    takes the UTC month whatever the node's time zone."""
    oct31_late = calendar.timegm((2025, 10, 31, 23, 30, 0))        # Nov 1, 00:30 in Berlin
    nov30_late = calendar.timegm((2025, 11, 30, 23, 30, 0))        # Dec 1, 00:30 in Berlin
    nov15 = calendar.timegm((2025, 11, 15, 12, 0, 0))
    db = make_store(tmp_path, [_job(1, oct31_late - 60, 60), _job(2, nov15, 60),
                               _job(3, nov30_late - 60, 60)])
    common = ["export", "apel", "--summary", "--db", db, "--site", "S", "--path-type",
              "directory", "--json"]
    local = tmp_path / "local"
    r = _elsa(*common, "--outgoing", str(local), "--since", "2025-11-01", "--until",
              "2025-12-01", tz="Europe/Berlin")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["records"] == 0 and _messages(local) == []
    assert any("summary of 2025-10 not written" in n and "--month 2025-10" in n
               for n in got["notes"])
    assert any("summary of 2025-11 not written" in n for n in got["notes"])
    whole = tmp_path / "whole"
    r = _elsa(*common, "--outgoing", str(whole), "--month", "2025-11", tz="Europe/Berlin")
    assert r.returncode == 0, r.stderr
    (rec,) = _all_records(_messages(whole), "summary")
    assert (rec["Year"], rec["Month"], rec["NumberOfJobs"]) == (2025, 11, 2)
    assert rec["LatestEndTime"] == int(nov30_late)
    r = _elsa(*common, "--outgoing", str(whole), "--month", "2025-11", "--since", "1d",
              tz="UTC")
    assert r.returncode == 2 and "--month or --since/--until, not both" in r.stderr


def test_default_tags_are_those_the_batch_integration_writes(tmp_path, capsys):
    from elsa import wlm

    tags = wlm.detect({"SLURM_JOB_ID": "4242", "SLURM_JOB_PARTITION": "long",
                       "SLURM_JOB_ACCOUNT": "atlas", "SLURM_JOB_USER": ME}, "slurm")
    db = make_store(tmp_path, [_job(1, NOW - 100, 60, tags=tags)])
    out = tmp_path / "out"
    assert main(["export", "apel", "--db", db, "--site", "S", "--outgoing", str(out),
                 "--path-type", "directory"]) == 0
    (rec,) = _all_records(_messages(out), "job")
    assert (rec["LocalJobId"], rec["Queue"], rec["VO"]) == ("4242", "long", "atlas")


def test_a_summary_says_nothing_of_the_fields_it_does_not_write(tmp_path, capsys):
    """A summary has no Queue and no LocalJobId: a tag too long for them is no news."""
    jobs = [_job(1, NOW - 900, 60, tags={"wlm_job_id": "j" * 300, "queue": "q" * 101,
                                         "vo": "v" * 300})]
    db = make_store(tmp_path, jobs)
    out = tmp_path / "out"
    assert main(["export", "apel", "--summary", "--db", db, "--site", "S", "--outgoing",
                 str(out), "--path-type", "directory"]) == 0
    err = capsys.readouterr().err
    assert "VO is not written" in err
    assert "Queue" not in err and "LocalJobId" not in err
