"""Smoke test: the daemon starts, answers status, creates a job and follows a fork."""

import subprocess

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.root


def test_daemon_tracks_child_of_member(elsad, spawned):
    d = elsad()
    p = subprocess.Popen(["sh", "-c", "read x; sleep 30 & wait"], stdin=subprocess.PIPE,
                         start_new_session=True)
    spawned.append(p)
    with d.client() as c:
        job = c.create(name="smoke", pids=[p.pid])
        p.stdin.write(b"go\n")
        p.stdin.flush()
        pids = wait_for(lambda: len(c.pids(job["jid"])) >= 2 and c.pids(job["jid"]),
                        what="the forked sleep to join")
        assert p.pid in pids
        st = c.status()
        assert st["backend"] == "cnproc" and st["events"] > 0


def test_event_storm_cannot_starve_the_loop(monkeypatch):
    """A drain that always finds a full batch (a storm that never lets the
    socket empty) still returns to the loop after a bounded number of batches."""
    from elsa.core import events as events_mod
    from elsa.core.priority import Priority

    class Conn:
        calls = 0

        def drain(self, sink, limit):
            Conn.calls += 1
            return limit  # always full

    class Manager:
        def on_fork(self, *args):
            pass

        def on_exit(self, *args):
            pass

    ev = events_mod.ProcEvents(Conn(), Manager(), hold=None, priority=Priority(0))
    assert ev.drain() is False  # returns instead of looping forever
    assert Conn.calls == events_mod.DRAIN_BATCHES


def test_job_emptied_applies_the_whole_backlog_first():
    """A job-emptied notice after a burst hold: the events queued before it
    (more than one drain's worth) are applied before the job ends, so forks
    behind the first drain still make members; a storm that keeps the socket
    full stops the draining once the backlog's bytes were read."""
    from elsa.core import events as events_mod
    from elsa.core.priority import Priority

    class Conn:
        def __init__(self, backlog):
            self.backlog = backlog  # messages queued at the notice
            self.read = 0

        def queued(self):
            return (self.backlog * 832, 1 << 26)

        def drain(self, sink, limit):
            n = min(limit, self.backlog - self.read) if self.backlog >= 0 else limit
            self.read += n
            return n

    class Manager:
        def __init__(self):
            self.jobs = {7: object()}
            self.ended_after = None

        def on_fork(self, *args):
            pass

        def on_exit(self, *args):
            pass

        def job_emptied(self, jid):
            self.ended_after = conn.read
            del self.jobs[jid]

    batch = events_mod.DRAIN_BATCH * events_mod.DRAIN_BATCHES
    conn, mgr = Conn(3 * batch + 5), Manager()
    events_mod.ProcEvents(conn, mgr, hold=None, priority=Priority(0)).job_emptied(7)
    assert mgr.ended_after == 3 * batch + 5
    # A storm: the socket never empties; reading stops after the backlog's bytes.
    conn, mgr = Conn(-1), Manager()
    conn.queued = lambda: (2 * batch * 256, 1 << 26)
    events_mod.ProcEvents(conn, mgr, hold=None, priority=Priority(0)).job_emptied(7)
    assert mgr.ended_after == 2 * batch
