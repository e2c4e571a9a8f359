"""The per-process hot path of issue 6 (elsad's CPU per process): usage rows
built straight from kernel bytes give the same rows as the dataclass path;
the aggregator settles the proc connector instead of holding records; a
detached process stays attributable; taskstats read in batches; the event
batching window never makes a request see stale membership; ``nice``."""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elsa.core.aggregator import Aggregator
from elsa.core.model import parse_jid
from elsa.core.source import UsageRecord, record_row, row_record
from elsa.kernel import pacct
from elsa.kernel import taskstats as T
from elsa.testing import wait_for
from tests.support import FakeManager, taskstats_golden_messages

DATA = Path(__file__).parent / "data"


def test_taskstats_fast_tuple_and_row_match_the_dataclass_path():
    for data in taskstats_golden_messages():
        ((msg,), _) = T.decode_messages(data, 10**13)
        fast = T.fast_exit_tuple(data, 10**13)
        assert fast == msg.task.as_tuple() and T.TaskRecord(*fast) == msg.task
        assert T.usage_row(fast) == record_row(msg.task.to_usage(), None)
    # Not the one-message layout (an error message): the general decoder's job.
    err = struct.pack("=IHHIIi", 20, 2, 0, 1, 0, -3)
    assert T.fast_exit_tuple(err + b"\0" * 400, 0) is None


@pytest.mark.parametrize("use_numpy", [False, True])
def test_pacct_usage_rows_match_the_record_path(use_numpy):
    if use_numpy and pacct._np() is None:
        pytest.skip("numpy not installed")
    data = (DATA / "pacct_kernel.bin").read_bytes()
    dec = pacct.decode(data, use_numpy=use_numpy)
    rows = pacct.usage_rows(dec, "bsdacct")
    assert rows and rows == [record_row(r.to_usage("bsdacct"), None) for r in dec.records()]
    assert [row_record(r) for r in rows] == [r.to_usage("bsdacct") for r in dec.records()]


def test_pacct_struct_decoder_handles_mixed_byte_orders_like_before():
    recs = [pacct.AcctRecord(offset=0, flag=0, tty=0, exitcode=i, uid=1, gid=1, pid=100 + i,
                             ppid=1, btime=1_700_000_000, etime=10.0, utime=900 + i, stime=1,
                             mem=20000, io=0, rw=0, minflt=3, majflt=0, comm=f"c{i}")
            for i in range(4)]
    data = pacct.encode(recs[:2]) + pacct.encode(recs[2:3], big_endian=True) + pacct.encode(
        recs[3:])
    got = pacct.decode(data, use_numpy=False)
    assert [(r.pid, r.utime, r.big_endian) for r in got.records()] == [
        (100, 900, False), (101, 901, False), (102, 902, True), (103, 903, False)]


def _agg(mgr, settle, horizon=0.0, history=None):
    rows = []
    agg = Aggregator(lambda sql, p: rows.append(p), mgr.resolve, settle=settle,
                     history_horizon=lambda: horizon, boot_epoch_fn=lambda: 1_700_000_000.0,
                     history=history)
    return agg, rows


def _rec(pid, start_ticks, end=None):
    end = time.time() if end is None else end
    return UsageRecord(source="taskstats", pid=pid, start_ticks=start_ticks, comm="x",
                       end_time=end, start_time=end - 1, cpu_user_us=5)


def test_settled_record_without_job_is_final_at_once():
    mgr = FakeManager()
    agg, rows = _agg(mgr, settle=lambda: True)
    agg.add([_rec(10, 100)])
    assert [(r[2], r[1]) for r in rows] == [(10, None)]
    assert agg.counters.settled == 1 and agg.counters.held == 0 and not agg.held


def test_settle_applies_the_fork_event_the_record_was_waiting_for():
    mgr = FakeManager()

    def settle():
        mgr.members[11] = [(100, 7)]  # the queued fork event, applied by the drain
        return True

    agg, rows = _agg(mgr, settle)
    agg.add_rows("taskstats", [record_row(_rec(11, 100), None)])
    assert [(r[2], r[1]) for r in rows] == [(11, 7)]
    assert agg.counters.resolved_late == 1 and agg.counters.attributed == 1


def test_records_after_the_settle_are_looked_up_once():
    mgr = FakeManager()
    looked = []

    def resolve(pid, start, tol):
        looked.append(pid)
        return mgr.resolve(pid, start, tol)

    def settle():
        mgr.members[12] = [(100, 7)]  # a fork event applied by the drain
        return True

    rows = []
    agg = Aggregator(lambda sql, p: rows.append(p), resolve, settle=settle,
                     history_horizon=lambda: 0.0, boot_epoch_fn=lambda: 1_700_000_000.0)
    agg.add_rows("taskstats", [record_row(_rec(pid, 100), None) for pid in (10, 11, 12)])
    # 10 misses, settles and is looked up again; 11 and 12 come after the settle.
    assert looked == [10, 10, 11, 12]
    assert [(r[2], r[1]) for r in rows] == [(10, None), (11, None), (12, 7)]
    assert agg.counters.settled == 2 and agg.counters.attributed == 1


def test_unsettled_records_are_held_and_old_settled_ones_go_to_the_history():
    mgr = FakeManager()
    agg, rows = _agg(mgr, settle=lambda: False)
    agg.add([_rec(12, 100)])
    assert not rows and agg.counters.held == 1
    # Settled, but the process ended before memory's horizon (before the
    # daemon started): only the stored history may know its job. Every event
    # is in after the settle, so holding it would wait for nothing.
    now = time.time()
    asked = []
    agg2, rows2 = _agg(mgr, settle=lambda: True, horizon=now,
                       history=lambda pid, start, tol, end: asked.append(pid) or 77)
    agg2.add([_rec(13, 100, end=now - 5)])
    assert agg2.counters.held == 0 and asked == [13]
    assert len(rows2) == 1 and rows2[0][1] == 77


def test_store_submit_many_counts_every_row(tmp_path):
    from elsa.core.store import Store

    store = Store(str(tmp_path))
    try:
        store.submit("INSERT INTO meta(key, value) VALUES ('a', '1')")
        store.submit_many("INSERT INTO meta(key, value) VALUES (?, ?)",
                          [("b", "2"), ("c", "3")])
        mark = store.mark()
        assert mark == 3
        store.flush()
        assert store.is_committed(mark)
        assert store.get_meta("c") == "3"
    finally:
        store.close()


# -- against the real kernel ---------------------------------------------------------------

def _rows(db_path, pid):
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT source, jid FROM proc_usage WHERE pid = ? "
                              "ORDER BY source", (pid,)).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _sleeper(spawned):
    p = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"],
                         start_new_session=True)
    spawned.append(p)
    return p


@pytest.mark.root
def test_member_detached_and_outsider_records_attributed_at_once(elsad, spawned):
    d = elsad(extra="[sources.taskstats]\nread_interval = 0.05\n")
    db_path = os.path.join(d.state_dir, "elsa.db")
    member, detached, outsider = (_sleeper(spawned) for _ in range(3))
    job = d.call("create", name="t", pids=[member.pid, detached.pid])
    d.call("detach", pids=[detached.pid])
    # Records of processes that may have exited before the sources started
    # (end times are truncated to the second) go to the stored history: let
    # the daemon be up long enough that these cannot be mistaken for those.
    wait_for(lambda: d.call("status")["uptime"] > 2.0, 10, interval=0.1, what="uptime > 2 s")
    for p in (member, detached, outsider):
        p.kill()
        p.wait()
    for p in (member, detached, outsider):
        wait_for(lambda p=p: _rows(db_path, p.pid), 10, what=f"taskstats row of {p.pid}")
    assert _rows(db_path, member.pid) == [("taskstats", parse_jid(job["jid"]))]
    # Left the job alive: still that job's usage (as the stored history has it).
    assert _rows(db_path, detached.pid) == [("taskstats", parse_jid(job["jid"]))]
    assert _rows(db_path, outsider.pid) == [("taskstats", None)]
    agg = d.call("status")["sources"]["aggregator"]
    assert agg["settled"] >= 1, agg  # the outsider was not held for 2 s


@pytest.mark.root
def test_taskstats_read_in_windows_loses_nothing(tmp_path):
    from elsa.core.source import SourceContext
    from elsa.kernel.procfs import ProcFS
    from elsa_plugins.taskstats import TaskstatsSource

    got = []
    src = TaskstatsSource()
    src.start(SourceContext(options={"cpumask": "", "rcvbuf": 4 << 20, "fold_timeout": 30.0,
                                     "read_interval": 0.1},
                            procfs=ProcFS(), state_dir=str(tmp_path), emit=got.extend))
    try:
        # The loop watches the socket, leaving it unwatched for the window after a read.
        assert src.fileno() is not None and src.read_window == pytest.approx(0.1)
        # Lost last-thread records are looked for every fold_timeout / 6, and only
        # while a multi-threaded process waits (elsa/core/loop.py: no idle wake-up).
        assert src.interval == pytest.approx(5.0) and not src.has_poll_work()
        pids = []
        for _ in range(20):
            p = subprocess.Popen(["true"])
            p.wait()
            pids.append(p.pid)

        def seen():
            src.on_readable()
            return set(pids) <= {r.pid for r in got}

        wait_for(seen, 10, what="every child's taskstats record")
    finally:
        src.stop()
    assert src.status()["lost_enobufs"] == 0
    assert sorted(r.pid for r in got if r.pid in pids) == sorted(pids)  # once each


@pytest.mark.root
def test_request_sees_a_fork_made_just_before_it(elsad, spawned):
    """The proc connector is read in batches (daemon.EVENT_WINDOW); a request
    first applies the events queued before it."""
    d = elsad()
    code = ("import os, sys, time\n"
            "sys.stdin.readline()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    time.sleep(60)\n    os._exit(0)\n"
            "print(pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-S", "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, start_new_session=True, text=True)
    spawned.append(parent)
    job = d.call("create", name="w", pids=[parent.pid])
    with d.client() as c:
        for _ in range(3):  # keep the window busy: every request follows a drain
            c.call("status")
        parent.stdin.write("go\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())
        assert c.call("jobof", pid=child)["jid"] == job["jid"]


def _nice(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
        data = fh.read()
    return int(data[data.rfind(b")") + 2:].split()[16])


@pytest.mark.root
def test_nice_applies_to_every_thread(elsad):
    d = elsad(extra="nice = 7\n")
    st = d.call("status")
    assert st["priority"] == {"nice": 7, "configured": 7, "boosts": 0}
    tids = os.listdir(f"/proc/{d.proc.pid}/task")
    assert len(tids) >= 2  # the event loop and the store writer
    assert {_nice(d.proc.pid, t) for t in tids} == {7}
