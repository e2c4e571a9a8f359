"""`elsa` reports given bad or unusual input: a store that cannot be opened, a
pacct file that is corrupt or gzipped, odd store paths, hostile command names,
contradictory options. Each gets a clear one-line error or a faithful report,
never a traceback or a silently wrong table."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

import pytest

from elsa.kernel import pacct
from elsa.report.cli import main
from tests.support import kernel_acct_lock

T0 = 1_700_000_000
ROOT = Path(__file__).resolve().parent.parent


def _records(n: int = 100, comm: str = "x", t0: int = T0) -> List[pacct.AcctRecord]:
    return [pacct.AcctRecord(offset=0, flag=0, tty=0, exitcode=0, uid=1000 + i % 2, gid=0,
                             pid=2000 + i, ppid=1, btime=t0 + i * 60, etime=100.0, utime=10,
                             stime=1, mem=1000, io=0, rw=0, minflt=1, majflt=0, comm=comm)
            for i in range(n)]


@pytest.fixture
def acct(tmp_path: Path) -> Path:
    f = tmp_path / "pacct"
    f.write_bytes(pacct.encode(_records()))
    return f


def _store(tmp_path: Path, acct: Path, name: str = "elsa.db") -> str:
    db = str(tmp_path / name)
    assert main(["import-acct", "--db", db, str(acct)]) == 0
    return db


def _run(capsys, argv):
    rc = main(argv)
    c = capsys.readouterr()
    return rc, c.out, c.err


# -- import-acct: the store cannot be opened -------------------------------------------

def test_import_acct_store_problems_are_one_line_errors(tmp_path, acct, capsys):
    good = _store(tmp_path, acct)
    capsys.readouterr()
    (tmp_path / "dir").mkdir()
    (tmp_path / "notdb").write_text("[daemon]\n" * 200)
    with open(good, "rb") as fh:
        (tmp_path / "trunc.db").write_bytes(fh.read(8000))
    cases = {
        str(tmp_path / "dir"): "it is a directory",
        str(tmp_path / "notdb"): "not an SQLite database",
        str(tmp_path / "trunc.db"): f"store-salvage --db {tmp_path / 'trunc.db'}",
        str(tmp_path / "notdb" / "x.db"): "is a file, not a directory",
    }
    for db, want in cases.items():
        rc, out, err = _run(capsys, ["import-acct", "--db", db, str(acct)])
        assert rc == 2, db
        assert err.startswith("elsa: ") and len(err.splitlines()) == 1, err
        assert db in err and want in err, err
        assert "Traceback" not in err


@pytest.mark.root
def test_import_acct_into_a_store_this_user_cannot_write(tmp_path, acct):
    if os.geteuid() != 0:
        pytest.skip("needs root to run as nobody")
    d = Path(tempfile.mkdtemp(prefix="elsa-test-import-"))  # tmp_path is root's only
    try:
        os.chmod(d, 0o755)
        shutil.copy(acct, d / "pacct")
        os.chmod(d / "pacct", 0o644)
        db = str(d / "elsa.db")
        assert main(["import-acct", "--db", db, str(d / "pacct")]) == 0
        os.chmod(db, 0o644)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for target, want in ((db, "run it as the store's owner"),
                             (str(d / "new.db"), f"creates files in {d}")):
            r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534",
                                "--clear-groups", "--", sys.executable, "-m", "elsa.report.cli",
                                "import-acct", "--db", target, str(d / "pacct")],
                               capture_output=True, text=True, env=env, cwd="/")
            assert r.returncode == 2, r.stderr
            assert "Traceback" not in r.stderr and want in r.stderr, r.stderr
    finally:
        shutil.rmtree(d)


def test_import_acct_json_into_a_new_store_is_only_json(tmp_path, acct):
    # In a subprocess: the log setup is process-wide (structlog's default prints to stdout).
    r = subprocess.run([sys.executable, "-m", "elsa.report.cli", "import-acct", "--db",
                        str(tmp_path / "new" / "elsa.db"), "--json", str(acct)],
                       capture_output=True, text=True, env={**os.environ,
                                                            "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res[0]["records"] == 100 and res[0]["inserted"] == 100


# -- summary --acct-file ----------------------------------------------------------------

def test_acct_file_corruption_is_reported_with_file_and_offset(tmp_path, acct, capsys):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x20" * 500)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(acct.read_bytes()[:4000])
    rc, out, err = _run(capsys, ["summary", "--acct-file", str(garbage)])
    assert rc == 1 and f"elsa summary: {garbage}: offset 0: not an acct record" in err
    rc, out, err = _run(capsys, ["summary", "--by", "user", "--json", "--acct-file", str(trunc)])
    want = f"{trunc}: offset 3968: truncated record: 32 of 64 bytes at the end of the file"
    assert rc == 1 and want in err
    rows = json.loads(out)
    assert sum(r["processes"] for r in rows) == 62
    assert all(r["problems"][0].startswith(want) for r in rows)
    rc, out, err = _run(capsys, ["summary", "--json", "--acct-file", str(acct)])
    assert rc == 0 and err == "" and "problems" not in json.loads(out)[0]


def test_acct_file_problems_are_listed_per_file(tmp_path, capsys):
    # docs/accounting.md: "the first 20 problems per file" -- a second corrupt
    # file was never named when the first had 20 problems or more.
    files = []
    for name in ("a", "b"):
        data = bytearray(pacct.encode(_records(300)))
        for k in range(30):
            data[64 * 10 * k + 1] = 0x55  # a version byte no kernel writes
        f = tmp_path / name
        f.write_bytes(bytes(data))
        files.append(f)
    rc, out, err = _run(capsys, ["summary", "--acct-file", *map(str, files)])
    assert rc == 1
    for f in files:
        lines = [ln for ln in err.splitlines() if ln.startswith(f"elsa summary: {f}: offset ")]
        assert len(lines) == 20
        assert f"elsa summary: {f}: 10 more problems" in err


@pytest.mark.parametrize("fmt", ["--json", "--csv"])
@pytest.mark.parametrize("by", ["user", "command"])
def test_acct_file_rows_have_the_store_summarys_keys(tmp_path, capsys, by, fmt):
    # The same real kernel file summarized directly and from a store it was
    # imported into: the same columns (READ and WRITE, shown as "-" in the
    # table, were missing from --acct-file's JSON and CSV) and the same figures.
    kernel_file = str(ROOT / "tests" / "data" / "pacct_kernel.bin")
    db = str(tmp_path / "elsa.db")
    assert main(["import-acct", "--db", db, kernel_file]) == 0
    capsys.readouterr()
    rc, direct, err = _run(capsys, ["summary", "--by", by, fmt, "--acct-file", kernel_file])
    assert rc == 0 and err == ""
    rc, stored, err = _run(capsys, ["summary", "--by", by, fmt, "--db", db])
    assert rc == 0 and err == ""

    def rows(text: str) -> list:  # rows of equal CPU come in either order
        if fmt == "--csv":
            lines = text.splitlines()
            return [lines[0]] + sorted(lines[1:])
        return sorted((list(r.items()) for r in json.loads(text)), key=str)

    assert rows(direct) == rows(stored)


@pytest.mark.parametrize("kind", ["plain", "gzip", "corrupt"])
def test_acct_file_and_import_read_a_pipe(tmp_path, capsys, kind):
    # `ssh node cat pacct | elsa summary --acct-file /dev/stdin` (or <(...)), as
    # GNU sa reads it: the file was sought back after its gzip magic was read,
    # and a pipe failed with "Illegal seek". A corrupt one is read once, whole.
    import gzip

    data = (ROOT / "tests" / "data" / "pacct_kernel.bin").read_bytes()
    if kind == "corrupt":
        data = data[:64 * 10 + 1] + b"\x7f" + data[64 * 10 + 2:]
    plain = tmp_path / "pacct"
    plain.write_bytes(data)
    rc, want, want_err = _run(capsys, ["summary", "--json", "--acct-file", str(plain)])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in (["summary", "--json", "--acct-file", "/dev/stdin"],
                 ["import-acct", "--db", str(tmp_path / "elsa.db"), "/dev/stdin"]):
        r = subprocess.run([sys.executable, "-m", "elsa.report.cli", *argv],
                           input=gzip.compress(data) if kind == "gzip" else data,
                           capture_output=True, env=env, timeout=120)
        out, err = r.stdout.decode(), r.stderr.decode()
        if argv[0] == "summary":
            assert r.returncode == rc and out == want.replace(str(plain), "/dev/stdin")
            assert err == want_err.replace(str(plain), "/dev/stdin")
        else:
            n, bad = (55, 1) if kind == "corrupt" else (56, 0)
            assert f"/dev/stdin: {n} records, {n} new, 0 attributed to jobs, {bad} problems\n" \
                in out


@pytest.mark.root
@pytest.mark.skipif(shutil.which("accton") is None, reason="needs GNU acct")
def test_acct_file_names_cut_inside_a_character_are_one_row(tmp_path, capsys):
    # The kernel keeps 15 bytes of a command's name: "run_数据分析" and
    # "run_数据分布" both read "run_数据分\ufffd" (the last character cut), and
    # were two rows that looked the same, where the store has one.
    names = ["run_数据分析", "run_数据分布", "run_数据分布"]
    for name in set(names):
        shutil.copy("/bin/true", tmp_path / name)
    acct = tmp_path / "pacct"
    acct.touch()
    with kernel_acct_lock():
        subprocess.run(["accton", str(acct)], check=True, capture_output=True)
        try:
            for name in names:
                subprocess.run([str(tmp_path / name)], check=True)
        finally:
            subprocess.run(["accton", "off"], capture_output=True)
    db = str(tmp_path / "elsa.db")
    assert main(["import-acct", "--db", db, str(acct)]) == 0
    capsys.readouterr()
    got = {}
    for where in (["--acct-file", str(acct)], ["--db", db]):
        rc, out, err = _run(capsys, ["summary", "--by", "command", "--json", *where])
        rows = [r for r in json.loads(out) if r["command"].startswith("run_")]
        assert rc == 0 and [(r["command"], r["processes"]) for r in rows] == [
            ("run_数据分\ufffd", 3)]
        got[where[0]] = rows
    assert got["--acct-file"] == got["--db"]


def test_acct_file_window_and_store_only_options(tmp_path, acct, capsys):
    rc, out, err = _run(capsys, ["summary", "--json", "--acct-file", str(acct),
                                 "--since", str(T0 + 60 * 50), "--until", str(T0 + 60 * 60)])
    assert rc == 0 and sum(r["processes"] for r in json.loads(out)) == 10
    rc, out, err = _run(capsys, ["summary", "--acct-file", str(acct), "--since", "2100-01-01"])
    assert rc == 0 and len(out.splitlines()) == 1  # the header alone
    for opt in (["--source", "taskstats"], ["--tag", "a=b"]):
        rc, out, err = _run(capsys, ["summary", "--acct-file", str(acct), *opt])
        assert rc == 2 and f"elsa: {opt[0]} selects records of the store" in err


def test_acct_file_takes_several_files_and_gzip(tmp_path, acct, capsys):
    import gzip

    gz = tmp_path / "pacct.1.gz"
    gz.write_bytes(gzip.compress(pacct.encode(_records(t0=T0 - 86400))))
    rc, out, err = _run(capsys, ["summary", "--json", "--acct-file", str(acct), str(gz)])
    assert rc == 0 and err == "" and sum(r["processes"] for r in json.loads(out)) == 200
    db = str(tmp_path / "elsa.db")
    rc, out, err = _run(capsys, ["import-acct", "--db", db, "--json", str(gz)])
    assert rc == 0 and json.loads(out)[0]["inserted"] == 100


# -- store paths -------------------------------------------------------------------------

def test_store_path_with_uri_characters_is_that_file(tmp_path, acct, capsys):
    odd = tmp_path / "st#1?x=%41.db"
    db = _store(tmp_path, acct, odd.name)
    capsys.readouterr()
    rc, out, err = _run(capsys, ["summary", "--json", "--db", db])
    assert rc == 0, err
    assert sum(r["processes"] for r in json.loads(out)) == 100
    assert {p.name for p in tmp_path.iterdir()} <= {"pacct", odd.name, odd.name + "-wal",
                                                    odd.name + "-shm"}  # no "st" made
    (tmp_path / "d.db").mkdir()
    rc, out, err = _run(capsys, ["jobs", "--db", str(tmp_path / "d.db")])
    assert rc == 2 and "it is a directory" in err
    from elsa.report.salvage import salvage

    assert salvage(db)["rows"]["proc_usage"] == 100


# -- hostile names -----------------------------------------------------------------------

EVIL = "\x1b[2Jzz\nq"  # clears the screen, then forges a line


def test_control_characters_are_escaped_in_every_table(tmp_path, capsys):
    f = tmp_path / "pacct"
    f.write_bytes(pacct.encode(_records(3, comm=EVIL)))
    db = _store(tmp_path, f)
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs VALUES (42, ?, 0, '{}', ?, ?, 'ended', 'cnproc', '{}')",
                (EVIL, T0, T0 + 700))
    con.execute("UPDATE proc_usage SET jid = 42")
    con.execute("INSERT INTO app_runs(host_id, boot_id, pid, start_ticks, exec_ns, exec_time, "
                "end_reason, exe_path, path_status, comm, uid, jid) VALUES (1, 'b', 2000, 1, 1, ?, "
                "'exit', ?, 'resolved', ?, 0, 42)", (T0 + 1, "/tmp/" + EVIL, EVIL))
    con.commit()
    con.close()
    capsys.readouterr()
    shown = "\\x1b[2Jzz\\nq"
    for argv, lines in ((["summary", "--by", "command"], 2),
                        (["apps", "--by", "binary", "--since", str(T0)], 2),
                        (["apps", "--job", "0x2a"], 2),
                        (["jobs", "--format", "jid,name", "-P"], 2)):
        rc, out, err = _run(capsys, [*argv, "--db", db])
        assert rc == 0, err
        assert "\x1b" not in out and len(out.splitlines()) == lines, out
        assert shown in out, out
    rc, out, err = _run(capsys, ["job", "0x2a", "--db", db])
    assert rc == 0 and "\x1b" not in out and out.count(shown) == 4
    assert not any(line.startswith("q") for line in out.splitlines())
    from elsa.report.ja import print_report

    buf = io.StringIO()
    print_report({"flow": [{"command": EVIL, "pid": 7, "cpu_us": 0, "running": False,
                            "children": []}], "notes": []}, "f", buf)
    assert buf.getvalue().startswith(shown) and len(buf.getvalue().splitlines()) == 1
    # CSV and JSON keep the name as it is: quoted, one record per process group.
    rc, out, err = _run(capsys, ["summary", "--by", "command", "--csv", "--db", db])
    rows = list(csv.reader(io.StringIO(out)))
    assert len(rows) == 2 and rows[1][0] == EVIL
    rc, out, err = _run(capsys, ["summary", "--by", "command", "--json", "--db", db])
    assert json.loads(out)[0]["command"] == EVIL


# -- options that cannot mean anything ---------------------------------------------------

def test_eff_csv_inverted_window_and_unknown_source_are_refused(tmp_path, acct, capsys):
    db = _store(tmp_path, acct)
    capsys.readouterr()
    rc, out, err = _run(capsys, ["eff", "0x1", "--csv", "--db", db])
    assert rc == 2 and "not --csv" in err and out == ""
    for cmd in (["jobs"], ["summary", "--by", "user"], ["apps"]):
        rc, out, err = _run(capsys, [*cmd, "--db", db, "--since", "2026-11-28",
                                     "--until", "2026-11-01"])
        assert rc == 2 and "the window is empty: --until" in err and out == "", cmd
    rc, out, err = _run(capsys, ["summary", "--acct-file", str(acct), "--since", "2026-11-28",
                                 "--until", "2026-11-01"])
    assert rc == 2 and "the window is empty" in err
    for cmd in (["summary", "--by", "user"], ["job", "0x1"]):
        rc, out, err = _run(capsys, [*cmd, "--db", db, "--source", "taskstat"])
        assert rc == 2 and "--source 'taskstat': no such source" in err, err
        assert "bsdacct" in err and "taskstats" in err
    rc, out, err = _run(capsys, ["summary", "--json", "--db", db, "--source", "bsdacct"])
    assert rc == 0 and sum(r["processes"] for r in json.loads(out)) == 100


def test_apps_globs_match_case_as_the_central_store_does(tmp_path, acct, capsys):
    db = _store(tmp_path, acct)
    con = sqlite3.connect(db)
    for pid, path, package in ((1, "/usr/bin/xz", "xz-utils"), (2, "/usr/bin/python3.11", None)):
        con.execute("INSERT INTO app_runs(host_id, boot_id, pid, start_ticks, exec_ns, "
                    "exec_time, end_reason, exe_path, path_status, comm, uid, package) "
                    "VALUES (1, 'b', ?, 1, ?, ?, 'exit', ?, 'resolved', 'c', 0, ?)",
                    (pid, pid, T0 + pid, path, package))
    con.commit()
    con.close()
    capsys.readouterr()

    def paths(*opts: str) -> List[str]:
        rc, out, err = _run(capsys, ["apps", "--json", "--db", db, *opts])
        assert rc == 0, err
        return sorted(r.get("exe_path") or r.get("package") for r in json.loads(out))

    assert paths("--path", "/usr/bin/*") == ["/usr/bin/python3.11", "/usr/bin/xz"]
    assert paths("--path", "/usr/bin/python3.1?") == ["/usr/bin/python3.11"]
    assert paths("--path", "/USR/BIN/XZ") == []
    assert paths("--package", "XZ*", "--by", "package") == []
    assert paths("--package", "xz*", "--by", "package") == ["xz-utils"]


def test_elsa_has_a_version_and_runs_as_a_module():
    # As elsad and elsa-jobmng do; 'python3 -m elsa' serves a checkout not installed.
    from elsa import __version__

    r = subprocess.run([sys.executable, "-m", "elsa", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"elsa {__version__}"
