"""The proc connector's event filter (Linux 6.6+) and the loss checks that stand
in for the sequence numbers on a filtered socket.

The filter itself is tested on the real kernel. The kernel's own loss (a message
it cannot allocate is dropped for every listener) cannot be caused on demand
here, so the two checks that reveal it on a filtered socket (a member's pid
forked anew, a record whose parent was a member) are fed the events and rows
such a loss leaves behind, into a real JobManager and store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import pytest

from elsa.backends.cnproc import CnprocBackend
from elsa.core import usage
from elsa.core.aggregator import Aggregator
from elsa.core.events import ProcEvents
from elsa.core.manager import JobManager
from elsa.core.model import CLOCK_TICKS
from elsa.core.priority import Priority
from elsa.core.store import Store
from elsa.core.usage import UsageRecord, record_row
from elsa.kernel import cnproc
from elsa.kernel.procfs import ProcFS
from tests.conftest import wait_for

FILTERS = cnproc.kernel_filters(os.uname().release)

# A child that renames itself (a comm event) and starts a session (a sid
# event): the two kinds elsad does not ask for.
CHILD = ("import os; open('/proc/self/comm', 'w').write('elsa-filter-t'); os.setsid()")


def test_kernel_filters_reads_the_release():
    assert cnproc.kernel_filters("6.6.0")
    assert cnproc.kernel_filters("6.18.44-fc-v657")
    assert cnproc.kernel_filters("7.0.1")
    assert not cnproc.kernel_filters("6.5.13")
    assert not cnproc.kernel_filters("6.1.0-18-amd64")
    assert not cnproc.kernel_filters("5.14.0-362.el9.x86_64")
    assert not cnproc.kernel_filters("garbage")


def test_listen_with_a_mask_is_a_proc_input():
    plain = cnproc.control_message(cnproc.PROC_CN_MCAST_LISTEN)
    masked = cnproc.control_message(cnproc.PROC_CN_MCAST_LISTEN, cnproc.NEEDED_EVENTS)
    assert len(masked) == len(plain) + 4
    # nlmsg_len covers the message; cn_msg.len is the payload: 4 bytes, 8 with the mask.
    assert int.from_bytes(masked[:4], sys.byteorder) == len(masked)
    assert int.from_bytes(plain[32:34], sys.byteorder) == 4
    assert int.from_bytes(masked[32:34], sys.byteorder) == 8
    assert int.from_bytes(masked[36:40], sys.byteorder) == cnproc.PROC_CN_MCAST_LISTEN
    assert int.from_bytes(masked[40:44], sys.byteorder) == cnproc.NEEDED_EVENTS


def _events_of(conns: Dict[str, cnproc.ProcConnector], pid: int) -> Dict[str, List[Any]]:
    """Every event about *pid* each connector read, until each saw its exit (and
    every event that names no process: sid and others, losses)."""
    seen: Dict[str, List[Any]] = {name: [] for name in conns}
    done = set()
    deadline = time.monotonic() + 10
    while len(done) < len(conns) and time.monotonic() < deadline:
        for name, conn in conns.items():
            for ev in conn.read():
                if isinstance(ev, (cnproc.LossEvent, cnproc.OtherEvent)):
                    seen[name].append(ev)  # no pid to tell whose: kept, any process's
                    continue
                who = getattr(ev, "child_tgid", None) or getattr(ev, "tgid", None)
                if who == pid:
                    seen[name].append(ev)
                    if isinstance(ev, cnproc.ExitEvent):
                        done.add(name)
        time.sleep(0.01)  # poll with a deadline: the events' arrival is the condition
    assert done == set(conns), f"no exit event for pid {pid} within 10 s: {seen}"
    return seen


@pytest.mark.skipif(not FILTERS, reason="kernel before 6.6: no proc connector filter")
def test_filtered_socket_gets_fork_exec_exit_only():
    filtered = cnproc.ProcConnector(1 << 20, cnproc.NEEDED_EVENTS)
    everything = cnproc.ProcConnector(1 << 20)
    try:
        assert filtered.filtered and filtered.event_mask == cnproc.NEEDED_EVENTS
        assert not everything.filtered
        child = subprocess.Popen([sys.executable, "-c", CHILD])
        child.wait()
        seen = _events_of({"filtered": filtered, "all": everything}, child.pid)
        kinds = {name: {type(ev).__name__ for ev in evs} for name, evs in seen.items()}
        assert kinds["all"] >= {"ForkEvent", "ExecEvent", "CommEvent", "OtherEvent",
                                "ExitEvent"}
        # The comm and sid events were not sent to the filtered socket, and the
        # gaps they leave in the sequence numbers are not taken for loss.
        assert kinds["filtered"] == {"ForkEvent", "ExecEvent", "ExitEvent"}
        assert filtered.seq_lost == 0 and filtered.dropped() == 0
    finally:
        filtered.close()
        everything.close()


def test_old_kernel_release_subscribes_to_everything():
    # A kernel before 6.6 ignores a LISTEN with a mask altogether: the plain
    # LISTEN is sent and every event arrives, with sequence checking on.
    conn = cnproc.ProcConnector(1 << 20, cnproc.NEEDED_EVENTS, release="6.1.0-18-amd64")
    try:
        assert not conn.filtered and conn.event_mask == cnproc.PROC_EVENT_ALL
        child = subprocess.Popen([sys.executable, "-c", CHILD])
        child.wait()
        seen = _events_of({"old": conn}, child.pid)
        assert "CommEvent" in {type(ev).__name__ for ev in seen["old"]}
    finally:
        conn.close()


# -- the loss checks of a filtered socket -----------------------------------------------

FAKE_PID = 4_000_001  # above any pid_max this machine uses: no real process has it


@pytest.fixture
def manager(tmp_path):
    procfs = ProcFS()
    store = Store(str(tmp_path / "state"))
    m = JobManager(store=store, backend=CnprocBackend(), procfs=procfs,
                   boot_id=procfs.boot_id())
    holder = subprocess.Popen(["sleep", "60"])
    try:
        job = m.create(name="filter-test", owner_uid=os.getuid())
        m.attach(job.jid, holder.pid)
        yield m, job.jid, holder
    finally:
        holder.kill()
        holder.wait()
        store.close()


def _fork_ts(m: JobManager, start_ticks: int) -> int:
    """The CLOCK_MONOTONIC event timestamp of a fork at *start_ticks*."""
    return start_ticks * (1_000_000_000 // CLOCK_TICKS) - m._boot_offset_ns


def test_a_members_pid_forked_anew_closes_the_member(manager):
    m, jid, holder = manager
    start = m._entry(holder.pid)[1] + 100
    m.on_fork(holder.pid, FAKE_PID, FAKE_PID, _fork_ts(m, start))
    assert m.job_of(FAKE_PID) == jid and m.counters.exits_unseen == 0
    # Its exit event is lost; a process in no job (init) forks the same pid later.
    m.on_fork(1, FAKE_PID, FAKE_PID, _fork_ts(m, start + 5 * CLOCK_TICKS))
    assert m.job_of(FAKE_PID) is None and m.counters.exits_unseen == 1
    assert m.jobs[jid].members.count == 1  # the holder
    # The same process again (a resync read /proc after its fork): kept.
    m.on_fork(holder.pid, FAKE_PID + 1, FAKE_PID + 1, _fork_ts(m, start))
    m.on_fork(1, FAKE_PID + 1, FAKE_PID + 1, _fork_ts(m, start))
    assert m.job_of(FAKE_PID + 1) == jid and m.counters.exits_unseen == 1


class _Filtered:
    """The connector ProcEvents is given; only lost_fork is exercised."""

    filtered = True

    def fileno(self) -> int:
        return -1


def _row(pid: int, ppid: int, start_ticks: int) -> tuple:
    boot = time.time() - time.monotonic()  # close enough: taskstats rows carry ticks
    rec = UsageRecord("taskstats", pid, ppid=ppid, start_ticks=start_ticks,
                      start_time=boot + start_ticks / CLOCK_TICKS,
                      end_time=boot + start_ticks / CLOCK_TICKS + 0.01, cpu_user_us=10)
    return record_row(rec, None)


def test_record_of_a_members_child_in_no_job_is_a_lost_fork(manager):
    m, jid, holder = manager
    events = ProcEvents(_Filtered(), m, hold=None, priority=Priority(0))
    parent_start = m._entry(holder.pid)[1]
    boot = time.time() - time.monotonic()
    # Born surely after its parent was attached (by more than the start's 0.52 s
    # uncertainty), in no job: its fork event was lost.
    assert events.lost_fork(_row(FAKE_PID, holder.pid, parent_start + 150), boot) == jid
    assert events.loss_events == 1 and events._loss_since is not None
    # A child of a process in no job, or one that started before its "parent"
    # (the ppid is a later process with the same pid): no loss.
    events._loss_since = None
    assert events.lost_fork(_row(FAKE_PID, 1, parent_start + 50), boot) is None
    assert events.lost_fork(_row(FAKE_PID, holder.pid, parent_start - 500), boot) is None
    assert events.loss_events == 1 and events._loss_since is None


def test_aggregator_gives_a_lost_fork_its_parents_job():
    stored: List[tuple] = []
    row = _row_plain(FAKE_PID, 777)
    agg = Aggregator(lambda sql, r: stored.append(r), lambda *a: None,
                     submit_many=lambda sql, rows: stored.extend(rows),
                     settle=lambda: True,
                     lost_fork=lambda r, boot: 42 if r[usage.PPID] == 777 else None)
    agg.add_rows("taskstats", [row, _row_plain(FAKE_PID + 1, 778)])
    assert [r[1] for r in stored] == [42, None]
    assert agg.counters.resolved_by_parent == 1 and agg.counters.settled == 1
    # Without the check (an unfiltered socket) the record is final in no job.
    stored.clear()
    plain = Aggregator(lambda sql, r: stored.append(r), lambda *a: None,
                       submit_many=lambda sql, rows: stored.extend(rows), settle=lambda: True)
    plain.add_rows("taskstats", [row])
    assert [r[1] for r in stored] == [None]


def _row_plain(pid: int, ppid: int) -> tuple:
    now = time.time()
    return record_row(UsageRecord("taskstats", pid, ppid=ppid, start_ticks=1000,
                                  start_time=now - 1, end_time=now, cpu_user_us=10), None)


# -- the daemon ---------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.parametrize("setting", [None, False])
def test_daemon_subscribes_as_configured(elsad, spawned, setting):
    """Default: filtered where the kernel can; proc_event_filter = false: every
    event. Either way a member's fork and exit are followed."""
    d = elsad(extra="" if setting is None else "proc_event_filter = false\n")
    p = subprocess.Popen(["sh", "-c", "read x; sleep 0.2 & wait"], stdin=subprocess.PIPE,
                         start_new_session=True)
    spawned.append(p)
    with d.client() as c:
        job = c.create(name="filter", pids=[p.pid])
        p.communicate(b"go\n", timeout=30)
        st = wait_for(lambda: (lambda s: s["counters"]["member_exits"] >= 2 and s)(c.status()),
                      what="the member's child and the member to exit")
        assert st["proc_connector"] == {"filtered": FILTERS and setting is None,
                                        "socket_drops": 0}
        assert st["counters"]["member_forks"] >= 1 and st["counters"]["exits_unseen"] == 0
        assert c.wait(job["jid"], timeout=30)["ended"] is True


def test_self_test_names_the_filter_when_no_event_comes():
    """A kernel that ignored the filtered LISTEN sends nothing: the start-up
    self-test's error says which setting to change. (A silent connector stands
    in for such a kernel: this one takes the filter.)"""
    import socket as socket_mod

    from elsa.errors import KernelInterfaceError

    quiet, other = socket_mod.socketpair()

    class Silent(_Filtered):
        def fileno(self) -> int:
            return quiet.fileno()

        def read(self):
            return iter(())

    try:
        class NoManager:
            on_fork = on_exit = None

        events = ProcEvents(Silent(), NoManager(), hold=None, priority=Priority(0))
        with pytest.raises(KernelInterfaceError, match="proc_event_filter = false"):
            events.self_test()
    finally:
        quiet.close()
        other.close()


@pytest.mark.root
def test_a_wrappers_children_before_its_attach_are_not_the_jobs(elsad):
    """A wrapper that runs commands, then execs `elsa-jobmng run --job` (its pid
    attaches): the commands' records, read after the attach, name it as their parent,
    yet they ran before it joined (the ppid rule's attach bound)."""
    import json

    d = elsad()
    jids = []
    for _ in range(5):
        with d.client() as c:
            jid = c.create(name="wrapped")["jid"]
        jids.append(jid)
        subprocess.run(["sh", "-c", '/bin/echo x >/dev/null; /bin/true; exec "$0" -m elsa.jobmng '
                        f'--socket {d.socket} run --job {jid} -- /bin/sleep 0.2',
                        sys.executable], check=True, timeout=60)

    def comms(jid: str) -> List[str]:
        out = subprocess.run([sys.executable, "-m", "elsa.report.cli", "job", jid, "--json",
                              "--state-dir", d.state_dir], capture_output=True, text=True,
                             check=True).stdout
        return sorted(p["comm"] for p in json.loads(out)["processes"])

    with d.client() as c:
        for jid in jids:
            wait_for(lambda j=jid: c.show(j)["state"] == "ended", 30, what="the job's end")
    # The sleep's record is in; the wrapper's echo and true never are.
    for jid in jids:
        wait_for(lambda j=jid: "sleep" in comms(j), 30, what="the job's records")
        assert "echo" not in comms(jid) and "true" not in comms(jid), comms(jid)
