"""Authorization with real unprivileged accounts (created here, removed at teardown).

Clients run as those users: the test forks, the child drops to the user's uid and
gid with setresuid/setresgid (and sets exactly the supplementary groups we
choose), then talks to the daemon, so the daemon sees the user in SO_PEERCRED
and SO_PEERGROUPS. (The interpreter lives under /root, which other users cannot
traverse, so the child runs our already-loaded code rather than exec'ing a new
interpreter.) The test daemon's socket sits in a 0755 directory so the users
can reach it.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from elsa import jobmng
from elsa.client import Client, RequestFailed
from tests.conftest import pid_alive, wait_for

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def accounts() -> Iterator[Tuple[User, User, int, str]]:
    """Users elsa-test-a-XXXX and elsa-test-b-XXXX, and a group for admin_group."""
    suffix = secrets.token_hex(3)
    names = [f"elsa-test-a-{suffix}", f"elsa-test-b-{suffix}"]
    group = f"elsa-test-g-{suffix}"
    made: List[str] = []
    try:
        for n in names:
            _run("useradd", "-m", "-s", "/bin/sh", n)
            made.append(n)
        _run("groupadd", group)
        import grp
        import pwd

        users = [User(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid) for n in names]
        yield users[0], users[1], grp.getgrnam(group).gr_gid, group
    finally:
        for n in made:
            subprocess.run(["userdel", "-r", n], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        subprocess.run(["groupdel", group], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


# The children cannot import anything new (the interpreter's tree is under /root):
# load what elsa-jobmng needs now, including argparse's lazy parts.
jobmng.build_parser().format_help()


def as_user(user: User, fn: Callable[[], Any], groups: Tuple[int, ...] = ()) -> Any:
    """Run *fn* in a forked child with *user*'s credentials; return its JSON result.

    An exception in the child comes back as {"exception": "..."}.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            os.setgroups(list(groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            try:
                out = {"value": fn()}
            except BaseException:
                out = {"exception": traceback.format_exc()}
            data = json.dumps(out).encode()
            with os.fdopen(wfd, "wb") as fh:
                fh.write(data)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    out = json.loads(data)
    if "exception" in out:
        raise AssertionError("in the child:\n" + out["exception"])
    return out["value"]


def attempt(sock: str, op: str, **fields: Any) -> Callable[[], Dict[str, Any]]:
    """A client call as a JSON-able outcome: {"ok": result} or {"code": ...}."""
    def run() -> Dict[str, Any]:
        try:
            with Client(sock, timeout=10) as c:
                return {"ok": c.call(op, **fields)}
        except RequestFailed as exc:
            return {"code": exc.code, "message": exc.message}
    return run


def cli_as(sock: str, *argv: str) -> Callable[[], Dict[str, Any]]:
    """elsa-jobmng's main() (same code as the console script) with its exit code."""
    def run() -> Dict[str, Any]:
        out, errs = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(errs):
            rc = jobmng.main(["--socket", sock, *argv])
        return {"rc": rc, "stdout": out.getvalue(), "stderr": errs.getvalue()}
    return run


def user_proc(spawned: List[subprocess.Popen], user: User) -> subprocess.Popen:
    p = subprocess.Popen(["sleep", "300"], user=user.uid, group=user.gid, extra_groups=[],
                         start_new_session=True, cwd="/")
    spawned.append(p)
    return p


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 0755 directory for the daemon's socket (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="elsa-auth-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_users_manage_only_their_own(shared_dir, elsad, spawned, accounts):
    a, b, admin_gid, admin_group = accounts
    d = elsad(workdir=shared_dir, extra=f'admin_group = "{admin_group}"\n')
    sock = d.socket
    pa1, pa2, pa3 = (user_proc(spawned, a) for _ in range(3))
    pb1, pb2 = user_proc(spawned, b), user_proc(spawned, b)
    pr = subprocess.Popen(["sleep", "300"], start_new_session=True)
    spawned.append(pr)

    # Set-up by each owner (these are authorized and must succeed).
    hello = as_user(a, attempt(sock, "hello"))["ok"]
    assert hello["caller"]["uid"] == a.uid and hello["caller"]["admin"] is False
    job_a = as_user(a, attempt(sock, "create", name="a", pids=[pa1.pid]))["ok"]["jid"]
    job_b = as_user(b, attempt(sock, "create", name="b", pids=[pb1.pid]))["ok"]["jid"]
    with Client(sock) as c:
        job_r = c.create(name="root", pids=[pr.pid])["jid"]
        jobs_before = len(c.list(all=True))
        denied_before = c.status()["control"]["denied"]

    # Everything user A must NOT be able to do.
    forbidden = [
        ("attach B's process to A's job", "attach", {"jid": job_a, "pids": [pb2.pid]}),
        ("attach B's process to B's job", "attach", {"jid": job_b, "pids": [pb2.pid]}),
        ("attach A's process to B's job", "attach", {"jid": job_b, "pids": [pa2.pid]}),
        ("attach A's process to root's job", "attach", {"jid": job_r, "pids": [pa2.pid]}),
        ("attach root's process to A's job", "attach", {"jid": job_a, "pids": [pr.pid]}),
        ("attach init to A's job", "attach", {"jid": job_a, "pids": [1]}),
        ("attach own and B's process (all or nothing)", "attach",
         {"jid": job_a, "pids": [pa2.pid, pb2.pid]}),
        ("steal B's member into A's job", "attach", {"jid": job_a, "pids": [pb1.pid]}),
        ("kill B's job", "kill", {"jid": job_b, "signal": 9}),
        ("kill root's job", "kill", {"jid": job_r, "signal": 9}),
        ("end B's job", "end", {"jid": job_b}),
        ("end root's job", "end", {"jid": job_r}),
        ("detach B's member", "detach", {"pids": [pb1.pid]}),
        ("detach root's member", "detach", {"pids": [pr.pid]}),
        ("freeze B's job", "freeze", {"jid": job_b}),
        ("thaw root's job", "thaw", {"jid": job_r}),
        ("create a job owned by B", "create", {"owner_uid": b.uid}),
        ("create a job owned by root", "create", {"owner_uid": 0}),
        ("create a job holding B's process", "create", {"pids": [pb2.pid]}),
        ("create a job holding root's process", "create", {"pids": [pr.pid]}),
    ]
    unauthorized_successes = []
    for what, op, fields in forbidden:
        out = as_user(a, attempt(sock, op, **fields))
        if "ok" in out:
            unauthorized_successes.append(what)
        else:
            assert out["code"] == "permission-denied", (what, out)
    # The same through the CLI: exit code 4, one line on stderr.
    cli_forbidden = [("kill", job_b, "--signal", "KILL"), ("end", job_r),
                     ("attach", str(job_b), str(pa2.pid)), ("detach", str(pb1.pid))]
    for argv in cli_forbidden:
        out = as_user(a, cli_as(sock, *argv))
        if out["rc"] == 0:
            unauthorized_successes.append(f"cli {argv}")
        assert out["rc"] == 4, (argv, out)
        assert "permission-denied" in out["stderr"] and out["stderr"].count("\n") == 1
    attempts = len(forbidden) + len(cli_forbidden)
    assert attempts >= 24
    assert unauthorized_successes == []

    # Nothing changed: every process alive, every membership as before.
    for p in (pa1, pa2, pa3, pb1, pb2, pr):
        assert pid_alive(p.pid)
    with Client(sock) as c:
        assert c.pids(job_a) == [pa1.pid]
        assert c.pids(job_b) == [pb1.pid]
        assert c.pids(job_r) == [pr.pid]
        assert len(c.list(all=True)) == jobs_before
        # Every refusal was counted, and logged with who tried.
        assert c.status()["control"]["denied"] - denied_before == attempts
    denials = [line for line in d.log().splitlines() if "request denied" in line]
    assert len(denials) == attempts and all(f'"uid": {a.uid}' in x for x in denials)

    # What A may do with its own processes and jobs.
    assert as_user(a, attempt(sock, "attach", jid=job_a, pids=[pa2.pid]))["ok"]
    assert as_user(a, attempt(sock, "detach", pids=[pa2.pid]))["ok"]
    assert as_user(a, cli_as(sock, "attach", job_a, str(pa3.pid)))["rc"] == 0
    own = as_user(a, attempt(sock, "kill", jid=job_a, signal="KILL"))["ok"]
    assert own["signalled"] == 2 and own["skipped"] == 0
    wait_for(lambda: not pid_alive(pa1.pid) and not pid_alive(pa3.pid), what="A's members")
    job_a2 = as_user(a, cli_as(sock, "--json", "create", "--name", "a2"))
    assert job_a2["rc"] == 0
    jid_a2 = json.loads(job_a2["stdout"])["jid"]
    assert as_user(a, cli_as(sock, "end", jid_a2))["rc"] == 0
    # Reads are open to everyone.
    assert as_user(a, attempt(sock, "pids", jid=job_b))["ok"]["pids"] == [pb1.pid]
    assert as_user(a, attempt(sock, "jobof", pid=pr.pid))["ok"]["jid"] == job_r

    # Root can do all of it.
    with Client(sock) as c:
        c.attach(job_r, [pa2.pid])  # A's process into root's job
        c.attach(job_b, [pb2.pid])
        c.detach([pb2.pid])
        assert c.kill(job_b, "KILL")["signalled"] == 1
        wait_for(lambda: not pid_alive(pb1.pid), what="B's member to die")
        assert c.create(owner_uid=b.uid, name="for b")["owner_uid"] == b.uid
        assert c.end(job_r)["state"] == "ended"


def test_kill_skips_members_the_owner_could_not_signal(shared_dir, elsad, spawned, accounts):
    """A job of A's that holds a process of B (root put it there, as after `su`):
    A's kill reaches A's members only; the root daemon is no confused deputy."""
    a, b, _gid, _group = accounts
    d = elsad(workdir=shared_dir)
    pa, pb = user_proc(spawned, a), user_proc(spawned, b)
    job = as_user(a, attempt(d.socket, "create", pids=[pa.pid]))["ok"]["jid"]
    with Client(d.socket) as c:
        c.attach(job, [pb.pid])
    res = as_user(a, attempt(d.socket, "kill", jid=job, signal=int(signal.SIGKILL)))["ok"]
    assert res["signalled"] == 1 and res["skipped"] == 1
    wait_for(lambda: not pid_alive(pa.pid), what="A's member to die")
    assert pid_alive(pb.pid)


def test_admin_group_members_may_manage_everything(shared_dir, elsad, spawned, accounts):
    a, b, admin_gid, admin_group = accounts
    d = elsad(workdir=shared_dir, extra=f'admin_group = "{admin_group}"\n')
    pb = user_proc(spawned, b)
    job_b = as_user(b, attempt(d.socket, "create", pids=[pb.pid]))["ok"]["jid"]
    # Without the group (supplementary groups empty): refused.
    assert as_user(a, attempt(d.socket, "end", jid=job_b))["code"] == "permission-denied"
    # With the admin group as a supplementary group (SO_PEERGROUPS): allowed.
    hello = as_user(a, attempt(d.socket, "hello"), groups=(admin_gid,))["ok"]
    assert hello["caller"]["admin"] is True
    assert as_user(a, attempt(d.socket, "end", jid=job_b), groups=(admin_gid,))["ok"]


def test_connection_caps_per_user_and_admin_reserve(shared_dir, elsad, accounts):
    a, _b, _gid, _group = accounts
    d = elsad(workdir=shared_dir, extra="[limits]\nmax_connections = 4\n")

    def hog() -> List[str]:
        # Hold connections as A: the third is refused (half of 4 per uid).
        held, results = [], []
        for _ in range(3):
            try:
                c = Client(d.socket, timeout=5)
                c.status()
                held.append(c)
                results.append("ok")
            except RequestFailed as exc:
                results.append(exc.code)
        return results

    assert as_user(a, hog) == ["ok", "ok", "busy"]
    # Root is admitted even when the non-admin limit is reached.
    clients = [Client(d.socket) for _ in range(4)]
    try:
        for c in clients:
            c.status()
        with Client(d.socket) as extra:
            # (A's connections may still be closing: at least ours are there.)
            assert extra.status()["control"]["connections"] >= 5
    finally:
        for c in clients:
            c.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
