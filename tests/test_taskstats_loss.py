"""Forced ENOBUFS on the taskstats socket: the jobs that may have lost records
are flagged incomplete (running jobs and those with members that just exited),
and the records that were read are still stored."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from elsa.core.model import parse_jid
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
