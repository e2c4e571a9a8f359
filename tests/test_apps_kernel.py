"""Application accounting on the real kernel (issue 14): real programs, real elsad.

A job runs a shell script that runs a static binary, an exec chain
(``sh -c 'exec env PROG'``), ``make -j2`` of a small C project, a binary
deleted while running and a binary replaced at the same path. ``forkstat -e
exec`` listens in the same run: the job's application records must number
exactly the exec events forkstat saw for the job's processes.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from elsa.apps import record
from elsa.core.attribution import JOB_MEMBERS_SQL
from elsa.core.model import format_jid
from tests.conftest import wait_for

pytestmark = pytest.mark.root

HERE = Path(__file__).parent
APPS_TOML = ("[apps]\nenabled = true\nexit_wait = 1.0\nargv = [\"*/prog\"]\n"
             "[sources.taskstats]\nread_interval = 0.05\n")

MAKEFILE = """\
OBJS = a.o b.o c.o d.o
prog: $(OBJS)
\t$(CC) -o $@ $(OBJS)
%.o: %.c
\t$(CC) -O0 -c $< -o $@
"""


def _build_static(dest: Path) -> None:
    subprocess.run(["gcc", "-static", "-O1", "-o", str(dest), str(HERE / "apps_prog.c")],
                   check=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    if not shutil.which("gcc") or not shutil.which("make") or not shutil.which("forkstat"):
        pytest.skip("needs gcc, make and forkstat (scripts/setup-tests installs them)")
    w = tmp_path / "w"
    w.mkdir()
    _build_static(w / "prog")
    proj = w / "proj"
    proj.mkdir()
    (proj / "Makefile").write_text(MAKEFILE)
    for i, name in enumerate("abcd"):
        body = f"int f_{name}(void) {{ return {i}; }}\n"
        if name == "a":
            body += "int main(void) { return 0; }\n"
        (proj / f"{name}.c").write_text(body)
    # Replaced at the same path: a second, different build of the program.
    _build_static(w / "prog2")
    with open(w / "prog2", "ab") as fh:
        fh.write(b"\0different")
    (w / "work.sh").write_text(f"""#!/bin/sh
set -e
cd {w}
./prog 300 4 || true
sh -c 'exec env ./prog 300'
make -s -j2 -C proj
cp prog victim
sh -c 'exec 3<victim; rm victim; exec /proc/self/fd/3 300'
cp prog same
./same 200
mv same same.old
cp prog2 same
./same 200 7 || true
""")
    (w / "work.sh").chmod(0o755)
    return w


def _forkstat_pids(lines: list) -> list:
    out = []
    for line in lines:
        m = re.match(r"^\S+\s+exec\s+(\d+)\s", line)
        if m:
            out.append(int(m.group(1)))
    return out


def _history_settled(d) -> bool:
    store = d.call("status")["store"]
    return store["pending_writes"] == 0 and store["member_rows_waiting"] == 0


def test_apps_records_equal_forkstat_execs(elsad, workdir: Path) -> None:
    d = elsad(extra=APPS_TOML)
    fs_out = workdir / "forkstat.txt"
    with open(fs_out, "w") as fh:
        fs = subprocess.Popen(["forkstat", "-l", "-e", "exec"], stdout=fh,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Event" in fs_out.read_text(), what="forkstat to start")
        # The job's first process waits for a line, then execs the script:
        # every descendant is born inside the job.
        t0 = time.time()
        root = subprocess.Popen(["sh", "-c", f"read go; exec {workdir}/work.sh"],
                                stdin=subprocess.PIPE)
        with d.client() as c:
            jid = c.create(name="apps", pids=[root.pid])["jid"]
        assert root.stdin is not None
        root.stdin.write(b"go\n")
        root.stdin.close()
        assert root.wait(120) == 0
        time.sleep(0.5)  # forkstat prints what it has read; it has no flush request
    finally:
        fs.terminate()
        fs.wait(10)
    db = sqlite3.connect(os.path.join(d.state_dir, "elsa.db"))
    jid_int = int(str(jid), 16) if isinstance(jid, str) else jid
    # The job's processes in the stored history, once no short fork stay waits for the
    # taskstats row that carries it.
    wait_for(lambda: _history_settled(d), 20, what="short fork stays to be carried or written")
    members = {r[0] for r in db.execute(JOB_MEMBERS_SQL, (jid_int,))}
    seen = [p for p in _forkstat_pids(fs_out.read_text().splitlines()) if p in members]
    assert len(seen) > 20
    # The job's processes, and the root's exec from before the job existed (no jid).
    where = ("(jid = ? OR (pid = ? AND jid IS NULL AND exec_time >= ?))")

    def records():
        return db.execute(f"SELECT {', '.join(record.NAMES)} FROM app_runs WHERE {where} "
                          "ORDER BY exec_ns", (jid_int, root.pid, t0)).fetchall()

    prog = str(workdir / "prog")

    def complete() -> bool:
        # Every exec recorded, and the exit figures of the static program's last image
        # merged: taskstats records may wait in a burst hold after the exit event.
        rows = [record.AppRecord.from_row(r) for r in records()]
        return len(rows) >= len(seen) and any(
            r.exe_path == prog and r.end_reason == "exit" and r.figures_source == "taskstats"
            and r.max_rss_kb for r in rows)

    deadline = time.monotonic() + 20
    while not complete() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # nothing more arrives
    recs = [record.AppRecord.from_row(r) for r in records()]
    got, want = Counter(r.pid for r in recs), Counter(seen)
    assert got == want, (f"records {len(recs)}, forkstat {len(seen)}; only in records: "
                         f"{got - want}; only forkstat: {want - got}; "
                         f"records: {[(r.pid, r.exe_path, r.comm) for r in recs]}")
    assert all(r.end_reason in ("exec", "exit") for r in recs)
    resolved = [r for r in recs if r.exe_path]
    by_path = {}
    for r in resolved:
        by_path.setdefault(r.exe_path, []).append(r)
    # The shell script runs under its interpreter.
    assert any(r.exe_path.endswith(("/dash", "/bash", "/sh")) and r.path_status == "resolved"
               for r in resolved)
    # The static binary: resolved path, exit code 4, argv kept (allow-listed).
    static = [r for r in by_path.get(prog, []) if r.exit_code == 4]
    assert static, by_path.keys()
    assert static[0].argv is not None and '"300"' in static[0].argv
    assert static[0].comm == "prog" and static[0].uid == 0
    # The exec chain: one pid, three images in exec order, the last one the program.
    chain_pid = [r.pid for r in by_path.get(prog, []) if r.exit_code == 0][0]
    chain = [r for r in recs if r.pid == chain_pid]
    assert len(chain) == 3
    assert [r.end_reason for r in chain] == ["exec", "exec", "exit"]
    assert chain[0].end_time == pytest.approx(chain[1].exec_time)
    # make -j2: make itself, and the compiler driver with its package (dpkg systems).
    assert any(r.exe_path.endswith("/make") for r in resolved)
    assert any(r.comm in ("cc1", "as", "collect2", "ld") for r in recs)
    if os.path.exists("/var/lib/dpkg/status"):
        assert any(r.package == "make" and r.package_version for r in resolved)
    # Deleted while running: told apart by the flag (and dev/inode).
    victim = [r for r in recs if r.exe_path == str(workdir / "victim")]
    assert victim and victim[0].exe_deleted == 1 and victim[0].exe_ino is not None
    # Replaced at the same path: two records, two inodes.
    same = by_path.get(str(workdir / "same"), [])
    assert len(same) == 2 and same[0].exe_ino != same[1].exe_ino
    assert same[1].exit_code == 7
    # The last image's figures come from the exit record (taskstats).
    long_runs = [r for r in by_path.get(prog, []) if r.end_reason == "exit"]
    assert any(r.figures_source == "taskstats" and r.max_rss_kb for r in long_runs), [
        (r.pid, r.figures_source, r.max_rss_kb, r.exit_code, r.cpu_user_us, r.end_time,
         r.start_ticks, db.execute("SELECT source, start_ticks, end_time, max_rss_kb, jid "
                                   "FROM proc_usage WHERE pid = ?", (r.pid,)).fetchall())
        for r in long_runs]
    # Every last image whose process's taskstats record is stored took its figures from
    # it (the recorder matches the records the aggregator stores, in either order).
    ts_pids = {p for (p,) in db.execute("SELECT pid FROM proc_usage WHERE jid = ? AND "
                                        "source = 'taskstats'", (jid_int,))}
    last = [r for r in recs if r.end_reason == "exit" and r.pid in ts_pids]
    bad = [r for r in last if r.figures_source != "taskstats"]
    assert len(last) > 10 and not bad, [
        (r.pid, r.comm, r.figures_source, r.start_ticks, r.end_time, r.exit_code,
         db.execute("SELECT source, start_ticks, end_time FROM proc_usage WHERE pid = ?",
                    (r.pid,)).fetchall()) for r in bad]
    # A process that exec'd once, at its fork, is that image: the image takes its whole
    # exit record (the kernel starts a child's counters at zero), however late elsad
    # read /proc (a program read after it ended shows its end figures there).
    images = Counter(r.pid for r in recs)
    at_fork = 0
    for r in last:
        if images[r.pid] != 1:
            continue
        rows = db.execute("SELECT elapsed_us, cpu_user_us, cpu_system_us, read_bytes, "
                          "write_bytes FROM proc_usage WHERE pid = ? AND jid = ? AND "
                          "source = 'taskstats'", (r.pid, jid_int)).fetchall()
        # The process's start from its exit event and elapsed time: exec'd under a
        # clock tick after it (so also by /proc's start time, in ticks).
        if not any(r.exec_time - (r.end_time - e / 1e6) < 0.009 for e, *_ in rows):
            continue
        at_fork += 1
        assert (r.cpu_user_us, r.cpu_system_us, r.read_bytes, r.write_bytes) in [
            tuple(x[1:]) for x in rows], (r.pid, r.comm, r.path_status, rows)
    assert at_fork > 10
    # A program gone before elsad read it is named by its exit record's binary (device
    # and inode); its path, if any, is an earlier run's of that same file.
    gone = [r for r in last if r.path_status in ("gone", "inode")]
    assert all(r.exe_ino for r in gone), [(r.pid, r.comm) for r in gone if not r.exe_ino]
    for r in recs:
        if r.path_status == "inode":
            st = os.stat(r.exe_path)
            assert (st.st_dev, st.st_ino) == (r.exe_dev, r.exe_ino), r
    # Images replaced by an exec carry /proc figures, or none when unknown.
    assert all(r.figures_source in (None, "procfs") for r in recs if r.end_reason == "exec")

    # The reports over the same store.
    out = subprocess.run(["elsa", "apps", "--db", os.path.join(d.state_dir, "elsa.db"),
                          "--job", str(jid), "--json"], capture_output=True, text=True,
                         check=True).stdout
    import json

    listed = json.loads(out)
    assert len(listed) == sum(1 for r in recs if r.jid == jid_int)
    assert {x["jid"] for x in listed} == {format_jid(jid_int)}
    assert [x["exec_ns"] for x in listed] == sorted(x["exec_ns"] for x in listed)
