"""Nothing silent across a restart: a source that cannot cover elsad's downtime
(taskstats: records are not queued while nobody listens) gets the jobs that ran
across it flagged incomplete with the interval; `elsa job` and `elsa-jobmng
status` show the gap. Sources that do cover it (cgroup counters) are not flagged."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from elsa.core.accounting import ALIVE_KEY
from elsa.testing import wait_for

pytestmark = pytest.mark.root


def test_kill9_flags_the_gap_per_source_with_its_interval(elsad, spawned):
    d = elsad(backend="auto")
    member = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE, start_new_session=True)
    spawned.append(member)
    with d.client() as c:
        jid = c.create(name="across", pids=[member.pid])["jid"]
        running_sources = set(c.status()["sources"])
    assert "taskstats" in running_sources
    # The job and an "alive" mark are committed before the crash.
    wait_for(lambda: subprocess.run(["elsa", "jobs", "--json", "--state-dir", d.state_dir],
                                    capture_output=True, text=True).stdout.count(jid) >= 1,
             10, what="the job in the store")
    d.kill9()
    d.start()
    with d.client() as c:
        st = c.status()
    gaps = {g["source"]: g for g in st["sources"].get("gaps", [])}
    assert "taskstats" in gaps and jid in gaps["taskstats"]["jobs"], st["sources"]
    assert gaps["taskstats"]["from"] < gaps["taskstats"]["to"]
    assert "cgroupstat" not in gaps  # cumulative counters cover the downtime
    text = subprocess.run(["elsa-jobmng", "--socket", d.socket, "status"],
                          capture_output=True, text=True, check=True).stdout
    assert "gap        no taskstats records from" in text and jid in text
    member.communicate(b"")

    def flagged():
        out = subprocess.run(["elsa", "job", jid, "--json", "--state-dir", d.state_dir],
                             capture_output=True, text=True)
        return out.returncode == 0 and json.loads(out.stdout)["usage"]["incomplete"]

    incomplete = wait_for(flagged, 10, interval=0.2, what="the job flagged incomplete")
    assert "elsad was not running" in incomplete["taskstats"]
    assert "cgroupstat" not in incomplete
    table = subprocess.run(["elsa", "job", jid, "--state-dir", d.state_dir],
                           capture_output=True, text=True, check=True).stdout
    assert "INCOMPLETE (taskstats): no taskstats records from" in table


def test_after_a_clean_stop_the_gap_begins_at_the_stop(elsad, spawned):
    d = elsad(backend="auto")
    member = subprocess.Popen(["sleep", "60"], start_new_session=True)
    spawned.append(member)
    with d.client() as c:
        c.create(name="across", pids=[member.pid])

    def since_mark() -> float:
        db = sqlite3.connect(os.path.join(d.state_dir, "elsa.db"))
        try:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (ALIVE_KEY,)).fetchone()
        finally:
            db.close()
        return time.time() - float(row[0]) if row else 0.0

    # Half a second past the last "alive" mark (the timer marks every 2 s).
    wait_for(lambda: since_mark() >= 0.5, 10, interval=0.05, what="an alive mark 0.5 s old")
    stopped = time.time()
    d.stop()
    d.start()
    with d.client() as c:
        gaps = {g["source"]: g for g in c.status()["sources"].get("gaps", [])}
    assert gaps["taskstats"]["from"] >= stopped - 0.05, (gaps, stopped)


def test_a_restart_without_jobs_shows_its_gap_in_status(elsad):
    """The downtime is a gap of taskstats whether or not jobs ran across it (the
    reports read its hours process by process): status lists it with no jobs. A
    first start, with no earlier run, lists none."""
    d = elsad(backend="auto")
    with d.client() as c:
        assert [g for g in c.status()["sources"].get("gaps", [])
                if g["source"] == "taskstats"] == []
    stopped = time.time()
    d.stop()
    d.start()
    with d.client() as c:
        gaps = {g["source"]: g for g in c.status()["sources"].get("gaps", [])}
    assert gaps["taskstats"]["jobs"] == [], gaps
    assert gaps["taskstats"]["from"] >= stopped - 3 and gaps["taskstats"]["from"] < gaps[
        "taskstats"]["to"], (gaps, stopped)
    assert "elsad was not running" in gaps["taskstats"]["why"], gaps
    assert "cgroupstat" not in gaps
    text = subprocess.run(["elsa-jobmng", "--socket", d.socket, "status"],
                          capture_output=True, text=True, check=True).stdout
    (line,) = [t for t in text.splitlines() if t.startswith("gap ") and "taskstats" in t]
    assert line.startswith("gap        no taskstats records from") and "flagged" not in line, text
