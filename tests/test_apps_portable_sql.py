"""The application reports' SQL runs unchanged on PostgreSQL (issue 14: one
statement per report for SQLite and a central PostgreSQL store alike).

A real PostgreSQL (Debian's, in a private data directory, as user nobody, on
a Unix socket only) gets the ``app_runs`` table from
:data:`elsa.apps.record.COLUMNS` and the same rows as a SQLite store; every
statement the reports build runs on both (``?`` placeholders become ``$n``
in a PREPARE, as a PostgreSQL adapter does) and gives the same answer.
``psql`` stands in for a driver so the test needs no Python package.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import Any, List, Sequence

import pytest

from elsa.apps import record, report
from elsa.core.schema import _split_sql

pytestmark = pytest.mark.root

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]
ROWS = [
    dict(host_id=1, boot_id="b", pid=1, start_ticks=1, exec_ns=1, exec_time=1001.0,
         end_time=1003.0, end_reason="exit", exe_path="/usr/bin/gcc-12", path_status="resolved",
         comm="gcc", uid=1000, cpu_user_us=2000000, cpu_system_us=0, package="gcc-12",
         package_version="12.2", jid=7),
    dict(host_id=1, boot_id="b", pid=4, start_ticks=1, exec_ns=4, exec_time=1004.0,
         end_time=None, end_reason="open", exe_path=None, path_status="gone", comm="python3",
         uid=1001, jid=7),
    dict(host_id=1, boot_id="b", pid=3, start_ticks=1, exec_ns=3, exec_time=1003.0,
         end_time=1004.5, end_reason="exit", exe_path="/home/ann/bin/o'k_1", path_status="resolved",
         comm="ok", uid=1000, cpu_user_us=5, cpu_system_us=1, max_rss_kb=10),
]


def _lit(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return repr(v)


@pytest.fixture
def pg():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or not shutil.which("psql"):
        pytest.skip("needs Debian's postgresql (scripts/setup-tests installs it)")
    bindir = os.path.dirname(bins[-1])
    # Not under tmp_path: pytest's base directory is private to root.
    d = Path(tempfile.mkdtemp(prefix="elsa-test-pg-"))
    os.chmod(d, 0o755)
    os.chown(d, 65534, 65534)
    subprocess.run([*NOBODY, f"{bindir}/initdb", "-D", str(d / "data"), "-A", "trust",
                    "-U", "elsa"], check=True, capture_output=True, cwd="/")
    subprocess.run([*NOBODY, f"{bindir}/pg_ctl", "-D", str(d / "data"), "-w", "-l",
                    str(d / "log"), "-o", f"-k {d} -c listen_addresses=''", "start"],
                   check=True, capture_output=True, cwd="/")
    try:
        yield str(d)
    finally:
        subprocess.run([*NOBODY, f"{bindir}/pg_ctl", "-D", str(d / "data"), "-m",
                        "immediate", "-w", "stop"], capture_output=True, cwd="/")
        shutil.rmtree(d, ignore_errors=True)


class _Psql:
    """A DB-API-shaped stand-in: execute() runs the statement in psql."""

    def __init__(self, sockdir: str) -> None:
        self.sockdir = sockdir
        self.rows: List[List[str]] = []

    def run(self, sql: str) -> str:
        r = subprocess.run(["psql", "-h", self.sockdir, "-U", "elsa", "-d", "postgres",
                            "-v", "ON_ERROR_STOP=1", "-qAt", "-F", "\t", "-c", sql],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"PostgreSQL refused: {sql}\n{r.stderr}"
        return r.stdout

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Psql:
        n = iter(range(1, 1000))
        pg_sql = re.sub(r"\?", lambda m: f"${next(n)}", sql)
        args = f"({', '.join(_lit(p) for p in params)})" if params else ""
        out = self.run(f"PREPARE q AS {pg_sql}; EXECUTE q{args}")
        self.rows = [line.split("\t") for line in out.splitlines()]
        return self

    def fetchall(self) -> List[List[str]]:
        return self.rows


def _normal(rows: Sequence[Sequence[Any]]) -> List[List[str]]:
    """Both stores' answers as text (psql prints numbers its own way)."""
    def one(v: Any) -> str:
        if v is None or v == "":
            return ""
        try:
            f = float(v)
        except (TypeError, ValueError):
            return str(v)
        return f"{f:.6g}"
    return [[one(v) for v in r] for r in rows]


def test_every_report_statement_runs_on_postgresql_with_the_same_answer(pg: str,
                                                                       tmp_path: Path) -> None:
    psql = _Psql(pg)
    cols = ", ".join(f"{n} {t}" for n, t, _ in record.COLUMNS)
    psql.run(f"CREATE TABLE {record.TABLE} (id BIGSERIAL PRIMARY KEY, {cols}, "
             f"UNIQUE ({', '.join(record.KEY)}))")
    lite = sqlite3.connect(tmp_path / "s.db")
    lite.execute("PRAGMA case_sensitive_like = ON")  # as elsa.report.connect.open_store
    lite.execute("CREATE TABLE proc_usage (id INTEGER PRIMARY KEY, pid INTEGER, end_time REAL)")
    for stmt in _split_sql(record.MIGRATION):
        lite.execute(stmt)
    for r in ROWS:
        values = ", ".join(_lit(v) for v in r.values())
        psql.run(f"INSERT INTO {record.TABLE}({', '.join(r)}) VALUES ({values})")
        lite.execute(f"INSERT INTO {record.TABLE}({', '.join(r)}) VALUES ({values})")

    class Both:
        def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
            want = _normal(lite.execute(sql, params).fetchall())
            got = _normal(psql.execute(sql, params).fetchall())
            assert sorted(got) == sorted(want), sql
            self.n = getattr(self, "n", 0) + 1
            return lite.execute(sql, params)

    both = Both()
    for by in report.GROUPS:
        report.usage(both, by)
    report.usage(both, "user", path="/home/*", since=1000.0, until=2000.0)
    report.usage(both, "binary", path="/home/ann/bin/o'k_1")  # quote and a literal '_'
    report.usage(both, "package", package="gcc*", comm="gcc", uid=1000, jid=7)
    assert not report.usage(both, "binary", path="/USR/BIN/*")  # case counts on both
    assert report.job_programs(both, 7)
    assert both.n == 9
