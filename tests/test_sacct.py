"""`elsa jobs --format/--parsable2/--noheader` and `elsa eff` (sacct and seff conventions)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from elsa.core.aggregator import add_to_sums
from elsa.core.model import format_jid
from elsa.core.schema import migrate
from elsa.core.usage import save_priorities
from elsa.report.cli import main
from elsa.report.sacct import fmt_duration, fmt_size

T0 = 1_764_000_000.0


@pytest.fixture
def db_path(tmp_path):
    path = str(tmp_path / "elsa.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path)
    # Job 1: cpuset 0-1 (2 cores), 100 s wall, 150 s CPU, 1 GiB limit, 256 MiB peak.
    db.execute("INSERT INTO jobs VALUES (1, 'build', 0, ?, ?, ?, 'ended', 'cpuset', ?)",
               (json.dumps({"account": "chem", "partition": "short"}), T0, T0 + 100,
                json.dumps({"cpus": "0-1", "memory_limit": str(1 << 30)})))
    db.execute("INSERT INTO proc_usage(source, jid, pid, start_time, end_time, uid, comm, "
               "cpu_user_us, cpu_system_us, max_rss_kb, read_bytes, write_bytes) VALUES "
               "('taskstats', 1, 10, ?, ?, 0, 'cc', 120000000, 30000000, 262144, 1536, 0)",
               (T0, T0 + 100))
    add_to_sums(db)
    # Its first member (the script) exited 2; a later one was killed.
    db.execute("INSERT INTO members VALUES ('b', 10, 1, 1, ?, ?, 512, 'fork', 0)", (T0, T0 + 99))
    db.execute("INSERT INTO members VALUES ('b', 11, 2, 1, ?, ?, 9, 'fork', 0)",
               (T0 + 1, T0 + 50))
    # Job 2: no limits, no usage measured.
    db.execute("INSERT INTO jobs VALUES (2, 'idle', 0, '{}', ?, ?, 'ended', 'cnproc', '{}')",
               (T0 + 200, T0 + 90061))
    db.close()
    return path


def test_time_and_size_formats_like_sacct():
    assert fmt_duration(312) == "00:05:12"
    assert fmt_duration(93784) == "1-02:03:04"
    assert fmt_duration(62.345, millis=True) == "01:02.345"
    assert fmt_duration(None) == "-"
    assert fmt_size(512) == "512" and fmt_size(1536) == "1.50K"


def test_cpu_time_never_prints_60_seconds():
    # CPU figures are microseconds: 59.9996 s is 59.999 s in sacct's MM:SS.mmm
    # (milliseconds truncated, as sacct does), not '00:60.000'.
    assert fmt_duration(59_999_600 / 1e6, millis=True) == "00:59.999"
    assert fmt_duration(3_599_999_600 / 1e6, millis=True) == "59:59.999"
    assert fmt_duration(1_156_000 / 1e6, millis=True) == "00:01.156"
    assert fmt_duration(3600.0, millis=True) == "01:00:00"


def test_parsable2_format_order_and_noheader(db_path, capsys):
    assert main(["jobs", "--db", db_path, "--format", "jid,account,elapsed,cpu,maxrss,ncpus",
                 "--parsable2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "JID|ACCOUNT|ELAPSED|CPU|MAXRSS|NCPUS"
    rows = {ln.split("|")[0]: ln for ln in lines[1:]}
    assert rows[format_jid(1)] == f"{format_jid(1)}|chem|00:01:40|02:30.000|256.00M|2"
    assert rows[format_jid(2)] == f"{format_jid(2)}|-|1-00:57:41|-|-|-"
    assert not any(ln.endswith("|") for ln in lines)
    assert main(["jobs", "--db", db_path, "--format", "jid", "-P", "--noheader"]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted([format_jid(1), format_jid(2)])


def test_jobs_filter_by_tag(db_path, capsys):
    assert main(["jobs", "--db", db_path, "--tag", "account=chem", "-P", "-n",
                 "--format", "jid,partition"]) == 0
    assert capsys.readouterr().out == f"{format_jid(1)}|short\n"
    assert main(["jobs", "--db", db_path, "--tag", "account=none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_state_and_exit_from_the_first_member(db_path, capsys):
    assert main(["jobs", "--db", db_path, "-P", "-n", "--format", "jid,state,exit"]) == 0
    rows = dict(ln.split("|", 1) for ln in capsys.readouterr().out.split())
    assert rows[format_jid(1)] == "FAILED|2:0"
    assert rows[format_jid(2)] == "ENDED|-"  # no member: unknown, not 0:0


def test_format_help_and_unknown_field(db_path, capsys):
    assert main(["jobs", "--format", "help"]) == 0
    out = capsys.readouterr().out
    for name in ("jid", "elapsed", "cpu", "maxrss", "state", "exit"):
        assert f"\n{name} " in "\n" + out
    assert main(["jobs", "--db", db_path, "--format", "jid,bogus"]) == 2
    assert "unknown field(s) bogus" in capsys.readouterr().err


def test_eff_known_and_unknown(db_path, capsys):
    assert main(["eff", format_jid(1), "--db", db_path, "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["cpu_efficiency"] == pytest.approx(150 / (100 * 2))
    assert e["memory_efficiency"] == pytest.approx(0.25)
    assert e["cores"] == 2 and e["memory_limit_kb"] == 1 << 20
    assert main(["eff", format_jid(1), "--db", db_path]) == 0
    out = capsys.readouterr().out
    assert "CPU Efficiency: 75.00% of 00:03:20 core-walltime" in out
    assert "Memory Efficiency: 25.00% of 1.00G" in out
    assert main(["eff", format_jid(2), "--db", db_path, "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["cpu_efficiency"] is None and "no accounting source" in e["cpu_efficiency_why"]
    assert e["memory_efficiency"] is None and e["max_rss_kb"] is None
    capsys.readouterr()
    assert main(["eff", " 0x99", "--db", db_path]) == 2
    assert "no job 0x0000000000000099 in the store" in capsys.readouterr().err  # one spelling


def test_eff_of_a_pinned_job_divides_the_cpu_of_its_own_time(tmp_path, capsys):
    """A 1-core job busy for its whole wall time: the root's process record also holds
    elsa-jobmng's start-up before the join (the job's CPU figure, usage.note), which the
    cgroup's counter, from the job's creation, leaves out. Efficiency is the counter's."""
    path = str(tmp_path / "elsa.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path)
    save_priorities(db, db.execute, {"cgroupstat": 10, "taskstats": 20})
    db.execute("INSERT INTO jobs VALUES (5, 'pinned', 0, '{}', ?, ?, 'ended', 'cpuset', ?)",
               (T0, T0 + 2.0, json.dumps({"cpus": "1"})))
    db.execute("INSERT INTO proc_usage(source, jid, pid, start_time, end_time, uid, comm, "
               "cpu_user_us, cpu_system_us) VALUES ('taskstats', 5, 10, ?, ?, 0, 'python3', "
               "2030000, 68000)", (T0 - 0.07, T0 + 2.0))
    add_to_sums(db)
    db.execute("INSERT INTO job_usage(jid, source, cpu_user_us, cpu_system_us, updated) "
               "VALUES (5, 'cgroupstat', 1970000, 10000, ?)", (T0 + 2.0,))
    db.close()
    capsys.readouterr()  # the migration's log lines
    assert main(["eff", format_jid(5), "--db", path, "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["cpu_s"] == pytest.approx(2.098)  # the job's CPU: its records' (note)
    assert e["cpu_efficiency"] == pytest.approx(1.98 / 2.0)
