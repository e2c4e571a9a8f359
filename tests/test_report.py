"""`elsa` reports over a store filled by `elsa import-acct`: JSON keys as issue 5
names them, exact --since/--until windows, CSV/table output, no double import."""

from __future__ import annotations

import json
import sqlite3

import pytest

from elsa.kernel import pacct
from elsa.report.cli import main, parse_time

T0 = 1_700_000_000  # an hour boundary minus 800 s: windows cut through hours
BOOT = T0 - 5000  # when the members' boot began


def _records():
    recs = []
    for i in range(300):
        recs.append(pacct.AcctRecord(
            offset=0, flag=0, tty=0, exitcode=0, uid=[0, 1000, 1001][i % 3],
            gid=0, pid=20_000 + i, ppid=1, btime=T0 + i * 60, etime=float(100 + i),
            utime=10 + i % 7, stime=i % 5, mem=1000 + i, io=0, rw=0, minflt=i, majflt=0,
            comm=["make", "cc", "ld", "sh"][i % 4]))
    return recs


@pytest.fixture
def store(tmp_path):
    f = tmp_path / "pacct"
    f.write_bytes(pacct.encode(_records()))
    db_path = str(tmp_path / "state" / "elsa.db")
    assert main(["import-acct", "--db", db_path, str(f)]) == 0
    # A job whose members are pids 20000..20009 (as elsad's history records them).
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO jobs VALUES (42, 'build', 1000, '{}', ?, ?, 'ended', 'cnproc', "
               "'{}')", (T0, T0 + 700))
    # Identity as elsad stores it: start ticks since the boot, whose start it records.
    db.execute("INSERT INTO meta VALUES ('boot_epoch:boot', ?)", (str(BOOT),))
    for i in range(10):
        db.execute("INSERT INTO members VALUES ('boot', ?, ?, 42, ?, ?, 0, 'fork', 0)",
                   (20_000 + i, (T0 + i * 60 - BOOT) * 100 + 30, T0 + i * 60 + 0.3,
                    T0 + i * 60 + 2))
    db.commit()
    db.close()
    return db_path, f


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_summary_by_user_keys_and_totals(store, capsys):
    db_path, _ = store
    rows = _json(capsys, ["summary", "--by", "user", "--json", "--db", db_path])
    recs = _records()
    by_uid = {r["uid"]: r for r in rows}
    assert set(by_uid) == {0, 1000, 1001}
    for row in rows:
        for k in ("user", "processes", "cpu_user_us", "cpu_system_us", "elapsed_us",
                  "max_rss_kb"):
            assert k in row
    for uid in (0, 1000, 1001):
        mine = [r for r in recs if r.uid == uid]
        assert by_uid[uid]["processes"] == len(mine)
        assert by_uid[uid]["cpu_user_us"] == sum(r.utime for r in mine) * 10_000
        assert by_uid[uid]["avg_mem_kb"] == round(sum(r.mem for r in mine) / len(mine))


@pytest.mark.parametrize("since,until", [(T0 + 1000, T0 + 9000), (T0 + 100, T0 + 200),
                                         (None, T0 + 5000), (T0 + 3599, None)])
def test_summary_windows_are_exact(store, capsys, since, until):
    db_path, _ = store
    argv = ["summary", "--by", "command", "--json", "--db", db_path]
    if since is not None:
        argv += ["--since", str(since)]
    if until is not None:
        argv += ["--until", str(until)]
    rows = {r["command"]: r for r in _json(capsys, argv)}
    want = {}
    for r in _records():
        end = r.btime + r.etime / 100
        if (since is None or end >= since) and (until is None or end < until):
            want[r.comm] = want.get(r.comm, 0) + 1
    assert {k: v["processes"] for k, v in rows.items()} == want


def test_import_is_idempotent_and_attributes_from_history(store, capsys, tmp_path):
    db_path, f = store
    assert main(["import-acct", "--db", db_path, "--json", str(f)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["records"] == 300 and res[0]["inserted"] == 0
    # A later file with the job's processes is attributed through members.
    g = tmp_path / "pacct.later"
    recs = [r for r in _records()[:10]]
    g.write_bytes(pacct.encode([pacct.AcctRecord(**{**r.__dict__, "btime": r.btime + 1,
                                                   "etime": r.etime + 1}) for r in recs]))
    res = _json(capsys, ["import-acct", "--db", db_path, "--json", str(g)])
    assert res[0]["inserted"] == 10 and res[0]["attributed"] == 10


def test_job_json_has_the_issue_keys(store, capsys, tmp_path):
    db_path, f = store
    g = tmp_path / "pacct.job"
    recs = _records()[:10]
    g.write_bytes(pacct.encode([pacct.AcctRecord(**{**r.__dict__, "btime": r.btime + 1})
                                for r in recs]))
    assert main(["import-acct", "--db", db_path, str(g)]) == 0
    capsys.readouterr()
    job = _json(capsys, ["job", "0x2a", "--json", "--db", db_path])
    assert job["jid"] == "0x000000000000002a"
    for k in ("processes", "cpu_user_us", "cpu_system_us", "max_rss_kb", "read_bytes",
              "write_bytes", "sources"):
        assert k in job["usage"]
    assert job["usage"]["processes"] == 10 and len(job["processes"]) == 10
    assert job["usage"]["cpu_user_us"] == sum(r.utime for r in recs) * 10_000
    assert "bsdacct" in job["usage"]["sources"]
    assert {p["pid"] for p in job["processes"]} == {r.pid for r in recs}
    rows = _json(capsys, ["summary", "--by", "job", "--json", "--db", db_path])
    assert rows[0]["jid"] == "0x000000000000002a" and rows[0]["processes"] == 10
    for k in ("cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb"):
        assert k in rows[0]
    jobs = _json(capsys, ["jobs", "--json", "--db", db_path])
    assert jobs[0]["jid"] == "0x000000000000002a" and jobs[0]["usage"]["processes"] == 10


def test_table_and_csv_output(store, capsys):
    db_path, _ = store
    assert main(["summary", "--by", "user", "--db", db_path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["USER", "PROCS", "USER"]
    assert main(["summary", "--by", "command", "--csv", "--db", db_path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("command,processes,cpu_user_us") and len(lines) == 5


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    assert main(["jobs", "--db", str(tmp_path / "none.db")]) == 2
    assert "no store at" in capsys.readouterr().err


def test_parse_time_forms():
    assert parse_time("90m", now=10_000) == 10_000 - 5400
    assert parse_time("1700000000") == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20+00:00") == 1_700_000_000


def test_jobs_page_sorts_by_usage_without_stored_priorities(tmp_path):
    """A store elsad never ran on (import-acct, benchmarks) has no source priorities: the
    ranking is then a bare number, which SQL's ORDER BY would read as a column position."""
    import sqlite3

    from elsa.core.store import Store
    from elsa.report import query

    st = Store(str(tmp_path))
    st.close()
    db = sqlite3.connect(str(tmp_path / "elsa.db"))
    for jid, cpu in ((1, 5), (2, 9), (3, 7)):
        db.execute("INSERT INTO jobs(jid, name, owner_uid, tags, created, state, backend, "
                   "params) VALUES (?, 'j', 0, '{}', ?, 'ended', 'cnproc', '{}')", (jid, jid))
        db.execute("INSERT INTO job_usage(jid, source, cpu_user_us, cpu_system_us) "
                   "VALUES (?, 'x', ?, 0)", (jid, cpu))
    # A source after 'x' in the order: the sort, like the figures shown, uses x's.
    db.execute("INSERT INTO job_usage(jid, source, cpu_user_us, cpu_system_us) "
               "VALUES (1, 'y', 100, 100)")
    db.execute("DELETE FROM meta WHERE key = 'usage.priority'")
    db.commit()
    total, rows = query.jobs_page(db, sort="cpu")
    assert total == 3 and [r["usage"]["cpu_user_us"] for r in rows] == [9, 7, 5]
    total, rows = query.jobs_page(db, sort="cpu", descending=False)
    assert [r["usage"]["cpu_user_us"] for r in rows] == [5, 7, 9]


def test_jobs_page_sorts_by_the_figure_it_shows(tmp_path):
    """Sorting by a usage figure orders jobs by the figure each row shows (best()'s
    choice in Python), whatever the stored priorities, the sources' names and which
    sources are flagged incomplete or lack the figure."""
    import json
    import random
    import sqlite3

    from elsa.core.store import Store
    from elsa.report import query

    Store(str(tmp_path)).close()
    db = sqlite3.connect(str(tmp_path / "elsa.db"))
    rnd = random.Random(18)
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('usage.priority', ?)",
               (json.dumps({"b": 10, "c": 10, "a": 30}),))
    for jid in range(1, 201):
        db.execute("INSERT INTO jobs(jid, name, owner_uid, tags, created, state, backend, "
                   "params) VALUES (?, 'j', 0, '{}', ?, 'ended', 'cnproc', '{}')", (jid, jid))
        for src in rnd.sample("abcd", rnd.randint(0, 4)):
            cpu = None if rnd.random() < 0.2 else rnd.randrange(10**6)
            rss = None if rnd.random() < 0.2 else rnd.randrange(10**6)
            db.execute("INSERT INTO job_usage(jid, source, cpu_user_us, cpu_system_us, "
                       "max_rss_kb, incomplete) VALUES (?, ?, ?, ?, ?, ?)",
                       (jid, src, cpu, None if cpu is None else 7, rss,
                        "lost" if rnd.random() < 0.3 else None))
    db.commit()

    def cpu(r):
        u = r["usage"]
        return None if u.get("cpu_user_us") is None else u["cpu_user_us"] + u["cpu_system_us"]

    for sort, fig in (("cpu", cpu), ("maxrss", lambda r: r["usage"].get("max_rss_kb"))):
        for desc in (True, False):
            _, rows = query.jobs_page(db, sort=sort, descending=desc, limit=1000)
            got = [fig(r) for r in rows]
            assert len(got) == 200 and any(v is None for v in got)
            # SQLite: NULL is the smallest value.
            key = [(-1 if v is None else v) for v in got]
            assert key == sorted(key, reverse=desc), (sort, desc)


def test_jobs_page_newest_first_reads_the_created_index(tmp_path):
    """The default order of the web's jobs page and `elsa jobs` walks jobs_created
    (schema 11) instead of sorting every job of the store: the plan of the statement
    jobs_page runs (as SQLite traced it, parameters bound)."""
    import sqlite3

    from elsa.core.store import Store
    from elsa.report import query

    Store(str(tmp_path)).close()
    db = sqlite3.connect(str(tmp_path / "elsa.db"))
    ran = []
    db.set_trace_callback(ran.append)
    query.jobs_page(db, owner_uid=1000)
    db.set_trace_callback(None)
    (page,) = [sql for sql in ran if "ORDER BY" in sql]
    plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + page))
    assert "jobs_created" in plan and "TEMP B-TREE" not in plan, plan


def test_job_table_shows_the_batch_systems_tags(store, capsys):
    # An admin looking up a Slurm/PBS job ('elsa jobs --tag wlm_job_id=4242') sees its
    # batch identity in 'elsa job' as --json gives it (tags), not only in JSON.
    db_path, _ = store
    db = sqlite3.connect(db_path)
    db.execute("UPDATE jobs SET tags = ? WHERE jid = 42",
               (json.dumps({"wlm": "slurm", "wlm_job_id": "4242", "account": "chem"}),))
    db.commit()
    db.close()
    assert main(["job", "0x2a", "--db", db_path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "tags account=chem wlm=slurm wlm_job_id=4242" in lines[:3], lines[:3]
