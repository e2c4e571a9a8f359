"""Central store against a real PostgreSQL (initdb/pg_ctl in a temp dir, as nobody).

Node stores here are real SQLite stores filled through the store's own writer
with synthetic usage rows (the kernel is exercised by test_central_nodes.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict

import pytest

psycopg = pytest.importorskip("psycopg")

from elsa.apps import record  # noqa: E402
from elsa.apps.recorder import INSERT as INSERT_APP  # noqa: E402
from elsa.apps.report import usage as apps_usage  # noqa: E402
from elsa.central import schema  # noqa: E402
from elsa.central.pgserver import PgServer, pg_bindir  # noqa: E402
from elsa.central.shipper import APP_MARK_KEY, MARK_KEY, RECHECK_S  # noqa: E402
from elsa.core.model import Job, parse_jid  # noqa: E402
from elsa.errors import StoreError  # noqa: E402
from elsa.report import query  # noqa: E402
from elsa.report.cli import main as elsa_main  # noqa: E402
from elsa.report.connect import open_db  # noqa: E402
from elsa.testing import wait_for  # noqa: E402
from tests.central_support import (  # noqa: E402
    NOW,
    add_node,
    admin,
    app_row,
    assert_reader_reads_only,
    central_job_totals,
    drained,
    fill_apps,
    fill_store,
    fresh_db,
    local_job_totals,
    pg,
    ship_all,
    shipper,
)

__all__ = ["pg"]  # the fixture

pytestmark = pytest.mark.skipif(pg_bindir() is None, reason="Debian's postgresql not installed")



def test_migrate_is_versioned_and_idempotent(pg: PgServer) -> None:
    with admin(pg) as c:
        before, after, parts = schema.migrate(c)
        assert (before, after, parts) == (schema.VERSION, schema.VERSION, [])
        assert schema.schema_version(c) == schema.VERSION
        names = {r[0] for r in c.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'proc_usage'")}
    month = time.strftime("proc_usage_%Y_%m", time.gmtime())
    assert month in names and "proc_usage_default" in names


def test_node_writes_own_rows_only(pg: PgServer) -> None:
    url_a = add_node(pg, "rls_a")
    add_node(pg, "rls_b")
    row = "(%s, 'taskstats', 1, 7, 1.0, %s, 'sh')"
    ins = ("INSERT INTO proc_usage (host, source, jid, pid, start_time, end_time, comm) "
           f"VALUES {row}")
    with admin(pg) as c:
        c.execute(ins, ("rls_b", NOW))
        c.execute("INSERT INTO jobs VALUES ('rls_b', 99, 'b', 0, '{}', 1, 2, 'ended', 'x', '{}')")
    with psycopg.connect(url_a, autocommit=True) as a:
        a.execute(ins, ("rls_a", NOW))  # its own row: fine
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            a.execute(ins, ("rls_b", NOW + 1))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("DELETE FROM proc_usage WHERE host = 'rls_b'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("DELETE FROM jobs")
        # Another host's rows are invisible, so an UPDATE finds nothing to change...
        assert a.execute("UPDATE jobs SET name = 'x' WHERE host = 'rls_b'").rowcount == 0
        assert a.execute("SELECT count(*) FROM proc_usage WHERE host = 'rls_b'"
                         ).fetchone()[0] == 0
        # ... and its own rows cannot be handed to another host.
        a.execute("INSERT INTO jobs VALUES ('rls_a', 98, 'a', 0, '{}', 1, 2, 'ended', 'x', '{}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            a.execute("UPDATE jobs SET host = 'rls_b' WHERE jid = 98")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("UPDATE usage_rollup SET processes = 0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("INSERT INTO user_map VALUES ('*', 0, NULL, 'x', NULL)")
    with admin(pg) as c:
        assert c.execute("SELECT name FROM jobs WHERE host = 'rls_b' AND jid = 99"
                         ).fetchone()[0] == "b"
        # The reader role reads everything and writes nothing.
        c.execute("CREATE ROLE rls_reader LOGIN PASSWORD 'r' IN ROLE elsa_reader")
    with psycopg.connect(pg.tcp_url("rls_reader", "r"), autocommit=True) as r:
        assert r.execute("SELECT count(*) FROM proc_usage WHERE host LIKE 'rls_%'"
                         ).fetchone()[0] == 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            r.execute("DELETE FROM jobs")


def test_ship_resend_and_reports_match(pg: PgServer, tmp_path: Path, capsys) -> None:
    fresh_db(pg, "ship")
    url = add_node(pg, "n1", "ship")
    st = fill_store(tmp_path / "n1", 1)
    ship_all(st, url, "n1", batch_rows=250)
    assert central_job_totals(pg, "ship") == local_job_totals(st, "n1")
    # A crash before the local mark was written: everything is sent again.
    st.submit("DELETE FROM meta WHERE key = ?", (MARK_KEY,))
    st.submit("DELETE FROM central_jobs")
    st.flush()
    sh = shipper(st, url, "n1", batch_rows=700).start()
    try:
        wait_for(lambda: drained(sh) and sh.status()["rounds"] >= 3, 30,
                 what="the re-send to finish")
    finally:
        sh.stop()
    assert central_job_totals(pg, "ship") == local_job_totals(st, "n1")
    # The same report code over both stores gives the same figures.
    central = open_db(pg.admin_url.replace("/postgres?", "/ship?"))
    local = open_db(st.path)
    for by in ("user", "command"):
        for window in ((None, None), (NOW - 2.5 * 86400 + 123, NOW - 86400 - 77)):
            a = query.summary(local, by, *window)
            b = query.summary(central, by, *window)
            key = "command" if by == "command" else "uid"
            strip = ("user", "account")
            assert sorted(({k: v for k, v in r.items() if k not in strip} for r in a),
                          key=lambda r: r[key]) == \
                sorted(({k: v for k, v in r.items() if k not in strip} for r in b),
                       key=lambda r: r[key])
    ja = query.job_summary(local)
    jb = query.job_summary(central)
    # Owners differ on purpose: the central store names them user@host (or the site
    # user they map to).
    assert [{k: v for k, v in r.items() if k not in ("host", "owner")} for r in jb] == \
        [{k: v for k, v in r.items() if k != "owner"} for r in ja]
    assert jb[0]["owner"].endswith("@n1")
    assert {r["host"] for r in jb} == {"n1"}
    one = parse_jid(ja[0]["jid"])
    da, db_ = query.job_detail(local, one), query.job_detail(central, one)
    assert da["usage"] == db_["usage"] and len(da["processes"]) == len(db_["processes"])
    assert da["folded"] and da["folded"] == db_["folded"]  # [thresholds]' folded records
    # CLI: --db URL, --host and --tag.
    dburl = pg.admin_url.replace("/postgres?", "/ship?")
    capsys.readouterr()  # the shipper's log lines
    assert elsa_main(["jobs", "--db", dburl, "--json", "--host", "n1", "--tag", "queue=q1"]) == 0
    out = capsys.readouterr().out
    got = json.loads(out)
    assert got and all(j["tags"]["queue"] == "q1" and j["host"] == "n1" for j in got)
    # A node no one knows: refused naming the known ones (a typo was an empty report).
    assert elsa_main(["jobs", "--db", dburl, "--json", "--host", "n1", "--host", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--host 'nope': no node of that name shipped anything" in err, err
    assert err.rstrip().endswith("the known hosts are n1"), err
    assert elsa_main(["summary", "--by", "user", "--db", dburl]) == 0
    assert "@n1" in capsys.readouterr().out
    # elsa bill: the same items and charges from both stores. Its whole hours take
    # each hour's job records out of the rollup's, bucketed as the rollup buckets
    # them (PostgreSQL's CAST to an integer rounds: the records of an hour's second
    # half went to the next hour).
    cfg = tmp_path / "bill.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[billing]\n[billing.rates]\ncpu_user = 1\n')
    hour = int(NOW // 3600) * 3600
    for since, until in ((hour - 4 * 86400, hour), (hour - 4 * 86400 + 1234, hour - 86400 - 77)):
        bills = []
        for where in (st.path, dburl):
            assert elsa_main(["bill", "--config", str(cfg), "--db", where, "--by", "job",
                              "--json", "--since", str(since), "--until", str(until)]) == 0
            bills.append(json.loads(capsys.readouterr().out))
        assert [(r["key"], r["processes"], r["charge"]) for r in bills[1]["rows"]] == [
            (r["key"], r["processes"], r["charge"]) for r in bills[0]["rows"]], bills
        assert bills[0]["total"] == bills[1]["total"] and bills[0]["rows"]
    # --db also takes libpq's key=value form (as 'elsa central --url' does); a
    # password in it is never shown.
    with admin(pg) as c:
        c.execute("DROP ROLE IF EXISTS ship_reader")
        c.execute("CREATE ROLE ship_reader LOGIN PASSWORD 'SECRETPW' IN ROLE elsa_reader")
    dsn = f"host=127.0.0.1 port={pg.port} dbname=ship user=ship_reader password="
    assert elsa_main(["summary", "--db", dsn + "SECRETPW", "--by", "user", "--json"]) == 0
    assert {r["user"].rpartition("@")[2] for r in json.loads(capsys.readouterr().out)} == {"n1"}
    assert elsa_main(["summary", "--db", dsn + "WRONGPW", "--by", "user"]) == 2
    err = capsys.readouterr().err
    assert "password authentication failed" in err and "password=***" in err, err
    assert "WRONGPW" not in err and "no store at" not in err
    st.close()


def test_user_mapping_applied_at_report_time(pg: PgServer, tmp_path: Path, capsys) -> None:
    fresh_db(pg, "umap")
    url = add_node(pg, "m1", "umap")
    st = fill_store(tmp_path / "m1", 2, jobs=2, procs=50)
    fill_apps(st, 2, 60)
    from elsa.core.aggregator import INSERT_PROC

    # A process of uid 1002 outside any job, two days ago.
    st.submit_many(INSERT_PROC, [("taskstats", None, 9999, 1, NOW - 172801.5, NOW - 172800, 1,
                                  1002, 100, "lone", 0, 7_000_000, 0, 1_500_000, 10, 20, 0,
                                  0, 0, 0, 5, 0, 1, 1, None, None, None)])
    st.flush()
    ship_all(st, url, "m1")
    with admin(pg, "umap") as c:
        schema.map_user(c, "m1", "1000", "alice", "physics")
        schema.map_user(c, "*", "1001", "alice", "physics")
    rows = query.summary(open_db(pg.admin_url.replace("/postgres?", "/umap?")), "user")
    users = {r["user"]: r for r in rows}
    assert users["alice"]["account"] == "physics"
    assert users["alice"]["uid"] is None  # two uids folded into one site user
    local = {r["uid"]: r["processes"] for r in query.summary(open_db(st.path), "user")}
    assert users["alice"]["processes"] == local[1000] + local[1001]
    # The web's CPU-per-day chart: one row per day for the site user, not one per uid
    # (the chart kept the last row of a user's day); uid only where the day had one.
    central = open_db(pg.admin_url.replace("/postgres?", "/umap?"))
    days = [r for r in query.usage_per_day(central) if r["user"] == "alice"]
    assert len({r["day"] for r in days}) == len(days)
    assert sum(r["processes"] for r in days) == local[1000] + local[1001]
    node = query.usage_per_day(open_db(st.path))
    for r in days:
        uids = {n["uid"] for n in node if n["day"] == r["day"] and n["uid"] in (1000, 1001)}
        assert r["uid"] == (uids.pop() if len(uids) == 1 else None), (r, uids)
    with admin(pg, "umap") as c:
        # Unmapped: the name the node had for the uid (its bare number when none).
        (name,) = c.execute("SELECT name FROM host_users WHERE host = 'm1' AND uid = 1002"
                            ).fetchone()
    assert users[f"{name}@m1"]["processes"] == local[1002]
    # One site user charged to two accounts: a row per account, each with its uids.
    with admin(pg, "umap") as c:
        schema.map_user(c, "m1", "1002", "alice", "bio")
    db = open_db(pg.admin_url.replace("/postgres?", "/umap?"))
    rows = query.summary(db, "user")
    got = {(r["user"], r["account"]): (r["uid"], r["processes"]) for r in rows}
    assert got == {("alice", "physics"): (None, local[1000] + local[1001]),
                   ("alice", "bio"): (1002, local[1002])}
    # The text table tells the two rows apart by their ACCOUNT column.
    capsys.readouterr()  # the shipper's log lines
    dburl = pg.admin_url.replace("/postgres?", "/umap?")
    assert elsa_main(["summary", "--by", "user", "--db", dburl]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["USER", "ACCOUNT", "PROCS"]
    assert sorted(tuple(ln.split()[:3]) for ln in lines[1:]) == [
        ("alice", "bio", str(local[1002])),
        ("alice", "physics", str(local[1000] + local[1001]))]
    apps_local = {r["uid"]: r["runs"] for r in apps_usage(open_db(st.path), "user")}
    got = {(r["user"], r["account"]): r["runs"] for r in apps_usage(db, "user")}
    assert got == {("alice", "physics"): apps_local[1000] + apps_local[1001],
                   ("alice", "bio"): apps_local[1002]}
    assert elsa_main(["apps", "--by", "user", "--db", dburl]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["USER", "ACCOUNT", "RUNS"]
    assert sorted(tuple(ln.split()[:3]) for ln in lines[1:]) == [
        ("alice", "bio", str(apps_local[1002])),
        ("alice", "physics", str(apps_local[1000] + apps_local[1001]))]
    # elsa bill names users and accounts through the same mapping: the jobs of 1000 and
    # 1001 (no account tag; 50 processes and 3 folded rows of 10-12 each) are alice's
    # under physics, the lone process of 1002 alice's under bio.
    cfg = tmp_path / "bill.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[billing]\n[billing.rates]\ncpu_user = 1\n')
    window = ["--since", str(int(NOW // 3600 - 96) * 3600), "--until", str(int(NOW))]
    bills = {}
    for by in ("user", "account"):
        assert elsa_main(["bill", "--config", str(cfg), "--db", dburl, "--by", by, "--json",
                          *window]) == 0
        bills[by] = {r["key"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(bills["user"]) == {"alice"}, bills["user"]
    assert bills["user"]["alice"]["jobs"] == 2, bills["user"]
    assert {k: (r["jobs"], r["processes"]) for k, r in bills["account"].items()} == {
        "physics": (2, 2 * (50 + 10 + 11 + 12)), "bio": (0, 1)}, bills["account"]
    st.close()


def test_bad_input_errors_nothing_lost(pg: PgServer, tmp_path: Path) -> None:
    st = fill_store(tmp_path / "bad", 3, jobs=2, procs=40)
    # A wrong URL, a wrong password, a database never migrated ("older schema").
    with admin(pg) as c:
        c.execute("DROP DATABASE IF EXISTS old")
        c.execute("CREATE DATABASE old")
        c.execute("DROP ROLE IF EXISTS stranger")
        c.execute("CREATE ROLE stranger LOGIN PASSWORD 's'")
    url = add_node(pg, "bad")
    cases = [
        ("postgresql://nobody@127.0.0.1:1/x", "connecting to"),
        (pg.tcp_url("elsa_node_bad", "wrong"), "password authentication failed"),
        (pg.tcp_url("elsa_node_bad", "pw-bad", "old"), "schema 0"),
        (url.replace("elsa_node_bad:pw-bad", "elsa_admin"), "password"),
        (pg.tcp_url("stranger", "s"), "is it a node role?"),
    ]
    for bad_url, why in cases:
        bad = shipper(st, bad_url, "bad").start()
        try:
            wait_for(lambda b=bad: b.status()["last_error"] is not None, 30, what="an error")
            s = bad.status()
        finally:
            bad.stop()
        assert why in s["last_error"], s
        assert "pw-bad" not in s["last_error"] and "pw-bad" not in s["url"]
        assert s["backlog_records"] == 80 and s["shipped_records"] == 0
    # The host a role may write as is checked before anything is sent.
    sh = shipper(st, url, "someone-else").start()
    try:
        wait_for(lambda: sh.status()["last_error"] is not None, 30, what="an error")
        assert "may write as host 'bad'" in sh.status()["last_error"]
    finally:
        sh.stop()
    with pytest.raises(StoreError, match="schema 0"):
        open_db(pg.admin_url.replace("/postgres?", "/old?"))
    st.close()


def test_admin_commands_say_what_failed_without_a_traceback(pg: PgServer, capsys) -> None:
    fresh_db(pg, "adm")
    owner = pg.admin_url.replace("/postgres?", "/adm?")
    with admin(pg) as c:
        c.execute("DROP ROLE IF EXISTS adm_reader")
        c.execute("CREATE ROLE adm_reader LOGIN PASSWORD 'secret-r' IN ROLE elsa_reader")
    reader = pg.tcp_url("adm_reader", "secret-r", "adm")

    def central(*argv: str) -> str:
        assert elsa_main(["central", *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "secret-r" not in err
        return err

    for argv in (["map-user", "--url", reader, "0@n9", "alice", "--account", "physics"],
                 ["add-node", "--url", reader, "n9"]):
        err = central(*argv)
        assert f"elsa: central {argv[0]} on postgresql://adm_reader:***@" in err, err
        assert "permission denied" in err and "administrator's" in err, err
    # Host names that differ only in '-', '.' or case get the same default role.
    assert elsa_main(["central", "add-node", "--url", owner, "node-1"]) == 0
    for host in ("node_1", "NODE.1"):
        err = central("add-node", "--url", owner, host)
        assert "role elsa_node_node_1 is bound to host 'node-1' already" in err, err
        assert "--role elsa_node_node_1_2" in err, err
    assert elsa_main(["central", "add-node", "--url", owner, "node_1", "--role",
                      "elsa_node_node_1_2"]) == 0
    # The node's hint for a host mismatch ('add-node HOST --role ROLE'): the role moves.
    capsys.readouterr()
    assert elsa_main(["central", "add-node", "--url", owner, "renamed", "--role",
                      "elsa_node_node_1"]) == 0
    assert "moved from host node-1" in capsys.readouterr().out
    with admin(pg, "adm") as c:
        assert dict(c.execute("SELECT host, role FROM elsa_nodes")) == {
            "node_1": "elsa_node_node_1_2", "renamed": "elsa_node_node_1"}
    # A database never migrated.
    with admin(pg) as c:
        c.execute("DROP DATABASE IF EXISTS adm0")
        c.execute("CREATE DATABASE adm0")
    err = central("map-user", "--url", pg.admin_url.replace("/postgres?", "/adm0?"),
                  "0@n9", "alice")
    assert "run 'elsa central migrate' there first" in err, err


@pytest.mark.root
@pytest.mark.slow
def test_server_disk_full_then_recovers(pg: PgServer, tmp_path: Path) -> None:
    """The usage tables in a tablespace on a 16 MiB tmpfs, filled up: the server
    refuses the rows; the node keeps every record and ships them once space is back.
    (A full disk under the WAL makes PostgreSQL stop instead: a server outage.)"""
    ts = os.path.join(pg.root, "small")
    os.mkdir(ts)
    uid, gid = (pg.user.pw_uid, pg.user.pw_gid) if pg.user else (0, 0)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=16m,mode=0700,uid={uid},gid={gid}",
                    "tmpfs", ts], check=True)
    try:
        fresh_db(pg, "diskfull")
        url = add_node(pg, "full", "diskfull")
        with admin(pg, "diskfull") as c:
            c.execute(f"CREATE TABLESPACE small LOCATION '{ts}'")
            for (t,) in c.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON "
                                  "c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                                  "WHERE p.relname = 'proc_usage'").fetchall():
                c.execute(f"ALTER TABLE {t} SET TABLESPACE small")
            c.execute("CREATE TABLE ballast (b TEXT) TABLESPACE small")
            with pytest.raises(psycopg.errors.DiskFull):
                for _ in range(100):
                    c.execute("INSERT INTO ballast SELECT repeat(md5(random()::text), 30) "
                              "FROM generate_series(1, 2000)")
        st = fill_store(tmp_path / "full", 4, jobs=3, procs=2000)
        sh = shipper(st, url, "full").start()
        try:
            wait_for(lambda: "disk is full" in (sh.status()["last_error"] or ""), 60,
                     what="a disk-full error")
            s = sh.status()
            assert s["backlog_records"] == 6000 and s["shipped_records"] == 0, s
            with admin(pg, "diskfull") as c:
                c.execute("DROP TABLE ballast")
            wait_for(lambda: drained(sh), 60, what="the backlog to drain after space is back")
        finally:
            sh.stop()
        assert central_job_totals(pg, "diskfull") == local_job_totals(st, "full")
        st.close()
    finally:
        try:
            with admin(pg) as c:
                c.execute("DROP DATABASE IF EXISTS diskfull WITH (FORCE)")
                c.execute("DROP TABLESPACE IF EXISTS small")
        finally:
            subprocess.run(["umount", "-l", ts], check=False)


def test_prune_keeps_unshipped(pg: PgServer, tmp_path: Path) -> None:
    fresh_db(pg, "prune")
    url = add_node(pg, "p1", "prune")
    st = fill_store(tmp_path / "p1", 5, jobs=3, procs=100)
    total = st.db.execute("SELECT count(*) FROM proc_usage").fetchone()[0]
    # Ship only the first 150 rows (one round), then prune with keep_local_days 1.
    sh = shipper(st, url, "p1", batch_rows=150)
    sh._open_local()
    sh._connect()
    sh._round()
    sh.keep_days = 1.0
    sh._prune()
    st.flush()
    left = st.db.execute("SELECT count(*) FROM proc_usage").fetchone()[0]
    assert left == total - 150
    (unshipped,) = st.db.execute("SELECT count(*) FROM proc_usage WHERE id > 150").fetchone()
    assert unshipped == total - 150
    sh.stop()
    st.close()


def test_web_pages_over_the_central_store(pg: PgServer, tmp_path: Path) -> None:
    """elsa web on the site's PostgreSQL: the same pages and JSON as on a node's store."""
    pytest.importorskip("flask")
    from elsa.web.app import create_app

    fresh_db(pg, "web")
    url = add_node(pg, "n1", "web")
    st = fill_store(tmp_path / "n1", 1)
    fill_apps(st, 1, 200, [r[0] for r in st.db.execute("SELECT jid FROM jobs")])
    ship_all(st, url, "n1", batch_rows=500)
    dburl = pg.admin_url.replace("/postgres?", "/web?")
    web = {"trusted_proxies": ["127.0.0.1"], "user_header": "Remote-User", "login": False,
           "pam_service": "login", "actions": False, "page_size": 50, "session_hours": 1.0}
    pages = {}
    for where in (st.path, dburl):
        app = create_app(db_path=where, state_dir=str(tmp_path), socket_path="/nonexistent",
                         web=web)
        client = app.test_client()
        hdr = {"Remote-User": "root"}
        got = {}
        for path in ("/jobs.json?sort=cpu", "/jobs.json?sort=maxrss&order=asc",
                     "/users.json", "/apps.json?by=package", "/apps.json?by=job"):
            r = client.get(path, headers=hdr)
            assert r.status_code == 200, (where, path, r.get_data(as_text=True)[:500])
            got[path] = r.get_json()
        first = got["/jobs.json?sort=cpu"]["jobs"][0]["jid"]
        r = client.get(f"/jobs/{first}.json", headers=hdr)
        assert r.status_code == 200, r.get_data(as_text=True)[:500]
        got["job"] = r.get_json()
        pages[where] = got
    node, site = pages[st.path], pages[dburl]
    for path in ("/jobs.json?sort=cpu", "/jobs.json?sort=maxrss&order=asc"):
        assert [j["jid"] for j in node[path]["jobs"]] == [j["jid"] for j in site[path]["jobs"]]
        assert node[path]["total"] == site[path]["total"]
    assert node["job"]["usage"] == site["job"]["usage"]
    assert node["job"]["applications"] and \
        node["job"]["applications"] == site["job"]["applications"]
    for path in ("/apps.json?by=package", "/apps.json?by=job"):
        assert node[path]["rows"] and node[path] == site[path], path
    assert sum(r["cpu_user_us"] for r in node["/users.json"]["rows"]) == \
        sum(r["cpu_user_us"] for r in site["/users.json"]["rows"])
    st.close()


def _central_apps(pg: PgServer, db: str, host: str) -> list:
    with admin(pg, db) as c:
        return c.execute(f"SELECT {', '.join(record.NAMES)} FROM app_runs WHERE host = %s "
                         f"ORDER BY {', '.join(record.KEY)}", (host,)).fetchall()


def _local_apps(st: Any) -> list:
    return st.db.execute(f"SELECT {', '.join(record.NAMES)} FROM app_runs "
                         f"ORDER BY {', '.join(record.KEY)}").fetchall()


def _central_tags(pg: PgServer, db: str, host: str) -> Dict[int, Dict[str, str]]:
    with admin(pg, db) as c:
        return {j: json.loads(t) for j, t in c.execute(
            "SELECT jid, tags FROM jobs WHERE host = %s", (host,))}


def test_tags_changed_long_after_the_end_are_shipped(pg: PgServer, tmp_path: Path) -> None:
    """elsa-jobmng tag works on ended jobs at any time: the change reaches the central
    store however long after the end (fill_store's jobs ended days ago, far beyond
    RECHECK_S), and the backlog counts the job until it does."""
    fresh_db(pg, "retag")
    url = add_node(pg, "r1", "retag")
    st = fill_store(tmp_path / "r1", 14, jobs=3, procs=20)
    ship_all(st, url, "r1")
    jids = sorted(_central_tags(pg, "retag", "r1"))
    assert st.db.execute("SELECT MAX(ended) FROM jobs").fetchone()[0] < time.time() - RECHECK_S
    st.set_tags(jids[0], {"queue": "q0", "account": "late-retag"})
    st.flush()
    sh = shipper(st, url, "r1")
    sh._open_local()
    sh._connect()
    sh._backlog(every=0.0)
    assert sh.status()["backlog_jobs"] == 1
    sh._round()
    assert _central_tags(pg, "retag", "r1")[jids[0]]["account"] == "late-retag"
    st.flush()
    sh._backlog(every=0.0)
    assert sh.status()["backlog_jobs"] == 0 and sh._round() is False
    # Retagged while a round is on its way: that round ships the tags it read, the
    # next one the new ones.
    send = sh._send

    def retag_then_send(*a: Any, **kw: Any) -> None:
        st.set_tags(jids[1], {"account": "during"})
        st.flush()
        send(*a, **kw)

    st.set_tags(jids[1], {"account": "before"})
    st.flush()
    sh._send = retag_then_send  # type: ignore[method-assign]
    sh._round()
    sh._send = send  # type: ignore[method-assign]
    assert _central_tags(pg, "retag", "r1")[jids[1]] == {"account": "before"}
    st.flush()
    sh._round()
    assert _central_tags(pg, "retag", "r1")[jids[1]] == {"account": "during"}
    # A store that shipped before the shipped tags were kept (NULL): its jobs are
    # compared once, nothing is sent when they are unchanged.
    st.submit("UPDATE central_jobs SET tags = NULL")
    st.flush()
    sh._backlog(every=0.0)
    assert sh.status()["backlog_jobs"] == 3
    shipped = sh.status()["shipped_jobs"]
    assert sh._round() is False
    st.flush()
    sh._backlog(every=0.0)
    assert sh.status()["backlog_jobs"] == 0 and sh.status()["shipped_jobs"] == shipped
    sh.stop()
    st.close()


def test_app_records_shipped_updated_once_and_resent_idempotently(
        pg: PgServer, tmp_path: Path) -> None:
    fresh_db(pg, "apps")
    url = add_node(pg, "a1", "apps")
    st = fill_store(tmp_path / "a1", 11, jobs=3, procs=20)
    jids = [r[0] for r in st.db.execute("SELECT jid FROM jobs")] + [None]
    rows = fill_apps(st, 11, 450, jids)
    s = ship_all(st, url, "a1", batch_rows=200)
    assert s["shipped_apps"] == 450 and s["backlog_apps"] == 0, s
    # Open records (images running when elsad stopped) are shipped too: the
    # node's reports count them.
    assert _central_apps(pg, "apps", "a1") == _local_apps(st)
    assert sum(1 for r in _central_apps(pg, "apps", "a1") if r[record.INDEX["end_reason"]]
               == "open") == 45
    # The open images end: the recorder writes them again (same key, new row id)
    # with their end and figures. Central: updated in place, never doubled.
    closed = [app_row(11, i, jids, cpu_user_us=123456, end_time=rows[i][8] + 2.5,
                      end_reason="exit", exit_code=3, exit_signal=0,
                      figures_source="bsdacct") for i in range(0, 450, 10)]
    st.submit_many(INSERT_APP, closed)
    st.flush()
    sh = shipper(st, url, "a1", batch_rows=200)
    sh._open_local()
    sh._connect()
    sh._backlog(every=0.0)
    assert sh.status()["backlog_apps"] == 45
    assert sh._round() is False
    got = _central_apps(pg, "apps", "a1")
    assert len(got) == 450 and got == _local_apps(st)
    done = {r[record.INDEX["pid"]]: r for r in got}
    assert all(done[c[2]][record.INDEX["exit_code"]] == 3 for c in closed)
    # The same batch committed again (its local mark lost in a crash): replaces
    # itself, counts nothing twice.
    batch = sh._read_apps(sh._local, 0)
    assert len(batch) == 200
    for _ in range(2):
        sh._send([], [], [], set(), None, (), batch)
    assert _central_apps(pg, "apps", "a1") == got
    sh.stop()
    # A lost mark: everything is sent again, nothing doubled.
    st.submit("DELETE FROM meta WHERE key = ?", (APP_MARK_KEY,))
    st.flush()
    s = ship_all(st, url, "a1", batch_rows=100)
    assert s["shipped_apps"] == 450, s
    assert _central_apps(pg, "apps", "a1") == got
    with admin(pg, "apps") as c:
        # The uids of application records are named for the reports (host_users).
        names = {u for (u,) in c.execute("SELECT uid FROM host_users WHERE host = 'a1'")}
    assert {r[record.INDEX["uid"]] for r in got} <= names
    st.close()


def test_node_cannot_touch_another_nodes_app_records(pg: PgServer, tmp_path: Path) -> None:
    fresh_db(pg, "apprls")
    url_a = add_node(pg, "ra", "apprls")
    add_node(pg, "rb", "apprls")
    cols = ", ".join(record.NAMES)
    ins = (f"INSERT INTO app_runs (host, {cols}) VALUES "
           f"(%s, {', '.join(['%s'] * len(record.NAMES))})")
    with admin(pg, "apprls") as c:
        c.execute(ins, ("rb", *app_row(2, 1)))
    with psycopg.connect(url_a, autocommit=True) as a:
        a.execute(ins, ("ra", *app_row(1, 1)))  # its own record
        a.execute("UPDATE app_runs SET end_time = end_time + 1 WHERE host = 'ra'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            a.execute(ins, ("rb", *app_row(1, 2)))
        # Another node's record is invisible: an UPDATE or upsert finds nothing.
        assert a.execute("UPDATE app_runs SET cpu_user_us = 0 WHERE host = 'rb'"
                         ).rowcount == 0
        assert a.execute("SELECT count(*) FROM app_runs").fetchone()[0] == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            a.execute("UPDATE app_runs SET host = 'rb' WHERE host = 'ra'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("DELETE FROM app_runs WHERE host = 'rb'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("DELETE FROM app_runs WHERE host = 'ra'")  # not even its own
    with admin(pg, "apprls") as c:
        assert c.execute("SELECT cpu_user_us, end_time FROM app_runs WHERE host = 'rb'"
                         ).fetchone() == (app_row(2, 1)[record.INDEX["cpu_user_us"]],
                                          app_row(2, 1)[record.INDEX["end_time"]])
    assert_reader_reads_only(pg, "apprls", "app_runs", 2, "UPDATE app_runs SET cpu_user_us = 0")


def test_apps_report_central_equals_node(pg: PgServer, tmp_path: Path, capsys) -> None:
    fresh_db(pg, "appsrep")
    stores = {}
    for n, host in enumerate(("r1", "r2")):
        url = add_node(pg, host, "appsrep")
        st = fill_store(tmp_path / host, 20 + n, jobs=2, procs=10)
        jids = [r[0] for r in st.db.execute("SELECT jid FROM jobs")] + [None]
        fill_apps(st, 20 + n, 300, jids)
        ship_all(st, url, host)
        stores[host] = st
    dburl = pg.admin_url.replace("/postgres?", "/appsrep?")

    def run(*argv: str) -> Any:
        capsys.readouterr()
        assert elsa_main(["apps", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    node = stores["r1"].path
    some_job = stores["r1"].db.execute("SELECT jid FROM jobs").fetchone()[0]
    for by in ("binary", "package", "user", "job"):
        for extra in ((), ("--path", "/usr/*"), ("--since", str(NOW - 2 * 86400),
                                                   "--until", str(NOW)),
                      ("--user", "1001", "--package", "gcc*")):
            want = run("--db", node, "--by", by, *extra)
            assert want, (by, extra)
            got = run("--db", dburl, "--host", "r1", "--by", by, *extra)
            if by == "user":  # site users: unmapped, uid@host's name at r1
                assert [r.pop("account") for r in got] == [None] * len(got)
                for r in got + want:
                    r["user"] = r["user"].split("@")[0]
            assert got == want, (by, extra)
    assert run("--db", dburl, "--job", hex(some_job)) == run("--db", node, "--job",
                                                             hex(some_job))
    # Both nodes together: runs and figures add up.
    both = run("--db", dburl, "--by", "user")
    one = [run("--db", stores[h].path, "--by", "user") for h in ("r1", "r2")]
    assert sum(r["runs"] for r in both) == 600
    assert sum(r["cpu_user_us"] for r in both) == sum(r["cpu_user_us"] for o in one for r in o)
    capsys.readouterr()
    assert elsa_main(["apps", "--db", dburl, "--host", "nope", "--json"]) == 2
    assert "known hosts are r1, r2" in capsys.readouterr().err
    # The user mapping applies at report time: one site user over two nodes and uids.
    with admin(pg, "appsrep") as c:
        schema.map_user(c, "r1", "1001", "alice", "physics")
        schema.map_user(c, "r2", "1002", "alice", "physics")
    by_user = {r["user"]: r for r in run("--db", dburl, "--by", "user")}
    runs = {h: {r["uid"]: r["runs"] for r in run("--db", stores[h].path, "--by", "user")}
            for h in ("r1", "r2")}
    alice = by_user["alice"]
    assert alice["account"] == "physics" and alice["uid"] is None
    assert alice["runs"] == runs["r1"][1001] + runs["r2"][1002]
    assert sum(r["runs"] for r in by_user.values()) == 600
    # A table too.
    capsys.readouterr()
    assert elsa_main(["apps", "--db", dburl, "--by", "package"]) == 0
    assert "gcc-12" in capsys.readouterr().out
    assert elsa_main(["apps", "--db", node, "--host", "r1"]) == 2
    assert "--host selects nodes of the central store" in capsys.readouterr().err
    for st in stores.values():
        st.close()


def test_prune_keeps_unshipped_app_records(pg: PgServer, tmp_path: Path) -> None:
    fresh_db(pg, "appprune")
    url = add_node(pg, "q1", "appprune")
    st = fill_store(tmp_path / "q1", 12, jobs=0)
    # Every record ended more than a day ago.
    fill_apps(st, 12, 250, open_every=25)
    st.submit("UPDATE app_runs SET end_time = ? WHERE end_time IS NOT NULL",
              (NOW - 2 * 86400,))
    st.flush()
    sh = shipper(st, url, "q1", batch_rows=100)
    sh._open_local()
    sh._connect()
    sh._round()  # ships the first 100 only
    sh.keep_days = 1.0
    sh._prune()
    st.flush()
    left = {r[0] for r in st.db.execute("SELECT id FROM app_runs")}
    # Shipped and ended: pruned; open ones stay (elsad carries them on); the rest
    # was never shipped and stays.
    assert left == {i for i in range(1, 251) if i > 100 or (i - 1) % 25 == 0}
    assert sh.status()["pruned_records"] == 96
    sh.stop()
    st.close()


def test_schema_1_database_upgraded_then_app_records_ship(pg: PgServer, tmp_path: Path) -> None:
    """A site's database at schema 1 (before application records): the node refuses
    to ship and keeps everything; after 'elsa central migrate' it ships it all."""
    with admin(pg) as c:
        c.execute("DROP DATABASE IF EXISTS up1")
        c.execute("CREATE DATABASE up1")
    with admin(pg, "up1") as c:
        with c.transaction():
            c.execute(schema.MIGRATIONS[0])
            c.execute("UPDATE elsa_schema SET version = 1")
    url = add_node(pg, "u1", "up1")
    st = fill_store(tmp_path / "u1", 13, jobs=2, procs=30)
    fill_apps(st, 13, 40)
    sh = shipper(st, url, "u1").start()
    try:
        wait_for(lambda: "schema 1" in (sh.status()["last_error"] or ""), 30,
                 what="the schema error")
        assert sh.status()["backlog_apps"] == 40
    finally:
        sh.stop()
    with admin(pg, "up1") as c:
        assert schema.migrate(c)[:2] == (1, schema.VERSION)
    s = ship_all(st, url, "u1")
    assert s["shipped_apps"] == 40 and s["shipped_records"] == 60, s
    assert _central_apps(pg, "up1", "u1") == _local_apps(st)
    st.close()


def _unknowns_rows(end: float) -> Any:
    """Node rows whose hour groups lack figures: bsdacct records (no I/O bytes), a
    taskstats one with I/O, small records folded with no memory figure."""
    from elsa.core.aggregator import proc_row
    from elsa.core.source import UsageRecord
    from elsa.core.thresholds import Folder

    def rec(source: str, pid: int, comm: str, **fig: Any) -> Any:
        return proc_row(UsageRecord(source, pid, start_ticks=pid, uid=1000, comm=comm,
                                    start_time=end - 2, end_time=end + pid / 8, **fig), None)

    procs = [rec("bsdacct", 1, "cc", cpu_user_us=20_000, elapsed_us=10**6, max_vm_kb=800,
                 minflt=3, majflt=0),
             rec("bsdacct", 2, "cc", cpu_user_us=10_000, elapsed_us=10**6, max_vm_kb=600,
                 minflt=1, majflt=0),
             rec("taskstats", 3, "ld", cpu_user_us=5_000, elapsed_us=10**6, max_rss_kb=90,
                 read_bytes=4096, write_bytes=0, minflt=2, majflt=0)]
    _, folded = Folder(min_cpu_ms=10).split(
        [rec("x", 10 + i, "tiny", cpu_user_us=1, elapsed_us=5) for i in range(3)])
    return procs, folded


def test_unknown_figures_reach_the_central_rollup_as_null(pg: PgServer, tmp_path: Path
                                                          ) -> None:
    """A figure no record measured is NULL in the central rollup as in the node's
    (store migration 13, central migration 3): the same summary from both stores."""
    from elsa.core.aggregator import INSERT_PROC
    from elsa.core.store import Store
    from elsa.core.thresholds import INSERT_FOLDED

    fresh_db(pg, "unk")
    url = add_node(pg, "k1", "unk")
    st = Store(str(tmp_path / "k1"))
    procs, folded = _unknowns_rows(NOW - 86400)
    st.submit_many(INSERT_PROC, procs)
    st.submit_many(INSERT_FOLDED, folded)
    st.flush()
    ship_all(st, url, "k1")
    central = open_db(pg.admin_url.replace("/postgres?", "/unk?"))
    local = open_db(st.path)
    strip = ("user", "account")
    for by in ("user", "command"):
        a = [{k: v for k, v in r.items() if k not in strip} for r in query.summary(local, by)]
        b = [{k: v for k, v in r.items() if k not in strip} for r in query.summary(central, by)]
        assert a == b
    rows = {r["command"]: r for r in query.summary(central, "command")}
    assert (rows["cc"]["read_bytes"], rows["cc"]["write_bytes"]) == (None, None)
    assert rows["cc"]["cpu_user_us"] == 30_000 and rows["cc"]["majflt"] == 0
    assert (rows["ld"]["read_bytes"], rows["ld"]["write_bytes"]) == (4096, 0)
    assert rows["tiny"]["avg_mem_kb"] is None and rows["tiny"]["cpu_system_us"] is None
    st.close()


def test_schema_2_rollup_upgraded_keeps_known_and_nulls_the_unknowable(pg: PgServer) -> None:
    """A database whose rollup counted unknowns as 0 (schema 2): 'elsa central migrate'
    makes them NULL where the rows are all there to say so; where some are gone (a
    month's partition detached) a 0 stays."""
    from elsa.central.schema import FOLDED_COLUMNS, PROC_COLUMNS

    with admin(pg) as c:
        c.execute("DROP DATABASE IF EXISTS up2")
        c.execute("CREATE DATABASE up2")
    # A year ago: in the default partition, outside the months migrate creates.
    procs, folded = _unknowns_rows(NOW - 400 * 86400)
    procs.append(procs[1][:2] + (4,) + procs[1][3:4] + (procs[1][4] + 1, procs[1][5] + 1)
                 + procs[1][6:9] + ("sh",) + procs[1][10:])
    procs.append(procs[-1][:2] + (5,) + procs[-1][3:])
    rollup = ("SELECT comm, processes, cpu_user_us, cpu_system_us, mem_kb_sum, read_bytes, "
              "write_bytes, majflt FROM usage_rollup ORDER BY comm")
    with admin(pg, "up2") as c:
        with c.transaction():
            for m in schema.MIGRATIONS[:2]:
                c.execute(m)
            c.execute("UPDATE elsa_schema SET version = 2")
        c.cursor().executemany(f"INSERT INTO proc_usage (host, {', '.join(PROC_COLUMNS)}) VALUES "
                               f"('o1', {', '.join(['%s'] * len(PROC_COLUMNS))})", procs)
        c.execute(f"INSERT INTO proc_folded (host, id, {', '.join(FOLDED_COLUMNS)}) VALUES "
                  f"('o1', 1, {', '.join(['%s'] * len(FOLDED_COLUMNS))})", folded[0])
        c.execute("DELETE FROM proc_usage WHERE pid = 5")  # 'sh': one of its two is gone
        assert c.execute(rollup).fetchall() == [
            ("cc", 2, 30_000, 0, 1400, 0, 0, 0), ("ld", 1, 5_000, 0, 90, 4096, 0, 0),
            ("sh", 2, 20_000, 0, 1200, 0, 0, 0), ("tiny", 3, 3, 0, 0, 0, 0, 0)]
        assert schema.migrate(c)[:2] == (2, schema.VERSION)
        assert c.execute(rollup).fetchall() == [
            ("cc", 2, 30_000, None, 1400, None, None, 0),
            ("ld", 1, 5_000, None, 90, 4096, 0, 0),
            ("sh", 2, 20_000, 0, 1200, 0, 0, 0),
            ("tiny", 3, 3, None, None, None, None, None)]
        # The triggers now leave unknowns NULL too.
        c.execute(f"INSERT INTO proc_folded (host, id, {', '.join(FOLDED_COLUMNS)}) VALUES "
                  f"('o1', 2, {', '.join(['%s'] * len(FOLDED_COLUMNS))})", folded[0])
        assert c.execute("SELECT processes, read_bytes, mem_kb_sum FROM usage_rollup "
                         "WHERE comm = 'tiny'").fetchone() == (6, None, None)
    with admin(pg) as c:
        c.execute("DROP DATABASE up2")


def test_sacct_formats_and_eff_on_the_central_store(pg: PgServer, tmp_path: Path,
                                                    capsys) -> None:
    # The exit sacct shows comes from the node's membership history, which is not
    # shipped: centrally it is unknown ('-', state ENDED), not a traceback.
    fresh_db(pg, "sacctc")
    url = add_node(pg, "s1", "sacctc")
    st = fill_store(tmp_path / "s1", 6, jobs=2, procs=20)
    ship_all(st, url, "s1")
    dburl = pg.admin_url.replace("/postgres?", "/sacctc?")
    capsys.readouterr()  # the shipper's log lines
    assert elsa_main(["jobs", "--db", dburl, "-P", "--format", "jid,user,procs,state,exit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    local = {r["jid"]: r["usage"]["processes"] for r in query.jobs(open_db(st.path))}
    assert lines[0] == "JID|USER|PROCS|STATE|EXIT"
    assert sorted((f[0], f[2], f[3], f[4]) for f in (ln.split("|") for ln in lines[1:])) == \
        sorted((j, str(n), "ENDED", "-") for j, n in local.items()), lines
    assert all(ln.split("|")[1].endswith("@s1") for ln in lines[1:]), lines
    assert elsa_main(["eff", "--db", dburl, "--json", lines[1].split("|")[0]]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["state"], got["exit"]) == ("ENDED", "-")
    st.close()


def test_bill_by_job_keeps_each_hosts_outside_job_items(pg: PgServer, tmp_path: Path,
                                                         capsys) -> None:
    # uid 1000 runs processes outside any job on two nodes: two site users
    # (name@b1, name@b2), each billed what its node bills, not one row for both.
    from elsa.core.aggregator import INSERT_PROC

    fresh_db(pg, "billjob")
    dburl = pg.admin_url.replace("/postgres?", "/billjob?")
    cfg = tmp_path / "bill.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[billing]\n[billing.rates]\ncpu_user = 1\n')
    end = int(NOW // 3600) * 3600 - 7200.5
    window = ["--since", str(end - 3600), "--until", str(end + 3600)]
    local = {}
    for k, host in enumerate(("b1", "b2")):
        url = add_node(pg, host, "billjob")
        st = fill_store(tmp_path / host, 7 + k, jobs=1, procs=5)
        st.submit_many(INSERT_PROC, [
            ("taskstats", None, 5000 + i, 1, end - 2, end - i, 1, 1000, 100, "lone", 0,
             (k + 1) * 1_000_000, 0, 2_000_000, 10, 20, 0, 0, 0, 0, 5, 0, 1, 1, None, None,
             None) for i in range(3 + k)])
        st.flush()
        ship_all(st, url, host)
        capsys.readouterr()
        assert elsa_main(["bill", "--config", str(cfg), "--db", st.path, "--by", "job",
                          "--json", *window]) == 0
        rows = json.loads(capsys.readouterr().out)["rows"]
        local[host] = [(r["processes"], r["charge"]) for r in rows if r["key"] is None]
        st.close()
    assert local == {"b1": [(3, "3.00")], "b2": [(4, "8.00")]}
    assert elsa_main(["bill", "--config", str(cfg), "--db", dburl, "--by", "job", "--json",
                      *window]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    got = {r["user"].rpartition("@")[2]: [(r["processes"], r["charge"])]
           for r in rows if r["key"] is None}
    assert got == local, rows


def test_report_as_a_role_outside_elsa_reader_says_what_to_do(pg: PgServer, capsys) -> None:
    # A login role made without elsa_reader, and a node's role (it may read its own
    # rows only): the report says which role and how to make a reader, no traceback.
    fresh_db(pg, "noread")
    node = add_node(pg, "r1", "noread")
    with admin(pg, "noread") as c:
        c.execute("DROP ROLE IF EXISTS plain_login")
        c.execute("CREATE ROLE plain_login LOGIN PASSWORD 'p'")
    plain = pg.tcp_url("plain_login", "p", "noread")
    for url, role, report in ((plain, "plain_login", ["jobs"]),
                              (plain, "plain_login", ["summary", "--by", "user"]),
                              (node, "elsa_node_r1", ["summary", "--by", "user"])):
        assert elsa_main([*report, "--db", url]) == 2
        err = capsys.readouterr().err
        assert f"role {role!r} may not read it (permission denied" in err, err
        assert "IN ROLE elsa_reader" in err, err


def test_migrate_moves_the_default_partitions_rows_of_a_new_month(pg: PgServer, capsys) -> None:
    # A node whose clock ran months ahead shipped rows of a month no partition held
    # yet: they went to proc_usage_default. The migrate that creates that month's
    # partition (cron, months later) moves them into it, counted once in the rollup,
    # instead of failing every month from then on.
    import datetime as dt

    fresh_db(pg, "skew")
    dburl = pg.admin_url.replace("/postgres?", "/skew?")
    ahead = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9 * 31)
    end = ahead.timestamp()
    month = f"proc_usage_{ahead:%Y_%m}"
    with admin(pg, "skew") as c:
        for i in range(3):
            c.execute("INSERT INTO proc_usage (host, source, pid, start_time, end_time, uid, "
                      "comm, cpu_user_us) VALUES ('n1', 'taskstats', %s, %s, %s, 0, 'skew', 7)",
                      (100 + i, end - 5, end + i))
        assert c.execute("SELECT count(*) FROM proc_usage_default").fetchone()[0] == 3
    capsys.readouterr()
    assert elsa_main(["central", "migrate", "--url", dburl, "--months-ahead", "10"]) == 0
    assert month in capsys.readouterr().out
    with admin(pg, "skew") as c:
        assert c.execute("SELECT count(*) FROM proc_usage_default").fetchone()[0] == 0
        assert c.execute(f"SELECT count(*), sum(cpu_user_us) FROM {month}").fetchone() == (3, 21)
        assert c.execute("SELECT sum(processes), sum(cpu_user_us) FROM usage_rollup WHERE "
                         "comm = 'skew'").fetchone() == (3, 21)
        # The moved month is a partition as any other: a re-sent row is still skipped.
        c.execute("INSERT INTO proc_usage (host, source, pid, start_time, end_time, uid, comm) "
                  "VALUES ('n1', 'taskstats', 100, %s, %s, 0, 'skew') ON CONFLICT DO NOTHING",
                  (end - 5, end))
        assert c.execute("SELECT count(*) FROM proc_usage").fetchone()[0] == 3
    with admin(pg) as c:
        c.execute("DROP DATABASE skew")


def test_add_node_password_file_errors_name_the_option(pg: PgServer, tmp_path: Path,
                                                       capsys) -> None:
    # The file came from --password-file, not from a node's [central] password_file.
    owner = pg.admin_url
    loose = tmp_path / "loose.pw"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    for path, why in ((loose, "is readable by group or others (mode 644); chmod 600 it"),
                      (tmp_path / "missing.pw", "No such file or directory")):
        assert elsa_main(["central", "add-node", "--url", owner, "pwnode", "--password-file",
                          str(path)]) == 2
        err = capsys.readouterr().err
        assert f"elsa: --password-file {path}" in err and why in err, err
        assert "[central]" not in err, err


def test_owner_without_createrole_is_told_to_grant_it(pg: PgServer, capsys) -> None:
    # The database's owner, as the docs say to run add-node, but made without
    # CREATEROLE: the error says that, not "is the URL an administrator's?".
    with admin(pg) as c:
        c.execute("DROP DATABASE IF EXISTS owned")
        c.execute("DROP ROLE IF EXISTS owner_nocr")
        c.execute("CREATE ROLE owner_nocr LOGIN PASSWORD 'o'")
        c.execute("CREATE DATABASE owned OWNER owner_nocr")
    url = pg.tcp_url("owner_nocr", "o", "owned")
    # The group roles are the cluster's, made by the fixture's migrate already.
    assert elsa_main(["central", "migrate", "--url", url]) == 0
    capsys.readouterr()
    assert elsa_main(["central", "add-node", "--url", url, "n7"]) == 2
    err = capsys.readouterr().err
    assert "permission denied to create role" in err, err
    assert err.startswith("elsa: central add-node on "), err  # one "elsa"
    assert "ALTER ROLE owner_nocr CREATEROLE" in err and "administrator's" not in err, err
    with admin(pg) as c:
        c.execute("ALTER ROLE owner_nocr CREATEROLE")
    assert elsa_main(["central", "add-node", "--url", url, "n7"]) == 0
    with admin(pg) as c:
        c.execute("DROP DATABASE owned")


def test_bill_leaves_a_running_jobs_records_to_the_job_as_the_node_does(
        pg: PgServer, tmp_path: Path, capsys) -> None:
    # A job still running on its node: its ended processes are shipped, its row is
    # not yet (a job reaches the central store when it ends). The node bills them
    # with the job when it ends, not as outside-job usage now; so must the central
    # store, or a month billed while the job runs and the month it ends both
    # charge them.
    from elsa.core.aggregator import INSERT_PROC

    fresh_db(pg, "billrun")
    dburl = pg.admin_url.replace("/postgres?", "/billrun?")
    url = add_node(pg, "r1", "billrun")
    st = fill_store(tmp_path / "r1", 11, jobs=1, procs=5)
    hour = int(NOW // 3600) * 3600 - 3 * 3600
    jid = (11 << 32) | 99
    st.insert_job(Job(jid=jid, name="long", owner_uid=1000, tags=(), created=hour - 600,
                      ended=None, state="running", backend="cnproc"))
    st.submit_many(INSERT_PROC, [
        ("taskstats", j, pid + i, 1, hour + 100 * i, hour + 100 * i + 50, 1, 1000, 100,
         "work", 0, 3_000_000, 0, 50_000_000, 10, 20, 0, 0, 0, 0, 5, 0, 1, 1, None, None,
         None) for i in range(6) for j, pid in ((jid, 6000), (None, 7000))])
    st.flush()
    ship_all(st, url, "r1")
    cfg = tmp_path / "bill.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[billing]\n[billing.rates]\ncpu_user = 1\n')
    # Whole hours (the rollup's path) and a window cut inside the hour (the records').
    for window in ((hour - 3600, hour + 7200), (hour + 30, hour + 3000)):
        bills = []
        for where in (st.path, dburl):
            capsys.readouterr()
            assert elsa_main(["bill", "--config", str(cfg), "--db", where, "--by", "job",
                              "--json", "--since", str(window[0]), "--until",
                              str(window[1])]) == 0
            rows = json.loads(capsys.readouterr().out)["rows"]
            bills.append(sorted((r["key"] or "-", r["processes"], r["charge"]) for r in rows))
        assert bills[0] == bills[1], (window, bills)
        assert ("-", 6, "18.00") in bills[0], bills[0]  # the 6 outside any job only
    st.close()


def test_migrate_refuses_a_negative_months_ahead(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        elsa_main(["central", "migrate", "--url", "postgresql:///x", "--months-ahead", "-3"])
    assert exited.value.code == 2
    assert "'-3': expected a number of months, 0 or more" in capsys.readouterr().err
