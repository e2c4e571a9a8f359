"""The usage model (elsa/core/usage.py): source priority comes from the source
specs, and live aggregation, the stored history and import-acct attribute by
one rule."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from elsa.core.aggregator import history_lookup
from elsa.core.attribution import ATTRIBUTE_SQL, identity, save_boot_epoch
from elsa.core.usage import best, load_priorities, priorities_of, save_priorities
from elsa.kernel import pacct
from elsa.report.cli import main

ROOT = Path(__file__).resolve().parents[1]
BOOT = 1_700_000_000.0


def test_no_source_name_is_written_into_the_core_or_the_reports():
    from elsa.plugins import PluginHost, build_plugin_manager

    names = set(PluginHost(build_plugin_manager()).sources())
    assert {"taskstats", "bsdacct", "cgroupstat"} <= names
    for rel in ("elsa/core/usage.py", "elsa/core/aggregator.py", "elsa/report/query.py",
                "elsa/core/accounting.py", "elsa/core/defaults.py"):
        # Code only: comments may cite documentation sections by name.
        text = "\n".join(line.split("#", 1)[0] for line in (ROOT / rel).read_text().splitlines())
        for name in names:
            assert not re.search(rf"""['"]{name}['"]""", text), (rel, name)


def test_priority_is_the_specs_and_reports_follow_it(tmp_path):
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")

    class Spec:
        def __init__(self, priority):
            self.priority = priority

    save_priorities(db, db.execute, priorities_of({"fast": Spec(5), "slow": Spec(90)}))
    prios = load_priorities(db)
    assert prios == {"fast": 5, "slow": 90}
    per = {"slow": {"cpu_user_us": 1}, "fast": {"cpu_user_us": 2}}
    assert best(per, prios)[1]["cpu_user_us"] == "fast"
    save_priorities(db, db.execute, {"fast": 95})  # a spec changed: the store follows
    assert best(per, load_priorities(db))[1]["cpu_user_us"] == "slow"


def _store(tmp_path):
    recs = [pacct.AcctRecord(offset=0, flag=0, tty=0, exitcode=0, uid=0, gid=0, pid=pid,
                             ppid=1, btime=int(BOOT) + start_s, etime=100.0, utime=1, stime=0,
                             mem=10, io=0, rw=0, minflt=0, majflt=0, comm="x")
            for pid, start_s in ((100, 50), (101, 60), (100, 400))]
    f = tmp_path / "pacct"
    f.write_bytes(pacct.encode(recs))
    path = str(tmp_path / "st" / "elsa.db")
    assert main(["import-acct", "--no-attribute", "--db", path, str(f)]) == 0
    db = sqlite3.connect(path, isolation_level=None)
    # Members: pid 100 started 50 s after boot (job 1); pid 101 at 60 s (job 2). The
    # second pid-100 process (400 s) is another process with a reused pid: no job.
    for pid, start_s, jid in ((100, 50, 1), (101, 60, 2)):
        db.execute("INSERT INTO members VALUES ('b1', ?, ?, ?, ?, ?, 0, 'attach', 0)",
                   (pid, start_s * 100, jid, BOOT + start_s + 30, BOOT + start_s + 90))
    return db


def test_live_history_and_import_attribute_alike(tmp_path):
    db = _store(tmp_path)
    rows = db.execute("SELECT * FROM proc_usage ORDER BY id").fetchall()
    cols = [d[0] for d in db.execute("SELECT * FROM proc_usage").description]
    from elsa.core.usage import ROW_FIELDS

    lookup = history_lookup(db, "b1")
    live = {}
    for r in rows:
        row = tuple(dict(zip(cols, r))[k] for k in ROW_FIELDS)
        start, tol = identity(row, BOOT)
        live[r[cols.index("id")]] = lookup(row[2], start, tol, row[5])
    save_boot_epoch(db.execute, "b1", BOOT)
    db.execute(ATTRIBUTE_SQL, (0, 10**9))
    imported = dict(db.execute("SELECT id, jid FROM proc_usage"))
    assert imported == live
    assert sorted(v for v in live.values() if v) == [1, 2] and list(live.values()).count(None) == 1


def test_job_cpu_is_never_below_its_own_process_records():
    from elsa.core.usage import not_below_records

    prios = {"cg": 10, "ts": 20}
    # The root row of `run`: 62 ms of start-up before joining, which the cgroup lacks.
    per = {"cg": {"cpu_user_us": 1000, "cpu_system_us": 0},
           "ts": {"processes": 1, "cpu_user_us": 62_000, "cpu_system_us": 300}}
    values, chosen = best(per, prios)
    note = not_below_records(values, chosen, per, prios)
    assert values["cpu_user_us"] == 62_000 and chosen["cpu_user_us"] == "ts"
    assert note and "before they joined" in note
    # A fork storm: the cgroup reads above the records; its figure stays.
    per = {"cg": {"cpu_user_us": 900_000, "cpu_system_us": 500_000},
           "ts": {"processes": 3002, "cpu_user_us": 300_000, "cpu_system_us": 535_000}}
    values, chosen = best(per, prios)
    assert not_below_records(values, chosen, per, prios) is None
    assert chosen["cpu_user_us"] == "cg" and values["cpu_system_us"] == 500_000
