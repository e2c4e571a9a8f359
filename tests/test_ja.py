"""`elsa ja` from inside a job (real elsad, real processes) and outside one; `tag`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import python_out, wait_for

pytestmark = pytest.mark.root
BIN = Path(sys.executable).parent


def _env():
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")


def test_ja_inside_and_outside_a_job(elsad, tmp_path):
    d = elsad(extra="[sources.taskstats]\n")
    cfg = str(d.config_path)
    r = subprocess.run(["elsa", "ja", "--config", cfg], env=_env(), capture_output=True,
                       text=True)
    assert r.returncode != 0 and "not inside an ELSA job" in r.stderr
    out = tmp_path / "ja.json"
    # In the job: a finished child (true), a running one (sleep), then ja itself.
    script = (f"/bin/true; sleep 30 & elsa ja --config {cfg} --json > {out}; "
              f"elsa ja --config {cfg} -s -c -f > {out}.txt; kill $!")
    r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--name", "jajob", "--tag",
                        "account=chem", "--", "sh", "-c", script], env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["name"] == "jajob" and rep["tags"]["account"] == "chem"
    assert rep["state"] == "running" and rep["elapsed_s"] >= 0
    s = rep["summary"]
    assert s["processes_running"] >= 3  # sh, sleep, elsa ja
    for key in ("cpu_user_us", "cpu_system_us", "max_rss_kb", "read_bytes", "write_bytes",
                "coremem_mib_s", "processes_finished"):
        assert key in s
    assert s["cpu_user_us"] is not None and s["cpu_user_us"] > 0  # ja's own CPU at least
    cmds = {c["command"] for c in rep["commands"]}
    assert {"sh", "sleep"} <= cmds
    (root,) = rep["flow"]
    assert root["command"] == "sh"
    assert {c["command"] for c in root["children"]} >= {"sleep"}
    text = Path(f"{out}.txt").read_text()
    assert "Job ID" in text and "COMMAND" in text and "sleep [" in text
    assert "Tags          account=chem\n" in text  # as --json's tags


def test_ja_counts_the_command_that_just_finished(elsad, tmp_path):
    # CSA's use: `ja` as the last line of a batch script reports the whole job.
    # The command before it exited a moment ago: the kernel queued its taskstats
    # record at its exit, but elsad reads the socket in batches (read_interval;
    # 5 s here, where the default 0.25 s loses it only some of the time).
    d = elsad(extra="[sources.taskstats]\nread_interval = 5.0\n")
    cfg = str(d.config_path)
    out, cpu = tmp_path / "ja.json", tmp_path / "cpu.txt"
    child = ("import os, time\nt = time.process_time()\n"
             "while time.process_time() - t < 0.3: pass\n"
             f"c = os.times(); open({str(cpu)!r}, 'w').write(str(c.user + c.system))")
    # /bin/true first: its record opens the socket's read window, so the next
    # record waits out the window unless 'ja' has it read.
    script = f"/bin/true; python3 -c \"$CHILD\"; elsa ja --config {cfg} --json > {out}"
    r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--", "sh", "-c", script],
                       env=dict(_env(), CHILD=child), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    child_us = float(cpu.read_text()) * 1e6
    py = [c for c in rep["commands"] if c["command"] == "python3"]
    assert py and py[0]["count"] == 1 and py[0]["running"] == 0, rep["commands"]
    assert py[0]["cpu_user_us"] + py[0]["cpu_system_us"] >= child_us * 0.95
    s = rep["summary"]
    assert s["processes_finished"] >= 2  # true, python3
    assert s["cpu_user_us"] + s["cpu_system_us"] >= child_us


def test_ja_per_command_counts_folded_records(elsad, tmp_path):
    # [thresholds] folds the small records into one row per command: 'ja -c' and
    # --json's commands count them, as the summary's processes_finished does.
    d = elsad(extra="[sources.taskstats]\n[thresholds]\nmin_cpu_ms = 50\n")
    cfg = str(d.config_path)
    out = tmp_path / "ja.json"
    script = (f"/bin/true; /bin/true; /bin/true; elsa ja --config {cfg} --json > {out}; "
              f"elsa ja --config {cfg} -c > {out}.txt")
    r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--", "sh", "-c", script],
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    true = [c for c in rep["commands"] if c["command"] == "true"]
    assert true and true[0]["count"] == 3 and true[0]["running"] == 0, rep["commands"]
    assert true[0]["cpu_user_us"] is not None
    finished = sum(c["count"] - c["running"] for c in rep["commands"])
    assert finished == rep["summary"]["processes_finished"]
    assert any("[thresholds]" in n for n in rep["notes"])
    text = Path(f"{out}.txt").read_text()
    assert any(line.split()[:3] == ["true", "3", "0"] for line in text.splitlines()), text


def test_tag_after_the_fact(elsad):
    d = elsad()
    r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--tag", "queue=a", "--",
                        "echo"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0
    with d.client() as c:
        jid = c.list(all=True)[-1]["jid"]
        wait_for(lambda: c.show(jid)["state"] == "ended", 10, what="the job to end")
        job = c.tag(jid, {"account": "chem", "queue": ""})
    assert job["tags"] == {"account": "chem"}
    r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "--json", "tag", jid,
                        "project=x"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tags"] == {"account": "chem", "project": "x"}
    # Stored: the report side sees it too.
    r = subprocess.run(["elsa", "jobs", "--state-dir", d.state_dir, "--format",
                        "jid,account", "-P", "-n"], env=_env(), capture_output=True, text=True)
    assert r.stdout.strip().endswith("|chem")
    # Another user may not tag root's job (run as nobody where this Python allows it).
    try:
        r = subprocess.run([sys.executable, "-m", "elsa.jobmng", "--socket", d.socket, "tag",
                            jid, "a=b"], user=65534, capture_output=True, text=True)
    except PermissionError:
        return
    if "Permission denied" in r.stderr and "python" in r.stderr:
        return
    assert r.returncode != 0 and "may only manage its own jobs" in r.stderr


def test_a_command_imports_its_own_modules_only():
    # `elsa ja` runs inside jobs: parsing its arguments must not import every
    # report's modules (elsa.report.cli.build_parser); help still lists all.
    code = ("import sys; from elsa.report import cli; p = cli.build_parser('ja'); "
            "p.parse_args(['ja', '-s']); "
            "print(sorted(m for m in ('elsa.billing.cli', 'elsa.web.serve', 'elsa.export.cli', "
            "'elsa.central.cli', 'elsa.apps.report', 'elsa.report.sacct') if m in sys.modules)); "
            "print(cli.build_parser().format_help())")
    first, helptext = python_out(code).split("\n", 1)
    assert first == "[]"
    for name in ("jobs", "bill", "eff", "ja", "apps", "web", "export", "central"):
        assert name in helptext


def test_ja_says_when_the_stored_records_miss_a_downtime(elsad, tmp_path, spawned):
    # elsad was killed and restarted while the job ran: taskstats has no records of
    # what ended meanwhile, so the finished processes ja counts are short. `elsa job`
    # says INCOMPLETE (taskstats); ja must say it too, not print the count as whole.
    d = elsad(extra="[sources.taskstats]\n")
    cfg = str(d.config_path)
    go, out = tmp_path / "go", tmp_path / "ja.json"
    script = (f"while [ ! -e {go} ]; do /bin/true; sleep 0.05; done; "
              f"elsa ja --config {cfg} --json > {out}; elsa ja --config {cfg} -s > {out}.txt")
    p = subprocess.Popen(["elsa-jobmng", "--socket", d.socket, "run", "--", "sh", "-c", script],
                         env=_env(), start_new_session=True)
    spawned.append(p)
    with d.client() as c:
        wait_for(lambda: c.list(), 10, what="the job")
    d.kill9()
    d.start()
    go.touch()
    assert p.wait(60) == 0
    rep = json.loads(out.read_text())
    assert any(n.startswith("finished processes incomplete (taskstats): no taskstats records "
                            "from ") for n in rep["notes"]), rep["notes"]
    text = Path(f"{out}.txt").read_text()
    assert "note: finished processes incomplete (taskstats): no taskstats records" in text, text
