"""Burst hold (elsa/core/burst.py): the policy on its own, the proc
connector's queue as the kernel reports it, and a real elsad holding through
real bursts of forks without losing or misattributing anything."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from elsa.core.burst import CHECK_INTERVAL, ENTER_RATE, QUIET_CHECKS, WATERMARK, BurstHold
from elsa.core.model import parse_jid
from tests.conftest import wait_for

CAP = 64 << 20


class Queue:
    """Stands in for ProcConnector.queued: the policy is plain arithmetic on
    (bytes queued, capacity); the kernel side is tested below."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self):
        return self.bytes, CAP


def test_a_burst_is_a_rate_and_zero_max_hold_never_holds():
    hold = BurstHold(Queue(), max_hold=5.0)
    assert hold.wants(int(ENTER_RATE * 0.01), 0.01)
    assert not hold.wants(int(ENTER_RATE * 0.01) - 1, 0.01)
    assert not hold.wants(5, 60.0)  # a trickle after a long quiet spell
    assert not BurstHold(Queue(), max_hold=0).wants(10**6, 0.01)


def test_hold_ends_when_the_queue_stops_growing():
    q = Queue()
    hold = BurstHold(q, max_hold=5.0)
    t = hold.begin(100.0)
    assert hold.active and t == pytest.approx(100.0 + CHECK_INTERVAL)
    q.bytes += 10_000 * 832 // 20  # 10,000 events a second for 50 ms
    t = hold.check(t)
    assert t is not None and hold.active
    # 100 events a second: the burst is over once that lasted QUIET_CHECKS checks
    # (a short pause, e.g. between the steps of a build, is not its end).
    for _ in range(QUIET_CHECKS - 1):
        q.bytes += 5 * 832
        t = hold.check(t)
        assert t is not None and hold.active
    q.bytes += 5 * 832
    assert hold.check(t) is None
    assert not hold.active
    assert hold.ended["quiet"] == 1
    assert hold.held_seconds == pytest.approx((1 + QUIET_CHECKS) * CHECK_INTERVAL)


def test_sources_only_hold_counts_the_events_read_as_if_they_were_queued():
    # With a prompt event listener the proc connector is read during the hold
    # (its queue stays near empty): the events read since the hold began
    # stand for the queue, and a drain is no rebase.
    q = Queue()
    read = [1_000]
    hold = BurstHold(q, max_hold=60.0)
    hold.arrived = lambda: read[0]
    assert hold.sources_only
    t = hold.begin(0.0)
    assert hold.queued() == (0, CAP)
    read[0] += 500  # 10,000 events a second for 50 ms, all read at once
    hold.rebase(t - 0.001)
    t = hold.check(t)
    assert t is not None and hold.active and hold._quiet == 0
    for _ in range(QUIET_CHECKS):
        read[0] += 1  # 20 events a second: the burst is over
        t = hold.check(t) if t is not None else None
    assert t is None and hold.ended["quiet"] == 1
    hold.begin(10.0)
    read[0] += int(CAP * WATERMARK / hold.bytes_per_event) + 1
    assert hold.check(10.05) is None and hold.ended["watermark"] == 1
    assert hold.status()["sources_only"] is True


def test_hold_ends_at_the_watermark_and_checks_early_enough_to_see_it():
    q = Queue()
    hold = BurstHold(q, max_hold=60.0)
    t0 = hold.begin(0.0)
    rate = 400 << 20  # bytes a second: reaches the watermark in ~0.08 s
    q.bytes = int(rate * t0)
    t = hold.check(t0)
    assert t is not None
    # Half the time to the watermark at the observed rate, not the full interval.
    assert t - t0 == pytest.approx((CAP * WATERMARK - q.bytes) / rate / 2, rel=0.01)
    assert t - t0 < CHECK_INTERVAL
    q.bytes = int(CAP * WATERMARK)
    assert hold.check(t) is None and hold.ended["watermark"] == 1


def test_hold_ends_after_max_hold_even_while_the_burst_goes_on():
    q = Queue()
    hold = BurstHold(q, max_hold=0.2)
    t = hold.begin(0.0)
    while t is not None:
        q.bytes += 50_000  # 1 MB a second: a busy machine, far from the watermark
        last, t = t, hold.check(t)
        assert last <= 0.2 + 1e-9
    assert hold.ended == {"quiet": 0, "watermark": 0, "max": 1, "waiter": 0, "stop": 0}


def test_a_drain_during_the_hold_is_not_the_end_of_the_burst():
    q = Queue()
    hold = BurstHold(q, max_hold=5.0)
    t = hold.begin(0.0)
    q.bytes = 2 << 20
    t = hold.check(t)
    q.bytes = 0  # a client request drained the queue ...
    hold.rebase(t)
    q.bytes = 1 << 20  # ... and the burst went on
    assert hold.check(t + CHECK_INTERVAL) is not None
    assert hold._quiet == 0


def test_calibration_is_bounded_and_needs_a_real_sample():
    hold = BurstHold(Queue(), max_hold=5.0)
    hold.calibrate(10 * 832, 10)
    assert hold.bytes_per_event == 832  # too few events: unchanged
    hold.calibrate(1000 * 1000, 1000)
    assert hold.bytes_per_event == 1000
    hold.calibrate(1000 * 100_000, 1000)
    assert hold.bytes_per_event == 4096


# -- the kernel's side ---------------------------------------------------------------------

@pytest.mark.root
def test_proc_connector_reports_its_queue():
    from elsa.kernel.cnproc import ProcConnector

    conn = ProcConnector(1 << 20)
    try:
        conn.drain(_Discard())
        empty, capacity = conn.queued()
        assert capacity == conn.rcvbuf
        for _ in range(20):
            subprocess.run(["true"], check=True)
        # Events are queued by the exiting task before waitpid returns.
        queued, _ = conn.queued()
        assert queued >= empty + 40 * 256  # >= 40 messages of >= 256 bytes each
        assert conn.drain(_Discard()) >= 40
        assert conn.queued()[0] < queued
    finally:
        conn.close()


class _Discard:
    def on_fork(self, *a): pass
    def on_exit(self, *a): pass
    def on_exec(self, *a): pass
    def on_loss(self, *a): pass


# Forks N children as fast as Python can (thousands a second: well above
# ENTER_RATE), each exiting at once, after a line on stdin; prints each
# child's pid, then waits for another line before exiting itself.
FORKER = """
import os, sys
n = int(sys.argv[1])
sys.stdin.readline()
pids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    pids.append(pid)
sys.stdout.write(" ".join(map(str, pids)) + "\\n")
sys.stdout.flush()
sys.stdin.readline()
"""


def _forker(spawned, n):
    p = subprocess.Popen([sys.executable, "-S", "-c", FORKER, str(n)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    spawned.append(p)
    return p


def _burst(p):
    p.stdin.write("go\n")
    p.stdin.flush()
    return [int(x) for x in p.stdout.readline().split()]


def _finish(p):
    """Let the forker exit (it waits for a line after its burst)."""
    p.stdin.write("done\n")
    p.stdin.flush()


def _job_with_forker(elsad, spawned, extra, n):
    d = elsad(extra=extra)
    forker = _forker(spawned, n)
    return d, forker, d.call("create", name="burst", pids=[forker.pid])


def _taskstats_rows(d):
    db = sqlite3.connect(f"file:{os.path.join(d.state_dir, 'elsa.db')}?mode=ro", uri=True)
    try:
        return db.execute("SELECT pid, jid FROM proc_usage WHERE source = 'taskstats'"
                          ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()


def _caught_up(d):
    st = d.call("status")
    return st if not st["hold"]["active"] else None


@pytest.mark.root
def test_elsad_holds_through_a_burst_and_accounts_every_process(elsad, spawned):
    d, forker, job = _job_with_forker(elsad, spawned,
                                      "burst_hold = 30.0\n[sources.taskstats]\n", 1500)
    before = wait_for(lambda: _caught_up(d), 30, interval=0.05, what="no hold before")
    pids = _burst(forker)
    st = wait_for(lambda: _caught_up(d), 30, interval=0.05, what="the hold to end")
    assert st["hold"]["holds"] > before["hold"]["holds"], st["hold"]
    assert st["hold"]["ended"]["quiet"] >= 1, st["hold"]
    assert st["lost_events"] == {"enobufs": 0, "seq_gap": 0}
    counters = st["counters"]
    assert counters["member_forks"] - before["counters"]["member_forks"] == len(pids)
    assert counters["member_exits"] - before["counters"]["member_exits"] == len(pids)
    # Every child's taskstats record, read after the hold, went to the job.
    wanted = set(pids)

    def stored():
        got = {pid for pid, jid in _taskstats_rows(d) if jid == parse_jid(job["jid"])}
        return wanted <= got

    wait_for(stored, 30, interval=0.2, what="every child's taskstats row, in the job")
    _finish(forker)


@pytest.mark.root
def test_a_request_during_a_hold_sees_the_burst(elsad, spawned):
    d, forker, job = _job_with_forker(elsad, spawned, "burst_hold = 30.0\n", 1500)
    pids = _burst(forker)  # the forker lives on (waits on stdin): the job too
    st = d.call("status")
    # Either still holding or caught up already; both must count every fork.
    assert st["counters"]["member_forks"] >= len(pids)
    assert d.call("jobof", pid=forker.pid)["jid"] == job["jid"]
    assert st["hold"]["holds"] >= 1, st["hold"]
    _finish(forker)


@pytest.mark.root
def test_a_storm_longer_than_the_buffer_ends_the_hold_at_the_watermark(elsad, spawned):
    # 1 MiB: the kernel reports 2 MiB of capacity, the watermark is at 1 MiB,
    # ~1,300 messages; 4,000 forks queue ~8,000 (6.7 MB) if nobody reads.
    d, forker, _ = _job_with_forker(elsad, spawned,
                                    f"burst_hold = 30.0\nnetlink_rcvbuf = {1 << 20}\n", 4000)
    pids = _burst(forker)
    st = wait_for(lambda: _caught_up(d), 30, interval=0.05, what="the hold to end")
    assert st["hold"]["ended"]["watermark"] >= 1, st["hold"]
    assert st["lost_events"] == {"enobufs": 0, "seq_gap": 0}
    assert st["counters"]["member_forks"] >= len(pids)
    _finish(forker)


@pytest.mark.root
def test_a_waiting_client_is_answered_without_waiting_out_the_hold(elsad, spawned):
    d, forker, job = _job_with_forker(elsad, spawned, "burst_hold = 60.0\n", 2000)
    with d.client() as waiter:
        _burst(forker)
        _finish(forker)
        forker.wait(10)
        t0 = time.monotonic()
        reply = waiter.call("wait", jid=job["jid"], timeout=30)
        waited = time.monotonic() - t0
    assert reply["ended"], reply
    # Well under burst_hold: the waiter ended (or prevented) the hold.
    assert waited < 10, waited
    st = d.call("status")
    assert st["lost_events"] == {"enobufs": 0, "seq_gap": 0}

