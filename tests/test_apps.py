"""Application accounting (issue 14): the record, the recorder against real
processes in /proc, the package index, and the portable report queries."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from elsa import config
from elsa.apps import record, report
from elsa.apps.packages import PackageIndex, parse_dpkg_status
from elsa.apps.recorder import INSERT, RECENT_S, REPLACED_MARGIN_NS, AppRecorder
from elsa.core.listener import ListenerContext
from elsa.core.model import format_jid
from elsa.core.store import Store
from elsa.core.usage import UsageRecord, UsageRow, record_row
from elsa.kernel.procfs import ProcFS
from elsa.report import cli

JID = 0x35969E00000007


def _options(**kw: Any) -> Dict[str, Any]:
    opts = dict(config.validate_table({"enabled": True}, config.section_options("apps"),
                                      where="apps", path="test"))
    opts["packages"] = "off"
    opts.update(kw)
    return opts


@pytest.fixture
def store(tmp_path: Path):
    s = Store(str(tmp_path / "state"))
    yield s
    s.close()


def _recorder(store: Store, held: Callable[[], bool] = lambda: False,
              timers: Optional[List[Any]] = None, **kw: Any) -> AppRecorder:
    """*timers*: gets (interval, callback, name, active) of each timer the recorder adds."""
    if timers is None:
        timers = []
    ctx = ListenerContext(config=config.parse({}, "test"), procfs=ProcFS(), store=store,
                          boot_id="boot-1", host_id=0x35969E, job_of=lambda pid: JID,
                          add_timer=lambda *a, active=None: timers.append((*a, active)),
                          source_priority={"taskstats": 20, "bsdacct": 30, "cgroupstat": 10},
                          sources_held=held)
    return AppRecorder(ctx, _options(**kw))


def _rows(store: Store) -> List[record.AppRecord]:
    store.flush()
    return [record.AppRecord.from_row(r) for r in store.db.execute(
        f"SELECT {', '.join(record.NAMES)} FROM app_runs ORDER BY exec_ns")]


# -- the record -------------------------------------------------------------------------------

def test_migration_creates_every_column_with_the_natural_key(store: Store) -> None:
    cols = [r[1] for r in store.db.execute("PRAGMA table_info(app_runs)")]
    assert cols == ["id", *record.NAMES]
    row = [0] * len(record.NAMES)
    row[record.INDEX["boot_id"]] = "b"
    row[record.INDEX["end_reason"]] = "exit"
    row[record.INDEX["path_status"]] = "resolved"
    store.submit_many(INSERT, [row, list(row)])  # the same record twice: stored once
    store.flush()
    assert store.db.execute("SELECT COUNT(*) FROM app_runs").fetchone() == (1,)


def test_record_json_has_every_column_and_the_hex_jid() -> None:
    values = {n: None for n in record.NAMES}
    values.update(host_id=1, boot_id="b", pid=5, start_ticks=7, exec_ns=9, exec_time=10.0,
                  end_time=12.5, end_reason="exit", path_status="gone", jid=JID)
    out = record.AppRecord(**values).to_json()
    assert set(record.NAMES) <= set(out)
    assert out["jid"] == format_jid(JID) and out["wall_s"] == 2.5
    assert out["exe_path"] is None
    json.dumps(out)


# -- the recorder, against real processes -------------------------------------------------------

def _usage(source: str, pid: int, start: int, comm: str = "sleep", uid: int = 0,
           **figures: Any) -> UsageRow:
    """A process's exit record as the aggregator hands it to listeners (each
    source's own tests cover how the kernel's record becomes this row)."""
    return record_row(UsageRecord(source=source, pid=pid, start_ticks=start,
                                  end_time=time.time(), comm=comm, uid=uid,
                                  **figures), None)


def _exec_and_kill(rec: AppRecorder, sig: int = signal.SIGKILL,
                   before_exit: Callable[[int, int], None] = lambda pid, start: None
                   ) -> Tuple[int, int]:
    """Run ``sleep``, show the recorder its exec, kill it, show its exit; return its
    pid and the start the recorder read. *before_exit* runs between the two."""
    from elsa.testing import wait_for

    child = subprocess.Popen(["sleep", "30"])
    try:
        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe").endswith("sleep"))
        rec.on_exec(child.pid, child.pid, time.monotonic_ns())
        img = rec.open[child.pid]
        assert img.row[record.INDEX["exe_path"]].endswith("/sleep")
        start = img.row[record.INDEX["start_ticks"]]
        before_exit(child.pid, start)
        child.send_signal(sig)
        child.wait()
        rec.on_exit(child.pid, child.pid, sig, time.monotonic_ns())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.pid, start


def test_exec_then_exit_takes_figures_from_the_exit_record(store: Store) -> None:
    """Exit records come in either order with the exit event; the better source's
    wins, and a record of an earlier process under the same pid is no match."""
    rec = _recorder(store, exit_wait=0.01)
    pid, start = _exec_and_kill(rec, signal.SIGTERM, before_exit=lambda pid, start: rec.on_usage([
        _usage("bsdacct", pid, start, cpu_user_us=1),          # before the exit event
        _usage("taskstats", pid, start - 5000, cpu_user_us=7),  # another process's
    ]))
    rec.on_usage([_usage("taskstats", pid, start, cpu_user_us=9_000_000,
                         cpu_system_us=4_000_000, max_rss_kb=1234, read_bytes=10,
                         write_bytes=20)])
    rec.flush()
    assert rec.ended  # waits its exit_wait for a better record
    time.sleep(0.02)
    rec.flush()
    assert rec.ended == [] and rec.ending == {}
    (r,) = _rows(store)
    assert (r.end_reason, r.exit_code, r.exit_signal) == ("exit", 0, signal.SIGTERM)
    assert r.figures_source == "taskstats"  # the better source of the two
    assert r.max_rss_kb == 1234
    assert 8_900_000 <= r.cpu_user_us <= 9_000_000  # minus what /proc had at the exec
    assert r.jid == JID and r.uid == os.getuid() and r.comm == "sleep"
    assert r.end_time >= r.exec_time


def test_flush_timer_is_idle_once_rows_are_written_and_the_exit_records_aged(
        store: Store) -> None:
    """The flush timer's predicate (elsa/core/loop.py: an idle elsad does not wake
    for it) says work while a row, an ending or a remembered exit record waits."""
    timers: List[Any] = []
    rec = _recorder(store, timers=timers, exit_wait=0.01)
    rec.start()
    try:
        (active,) = [t[3] for t in timers if t[2] == "apps-flush"]
        assert not active()
        rec.on_usage([_usage("taskstats", 4242, 100, cpu_user_us=1)])  # any exit at all
        assert active()
        for _ in range(2):  # the remembered records age out in two RECENT_S periods
            rec.recent_since -= RECENT_S
            rec.flush()
        assert not active()
    finally:
        rec.stop()


def test_an_exit_record_from_a_lesser_source_alone_still_gives_figures(store: Store) -> None:
    rec = _recorder(store, exit_wait=0.01)
    pid, start = _exec_and_kill(rec)
    rec.on_usage([_usage("bsdacct", pid, start, cpu_user_us=30_000_000, max_rss_kb=5)])
    time.sleep(0.02)
    rec.flush()
    (r,) = _rows(store)
    assert r.figures_source == "bsdacct" and r.max_rss_kb == 5
    assert r.cpu_system_us is None  # the record has none: not a zero
    assert 29_000_000 <= r.cpu_user_us <= 30_000_000


def test_an_exit_record_stored_before_the_exec_event_was_read_still_counts(
        store: Store) -> None:
    """The aggregator stores a record as soon as the process's fork event is known; its
    exec and exit events may still be queued. The record is kept for them (RECENT_S)."""
    from elsa.apps import recorder as recorder_mod

    rec = _recorder(store, exit_wait=0.01)
    child = subprocess.Popen(["true"])
    child.wait()  # reaped before elsad reads /proc: a gone image, start unknown
    # The process ran a second before this exec (its elapsed time says so).
    rec.on_usage([_usage("taskstats", child.pid, 1234, cpu_user_us=700, max_rss_kb=9,
                         elapsed_us=1_000_000)])
    rec.on_exec(child.pid, child.pid, time.monotonic_ns())
    rec.on_exit(child.pid, child.pid, 0, time.monotonic_ns())
    time.sleep(0.02)
    rec.flush()
    (r,) = _rows(store)
    assert (r.path_status, r.figures_source, r.max_rss_kb) == ("gone", "taskstats", 9)
    assert r.start_ticks == 1234 and r.comm == "sleep"  # from the record
    assert r.cpu_user_us is None  # no base read at the exec: not the fork's CPU as its own
    # Kept for at least RECENT_S, gone after twice that.
    assert child.pid in rec.recent
    for _ in range(2):
        rec.recent_since -= recorder_mod.RECENT_S
        rec.flush()
    assert rec.recent == {} and rec.recent_old == {}


def _zombie(cmd: List[str], stdin: Any = None) -> subprocess.Popen:
    """*cmd* started and left unreaped: wait until it is a zombie (state Z)."""
    from elsa.testing import wait_for

    child = subprocess.Popen(cmd, stdin=stdin)
    wait_for(lambda: _state(child.pid) == "Z", timeout=30)
    return child


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()[0].decode()


def _end(rec: AppRecorder, child: subprocess.Popen, start: int, **figures: Any) -> None:
    """The exit event and the exit record of *child*, then reap it and store the rows."""
    rec.on_exit(child.pid, child.pid, 0, time.monotonic_ns())
    rec.on_usage([_usage("taskstats", child.pid, start, **figures)])
    child.wait()
    for e in rec.ended:
        e.due = 0.0  # exit_wait is over: the record is there
    rec.flush()


def test_a_program_read_after_it_ended_counts_from_zero_when_it_exec_d_at_its_fork(
        store: Store) -> None:
    """A program that ended before elsad read /proc (a zombie) shows its end figures
    there, not a base: an exec right after the fork counts from zero, as the kernel does."""
    import sys

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.06: pass"
    rec = _recorder(store)
    t = time.monotonic_ns()  # Popen returns once the child has exec'd
    child = _zombie([sys.executable, "-c", burn])
    with open(f"/proc/{child.pid}/stat", "rb") as fh:
        utime, stime = map(int, fh.read().rsplit(b")", 1)[1].split()[11:13])
    assert utime >= 1 and utime + stime >= 5  # the zombie's CPU so far: all it used
    rec.on_exec(child.pid, child.pid, t)
    start = rec.open[child.pid].row[record.INDEX["start_ticks"]]
    _end(rec, child, start, cpu_user_us=123_456, read_bytes=70)
    (r,) = _rows(store)
    assert (r.path_status, r.comm, r.figures_source) == ("gone", "python3", "taskstats")
    assert (r.cpu_user_us, r.read_bytes) == (123_456, 70)  # not minus its end figures


def test_a_program_reaped_before_the_read_counts_from_zero_when_its_record_dates_its_fork(
        store: Store) -> None:
    """No /proc at all: the exit record's elapsed time says the exec came at the fork."""
    rec = _recorder(store)
    child = subprocess.Popen(["true"])
    child.wait()
    exec_ns = time.monotonic_ns()
    rec.on_exec(child.pid, child.pid, exec_ns)
    rec.on_exit(child.pid, child.pid, 0, exec_ns + 3_000_000)  # 3 ms later
    rec.on_usage([_usage("taskstats", child.pid, 1234, cpu_user_us=700, read_bytes=8,
                         elapsed_us=3_500)])  # forked 0.5 ms before its exec
    rec.ended[0].due = 0.0
    rec.flush()
    (r,) = _rows(store)
    assert (r.path_status, r.cpu_user_us, r.read_bytes) == ("gone", 700, 8)


def test_a_program_read_after_it_ended_long_after_its_fork_has_no_figures(
        store: Store) -> None:
    """The process ran 0.3 s before this exec: what it used before is unknown, and
    /proc after the end does not say it."""
    rec = _recorder(store)
    child = _zombie(["sh", "-c", "sleep 0.3; exec true"])
    rec.on_exec(child.pid, child.pid, time.monotonic_ns())
    start = rec.open[child.pid].row[record.INDEX["start_ticks"]]
    _end(rec, child, start, cpu_user_us=5_000)
    (r,) = _rows(store)
    assert r.path_status == "gone" and r.figures_source == "taskstats"
    assert r.cpu_user_us is None and r.read_bytes is None


def test_an_exec_read_after_the_process_ended_leaves_both_images_without_figures(
        store: Store) -> None:
    """The image an exec replaced would get the next image's figures as its own."""
    from elsa.testing import wait_for

    rec = _recorder(store)
    child = subprocess.Popen(["sh", "-c", "read x; exec true"], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe").endswith(("sh", "dash", "bash")))
        rec.on_exec(child.pid, child.pid, time.monotonic_ns())
        start = rec.open[child.pid].row[record.INDEX["start_ticks"]]
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.close()
        wait_for(lambda: _state(child.pid) == "Z", timeout=30)
        # Stamped clear of the shell's read: a stamp within the margin makes the shell's
        # record 'replaced', and the shell can end within 2 ms of that read.
        read_ns = rec.open[child.pid].read_ns
        rec.on_exec(child.pid, child.pid,
                    max(time.monotonic_ns(), read_ns + 2 * REPLACED_MARGIN_NS))
        _end(rec, child, start, cpu_user_us=5_000)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    shell, last = _rows(store)
    assert (shell.end_reason, shell.path_status, shell.cpu_user_us) == ("exec", "resolved", None)
    assert (last.end_reason, last.path_status, last.cpu_user_us) == ("exit", "gone", None)


def _gone_run(rec: AppRecorder, cmd: List[str], dev: int, ino: int,
              comm: str = "sleep", uid: int = 0) -> None:
    """*cmd* reaped before the recorder reads it; its exit record names (dev, ino)
    and gives its real *uid*."""
    child = subprocess.Popen(cmd)
    child.wait()
    rec.on_exec(child.pid, child.pid, time.monotonic_ns())
    rec.on_exit(child.pid, child.pid, 0, time.monotonic_ns())
    rec.on_usage([_usage("taskstats", child.pid, 1234, comm=comm, uid=uid, cpu_user_us=1,
                         extra={"exe_dev": dev, "exe_inode": ino})])
    for e in rec.ended:
        e.due = 0.0
    rec.flush()


def test_a_gone_program_takes_the_path_of_an_earlier_run_of_the_same_file(
        store: Store, tmp_path: Path) -> None:
    """Its exit record names the binary (device, inode); a resolved run of that file
    gave the path. A file replaced at the path since, or one never seen, gives none."""
    import shutil

    prog = tmp_path / "mysleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", prog)
    rec = _recorder(store)
    child = subprocess.Popen([str(prog), "30"])
    try:
        from elsa.testing import wait_for

        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe") == str(prog))
        rec.on_exec(child.pid, child.pid, time.monotonic_ns())  # resolved: learnt
    finally:
        child.kill()
        child.wait()
    rec.on_exit(child.pid, child.pid, 9, time.monotonic_ns())
    st = os.stat(prog)
    _gone_run(rec, [str(prog), "0"], st.st_dev, st.st_ino)
    _gone_run(rec, ["true"], st.st_dev, st.st_ino + 1_000_000)  # a file never seen
    os.link(prog, tmp_path / "old")  # keeps the old inode in use
    shutil.copy2(prog, tmp_path / "new")
    os.replace(tmp_path / "new", prog)
    _gone_run(rec, [str(prog), "0"], st.st_dev, st.st_ino)  # the path is another file now
    rec.flush(force=True)
    _, by_inode, unseen, replaced = _rows(store)
    assert (by_inode.path_status, by_inode.exe_path) == ("inode", str(prog))
    assert (by_inode.exe_dev, by_inode.exe_ino, by_inode.exe_deleted) == (
        st.st_dev, st.st_ino, 0)
    assert (unseen.path_status, unseen.exe_path, unseen.exe_ino) == (
        "gone", None, st.st_ino + 1_000_000)
    assert (replaced.path_status, replaced.exe_path, replaced.exe_ino) == (
        "gone", None, st.st_ino)
    assert rec.counters["inode"] == 1 and rec.counters["gone"] == 2


def test_a_gone_program_never_seen_is_found_by_its_command_name(store: Store) -> None:
    """A short program elsad never read (a build's one ``make``): the file of its exit
    record's comm in root's PATH directories, if it has the record's device and inode;
    not a file of that name with another inode, and not one the filters exclude."""
    from elsa.apps.recorder import SEARCH_DIRS

    true = os.path.realpath(next(os.path.join(d, "true") for d in SEARCH_DIRS
                                 if os.path.exists(os.path.join(d, "true"))))
    st = os.stat(true)
    rec = _recorder(store)
    _gone_run(rec, [true], st.st_dev, st.st_ino, comm="renamed")  # prctl(PR_SET_NAME)
    _gone_run(rec, [true], st.st_dev, st.st_ino + 1_000_000, comm="true")  # another file
    _gone_run(rec, [true], st.st_dev, st.st_ino, comm="true")
    # The next run of that file is named from memory, whatever its comm.
    _gone_run(rec, [true], st.st_dev, st.st_ino, comm="renamed")
    rec.flush(force=True)
    renamed, other, found, again = _rows(store)
    assert (renamed.path_status, renamed.exe_path) == ("gone", None)
    assert (other.path_status, other.exe_path) == ("gone", None)
    assert (found.path_status, found.exe_path, found.exe_ino) == ("inode", true, st.st_ino)
    assert (again.path_status, again.exe_path) == ("inode", true)
    assert rec.counters["inode"] == 2 and rec.counters["gone"] == 2


def test_a_gone_program_whose_binary_the_filters_exclude_is_not_recorded(
        store: Store, tmp_path: Path) -> None:
    """Its exit record names the binary (device, inode): a file found under its command
    name, or one an earlier run resolved, that the filters exclude (or do not include)
    makes no record, as the program read at once would make none. A binary not named
    stays unknown, and its record is kept."""
    import shutil

    from elsa.apps.recorder import SEARCH_DIRS
    from elsa.testing import wait_for

    true = os.path.realpath(next(os.path.join(d, "true") for d in SEARCH_DIRS
                                 if os.path.exists(os.path.join(d, "true"))))
    st = os.stat(true)
    rec = _recorder(store, exclude=[true])  # /bin/true, the same file, is not a way round
    _gone_run(rec, [true], st.st_dev, st.st_ino, comm="true")  # found by its comm
    _gone_run(rec, [true], st.st_dev, st.st_ino, comm="renamed")  # then known
    assert (rec.counters["excluded"], rec.counters["gone"], rec.counters["records"]) == (
        2, 0, 0)
    prog = tmp_path / "mysleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", prog)
    pst = os.stat(prog)
    rec = _recorder(store, include=["/nonexistent/*"])
    child = subprocess.Popen([str(prog), "30"])
    try:
        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe") == str(prog))
        rec.on_exec(child.pid, child.pid, time.monotonic_ns())  # read at once: excluded
    finally:
        child.kill()
        child.wait()
    _gone_run(rec, [str(prog), "0"], pst.st_dev, pst.st_ino)  # an earlier run resolved it
    _gone_run(rec, ["true"], st.st_dev, st.st_ino + 1_000_000, comm="true")  # not named
    rec.flush(force=True)
    (row,) = _rows(store)
    assert (row.path_status, row.exe_path, row.exe_ino) == ("gone", None, st.st_ino + 1_000_000)
    assert (rec.counters["excluded"], rec.counters["gone"], rec.counters["records"]) == (
        2, 1, 1)


def test_a_gone_program_is_filtered_by_the_real_uid_its_exit_record_gives(
        tmp_path: Path) -> None:
    """Reaped before the read, a program's uid is unknown at its exec; its exit record
    gives the real uid, and min_uid and uids then skip it as they skip a program read
    at once (a short root program is no record with min_uid = 1000)."""
    for i, (opts, kept) in enumerate((({"min_uid": 1}, 4242), ({"uids": [4242]}, 4242),
                                      ({"uids": [0]}, 0))):
        store = Store(str(tmp_path / f"state{i}"))
        try:
            rec = _recorder(store, **opts)
            for uid in (0, 4242):
                _gone_run(rec, ["true"], 0, 0, comm="true", uid=uid)  # binary not named
            rec.flush(force=True)
            assert [r.uid for r in _rows(store)] == [kept], opts
            assert (rec.counters["records"], rec.counters["excluded"],
                    rec.counters["gone"]) == (1, 1, 1)
        finally:
            store.close()


def test_a_last_image_waits_for_a_burst_hold_to_end(store: Store) -> None:
    """The exit record waits unread in a burst hold: the image waits for the hold to end
    (and the held records to be stored), however long its exit_wait, up to its bound."""
    from elsa.apps import recorder as recorder_mod

    held = [True]
    rec = _recorder(store, held=lambda: held[0], exit_wait=0.01)
    pid, start = _exec_and_kill(rec)
    time.sleep(0.02)  # past exit_wait
    rec.flush()
    assert len(rec.ended) == 1 and _rows(store) == []  # held: not written without figures
    held[0] = False
    rec.flush()
    assert len(rec.ended) == 1  # the hold just ended: its records are still on their way
    rec.on_usage([_usage("taskstats", pid, start, cpu_user_us=5, max_rss_kb=77)])
    rec.settled_at = time.monotonic()  # HOLD_SETTLE has passed
    rec.flush()
    (r,) = _rows(store)
    assert r.figures_source == "taskstats" and r.max_rss_kb == 77
    # Under back-to-back holds a row goes, without figures, once overdue by all its waits.
    held[0] = True
    _exec_and_kill(rec)
    rec.ended[0].due -= recorder_mod.MAX_EXIT_WAITS * rec.exit_wait
    rec.flush()
    assert rec.ended == [] and rec.ending == {}
    assert [x.figures_source for x in _rows(store)] == ["taskstats", None]


def test_exec_chain_and_a_late_read_is_never_a_wrong_path(store: Store) -> None:
    rec = _recorder(store)
    child = subprocess.Popen(["sleep", "30"])
    try:
        from elsa.testing import wait_for

        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe").endswith("sleep"))
        t = time.monotonic_ns()
        rec.on_exec(child.pid, child.pid, t)
        # A second exec stamped after the first read: the first image keeps its path.
        rec.on_exec(child.pid, child.pid, rec.open[child.pid].read_ns + 10_000_000)
        # A third stamped before the second read ended: that read may show
        # the third image, so the second keeps no path.
        rec.on_exec(child.pid, child.pid, rec.open[child.pid].read_ns - 1)
        rec.flush()
    finally:
        child.kill()
        child.wait()
    first, second = _rows(store)
    assert first.path_status == "resolved" and first.exe_path.endswith("/sleep")
    assert first.end_reason == "exec" and first.figures_source == "procfs"
    assert second.path_status == "replaced" and second.exe_path is None
    assert second.comm is None and second.uid == os.getuid()


def test_a_command_line_read_after_the_next_exec_is_not_kept(store: Store, monkeypatch) -> None:
    """The command line of an allow-listed binary is read after the other /proc files;
    if the process exec'd again before that read ended, it may be the next image's (a
    binary the allow-list does not name: its secrets). The 2 ms margin counts from the
    end of every read of the image, the command line's too: here that read ends 20 ms
    after the others, and an exec stamped 5 ms after they began leaves no argv."""
    from elsa.testing import wait_for

    rec = _recorder(store, argv=["*/sleep"])
    read_argv = rec.ctx.procfs.argv

    def slow_argv(pid: int) -> Any:
        time.sleep(0.02)  # the event thread preempted between the reads
        return read_argv(pid)

    monkeypatch.setattr(rec.ctx.procfs, "argv", slow_argv)
    child = subprocess.Popen(["sleep", "30"])
    try:
        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe").endswith("sleep"))
        began = time.monotonic_ns()
        rec.on_exec(child.pid, child.pid, began)
        assert rec.open[child.pid].row[record.INDEX["argv"]] is not None
        rec.on_exec(child.pid, child.pid, began + 5_000_000)
        rec.flush()
    finally:
        child.kill()
        child.wait()
    first, = _rows(store)
    assert (first.path_status, first.argv) == ("replaced", None)


def test_filters_skip_uids_and_paths_but_never_an_unknown_path(store: Store) -> None:
    rec = _recorder(store, exclude=["*/sleep"])
    child = subprocess.Popen(["sleep", "30"])
    try:
        from elsa.testing import wait_for

        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe").endswith("sleep"))
        rec.on_exec(child.pid, child.pid, time.monotonic_ns())
        assert child.pid not in rec.open and rec.counters["excluded"] == 1
        rec2 = _recorder(store, min_uid=os.getuid() + 1)
        rec2.on_exec(child.pid, child.pid, time.monotonic_ns())
        assert child.pid not in rec2.open
    finally:
        child.kill()
        child.wait()
    # Gone before the read: nothing is known, the record is kept.
    rec.on_exec(child.pid, child.pid, time.monotonic_ns())
    assert rec.open[child.pid].row[record.INDEX["path_status"]] == "gone"


def test_stop_writes_open_images_and_a_restart_carries_on(store: Store) -> None:
    rec = _recorder(store)
    child = subprocess.Popen(["sleep", "30"])
    try:
        from elsa.testing import wait_for

        wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe").endswith("sleep"))
        rec.on_exec(child.pid, child.pid, time.monotonic_ns())
        rec.on_exec(os.getpid() + 10**6, os.getpid() + 10**6, time.monotonic_ns())  # no such pid
        rec.stop()
        assert {r.end_reason for r in _rows(store)} == {"open"}
        again = _recorder(store)
        again.start()
        assert list(again.open) == [child.pid] and again.counters["lost"] == 1
        again.on_exit(child.pid, child.pid, 0, time.monotonic_ns())
        again.flush(force=True)
    finally:
        child.kill()
        child.wait()
    reasons = sorted(r.end_reason for r in _rows(store))
    assert reasons == ["exit", "lost"]


def test_a_program_carried_on_after_a_restart_that_exec_d_at_its_fork_keeps_its_figures(
        store: Store) -> None:
    """An image left open at a stop that began with its process (fork and exec, as a
    job's program) counts from zero after the restart too, so its exit record gives its
    CPU; a later image's base, read at its exec, was not kept: its figures stay NULL."""
    from elsa.core.model import CLOCK_TICKS
    from elsa.kernel.procfs import boottime_offset_ns
    from elsa.testing import wait_for

    rec = _recorder(store)
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        starts = []
        for delay_ns, child in zip((0, 1_000_000_000), children):
            wait_for(lambda c=child: os.readlink(f"/proc/{c.pid}/exe").endswith("sleep"))
            start = ProcFS().ident(child.pid).start_ticks
            starts.append(start)
            # The exec's stamp: at the process's start, or a second after it.
            rec.on_exec(child.pid, child.pid, start * 1_000_000_000 // CLOCK_TICKS
                        - boottime_offset_ns() + delay_ns)
        rec.stop()
        store.flush()
        again = _recorder(store)
        again.start()
        assert sorted(again.open) == sorted(c.pid for c in children)
        for child, start in zip(children, starts):
            child.kill()
            child.wait()
            again.on_exit(child.pid, child.pid, 9, time.monotonic_ns())
            again.on_usage([_usage("taskstats", child.pid, start, cpu_user_us=5_000,
                                   read_bytes=40)])
        again.flush(force=True)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    at_fork, later = sorted(_rows(store), key=lambda r: r.exec_ns)
    assert (at_fork.end_reason, at_fork.cpu_user_us, at_fork.read_bytes) == ("exit", 5_000, 40)
    assert (later.end_reason, later.cpu_user_us, later.read_bytes) == ("exit", None, None)


# -- packages ---------------------------------------------------------------------------------

def test_dpkg_index(tmp_path: Path) -> None:
    dpkg = tmp_path / "dpkg"
    (dpkg / "info").mkdir(parents=True)
    (dpkg / "status").write_text(
        "Package: tool\nStatus: install ok installed\nVersion: 1.2-3\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 9\n")
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    os.symlink("usr/bin", root / "bin")
    exe = root / "usr" / "bin" / "tool"
    exe.write_text("")
    exe.chmod(0o755)
    doc = root / "usr" / "bin" / "README"
    doc.write_text("")
    (dpkg / "info" / "tool:amd64.list").write_text(f"{exe}\n{doc}\n{root}/usr/bin\n")
    assert parse_dpkg_status(str(dpkg / "status")) == {"tool": "1.2-3"}
    idx = PackageIndex("dpkg", dpkg_dir=str(dpkg), root=str(root))
    idx.start()
    assert idx.ready.wait(10)
    assert idx.lookup(str(exe)) == ("tool", "1.2-3")
    assert idx.lookup(str(doc)) is None  # not executable
    assert idx.status()["binaries"] == 1 and idx.status()["error"] is None


# -- reports (portable SQL) -----------------------------------------------------------------------

def _db(tmp_path: Path) -> str:
    path = tmp_path / "elsa.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 3")
    db.execute("CREATE TABLE proc_usage (id INTEGER PRIMARY KEY, pid INTEGER, end_time REAL)")
    from elsa.core.schema import _split_sql

    for stmt in _split_sql(record.MIGRATION):
        db.execute(stmt)

    def add(pid, exec_ns, path, comm, uid, cpu, pkg=None, ver=None, jid=JID, end=1.0,
            status="resolved"):
        row = {n: None for n in record.NAMES}
        row.update(host_id=1, boot_id="b", pid=pid, start_ticks=1, exec_ns=exec_ns,
                   exec_time=1000.0 + exec_ns, end_time=None if end is None
                   else 1000.0 + exec_ns + end, end_reason="exit" if end else "open",
                   exe_path=path, path_status=status, comm=comm, uid=uid, cpu_user_us=cpu,
                   cpu_system_us=None if cpu is None else 0, package=pkg,
                   package_version=ver, jid=jid)
        db.execute(f"INSERT INTO app_runs({', '.join(row)}) VALUES "
                   f"({', '.join('?' * len(row))})", list(row.values()))

    add(1, 1, "/usr/bin/gcc-12", "gcc", 1000, 2_000_000, "gcc-12", "12.2", end=2.0)
    add(2, 2, "/usr/bin/gcc-12", "gcc", 1001, 1_000_000, "gcc-12", "12.2")
    add(3, 3, "/home/ann/bin/sim", "sim", 1000, 3_600_000_000, jid=None)
    add(4, 4, None, "python3", 1001, None, status="gone", end=None)
    add(5, 5, "/usr/bin/python3.11", "python3", 1001, 7_200_000_000, "python3.11", "3.11.2")
    db.commit()
    db.close()
    return str(path)


def _cli(argv: List[str], capsys) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_usage_by_binary_package_user_job(tmp_path: Path) -> None:
    db = report.open_db(_db(tmp_path))
    by_bin = {(r["exe_path"], r["comm"]): r for r in report.usage(db, "binary")}
    gcc = by_bin[("/usr/bin/gcc-12", None)]
    assert (gcc["runs"], gcc["users"], gcc["wall_us"], gcc["cpu_user_us"]) == (
        2, 2, 3_000_000, 3_000_000)
    unknown = by_bin[(None, "python3")]  # kept with its comm
    assert unknown["unresolved"] == 1 and unknown["wall_us"] is None
    assert unknown["cpu_user_us"] is None
    pk = {(r["package"], r["package_version"]): r["runs"] for r in report.usage(db, "package")}
    assert pk[("gcc-12", "12.2")] == 2 and pk[(None, None)] == 2
    users = {r["uid"]: r["runs"] for r in report.usage(db, "user")}
    assert users == {1000: 2, 1001: 3}
    jobs = {r["jid"]: r["runs"] for r in report.usage(db, "job")}
    assert jobs == {JID: 4, None: 1}
    # Filters: glob on the path (LIKE, '_' is literal), package, comm, uid, period.
    assert [r["exe_path"] for r in report.usage(db, "binary", path="/home/*")] == [
        "/home/ann/bin/sim"]
    assert report.usage(db, "binary", path="/usr/bin/gcc_12") == []
    assert report.usage(db, "user", package="gcc*")[0]["runs"] == 1
    assert sum(r["runs"] for r in report.usage(db, "binary", comm="python3")) == 2
    assert report.usage(db, "binary", since=1002.5, until=1004.5)[0]["runs"] == 1
    assert report.glob_like("a_b%*?") == "a\\_b\\%%_"


def test_cli_table_csv_json(tmp_path: Path, capsys) -> None:
    path = _db(tmp_path)
    text = _cli(["apps", "--db", path, "--by", "binary"], capsys)
    assert "(path unknown) python3" in text and "/usr/bin/gcc-12" in text
    line = next(x for x in text.splitlines() if x.startswith("(path unknown)"))
    assert " - " in line  # unknown CPU is '-', never 0
    rows = json.loads(_cli(["apps", "--db", path, "--by", "job", "--json"], capsys))
    assert {r["jid"] for r in rows} == {format_jid(JID), None}
    csv_text = _cli(["apps", "--db", path, "--by", "user", "--csv"], capsys)
    assert csv_text.splitlines()[0].startswith("uid,runs,users")
    listed = json.loads(_cli(["apps", "--db", path, "--job", format_jid(JID), "--json"], capsys))
    assert [r["pid"] for r in listed] == [1, 2, 4, 5]
    table = _cli(["apps", "--db", path, "--job", format_jid(JID)], capsys)
    assert "(gone)" in table
    # The site questions of docs/applications.md.
    q1 = json.loads(_cli(["apps", "--db", path, "--by", "package", "--package", "gcc*",
                          "--json"], capsys))
    assert q1[0]["package_version"] == "12.2" and q1[0]["wall_us"] == 3_000_000
    q2 = json.loads(_cli(["apps", "--db", path, "--by", "user", "--path", "/home/*",
                          "--json"], capsys))
    assert [r["uid"] for r in q2] == [1000]
    q3 = json.loads(_cli(["apps", "--db", path, "--by", "binary", "--comm", "python3",
                          "--json"], capsys))
    assert sum(r["cpu_user_us"] or 0 for r in q3) == 7_200_000_000


def test_cli_job_refuses_the_filters_it_would_not_apply(tmp_path: Path, capsys) -> None:
    """--job lists every program of the job: a filter given with it was ignored, so
    '--job J --path /usr/*' listed programs outside /usr as if they matched."""
    path = _db(tmp_path)
    for extra in (["--path", "/usr/*"], ["--comm", "python3"], ["--user", "0"],
                  ["--package", "gcc*"], ["--since", "1d"], ["--until", "1d"]):
        assert cli.main(["apps", "--db", path, "--job", format_jid(JID), *extra]) != 0
        err = capsys.readouterr().err
        assert f"{extra[0]} does not apply to --job" in err and "--by" in err, err


def test_docs_describe_every_column_and_option() -> None:
    text = (Path(__file__).parent.parent / "docs" / "applications.md").read_text()
    for name in record.NAMES:
        assert f"| `{name}` |" in text, name
    for key in config.section_options("apps"):
        assert f"{key} =" in text, key


def test_read_after_gives_finished_records_in_spool_order(store: Store) -> None:
    rows = []
    for i, reason in enumerate(("exit", "open", "exec")):
        row = [None] * len(record.NAMES)
        row[:5] = [1, "b", 10 + i, 1, i]
        row[record.INDEX["exec_time"]] = 1.0
        row[record.INDEX["end_reason"]] = reason
        row[record.INDEX["path_status"]] = "gone"
        rows.append(row)
    store.submit_many(INSERT, rows)
    store.flush()
    got = record.read_after(store.db, 0)
    assert [r.pid for _, r in got] == [10, 12]
    assert record.read_after(store.db, got[-1][0]) == []
    # A shipper takes open records too (their closed record replaces them later).
    every = record.rows_after(store.db, 0, finished_only=False)
    assert [r[1:] for r in every] == [tuple(r) for r in rows]


def test_a_raising_listener_is_isolated_and_the_manager_still_sees_exits() -> None:
    from elsa.core.events import _with_listeners
    from elsa.core.listener import EventListener

    seen: List[Any] = []

    class Bad(EventListener):
        name = "bad"

        def on_exec(self, pid: int, tgid: int, ts_ns: int) -> None:
            raise RuntimeError("boom")

        def on_exit(self, pid: int, tgid: int, exit_status: int, ts_ns: int) -> None:
            raise RuntimeError("boom")

    class Good(EventListener):
        name = "good"

        def on_exec(self, pid: int, tgid: int, ts_ns: int) -> None:
            seen.append(("exec", pid))

    on_exit, on_exec = _with_listeners(lambda *a: seen.append(("manager", a[0])),
                                       [Bad(), Good()])
    on_exec(5, 5, 1)
    on_exit(5, 5, 0, 2)
    assert seen == [("exec", 5), ("manager", 5)]


def test_usage_rows_reach_only_listeners_that_take_them_and_a_raising_one_is_isolated(
) -> None:
    from elsa.core.listener import EventListener, usage_sink

    seen: List[Any] = []

    class Bad(EventListener):
        name = "bad"

        def on_usage(self, rows: List[UsageRow]) -> None:
            raise RuntimeError("boom")

    class Good(EventListener):
        name = "good"

        def on_usage(self, rows: List[UsageRow]) -> None:
            seen.extend(rows)

    assert usage_sink([EventListener()]) is None  # none takes rows: nothing to call
    sink = usage_sink([EventListener(), Bad(), Good()])
    assert sink is not None
    sink([("taskstats",), ("bsdacct",)])
    assert seen == [("taskstats",), ("bsdacct",)]
