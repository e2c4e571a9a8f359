"""Four elsad nodes ship real workloads to one PostgreSQL concurrently, through a
server crash (pg_ctl stop -m immediate) and a node killed with SIGKILL while
shipping; afterwards the central store holds exactly what the nodes hold:
process rows, jobs, job usage and application records."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from elsa.apps import record
from elsa.testing import DaemonProc, wait_for
from tests.central_support import add_node, admin, fresh_db, pg

__all__ = ["pg"]  # the fixture

pytestmark = [pytest.mark.root, pytest.mark.slow]

NODES = 4
# Each job: a shell that runs a few hundred short programs (real exits, real records).
WORK = "for i in $(seq 150); do /bin/true; done; cat /etc/os-release > /dev/null"


def _central(pg: Any, n: int) -> Tuple[str, str]:
    url = add_node(pg, f"node{n}", "site")
    return url, (f'[sources.taskstats]\n[central]\nurl = "{url}"\nhost = "node{n}"\n'
                 "interval = 0.2\nretry_max = 1.0\nbatch_rows = 500\n"
                 '[apps]\nenabled = true\nexit_wait = 1.0\npackages = "off"\n')


def _run_jobs(d: DaemonProc, count: int, errors: List[str]) -> None:
    for _ in range(count):
        r = subprocess.run([sys.executable, "-m", "elsa.jobmng", "--socket", d.socket, "run",
                            "--", "sh", "-c", WORK], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            errors.append(r.stderr)


def _workload(nodes: List[DaemonProc], count: int) -> List[threading.Thread]:
    errors: List[str] = []
    threads = [threading.Thread(target=_run_jobs, args=(d, count, errors)) for d in nodes]
    for t in threads:
        t.start()
    return threads


def _central_status(d: DaemonProc) -> Dict[str, Any]:
    return d.call("status")["central"]


def _local(d: DaemonProc) -> Tuple[Dict[int, Tuple], Dict[Tuple[int, str], Tuple], int, int]:
    db = sqlite3.connect(f"file:{d.state_dir}/elsa.db?mode=ro", uri=True)
    (mark,) = db.execute("SELECT value FROM meta WHERE key = 'central.proc_id'").fetchone()
    per_job = {j: (n, cu, cs) for j, n, cu, cs in db.execute(
        "SELECT jid, count(*), sum(cpu_user_us), sum(cpu_system_us) FROM proc_usage "
        "WHERE jid IS NOT NULL GROUP BY jid")}
    usage = {(j, s): (n, cu, cs) for j, s, n, cu, cs in db.execute(
        "SELECT u.jid, u.source, u.processes, u.cpu_user_us, u.cpu_system_us FROM job_usage u "
        "JOIN jobs USING (jid) WHERE jobs.ended IS NOT NULL")}
    (upto,) = db.execute("SELECT count(*) FROM proc_usage WHERE id <= ?", (int(mark),)
                         ).fetchone()
    db.close()
    return per_job, usage, upto, int(mark)


def _job_rows_shipped(d: DaemonProc) -> bool:
    if _central_status(d)["failing"]:
        return False
    db = sqlite3.connect(f"file:{d.state_dir}/elsa.db?mode=ro", uri=True)
    try:
        (waiting,) = db.execute("SELECT count(*) FROM jobs WHERE ended IS NOT NULL AND jid NOT "
                                "IN (SELECT jid FROM central_jobs)").fetchone()
        if waiting or db.execute("SELECT count(*) FROM jobs WHERE ended IS NULL").fetchone()[0]:
            return False
        row = db.execute("SELECT value FROM meta WHERE key = 'central.proc_id'").fetchone()
        (last,) = db.execute("SELECT max(id) FROM proc_usage WHERE jid IS NOT NULL").fetchone()
    finally:
        db.close()
    return row is not None and last is not None and int(row[0]) >= last


def _differences(c: Any, d: DaemonProc, host: str) -> List[str]:
    """What differs between node *d*'s store and its rows in the central store."""
    out = []
    # Shipping goes on (taskstats records every process on the machine): compare
    # what the node counts as shipped, and every job's rows and totals.
    per_job, usage, upto, _mark = _local(d)
    # One statement, one snapshot: the node keeps shipping meanwhile.
    got, roll = c.execute(
        "SELECT (SELECT count(*) FROM proc_usage WHERE host = %s), "
        "(SELECT sum(processes) FROM usage_rollup WHERE host = %s)", (host, host)).fetchone()
    if got < upto:
        out.append(f"central holds {got} rows, the node marked {upto} shipped")
    # The hourly rollup (what summaries read) counted each row once.
    if roll != got:
        out.append(f"rollup counts {roll} processes for {got} rows")
    central_jobs = {j: (n, cu, cs) for j, n, cu, cs in c.execute(
        "SELECT jid, count(*), sum(cpu_user_us), sum(cpu_system_us) FROM proc_usage "
        "WHERE host = %s AND jid IS NOT NULL GROUP BY jid", (host,))}
    if central_jobs != per_job:
        out.append(f"per-job rows differ: {central_jobs} != {per_job}")
    central_usage = {(j, s): (n, cu, cs) for j, s, n, cu, cs in c.execute(
        "SELECT jid, source, processes, cpu_user_us, cpu_system_us FROM job_usage "
        "WHERE host = %s", (host,))}
    if central_usage != usage:
        out.append(f"job usage differs: {central_usage} != {usage}")
    njobs = c.execute("SELECT count(*) FROM jobs WHERE host = %s", (host,)).fetchone()[0]
    db = sqlite3.connect(f"file:{d.state_dir}/elsa.db?mode=ro", uri=True)
    ended = db.execute("SELECT count(*) FROM jobs WHERE ended IS NOT NULL").fetchone()[0]
    db.close()
    if njobs != ended or ended < 5:
        out.append(f"{njobs} jobs central, {ended} ended locally")
    out.extend(_app_differences(c, d, host))
    return out


def _app_differences(c: Any, d: DaemonProc, host: str) -> List[str]:
    """Every application record the node counts as shipped (row id up to its mark)
    is central with the same values; none is central that the node lacks."""
    cols = ", ".join(record.NAMES)
    nkey = len(record.KEY)
    db = sqlite3.connect(f"file:{d.state_dir}/elsa.db?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'central.app_id'").fetchone()
        mark = int(row[0]) if row else 0
        local = {r[:nkey]: r for r in db.execute(
            f"SELECT {', '.join(record.KEY)}, {cols} FROM app_runs WHERE id <= ?", (mark,))}
        (total,) = db.execute("SELECT count(*) FROM app_runs").fetchone()
        (in_jobs,) = db.execute("SELECT count(*) FROM app_runs WHERE id <= ? AND jid IN "
                                "(SELECT jid FROM jobs)", (mark,)).fetchone()
    finally:
        db.close()
    central = {r[:nkey]: r for r in c.execute(
        f"SELECT {', '.join(record.KEY)}, {cols} FROM app_runs WHERE host = %s", (host,))}
    out = []
    missing = [k for k in local if k not in central]
    changed = [k for k in local if k in central and central[k] != local[k]]
    if missing or changed:
        out.append(f"app records: {len(missing)} of {len(local)} shipped missing centrally, "
                   f"{len(changed)} differ (e.g. {(missing + changed)[:2]})")
    if len(central) > total:
        out.append(f"{len(central)} app records central, {total} on the node")
    if in_jobs < 100:  # the jobs ran ~150 programs each
        out.append(f"only {in_jobs} shipped app records of jobs")
    return out


def test_four_nodes_through_outages(pg: Any, tmp_path: Path) -> None:
    fresh_db(pg, "site")
    nodes = []
    for n in range(NODES):
        _url, extra = _central(pg, n)
        nodes.append(DaemonProc(tmp_path / f"node{n}", backend="cnproc", extra=extra).start())
    try:
        threads = _workload(nodes, 6)
        wait_for(lambda: all(_central_status(d)["shipped_records"] > 0 for d in nodes), 60,
                 what="every node to ship")
        # The server crashes mid-stream; the nodes keep accounting and spool.
        pg.stop("immediate")
        wait_for(lambda: all(_central_status(d)["failing"] for d in nodes), 60,
                 what="every node to see the server gone")
        shown = subprocess.run([sys.executable, "-m", "elsa.jobmng", "--socket",
                                nodes[0].socket, "status"], capture_output=True, text=True,
                               check=True).stdout
        assert "FAILING, backlog" in shown and "last error at " in shown, shown
        assert "pw-node0" not in shown and "pw-node0" not in nodes[0].log()
        err = _central_status(nodes[0])["last_error"]
        assert "connect" in err or "terminat" in err or "closed" in err, err
        for t in threads:
            t.join()
        threads = _workload(nodes, 3)
        wait_for(lambda: (_central_status(nodes[2])["backlog_records"] or 0) > 500, 60,
                 what="a backlog to build up while the server is down")
        assert _central_status(nodes[2])["oldest_age_s"] > 0
        pg.start()
        # A node killed with SIGKILL while it ships its backlog, then started again.
        wait_for(lambda: not _central_status(nodes[2])["failing"], 60,
                 what="node2 to reconnect")
        nodes[2].kill9()
        for t in threads:
            t.join()
        nodes[2].start()
        threads = _workload(nodes, 2)
        for t in threads:
            t.join()
        for d in nodes:
            wait_for(lambda d=d: _job_rows_shipped(d), 120,
                     what=f"{d.state_dir} to ship its jobs and their rows")
        with admin(pg, "site") as c:
            # The sources' priorities the reports rank by came from the nodes.
            prios = c.execute("SELECT value FROM meta WHERE key = 'usage.priority'").fetchone()
            assert prios is not None and "taskstats" in prios[0]
            for n, d in enumerate(nodes):
                host = f"node{n}"
                # Late records (a job's last exits, the cgroup's final figures) change a
                # job's local totals after it ended; the node re-ships its snapshot on
                # the next round: wait for agreement, with a deadline.
                last: List[str] = []

                def agree(c: Any = c, d: DaemonProc = d, host: str = host,
                          last: List[str] = last) -> bool:
                    last[:] = _differences(c, d, host)
                    return not last

                try:
                    wait_for(agree, 60, what=f"{host}'s central totals to equal its store")
                except AssertionError:
                    raise AssertionError(f"{host}: {last}") from None
                # No record twice: the central key is (host, record key).
                assert c.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM proc_usage WHERE host = %s "
                    "GROUP BY source, pid, start_time, end_time HAVING count(*) > 1) x",
                    (host,)).fetchone()[0] == 0
    finally:
        for d in nodes:
            try:
                d.stop()
            except Exception:
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.kill()
        if not pg.running():
            pg.start()


def _status_text(d: DaemonProc) -> str:
    return subprocess.run([sys.executable, "-m", "elsa.jobmng", "--socket", d.socket,
                           "status"], capture_output=True, text=True, check=True).stdout


def test_status_text_dates_the_last_error_and_says_when_it_is_past(pg: Any,
                                                                   tmp_path: Path) -> None:
    """After the shipper recovered, the text read "ok" above "last error: ..." with no
    time (the JSON has last_error_at): an old error read as the present state."""
    fresh_db(pg, "recover")
    url = add_node(pg, "rec0", "recover")
    d = DaemonProc(tmp_path / "rec0", backend="cnproc", extra=(
        f'[central]\nurl = "{url}"\nhost = "rec0"\ninterval = 0.2\nretry_max = 1.0\n')).start()
    try:
        wait_for(lambda: _central_status(d)["rounds"] > 0, 60, what="a first round shipped")
        pg.stop("immediate")
        wait_for(lambda: _central_status(d)["failing"], 60, what="the server seen gone")
        failing = _status_text(d)
        pg.start()
        wait_for(lambda: not _central_status(d)["failing"], 60, what="the shipper to recover")
        shown = _status_text(d)
        at = _central_status(d)["last_error_at"]
    finally:
        d.stop()
        if not pg.running():
            pg.start()
    assert "FAILING" in failing and "last error at 20" in failing, failing
    assert "(recovered)" not in failing, failing
    line = [x for x in shown.splitlines() if "last error" in x]
    assert ": ok, backlog" in shown and len(line) == 1, shown
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    assert line[0].strip().startswith(f"last error (recovered) at {when}: "), line
