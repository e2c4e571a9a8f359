"""Usage that only a lower-ranked source saw, while the best one had a gap (elsad
down: taskstats listened to nobody; taskstats records lost to ENOBUFS), is counted
once by `elsa summary` and billed once by `elsa bill`: the hours a recorded gap
overlaps are read process by process, each process from its best source
(elsa.core.usage.best_records_sql)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from elsa.core.aggregator import add_to_sums
from elsa.core.schema import migrate
from elsa.core.usage import gap_stmt, load_gaps, save_priorities
from elsa.report.cli import main
from elsa.report.query import usage_per_day
from elsa.testing import wait_for
from tests.support import kernel_acct_lock

CONFIG = """
state_dir = "{state}"
[billing]
timezone = "UTC"
[billing.rates]
cpu_user = 1
"""


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def _proc(db, source, pid, comm, end, cu, jid=None):
    (lo,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM proc_usage").fetchone()
    db.execute("INSERT INTO proc_usage(source, jid, pid, start_time, end_time, uid, comm, "
               "cpu_user_us, cpu_system_us, elapsed_us) VALUES (?, ?, ?, ?, ?, 1000, ?, ?, 0, "
               "1000000)", (source, jid, pid, end - 1, end, comm, cu))
    add_to_sums(db, lo)


GAP = (ts("2026-11-27T20:16:10"), ts("2026-11-27T20:16:20"))


@pytest.fixture
def site(tmp_path):
    """Hour 20:00-21:00: taskstats records before and after a gap of 10 s; bsdacct's
    records of the same processes (their times and CPU as pacct has them: rounded), and
    of `downburn`, which ran in the gap. Hour 21:00-22:00 has no gap: one source."""
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(CONFIG.format(state=state))
    path = str(state / "elsa.db")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, path)
    save_priorities(db, db.execute, {"taskstats": 20, "bsdacct": 30})
    for i, minute in enumerate((5, 10, 15, 20, 30, 40)):
        end = ts(f"2026-11-27T20:{minute:02d}:00") + 0.37
        _proc(db, "taskstats", 100 + i, f"cmd{i}", end, 1_234_567)
        _proc(db, "bsdacct", 100 + i, f"cmd{i}", end - 0.8, 1_230_000)
    # Recorded by taskstats between elsad's last "alive" mark and its stop: in the gap.
    _proc(db, "taskstats", 150, "late", GAP[0] + 1.2, 2_000_000)
    _proc(db, "bsdacct", 150, "late", GAP[0] + 0.9, 2_000_000)
    _proc(db, "bsdacct", 200, "downburn", ts("2026-11-27T20:16:17"), 360_000)
    # A process in a job: billed with the job, not as outside-job usage.
    _proc(db, "taskstats", 300, "injob", ts("2026-11-27T20:50:00"), 5_000_000, jid=7)
    _proc(db, "bsdacct", 300, "injob", ts("2026-11-27T20:50:00") - 0.5, 5_000_000)
    for i in range(3):  # a later hour without a gap: the best source only
        end = ts("2026-11-27T21:10:00") + i
        _proc(db, "taskstats", 400 + i, "after", end, 1_000_000)
        _proc(db, "bsdacct", 400 + i, "after", end - 0.5, 990_000)
    db.close()
    return cfg, path


def _record_gap(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(*gap_stmt("taskstats", *GAP))
    db.close()


def _summary(capsys, path, since, until, by="command"):
    assert main(["summary", "--by", by, "--json", "--db", path, "--since", since,
                 "--until", until]) == 0
    return {r[by]: r for r in json.loads(capsys.readouterr().out)}


WINDOWS = [("2026-11-27T20:00Z", "2026-11-27T22:00Z"),   # whole hours
           ("2026-11-27T20:03Z", "2026-11-27T21:30Z"),   # edges cut through hours
           ("2026-11-27T20:03Z", "2026-11-27T20:45Z")]   # inside the gap's hour


@pytest.mark.parametrize("since,until", WINDOWS)
def test_summary_counts_the_gap_once(site, capsys, since, until):
    _cfg, path = site
    _record_gap(path)
    rows = _summary(capsys, path, since, until)
    assert rows["downburn"]["processes"] == 1
    assert rows["downburn"]["cpu_user_us"] == 360_000
    first = 0 if since.endswith("20:00Z") else 1  # cmd0 ended at 20:05
    for i in range(first, 6):  # every other process once, with taskstats' figure
        assert rows[f"cmd{i}"]["processes"] == 1
        assert rows[f"cmd{i}"]["cpu_user_us"] == 1_234_567
    assert rows["late"]["processes"] == 1
    if until.endswith("22:00Z"):
        assert rows["after"]["processes"] == 3
        assert rows["after"]["cpu_user_us"] == 3_000_000
    (user,) = _summary(capsys, path, since, until, by="user").values()
    assert user["uid"] == 1000
    assert user["processes"] == sum(r["processes"] for r in rows.values())
    assert user["cpu_user_us"] == sum(r["cpu_user_us"] for r in rows.values())


def test_without_a_recorded_gap_the_best_source_counts_alone(site, capsys):
    _cfg, path = site
    rows = _summary(capsys, path, *WINDOWS[0])
    assert "downburn" not in rows  # no gap known: bsdacct's records are taken as twins
    assert rows["cmd0"]["cpu_user_us"] == 1_234_567


@pytest.mark.parametrize("since,until", WINDOWS)
def test_bill_bills_the_gap_once(site, capsys, since, until):
    cfg, path = site
    _record_gap(path)
    assert main(["bill", "--config", str(cfg), "--db", path, "--by", "job", "--json",
                 "--since", since, "--until", until]) == 0
    data = json.loads(capsys.readouterr().out)
    (item,) = [r for r in data["rows"] if r["key"] is None]
    rows = _summary(capsys, path, since, until)
    rows.pop("injob", None)  # billed with its job, not as outside-job usage
    assert "downburn" in rows
    # The processes the summary counts, each once: downburn's too.
    assert item["processes"] == sum(r["processes"] for r in rows.values())
    cpu = sum(r["cpu_user_us"] for r in rows.values())
    assert Decimal(item["quantities"]["cpu_user"]) == Decimal(cpu) / 1_000_000


@pytest.mark.parametrize("uid", [None, 1000])
def test_the_webs_usage_per_day_counts_a_gap_hour_as_the_summary_does(site, capsys, uid):
    _cfg, path = site
    _record_gap(path)
    rows = _summary(capsys, path, *WINDOWS[0])
    assert "downburn" in rows
    db = sqlite3.connect(path)
    try:
        (day,) = usage_per_day(db, ts("2026-11-27T20:00:00"), ts("2026-11-27T22:00:00"), uid)
        assert usage_per_day(db, ts("2026-11-27T20:00:00"), ts("2026-11-27T22:00:00"),
                             4242) == []
    finally:
        db.close()
    assert day["uid"] == 1000 and day["day"] == ts("2026-11-27T00:00:00")
    assert day["processes"] == sum(r["processes"] for r in rows.values())
    assert day["cpu_us"] == sum(r["cpu_user_us"] + r["cpu_system_us"] for r in rows.values())


def test_an_hour_inside_a_gap_in_which_the_source_has_records_is_read_per_process(
        site, capsys):
    """A gap that spans whole hours in which its source still has records (an overflow
    while the read was late: part of the records lost): those hours are read process by
    process too, not only the hours the gap begins or ends in."""
    _cfg, path = site
    db = sqlite3.connect(path, isolation_level=None)
    _proc(db, "bsdacct", 500, "inner", ts("2026-11-27T21:30:00"), 700_000)
    db.execute(*gap_stmt("taskstats", GAP[0], ts("2026-11-27T22:00:30")))
    db.close()
    rows = _summary(capsys, path, "2026-11-27T20:00Z", "2026-11-27T23:00Z")
    assert rows["inner"]["processes"] == 1
    assert rows["after"]["processes"] == 3  # each once, taskstats' figure
    assert rows["after"]["cpu_user_us"] == 3_000_000
    assert rows["downburn"]["processes"] == 1


def test_a_record_up_to_a_second_before_a_gap_in_the_previous_hour_counts(site, capsys):
    """pacct's end time is up to 1 s early (whole-second btime): the record of a process
    that exited just after a gap began, at an hour's start, may end in the hour before."""
    _cfg, path = site
    db = sqlite3.connect(path, isolation_level=None)
    _proc(db, "bsdacct", 600, "edge", ts("2026-11-27T20:59:59") + 0.6, 500_000)
    db.execute(*gap_stmt("taskstats", ts("2026-11-27T21:00:00") + 0.5,
                         ts("2026-11-27T21:00:10")))
    db.close()
    rows = _summary(capsys, path, "2026-11-27T20:00Z", "2026-11-27T22:00Z")
    assert rows["edge"]["processes"] == 1
    assert rows["cmd0"]["processes"] == 1 and rows["cmd0"]["cpu_user_us"] == 1_234_567


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


def _json_of(argv):
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.root
@pytest.mark.skipif(shutil.which("accton") is None, reason="needs GNU acct")
def test_downtime_usage_from_an_imported_pacct_is_reported_and_billed(elsad, tmp_path):
    """The review's case: elsad (taskstats) down, a CPU-heavy process recorded only by
    kernel accounting, elsad back, `elsa import-acct` of that file."""
    d = elsad()
    db_path = os.path.join(d.state_dir, "elsa.db")
    subprocess.run(["true"], check=True)  # taskstats records in the gap's hour
    d.stop()
    stopped = time.time()
    burner = tmp_path / "downburn"
    shutil.copy(sys.executable, burner)
    pacct = tmp_path / "pacct"
    pacct.touch()
    with kernel_acct_lock():
        subprocess.run(["accton", str(pacct)], check=True, capture_output=True)
        try:
            subprocess.run([str(burner), "-c", BURN], check=True)
        finally:
            subprocess.run(["accton", "off"], capture_output=True)
    # pacct's end time (whole-second btime + elapsed) may be up to 1 s late: the
    # windows below end before the restart and after every record of the downtime.
    restarting = time.time() + 1.0
    wait_for(lambda: time.time() > restarting, 5, interval=0.1, what="pacct's margin")
    d.start()
    gaps = wait_for(lambda: [g for g in load_gaps(sqlite3.connect(db_path))
                             if g[0] == "taskstats" and g[2] >= restarting], 10,
                    interval=0.2, what="the downtime recorded as a taskstats gap")
    assert gaps[0][1] <= stopped
    assert subprocess.run(["elsa", "import-acct", "--db", db_path, str(pacct)],
                          capture_output=True).returncode == 0
    cfg = tmp_path / "bill.toml"
    cfg.write_text(f'state_dir = "{d.state_dir}"\n[billing]\n[billing.rates]\ncpu_user = 1\n')
    hour = math.floor(stopped / 3600) * 3600
    # Windows that end before the restart: no record can still come in.
    for since in (hour, stopped - 30):
        window = ["--db", db_path, "--json", "--since", repr(since),
                  "--until", repr(restarting)]
        rows = {r["command"]: r for r in _json_of(["elsa", "summary", "--by", "command"]
                                                  + window)}
        assert rows["downburn"]["processes"] == 1, rows.get("downburn")
        assert rows["downburn"]["cpu_user_us"] + rows["downburn"]["cpu_system_us"] >= 250_000
        users = {r["user"]: r for r in _json_of(["elsa", "summary", "--by", "user"] + window)}
        bill = _json_of(["elsa", "bill", "--config", str(cfg), "--by", "user"] + window)
        billed = {r["key"]: r for r in bill["rows"]}
        # The bill's outside-job items are the summary's processes (no job ran): each once.
        assert billed["root"]["processes"] == users["root"]["processes"]
        assert (Decimal(billed["root"]["charges"]["cpu_user"])
                == (Decimal(users["root"]["cpu_user_us"]) / 1_000_000).quantize(
                    Decimal("0.01")))


LOSSY = ('burst_hold = 0\n'
         # A tiny taskstats buffer read once a second: a burst of exits overflows it.
         '[sources.taskstats]\nrcvbuf = 4096\nread_interval = 1.0\n'
         '[sources.bsdacct]\nmode = "managed"\ninterval = 0.2\nprobe_files = []\n')

FORKS = """
import os, sys
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.mark.root
def test_processes_taskstats_lost_to_enobufs_are_counted_from_bsdacct(elsad, tmp_path,
                                                                      capsys):
    """The hour of a real overflow: taskstats holds some of a fork burst's processes,
    bsdacct (managed, the kernel's pacct file) all of them. The summary counts each
    once: every one that only bsdacct saw too."""
    burner = tmp_path / "lostburst"  # a command name nothing else on the machine has
    shutil.copy(sys.executable, burner)
    with kernel_acct_lock():
        started = time.time()  # before the listener registers: no gap begins earlier
        d = elsad(extra=LOSSY)
        subprocess.run([str(burner), "-S", "-c", FORKS, "1000"], check=True)
        wait_for(lambda: d.call("status")["sources"]["taskstats"]["lost_enobufs"] > 0, 30,
                 interval=0.2, what="taskstats ENOBUFS")
        d.stop()  # every record read and stored, accounting switched back off
    path = os.path.join(d.state_dir, "elsa.db")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert [g for g in load_gaps(db) if g[0] == "taskstats" and g[1] >= started], \
            load_gaps(db)
        # The store's first start recorded taskstats' gap "before it first ran on this
        # store" (from 0), which ends in this hour: out, so that only the overflow's
        # gap makes the hour one read process by process.
        db.execute("DELETE FROM meta WHERE key LIKE 'gap:0.0:%'")
    finally:
        db.close()
    since = repr(math.floor(started / 3600) * 3600.0)
    until = repr(time.time() + 1)
    window = ["--since", since, "--until", until]

    def lostburst(*source):
        assert main(["summary", "--by", "command", "--json", "--db", path, *window,
                     *source]) == 0
        rows = {r["command"]: r for r in json.loads(capsys.readouterr().out)}
        return rows["lostburst"]["processes"]

    seen = {src: lostburst("--source", src) for src in ("taskstats", "bsdacct")}
    assert seen["bsdacct"] == 1001, seen  # the burst's parent and its 1000 children
    assert seen["taskstats"] < seen["bsdacct"], seen  # the overflow cost taskstats some
    assert lostburst() == seen["bsdacct"], seen


def test_gap_buckets_merges_a_sources_ranges_that_overlap_or_touch():
    """A report queries each range: 10,000 gaps within 8 hours (a restart or overflow
    episode each) took 1.2 s a report, one query a gap."""
    from elsa.core.usage import gap_buckets

    h = 3600
    gaps = [("taskstats", 10 * h + 5, 10 * h + 9), ("taskstats", 10 * h + 20, 10 * h + 30),
            ("taskstats", 11 * h + 5, 12 * h + 5), ("bsdacct", 10 * h + 5, 10 * h + 9),
            ("taskstats", 14 * h + 5, 14 * h + 9), ("taskstats", 0, 20 * h + 9)]
    assert gap_buckets(gaps, h) == [("bsdacct", 10, 10), ("taskstats", 10, 12),
                                    ("taskstats", 14, 14), ("taskstats", 20, 20)]
