"""elsa-jobmng end to end against a real elsad: run, JSON keys, exit codes, messages.

The `run` tests use the installed console script (a real exec); the others call
``elsa.jobmng.main`` in-process (the same code, without interpreter start-up).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Set

import pytest

from elsa import jobmng
from tests.conftest import pid_alive, wait_for

pytestmark = pytest.mark.root

SHOW_KEYS = {"jid", "name", "owner_uid", "owner", "state", "created", "ended", "tags",
             "pids", "backend", "params"}

NODE = """\
# node.sh FILE DEPTH: record my pid, fork two subtrees of DEPTH-1, become a sleeper
echo $$ >> "$1"
if [ "$2" -gt 0 ]; then
  sh "$0" "$1" $(($2 - 1)) &
  sh "$0" "$1" $(($2 - 1)) &
fi
exec sleep 300
"""

MAIN = """\
# main.sh DIR FILE: nested forks, a subshell, and a setsid double-forked daemon
echo $$ >> "$2"
sh "$1/node.sh" "$2" 2 &
( sh "$1/node.sh" "$2" 1 & wait ) &
setsid sh -c 'sh "$0" "$1" 1 & exit 0' "$1/node.sh" "$2" &
wait
"""


def cli(*argv: str, capsys) -> tuple:
    rc = jobmng.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _recorded(path: Path) -> List[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def _sid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[3])


def test_run_puts_every_descendant_in_the_job(elsad, spawned, tmp_path):
    d = elsad()
    (tmp_path / "node.sh").write_text(NODE)
    (tmp_path / "main.sh").write_text(MAIN)
    record = tmp_path / "pids"
    p = subprocess.Popen(["elsa-jobmng", "--socket", d.socket, "run", "--name", "e2e",
                          "--tag", "suite=jobmng", "--", "sh", str(tmp_path / "main.sh"),
                          str(tmp_path), str(record)], start_new_session=True)
    spawned.append(p)
    recorded: Set[int] = set()
    try:
        # 1 main + 7 (depth 2) + 3 (depth 1 in a subshell) + 3 (setsid daemon) = 14
        wait_for(lambda: len(_recorded(record)) >= 14, 20, what="14 processes to start")
        recorded = set(_recorded(record))
        assert p.pid in recorded  # run exec'd: the job's first member is CMD itself
        jid_text = subprocess.run(
            ["elsa-jobmng", "--socket", d.socket, "jobof", str(p.pid)],
            capture_output=True, text=True, check=True).stdout.strip()
        assert jid_text.startswith("0x") and len(jid_text) == 18
        shown = subprocess.run(
            ["elsa-jobmng", "--socket", d.socket, "show", jid_text, "--json"],
            capture_output=True, text=True, check=True)
        job = json.loads(shown.stdout)
        assert SHOW_KEYS <= set(job)
        assert job["jid"] == jid_text and job["name"] == "e2e"
        assert job["tags"] == {"suite": "jobmng"} and job["state"] == "running"
        assert job["owner_uid"] == 0 and job["backend"] == "cnproc"
        alive = {pid for pid in recorded if pid_alive(pid)}
        assert alive == recorded
        missing = recorded - set(job["pids"])
        assert not missing, f"descendants not in the job: {sorted(missing)}"
        # The setsid branch really left the session (a daemon), and is still in.
        assert sum(1 for pid in recorded if _sid(pid) != _sid(p.pid)) == 3
        # kill reaches all of them, across the session boundary; the job then ends.
        k = subprocess.run(["elsa-jobmng", "--socket", d.socket, "kill", jid_text,
                            "--signal", "KILL"], capture_output=True, text=True)
        assert k.returncode == 0, k.stderr
        w = subprocess.run(["elsa-jobmng", "--socket", d.socket, "wait", jid_text,
                            "--timeout", "10"], capture_output=True, text=True)
        assert w.returncode == 0 and "ended" in w.stdout
        for pid in recorded:
            wait_for(lambda pid=pid: not pid_alive(pid), 5, what=f"{pid} to die")
        assert p.wait(5) == -signal.SIGKILL
    finally:
        for pid in recorded | set(_recorded(record)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_run_exit_status_env_and_join_existing(elsad, tmp_path, capsys):
    d = elsad()
    sock = ["elsa-jobmng", "--socket", d.socket]
    r = subprocess.run(sock + ["run", "--", "sh", "-c", "exit 7"])
    assert r.returncode == 7
    r = subprocess.run(sock + ["run", "--", "/nonexistent/cmd"], capture_output=True,
                       text=True)
    assert r.returncode == 127 and "command not found" in r.stderr
    r = subprocess.run(sock + ["run", "--", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 126
    rc, out, _ = cli("--socket", d.socket, "create", "--name", "outer", capsys=capsys)
    jid = out.strip()
    r = subprocess.run(sock + ["run", "--job", jid, "--", "sh", "-c",
                               'echo "$ELSA_JID"; elsa-jobmng --socket "$0" jobof $$', d.socket],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [jid, jid]
    # Without a daemon, run refuses before starting CMD (125) and says why in one line.
    marker = tmp_path / "ran"
    r = subprocess.run(["elsa-jobmng", "--socket", str(tmp_path / "none.sock"), "run", "--",
                        "touch", str(marker)], capture_output=True, text=True)
    assert r.returncode == 125 and not marker.exists()
    assert "elsad is not running" in r.stderr and r.stderr.count("\n") == 1


def test_commands_json_and_exit_codes(elsad, spawned, capsys):
    d = elsad()
    s = ["--socket", d.socket]
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    spawned.append(p)
    rc, out, _ = cli(*s, "create", "--name", "j1", "--tag", "a=1", "--tag", "b=x=y",
                     "--json", capsys=capsys)
    assert rc == 0
    job = json.loads(out)
    assert SHOW_KEYS <= set(job) and job["tags"] == {"a": "1", "b": "x=y"}
    jid = job["jid"]
    assert cli(*s, "attach", jid, str(p.pid), capsys=capsys)[0] == 0
    rc, out, _ = cli(*s, "pids", jid, capsys=capsys)
    assert rc == 0 and out.split() == [str(p.pid)]
    assert json.loads(cli(*s, "--json", "pids", jid, capsys=capsys)[1]) == [p.pid]
    # decimal job ids are accepted too
    rc, out, _ = cli(*s, "show", str(int(jid, 16)), capsys=capsys)
    assert rc == 0 and f"pids     {p.pid}" in out and "name     j1" in out
    rc, out, _ = cli(*s, "jobof", str(p.pid), "--json", capsys=capsys)
    assert json.loads(out) == {"pid": p.pid, "jid": jid}
    rc, out, _ = cli(*s, "list", "--json", capsys=capsys)
    listed = json.loads(out)
    assert isinstance(listed, list) and len(listed) == 1
    assert SHOW_KEYS - {"pids"} <= set(listed[0]) and "pids" not in listed[0]
    assert listed[0]["nprocs"] == 1
    assert len(json.loads(cli(*s, "list", "--user", "root", "--json", capsys=capsys)[1])) == 1
    assert json.loads(cli(*s, "list", "--user", "65000", "--json", capsys=capsys)[1]) == []
    assert cli(*s, "list", "--user", "no-such-user-here", capsys=capsys)[0] == 2
    rc, out, _ = cli(*s, "list", capsys=capsys)
    assert out.splitlines()[0].split()[:4] == ["JID", "STATE", "OWNER", "PROCS"]
    assert jid in out
    # wait with a timeout on a running job: exit 5, after about the timeout
    t0 = time.monotonic()
    rc, _, err = cli(*s, "wait", jid, "--timeout", "0.3", capsys=capsys)
    assert rc == 5 and "still running" in err and time.monotonic() - t0 < 2
    # the backend refuses freeze (cnproc): its error is printed, exit 1
    rc, _, err = cli(*s, "freeze", jid, capsys=capsys)
    assert rc == 1 and "cannot freeze" in err and "[backend]" in err
    rc, _, err = cli(*s, "create", "--cpus", "0", "--mems", "0", capsys=capsys)
    assert rc == 1 and "takes no job parameters" in err
    rc, out, _ = cli(*s, "end", jid, "--json", capsys=capsys)
    assert rc == 0 and json.loads(out)["state"] == "ended"
    assert pid_alive(p.pid)  # end detaches, it does not kill
    assert cli(*s, "jobof", str(p.pid), capsys=capsys)[0] == 6
    rc, out, _ = cli(*s, "wait", jid, "--json", capsys=capsys)
    assert rc == 0 and json.loads(out)["ended"] is True
    rc, out, _ = cli(*s, "list", "--all", "--json", capsys=capsys)
    assert [j["state"] for j in json.loads(out)] == ["ended"]
    rc, out, _ = cli(*s, "list", "--json", capsys=capsys)
    assert json.loads(out) == []
    jid2 = cli(*s, "create", capsys=capsys)[1].strip()
    assert cli(*s, "attach", jid2, str(p.pid), capsys=capsys)[0] == 0
    rc, out, _ = cli(*s, "detach", str(p.pid), "--json", capsys=capsys)
    assert rc == 0 and json.loads(out) == {"detached": [{"pid": p.pid, "jid": jid2}]}
    assert cli(*s, "jobof", str(p.pid), capsys=capsys)[0] == 6
    # not found: exit 6
    assert cli(*s, "show", "0x1", capsys=capsys)[0] == 6
    assert cli(*s, "jobof", "1", capsys=capsys)[0] == 6
    assert cli(*s, "kill", "0x1", capsys=capsys)[0] == 6
    # ended job: request refused, exit 1
    rc, _, err = cli(*s, "kill", jid, capsys=capsys)
    assert rc == 1 and "bad-job-state" in err
    # status, human and JSON
    rc, out, _ = cli(*s, "status", capsys=capsys)
    assert rc == 0 and "backend    cnproc" in out and "resyncs" in out
    # on while some other process on the machine forks in a burst (docs/daemon.md)
    assert re.search(r"^hold       (on|off), ", out, re.M) and "(at most 5.0 s each)" in out
    st = json.loads(cli(*s, "status", "--json", capsys=capsys)[1])
    assert {"version", "backend", "events", "lost_events", "resyncs", "control"} <= set(st)


def test_usage_errors_and_daemon_unavailable(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        jobmng.main(["show", "zz"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        jobmng.main(["kill", "0x1", "--signal", "NOPE"])
    assert exc.value.code == 2
    # An I/O timeout of 0 would be a non-blocking socket, not "elsad is not running".
    with pytest.raises(SystemExit) as exc:
        jobmng.main(["--timeout", "0", "status"])
    assert exc.value.code == 2 and "must be more than 0 s" in capsys.readouterr().err
    assert cli("--socket", str(tmp_path / "none"), "run", capsys=capsys)[0] == 2
    rc, out, err = cli("--socket", str(tmp_path / "none.sock"), "status", capsys=capsys)
    assert rc == 3 and out == ""
    assert err.count("\n") == 1 and "elsad is not running" in err and "start it" in err
    rc, _, err = cli("--config", str(tmp_path / "missing.toml"), "status", capsys=capsys)
    assert rc == 2 and "config file not found" in err
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(f'socket = "{tmp_path}/from-config.sock"\n')
    rc, _, err = cli("--config", str(cfg), "status", capsys=capsys)
    assert rc == 3 and "from-config.sock" in err


def test_parser_is_complete():
    parser = jobmng.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"create", "run", "attach", "detach", "jobof", "list", "show",
                                "pids", "wait", "kill", "end", "status", "freeze", "thaw",
                                "tag"}
    for name in ("create", "run"):
        opts = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert {"--name", "--tag", "--cpus", "--mems", "--wlm"} <= opts
    assert "exit codes" in parser.format_help()


def test_docs_cover_every_command_and_exit_code():
    text = (Path(__file__).resolve().parent.parent / "docs" / "jobmng.md").read_text()
    sub = next(a for a in jobmng.build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"`{name}" in text, f"command {name} not documented"
    for code in (0, 1, 2, 3, 4, 5, 6, 125, 126, 127):
        assert f"| {code} |" in text or f"**{code}**" in text, f"exit code {code}"
