"""The kernel's accounting file is shared state (managed bsdacct): another
`accton FILE` is noticed and left alone (and the time accounting was not
elsad's stored as a gap of bsdacct for the reports), and the file active before
elsad took over is restored on stop even after a kill -9. Switches acct(2): the suite runs
under `flock /tmp/elsa-kacct.lock` on shared machines."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from elsa.core.usage import load_gaps
from elsa.testing import wait_for

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("accton") is None, reason="needs GNU acct")]

#: Gaps are stored to the millisecond (elsa.core.usage.gap_stmt): a bound rounded down.
MS = 0.001
EXTRA = '[sources.bsdacct]\ninterval = 0.1\nownership_check = 0.5\nprobe_files = ["{p}"]\n'


def _grows(path) -> bool:
    before = os.stat(path).st_size
    subprocess.run(["true"])
    return os.stat(path).st_size > before


@pytest.fixture
def other_file(tmp_path):
    """An accounting file "another tool" owns; accounting is switched off after."""
    path = tmp_path / "other.pacct"
    path.touch()
    yield path
    subprocess.run(["accton", "off"], capture_output=True)


def test_displacement_is_noticed_and_left_alone(elsad, tmp_path, other_file):
    prev = tmp_path / "prev.pacct"
    prev.touch()
    d = elsad(extra=EXTRA.format(p=prev))
    with d.client() as c:
        jid = c.create(name="acct", pids=[os.getpid()])["jid"]
        st = c.status()["sources"]["bsdacct"]
        assert st["switched_on"] and st["displaced"] is None
        subprocess.run(["accton", str(other_file)], check=True, capture_output=True)
        st = wait_for(lambda: c.status()["sources"]["bsdacct"]["displaced"], 15,
                      interval=0.2, what="the displacement noticed")
        c.end(jid)
    assert _grows(other_file)
    d.stop()
    assert _grows(other_file)  # elsad did not switch off accounting it no longer owns
    out = subprocess.run(["elsa", "job", jid, "--json", "--state-dir", d.state_dir],
                         capture_output=True, text=True, check=True).stdout
    assert "taken over by another program" in json.loads(out)["usage"]["incomplete"]["bsdacct"]


def test_previous_file_is_restored_after_a_crash(elsad, tmp_path, other_file):
    # other_file plays psacct's file: active before elsad starts.
    subprocess.run(["accton", str(other_file)], check=True, capture_output=True)
    d = elsad(extra=EXTRA.format(p=other_file))
    with d.client() as c:
        assert c.status()["sources"]["bsdacct"]["previous"] == str(other_file)
    assert not _grows(other_file)  # elsad's file now
    d.kill9()
    d.start()  # probing now would find elsad's own file; the saved one counts
    with d.client() as c:
        assert c.status()["sources"]["bsdacct"]["previous"] == str(other_file)
    d.stop()
    assert _grows(other_file)  # restored


def _bsdacct_gaps(d):
    db = sqlite3.connect(f"file:{os.path.join(d.state_dir, 'elsa.db')}?mode=ro", uri=True)
    try:
        return [g for g in load_gaps(db) if g[0] == "bsdacct"]
    finally:
        db.close()


def _status_gaps(d):
    return [g for g in d.call("status")["sources"].get("gaps", []) if g["source"] == "bsdacct"]


def test_displacement_is_a_bsdacct_gap_until_elsad_takes_accounting_back(
        elsad, tmp_path, other_file):
    prev = tmp_path / "prev.pacct"
    prev.touch()
    started = time.time()
    d = elsad(extra=EXTRA.format(p=prev))
    displaced = os.path.join(d.state_dir, "pacct", "displaced.json")
    with d.client() as c:
        assert c.status()["sources"]["bsdacct"]["switched_on"]
        taken = time.time()
        subprocess.run(["accton", str(other_file)], check=True, capture_output=True)
        st = wait_for(lambda: c.status()["sources"]["bsdacct"]["displaced"], 15,
                      interval=0.2, what="the displacement noticed")
    # From before the other program took over (the last time elsad's file is known to
    # have been written) to at least the moment elsad noticed.
    (gap,) = wait_for(lambda: _bsdacct_gaps(d), 10, interval=0.2, what="a bsdacct gap")
    assert started - MS <= gap[1] <= taken + MS, (started, gap, taken)
    assert gap[1] == st["gap_from"] and gap[2] >= st["since"] - 0.01, (gap, st)
    # status shows the gap the reports read, with what bsdacct lost its records to.
    (shown,) = _status_gaps(d)
    assert shown["from"] == gap[1] and shown["to"] >= gap[2] and shown["jobs"] == [], shown
    assert shown["why"].startswith("bsdacct records lost to another program's takeover of "
                                   "kernel accounting (accton; elsad takes it back at its "
                                   "next start) from "), shown
    text = subprocess.run(["elsa-jobmng", "--socket", d.socket, "status"],
                          capture_output=True, text=True, check=True).stdout
    (line,) = [t for t in text.splitlines() if t.startswith("gap ")]
    assert line.startswith("gap        bsdacct records lost to another program's takeover "
                           "of kernel accounting"), text
    assert "flagged" not in line, line  # the gap itself names no jobs
    stopping = time.time()
    d.stop()
    (gap,) = _bsdacct_gaps(d)
    assert gap[2] >= stopping - MS and os.path.exists(displaced)  # goes on while elsad is down
    restarting = time.time()
    d.start()  # takes accounting back: the gap ends
    with d.client() as c:
        st = c.status()["sources"]["bsdacct"]
        assert st["switched_on"] and st["displaced"] is None
    wait_for(lambda: not os.path.exists(displaced), 10, interval=0.1,
             what="displaced.json forgotten once the gap is stored")
    (after,) = _bsdacct_gaps(d)  # the same gap, extended to the restart
    assert after[1] == gap[1] and restarting - MS <= after[2] <= time.time() + MS, (
        after, restarting)
    (shown,) = _status_gaps(d)  # told by the start that took accounting back
    assert (shown["from"], shown["to"]) == after[1:] and "taken back at this start" in shown[
        "why"], (shown, after)


def _program(tmp_path, name: str) -> str:
    """A copy of true(1) whose records carry *name* as their command."""
    exe = tmp_path / name
    shutil.copy(shutil.which("true") or "/bin/true", exe)
    exe.chmod(0o755)
    return str(exe)


def _bsdacct_records(d, comm: str) -> int:
    db = sqlite3.connect(f"file:{os.path.join(d.state_dir, 'elsa.db')}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM proc_usage WHERE source = 'bsdacct' "
                          "AND comm = ?", (comm,)).fetchone()[0]
    finally:
        db.close()


def test_the_processes_that_end_after_a_clean_stop_are_read_at_the_next_start(
        elsad, tmp_path, other_file):
    # other_file plays psacct's file, active before elsad: a clean stop hands accounting
    # back to it, and the kernel writes the downtime's records there, not in elsad's file.
    subprocess.run(["accton", str(other_file)], check=True, capture_output=True)
    subprocess.run([_program(tmp_path, "elsa-before")], check=True)
    d = elsad(extra=EXTRA.format(p=other_file))
    d.stop()
    handback = os.path.join(d.state_dir, "pacct", "handback.json")
    assert os.path.exists(handback)
    down = _program(tmp_path, "elsa-down")
    for _ in range(3):
        subprocess.run([down], check=True)
    d.start()
    wait_for(lambda: _bsdacct_records(d, "elsa-down") == 3, 15, interval=0.2,
             what="the records of the downtime read from the handed-back file")
    wait_for(lambda: not os.path.exists(handback), 10, interval=0.1,
             what="handback.json forgotten once its records are stored")
    assert _bsdacct_records(d, "elsa-before") == 0  # written before elsad took over
    assert not _bsdacct_gaps(d)  # bsdacct covered the downtime
    d.stop()


def test_a_clean_stop_that_switches_accounting_off_is_a_bsdacct_gap(
        elsad, tmp_path, other_file):
    subprocess.run(["accton", "off"], check=True, capture_output=True)
    prev = tmp_path / "prev.pacct"
    prev.touch()  # a probe file, not active: elsad's stop switches accounting off
    d = elsad(extra=EXTRA.format(p=prev))
    stopping = time.time()
    d.stop()
    restarting = time.time()
    d.start()
    (gap,) = wait_for(lambda: _bsdacct_gaps(d), 10, interval=0.2,
                      what="a bsdacct gap over the time accounting was off")
    assert stopping - MS <= gap[1] <= restarting + MS <= gap[2] + 2 * MS, (gap, stopping)
    assert gap[2] <= time.time() + MS
    (shown,) = _status_gaps(d)
    assert (shown["from"], shown["to"]) == gap[1:] and shown["why"].startswith(
        "bsdacct records lost to elsad's downtime (its stop handed kernel accounting back "
        "to a file it cannot read, or switched it off) from "), shown
    d.stop()


def test_a_job_across_a_clean_stop_that_switched_accounting_off_is_incomplete(
        elsad, tmp_path, other_file, spawned):
    # A job runs on while elsad is stopped (systemctl restart): the processes that end
    # then are in no file elsad can read, so the job's bsdacct figures miss them. Its
    # process count must not be taken from bsdacct as if complete.
    subprocess.run(["accton", "off"], check=True, capture_output=True)
    prev = tmp_path / "prev.pacct"
    prev.touch()
    d = elsad(extra=EXTRA.format(p=prev))
    member = subprocess.Popen(["sleep", "60"], start_new_session=True)
    spawned.append(member)
    jid = d.call("create", name="across", pids=[member.pid])["jid"]
    d.stop()
    d.start()
    wait_for(lambda: _bsdacct_gaps(d), 10, interval=0.2, what="the bsdacct gap stored")
    member.kill()
    member.wait(5)
    with d.client() as c:
        assert c.wait(jid, timeout=10)["ended"] is True
    out = subprocess.run([sys.executable, "-m", "elsa", "job", jid, "--json",
                          "--state-dir", d.state_dir],
                         capture_output=True, text=True, check=True).stdout
    incomplete = json.loads(out)["usage"].get("incomplete") or {}
    assert "bsdacct" in incomplete, incomplete
    assert incomplete["bsdacct"].startswith("no bsdacct records from "), incomplete
    d.stop()
