"""The event loop's batching window for readers and its timers' ``active``
predicate (elsa/core/loop.py), on real sockets; and an idle elsad that sleeps
instead of waking for timers with nothing to do."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Dict, List, Set

import pytest

from elsa.core.loop import EventLoop
from elsa.errors import ProcessGone
from elsa.kernel.procfs import ProcFS
from elsa.testing import wait_for


def _counting_select(loop: EventLoop) -> List[float]:
    """Record the monotonic time of every return of the loop's select."""
    returns: List[float] = []
    select = loop.selector.select

    def counted(timeout=None):
        ready = select(timeout)
        returns.append(time.monotonic())
        return ready
    loop.selector.select = counted  # type: ignore[method-assign]
    return returns


def _stop_when(loop: EventLoop, cond: Callable[[], bool], deadline_s: float) -> None:
    """A timer that stops the loop once *cond* holds, or at the deadline."""
    deadline = time.monotonic() + deadline_s

    def check() -> None:
        if cond():
            loop.request_stop("done")
        elif time.monotonic() > deadline:
            loop.request_stop("deadline")
    loop.add_timer(0.01, check, "stop-check")


@pytest.fixture
def pair():
    """A connected socket pair, the first end non-blocking (the loop's reader)."""
    r, w = socket.socketpair()
    r.setblocking(False)
    yield r, w
    r.close()
    w.close()


def test_windowed_reader_takes_what_arrived_meanwhile_in_one_call(pair):
    loop = EventLoop()
    r, w = pair
    got: List[bytes] = []

    def on_readable() -> None:
        try:
            got.append(r.recv(65536))
        except BlockingIOError:
            pass
    loop.add_reader(r.fileno(), on_readable, window=0.2)
    sent = 60

    def writer() -> None:
        for _ in range(sent):  # a byte every ~5 ms for ~0.3 s: the workload, not a wait
            w.send(b"x")
            time.sleep(0.005)
    t = threading.Thread(target=writer)
    t.start()
    _stop_when(loop, lambda: not t.is_alive() and sum(map(len, got)) == sent, 10)
    try:
        assert loop.run() == "done"
    finally:
        t.join()
    assert sum(map(len, got)) == sent  # nothing lost: the data waited in the socket
    # Without the window: a call per byte (~60). With it: one per 0.2 s (~0.3 s of writes).
    assert len(got) <= 5, [len(g) for g in got]


def test_windowed_reader_is_watched_again_after_its_window(pair):
    loop = EventLoop()
    r, w = pair
    calls: List[float] = []

    def on_readable() -> None:
        calls.append(time.monotonic())
        r.recv(65536)
        if len(calls) == 1:
            w.send(b"second")  # arrives inside the window
    loop.add_reader(r.fileno(), on_readable, window=0.15)
    w.send(b"first")
    _stop_when(loop, lambda: len(calls) == 2, 10)
    assert loop.run() == "done"
    assert calls[1] - calls[0] >= 0.15 - 0.005


def test_inactive_timer_neither_runs_nor_wakes_the_loop():
    loop = EventLoop()
    returns = _counting_select(loop)
    state: Dict[str, object] = {"active": False, "runs": 0}

    def tick() -> None:
        state["runs"] = int(state["runs"]) + 1  # type: ignore[call-overload]
    loop.add_timer(0.01, tick, "t", active=lambda: bool(state["active"]))
    loop.add_timer(0.5, lambda: loop.request_stop("done"), "stop")
    t0 = time.monotonic()
    assert loop.run() == "done"
    assert time.monotonic() - t0 >= 0.5
    assert state["runs"] == 0
    # A 10 ms timer would have woken it ~50 times in those 0.5 s.
    assert len(returns) <= 2, len(returns)


def test_timer_runs_once_its_predicate_says_it_has_work():
    loop = EventLoop()
    state: Dict[str, object] = {"active": False, "runs": 0}

    def tick() -> None:
        state["runs"] = int(state["runs"]) + 1  # type: ignore[call-overload]

    def activate() -> None:
        state["active"] = True  # the work appears in some other callback
    loop.add_timer(0.01, tick, "t", active=lambda: bool(state["active"]))
    loop.add_timer(0.1, activate, "activate")
    _stop_when(loop, lambda: int(state["runs"]) >= 3, 10)  # type: ignore[call-overload]
    assert loop.run() == "done"


def test_failing_predicate_leaves_the_timer_running_at_its_period():
    loop = EventLoop()
    runs: List[float] = []

    def broken() -> bool:
        raise RuntimeError("plugin bug")
    loop.add_timer(0.01, lambda: runs.append(time.monotonic()), "t", active=broken)
    _stop_when(loop, lambda: len(runs) >= 3, 10)
    assert loop.run() == "done"


def _nothing_held(status: dict) -> bool:
    sources = status["sources"]
    return (not sources.get("aggregator", {}).get("held_now")
            and not sources.get("taskstats", {}).get("pending_processes"))


def _machine_tasks(procfs: ProcFS) -> Set[int]:
    """The thread ids of every task alive on the machine now."""
    tasks: Set[int] = set()
    for pid in procfs.pids():
        try:
            tasks.update(procfs.threads(pid))
        except ProcessGone:
            pass  # it ended while listed: absent from this set, as from a later one
    return tasks


@pytest.mark.root
def test_idle_elsad_sleeps(elsad):
    """With no client, job or exit to handle, elsad wakes only for its few slow
    timers (the 2 s "alive" mark, cgroupstat's 10 s reading...): not for the
    control sweep, sequence holes, retries or the store writer's batches, which
    woke it ~20 times a second."""
    d = elsad()
    pid = d.proc.pid
    procfs = ProcFS()
    # Settle: the readiness, the test's own status request and its connection.
    wait_for(lambda: d.call("status")["uptime"] > 1.0, 10, interval=0.1, what="uptime > 1 s")
    # ... and nothing of the machine's earlier processes still in hand: exit records
    # held for their job (retried until attributed) or threads awaiting their process's
    # last one (a test before this one may leave both behind as it winds down).
    wait_for(lambda: _nothing_held(d.call("status")), 30, interval=0.2,
             what="no record held or pending")
    time.sleep(0.5)  # let the last connection's close and commit pass (not a sync point)
    # Any task started or ended on the machine wakes elsad (the proc connector's fork
    # and exit events, taskstats' exit record): measure a window in which none started
    # (/proc/stat "processes") and none of the tasks alive at its start ended. An exit
    # alone is enough: a previous test's server winding down woke it 13 times in 4 s.
    seen = []
    for _ in range(5):
        forks0, tasks0 = procfs.forks(), _machine_tasks(procfs)
        before = procfs.wakeups_and_cpu(pid)[0]
        t0 = time.monotonic()
        time.sleep(4.0)  # the measured idle period itself
        wakeups = procfs.wakeups_and_cpu(pid)[0] - before
        span = time.monotonic() - t0
        if procfs.forks() == forks0 and _machine_tasks(procfs) == tasks0:
            assert wakeups / span < 3.0, f"idle elsad woke {wakeups} times in {span:.1f} s"
            return
        seen.append(wakeups)
    pytest.fail("no 4 s window without a task starting or ending on this machine; "
                f"elsad woke {seen}")

