"""Forced ENOBUFS on the taskstats socket: the jobs that may have lost records
are flagged incomplete (running jobs and those with members that just exited),
the records that were read are still stored, and the interval in which records
were lost is stored as a gap of taskstats for the reports (tests/test_gap_usage.py
has a summary counting what only bsdacct saw in it)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from elsa.core.model import parse_jid
from elsa.core.usage import load_gaps
from elsa.kernel.taskstats_socket import TaskstatsSocket
from elsa.testing import wait_for

pytestmark = pytest.mark.root

# A tiny receive buffer (the kernel's minimum is a few KiB: a handful of
# records) read once a second: a burst of exits must overflow it.
EXTRA = ('burst_hold = 0\n'
         '[sources.taskstats]\nrcvbuf = 4096\nread_interval = 1.0\n')

BURST = """
import os, sys
sys.stdin.readline()
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


def _incomplete(d, jid):
    db = sqlite3.connect(f"file:{os.path.join(d.state_dir, 'elsa.db')}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT source, incomplete FROM job_usage WHERE jid = ? "
                               "AND incomplete IS NOT NULL", (parse_jid(jid),)).fetchall())
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def test_enobufs_flags_running_and_just_ended_jobs(elsad, spawned):
    d = elsad(extra=EXTRA)
    # A job that ended just before the overflow: its members are in the exit history.
    with d.client() as c:
        short = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
        spawned.append(short)
        ended = c.create(name="ended", pids=[short.pid])["jid"]
        short.communicate(b"")
        wait_for(lambda: c.show(ended)["state"] == "ended", 10, what="the short job to end")
        p = subprocess.Popen([sys.executable, "-S", "-c", BURST, "400"],
                             stdin=subprocess.PIPE, start_new_session=True)
        spawned.append(p)
        running = c.create(name="burst", pids=[p.pid])["jid"]
        p.stdin.write(b"go\n")
        p.stdin.flush()

        def overflowed():
            st = c.status()["sources"]["taskstats"]
            return st if st["lost_enobufs"] > 0 else None

        st = wait_for(overflowed, 30, interval=0.2, what="taskstats ENOBUFS")
        assert st["callback_errors"] == 0, st
    flagged = wait_for(lambda: "taskstats" in _incomplete(d, running) and _incomplete(d, running),
                       15, interval=0.2, what="the running job flagged incomplete")
    assert "ENOBUFS" in flagged["taskstats"]
    assert "taskstats" in _incomplete(d, ended)
    p.wait(30)
    log = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert not [e for e in log if e.get("level") == "error"], [e["event"] for e in log
                                                                if e.get("level") == "error"]


def _burst(n: int) -> None:
    subprocess.run([sys.executable, "-S", "-c", BURST, str(n)], input=b"go\n", check=True)


def test_the_lost_span_runs_from_the_last_emptying_to_the_read_that_saw_the_loss():
    sock = TaskstatsSocket(rcvbuf=4096)
    sock.register()
    try:
        drain_start = time.time()
        sock.receive_rows("taskstats", set(), {})  # empties the socket
        sock.take_lost()  # (anything another process's exits overflowed meanwhile)
        emptied = time.time()
        _burst(400)
        burst_done = time.time()
        sock.receive_rows("taskstats", set(), {})
        read_done = time.time()
        assert sock.enobufs > 0
        span = sock.take_lost()
        assert span is not None
        # Clocks read in different calls: a few ms of slack.
        assert drain_start - 0.01 <= span[0] <= emptied + 0.01, (drain_start, span, emptied)
        assert burst_done - 0.01 <= span[1] <= read_done + 0.01, (burst_done, span, read_done)
        assert sock.take_lost() is None
    finally:
        sock.close()


def test_enobufs_stores_a_taskstats_gap_around_the_lost_records(elsad):
    started = time.time()  # before the listener registers: no gap can begin earlier
    d = elsad(extra=EXTRA)
    burst_start = time.time()
    _burst(400)
    burst_done = time.time()
    wait_for(lambda: d.call("status")["sources"]["taskstats"]["lost_enobufs"] > 0, 30,
             interval=0.2, what="taskstats ENOBUFS")

    def gaps():
        db = sqlite3.connect(f"file:{os.path.join(d.state_dir, 'elsa.db')}?mode=ro", uri=True)
        try:
            return [g for g in load_gaps(db) if g[0] == "taskstats" and g[1] > 0]
        finally:
            db.close()

    found = wait_for(lambda: [g for g in gaps() if g[1] <= burst_done and g[2] >= burst_start],
                     15, interval=0.2, what="a taskstats gap over the burst")
    now = time.time()
    assert all(started - 1 <= g[1] <= g[2] <= now + 0.001 for g in gaps()), (started, gaps(), now)
    # One gap per overflow episode, not one per read.
    assert len(found) == 1, found
    # status tells the admin too (what reports read differently), from memory.
    shown = [g for g in d.call("status")["sources"].get("gaps", [])
             if g["source"] == "taskstats" and g["from"] <= burst_done and g["to"] >= burst_start]
    assert len(shown) == 1, d.call("status")["sources"]
    assert shown[0]["from"] == found[0][1] and shown[0]["to"] >= found[0][2], (shown, found)
    assert shown[0]["jobs"] == [] and shown[0]["why"].startswith(
        "taskstats records lost to a socket overflow (ENOBUFS) from "), shown
    text = subprocess.run(["elsa-jobmng", "--socket", d.socket, "status"],
                          capture_output=True, text=True, check=True).stdout
    (line,) = [t for t in text.splitlines() if "ENOBUFS" in t]
    assert line.startswith("gap        taskstats records lost to a socket overflow (ENOBUFS) "
                           "from "), text
    assert "flagged" not in line, line  # the gap itself names no jobs


def test_a_gap_beginning_soon_after_the_previous_one_extends_it():
    """A sustained overflow reports a gap per read: one meta row per episode."""
    from elsa.core.accounting import GAP_MERGE_S, GapRecorder
    from elsa.core.usage import gap_stmt

    written = []
    rec = GapRecorder(lambda sql, params: written.append(params))
    rec.add("taskstats", 100.0, 101.0)
    rec.add("taskstats", 100.9, 102.0)  # overlapping: the same row, later end
    rec.add("taskstats", 102.0 + GAP_MERGE_S - 1, 200.0)  # soon after: still the same
    rec.add("bsdacct", 150.0, 160.0)  # another source's own row
    rec.add("taskstats", 200.0 + GAP_MERGE_S + 1, 300.0)  # long after: a new row
    assert written == [gap_stmt("taskstats", 100.0, 101.0)[1],
                       gap_stmt("taskstats", 100.0, 102.0)[1],
                       gap_stmt("taskstats", 100.0, 200.0)[1],
                       gap_stmt("bsdacct", 150.0, 160.0)[1],
                       gap_stmt("taskstats", 200.0 + GAP_MERGE_S + 1, 300.0)[1]]
    # status lists the merged gaps, oldest first, in the downtime gaps' shape.
    assert [(g["source"], g["from"], g["to"], g["jobs"]) for g in rec.status()] == [
        ("taskstats", 100.0, 200.0, []), ("bsdacct", 150.0, 160.0, []),
        ("taskstats", 200.0 + GAP_MERGE_S + 1, 300.0, [])]
    assert rec.status()[1]["why"].startswith("bsdacct records lost from "), rec.status()


def test_status_keeps_the_latest_gaps_of_each_source_with_what_they_were_lost_to():
    """A long run with many overflow episodes: status keeps a few per source, not all."""
    from elsa.core.accounting import GAP_CAUSES_KEEP, GAP_MERGE_S, GAP_STATUS_KEEP, GapRecorder

    rec = GapRecorder(lambda sql, params: None)
    rec.add("bsdacct", 10.0, 20.0, "a takeover")
    step = 10 * GAP_MERGE_S
    for i in range(1000):
        rec.add("taskstats", 1000.0 + i * step, 1001.0 + i * step, "a socket overflow (ENOBUFS)")
    shown = rec.status()
    assert [g["from"] for g in shown if g["source"] == "taskstats"] == [
        1000.0 + i * step for i in range(1000 - GAP_STATUS_KEEP, 1000)]
    (bsd,) = [g for g in shown if g["source"] == "bsdacct"]  # not pushed out by taskstats
    assert bsd["why"].startswith("bsdacct records lost to a takeover from "), bsd
    # Told again and again as it goes on, with more causes than it keeps: one gap.
    for i in range(100):
        rec.add("bsdacct", 10.0, 21.0 + i, f"cause {i % 5}")
    (bsd,) = [g for g in rec.status() if g["source"] == "bsdacct"]
    assert bsd["to"] == 120.0 and bsd["why"].count(" to ") == GAP_CAUSES_KEEP + 1, bsd
    assert "a takeover and to cause 0 and to cause 1 from" in bsd["why"], bsd
