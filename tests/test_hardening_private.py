"""Accounting data is private: the store is not readable by other users, and a
user's ``elsa`` reports go through elsad, which shows them their own jobs
only (private_data), with the same output as the local report."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest

from elsa import users
from elsa.billing import bill, rates  # noqa: F401  (elsa ja's: loaded before the fork)
from elsa.report import cli as report_cli
from elsa.report import ja, query, remote, sacct  # noqa: F401  (loaded before the fork)
from tests.test_control_auth import (  # noqa: F401  (fixtures)
    accounts,
    as_user,
    shared_dir,
)

pytestmark = pytest.mark.root

report_cli.build_parser().format_help()  # argparse's lazy parts, before the children run


def elsa_as_main(*argv: str):
    def run():
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = report_cli.main(list(argv))
        return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
    return run


def test_store_is_private_and_reports_go_through_elsad(shared_dir, elsad, accounts):  # noqa: F811
    a, b, _gid, _group = accounts
    d = elsad(workdir=shared_dir)
    with d.client() as c:
        # Names that no hex JID can contain, so the table check below means what it says.
        ja = [c.create(name=f"alpha-{i}", owner_uid=a.uid)["jid"] for i in range(2)]
        jb = c.create(name="bravo-0", owner_uid=b.uid)["jid"]
        c.call("end", jid=ja[0])
    db = os.path.join(d.state_dir, "elsa.db")
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert not stat.S_IMODE(os.stat(d.state_dir).st_mode) & 0o044  # not listable
    assert as_user(a, lambda: os.access(db, os.R_OK)) is False
    common = ("--state-dir", d.state_dir, "--socket", d.socket)
    # Root reads the store itself; A gets the same rows for A's jobs, via elsad.
    users._NAMES.clear()  # uids of users other tests created and removed
    mine = json.loads(elsa_as_main("jobs", "--json", *common)()["stdout"])
    r = as_user(a, elsa_as_main("jobs", "--json", *common))
    assert r["rc"] == 0, r["stderr"]
    def steady(rows):  # a running job's wall time grows between the two reads
        return [{k: v for k, v in j.items() if k != "wall_us"} for j in rows]

    assert steady(json.loads(r["stdout"])) == steady(
        [j for j in mine if j["owner_uid"] == a.uid])
    assert {j["jid"] for j in json.loads(r["stdout"])} == set(ja)
    # The table is the same as root's for the same rows.
    table = as_user(a, elsa_as_main("jobs", *common))["stdout"]
    assert "alpha-0" in table and "alpha-1" in table and "bravo-0" not in table
    # Another user's job: refused, with the reason.
    r = as_user(a, elsa_as_main("job", jb, *common))
    assert r["rc"] != 0 and "not yours" in r["stderr"]
    r = as_user(a, elsa_as_main("job", ja[1], "--json", *common))
    assert r["rc"] == 0 and json.loads(r["stdout"])["jid"] == ja[1]
    # Totals over every user's commands are not for a normal user.
    r = as_user(a, elsa_as_main("summary", "--by", "command", *common))
    assert r["rc"] != 0 and "private_data" in r["stderr"]
    r = as_user(a, elsa_as_main("summary", "--by", "job", "--json", *common))
    assert {j["jid"] for j in json.loads(r["stdout"])} == set(ja)
    # elsa eff and elsa apps take the same path, under the same rule.
    r = as_user(a, elsa_as_main("eff", ja[1], "--json", *common))
    assert r["rc"] == 0, r["stderr"]
    r = as_user(a, elsa_as_main("eff", jb, *common))
    assert r["rc"] != 0 and "not yours" in r["stderr"]
    r = as_user(a, elsa_as_main("apps", "--by", "binary", "--json", *common))
    assert r["rc"] == 0 and json.loads(r["stdout"]) == [], r["stderr"]
    r = as_user(a, elsa_as_main("apps", "--job", jb, *common))
    assert r["rc"] != 0 and "not yours" in r["stderr"]
    # elsa bill: elsad's rate table, the caller's own items only.
    soon = str(int(time.time()) + 3600)
    r = as_user(a, elsa_as_main("bill", "--by", "user", "--since", "1d", "--until", soon,
                                "--json", *common))
    assert r["rc"] == 0, r["stderr"]
    assert [row["key"] for row in json.loads(r["stdout"])["rows"]] == [a.name]


def test_private_data_false_opens_reports(shared_dir, elsad, accounts):  # noqa: F811
    a, b, _gid, _group = accounts
    d = elsad(workdir=shared_dir, extra="[reports]\nprivate_data = false\n")
    with d.client() as c:
        jb = c.create(name="b0", owner_uid=b.uid)["jid"]
    r = as_user(a, elsa_as_main("job", jb, "--json", "--state-dir", d.state_dir,
                                "--socket", d.socket))
    assert r["rc"] == 0, r["stderr"]
    assert json.loads(r["stdout"])["owner_uid"] == b.uid


def test_ja_of_a_user_counts_the_finished_processes(shared_dir, elsad, accounts):  # noqa: F811
    # The store is private: a user's 'elsa ja' reads the job's finished processes
    # from elsad, as 'elsa job' does, instead of leaving them out ("finished
    # processes not included") and charging the running ones only.
    a, _b, _gid, _group = accounts
    d = elsad(workdir=shared_dir, extra="[sources.taskstats]\n")

    def run():
        from elsa.client import Client

        with Client(d.socket, timeout=10) as c:
            c.call("create", name="mine", pids=[os.getpid()])
        # A command of the job that finishes (the batch script's work), then ja.
        subprocess.run(["/bin/sh", "-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done"],
                       check=True)
        return elsa_as_main("ja", "--json", "--state-dir", d.state_dir, "--socket",
                            d.socket)()

    r = as_user(a, run)
    assert r["rc"] == 0, r["stderr"]
    rep = json.loads(r["stdout"])
    assert rep["notes"] == [] or not any("not included" in n for n in rep["notes"]), rep
    assert rep["summary"]["processes_finished"] >= 1
    sh = [c for c in rep["commands"] if c["command"] == "sh" and c["running"] == 0]
    assert sh and sh[0]["cpu_user_us"] + sh[0]["cpu_system_us"] > 0, rep["commands"]



def test_a_job_nobody_has_is_no_job_not_another_users(shared_dir, elsad, accounts):  # noqa: F811
    from elsa.core.model import format_jid, parse_jid

    a, _b, _gid, _group = accounts
    d = elsad(workdir=shared_dir)
    with d.client() as c:
        jid = c.create(name="mine", owner_uid=a.uid)["jid"]
    missing = format_jid(parse_jid(jid) + 1000)  # (a typo of the user's)
    for report in ("job", "eff"):
        r = as_user(a, elsa_as_main(report, missing, "--state-dir", d.state_dir,
                                    "--socket", d.socket))
        assert r["rc"] == 2 and r["stderr"].startswith(
            f"elsa: no job {missing} in the store"), (report, r)


def test_a_store_named_but_not_readable_says_so_and_how_to_get_the_report(
        shared_dir, elsad, accounts):  # noqa: F811
    a, _b, _gid, _group = accounts
    d = elsad(workdir=shared_dir)
    db = os.path.join(d.state_dir, "elsa.db")
    # --state-dir with no socket to ask: not "unable to open database file".
    r = as_user(a, elsa_as_main("jobs", "--state-dir", d.state_dir))
    assert r["rc"] == 2 and f"cannot read store {db}: permission denied" in r["stderr"], r
    assert "--socket" in r["stderr"], r
    # The packaged unit makes the state dir 0700: the file cannot even be seen,
    # which is no reason to say there is no store.
    os.chmod(d.state_dir, 0o700)
    r = as_user(a, elsa_as_main("jobs", "--state-dir", d.state_dir))
    assert r["rc"] == 2 and f"cannot read store {db}: permission denied" in r["stderr"], r
