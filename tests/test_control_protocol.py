"""The control protocol against a real elsad: framing, errors, limits, wait/kill/end, status.

Everything goes through real AF_UNIX sockets to a daemon subprocess; nothing is
mocked. ``RawConn`` (also used by the other control tests) speaks the wire
format directly, so the tests see exactly what a third-party client would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from elsa.core.model import parse_jid
from elsa.core.operations import OP_NAMES
from elsa.protocol import ERROR_CODES
from tests.conftest import pid_alive, wait_for

pytestmark = pytest.mark.root

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


class RawConn:
    """A bare socket speaking JSON lines, for tests that need to misbehave."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, obj: Any) -> None:
        self.send(json.dumps(obj).encode() + b"\n")

    def line(self) -> Optional[bytes]:
        """The next reply line, or None at EOF."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def reply(self) -> Dict[str, Any]:
        line = self.line()
        assert line is not None, "daemon closed the connection instead of replying"
        obj = json.loads(line)
        assert isinstance(obj, dict) and obj.get("v") == 1 and isinstance(obj.get("ok"), bool)
        if not obj["ok"]:
            assert obj["error"]["code"] in ERROR_CODES, obj
            assert obj["error"]["message"]
        return obj

    def call(self, op: str, **fields: Any) -> Dict[str, Any]:
        self.request({"v": 1, "op": op, **fields})
        return self.reply()

    def at_eof(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def err(reply: Dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return reply["error"]["code"]


def sleeper(spawned: List[subprocess.Popen], seconds: int = 300, **kw: Any) -> subprocess.Popen:
    p = subprocess.Popen(["sleep", str(seconds)], start_new_session=True, **kw)
    spawned.append(p)
    return p


# -- documentation ------------------------------------------------------------------------

def test_every_op_and_error_code_is_documented():
    text = DOCS.read_text()
    for op in OP_NAMES:
        assert re.search(rf"^### `{op}`", text, re.M), f"op {op} not documented"
    for code in ERROR_CODES:
        assert f"`{code}`" in text, f"error code {code} not documented"


# -- framing and errors -------------------------------------------------------------------

def test_malformed_requests_get_errors_and_the_connection_carries_on(elsad):
    d = elsad()
    c = RawConn(d.socket)
    cases = [
        (b"not json\n", "bad-request"),
        (b"[1,2,3]\n", "bad-request"),
        (b'"just a string"\n', "bad-request"),
        (b'{"op": 42}\n', "bad-request"),
        (b'{"v": 1}\n', "bad-request"),
        (b'{"op": "nope"}\n', "unknown-op"),
        (b'{"op": "status", "v": 2}\n', "unsupported-version"),
        (b'{"op": "status", "v": true}\n', "unsupported-version"),
        (b'{"op": "status", "v": 1.0}\n', "unsupported-version"),
        (b'{"op": "status", "v": "1"}\n', "unsupported-version"),
        (b'{"op": "status", "id": NaN}\n', "bad-request"),
        (b'{"op": "status", "id": {"a": 1}}\n', "bad-request"),
        (b'{"op": "show", "jid": "12"}\n', "bad-request"),
        (b'{"op": "show", "jid": true}\n', "bad-request"),
        (b'{"op": "show", "jid": -5}\n', "bad-request"),
        (b'{"op": "show", "jid": 1.5}\n', "bad-request"),
        (b'{"op": "show", "jid": 99999999999999999999999}\n', "bad-request"),
        (b'{"op": "show", "jid": 1}\n', "no-such-job"),
        (b'{"op": "attach", "jid": 1, "pids": []}\n', "bad-request"),
        (b'{"op": "attach", "jid": 1, "pids": [0]}\n', "bad-request"),
        (b'{"op": "create", "name": "a\\u0007b"}\n', "bad-request"),
        (b'{"op": "create", "tags": {"a=b": "c"}}\n', "bad-request"),
        (b'{"op": "create", "tags": ["x"]}\n', "bad-request"),
        (b'{"op": "kill", "jid": 1, "signal": "SIGNOPE"}\n', "bad-request"),
        (b'{"op": "kill", "jid": 1, "signal": 0}\n', "bad-request"),
        (b'{"op": "wait", "jid": 1, "timeout": -1}\n', "bad-request"),
        (b'{"op": "jobof", "pid": 1}\n', "not-in-job"),
        (b'{"op": "create", "pids": [2147483000]}\n', "no-such-process"),
        (b"\xff\xfe\xfd\n", "bad-request"),
        (b"[" * 60000 + b"\n", "bad-request"),  # deep nesting: RecursionError, not internal
    ]
    for line, code in cases:
        c.send(line)
        assert err(c.reply()) == code, line[:60]
    # Blank lines are ignored; the connection still works.
    c.send(b"\n  \n\t\n")
    r = c.call("status", id="after")
    assert r["ok"] and r["id"] == "after"
    # The failed create with a dead pid left no job behind.
    assert c.call("list", all=True)["result"] == []


def test_oversized_lines_are_refused_and_skipped(elsad):
    d = elsad(extra="[limits]\nmax_request_bytes = 1024\n")
    c = RawConn(d.socket)
    # Complete oversized line in one write.
    c.send(b'{"op":"status","pad":"' + b"x" * 5000 + b'"}\n')
    assert err(c.reply()) == "too-large"
    assert c.call("status")["ok"]
    # An unfinished line growing past the limit, in pieces: answered as soon as it
    # passes the limit, then skipped up to its newline.
    c.send(b'{"op":"status","pad":"' + b"y" * 2000)
    assert err(c.reply()) == "too-large"
    for _ in range(20):
        c.send(b"z" * 4000)
    c.send(b'"}\n{"op":"hello","id":7}\n')
    r = c.reply()
    assert r["ok"] and r["id"] == 7 and r["result"]["protocol"] == 1
    st = c.call("status")["result"]
    assert st["control"]["too_large"] == 2


def test_pipelined_requests_are_answered_in_order(elsad):
    d = elsad()
    c = RawConn(d.socket)
    n = 2000  # more than one turn's budget, and several recv() buffers
    c.send(b"".join(json.dumps({"op": "jobof" if i % 2 else "hello", "pid": 1, "id": i})
                    .encode() + b"\n" for i in range(n)))
    ids = [c.reply().get("id") for _ in range(n)]
    assert ids == list(range(n))
    st = c.call("status")["result"]["control"]
    assert st["deferred_turns"] > 0  # the server did yield to the event loop


def test_a_pipelined_pair_is_handled_in_one_turn_past_the_time_budget(elsad):
    """The turn budget (2 ms) never splits two pipelined requests (a launcher's
    attach + create), so they share a commit; a third waits for the next turn."""
    from elsa.core.server import TURN_BUDGET

    d = elsad()
    c = RawConn(d.socket)
    # Jobs enough that a list takes the daemon well over the budget (1,000 took
    # ~10 ms on the 2-core VM).
    jobs = 0
    while True:
        c.send(b"".join(json.dumps({"op": "create", "name": f"j{i}"}).encode() + b"\n"
                        for i in range(1000)))
        assert all(c.reply()["ok"] for _ in range(1000))
        jobs += 1000
        t0 = time.monotonic()
        c.request({"op": "list"})
        c.line()
        if time.monotonic() - t0 > 4 * TURN_BUDGET:
            break
        if jobs >= 10000:
            pytest.fail(f"a list of {jobs} jobs still took under {4 * TURN_BUDGET} s")

    def deferred() -> int:
        return c.call("status")["result"]["control"]["deferred_turns"]

    before = deferred()
    c.send(b'{"op":"list"}\n{"op":"hello"}\n')
    assert [c.reply()["ok"] for _ in range(2)] == [True, True]
    assert deferred() == before
    c.send(b'{"op":"list"}\n{"op":"list"}\n{"op":"hello"}\n')
    assert [c.reply()["ok"] for _ in range(3)] == [True, True, True]
    assert deferred() == before + 1


def test_half_close_without_final_newline_is_answered(elsad):
    d = elsad()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(d.socket)
    s.sendall(b'{"op":"hello","id":1}\n{"op":"status","id":2}')
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    lines = [json.loads(x) for x in data.splitlines()]
    assert [x["id"] for x in lines] == [1, 2] and all(x["ok"] for x in lines)
    # The same with requests that change state (their replies wait for the store).
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(d.socket)
    s.sendall(b'{"op":"create","id":1}\n{"op":"hello","id":2}\n{"op":"create","id":3}')
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    lines = [json.loads(x) for x in data.splitlines()]
    assert [x["id"] for x in lines] == [1, 2, 3] and all(x["ok"] for x in lines)


def test_idle_and_slow_loris_connections_are_closed(elsad):
    d = elsad(extra="[limits]\nidle_timeout = 1.0\n")
    idle = RawConn(d.socket)
    loris = RawConn(d.socket)
    t0 = time.monotonic()
    loris.send(b'{"op":')
    # Keep the unfinished line "active": one byte every 0.3 s. It must still be
    # closed about idle_timeout after the line began.
    closed_at = None
    while time.monotonic() - t0 < 5:
        try:
            loris.send(b" ")
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic() - t0
            break
        time.sleep(0.3)
    assert closed_at is not None and closed_at < 3.0
    assert idle.at_eof(timeout=3)
    st = d.call("status")["control"]
    assert st["idle_closed"] >= 2


# -- wait, kill, end -------------------------------------------------------------------------

def test_wait_timeout_and_end(elsad, spawned):
    d = elsad()
    p = sleeper(spawned)
    c = RawConn(d.socket)
    job = c.call("create", name="w", pids=[p.pid])["result"]
    jid = job["jid"]
    assert re.fullmatch(r"0x[0-9a-f]{16}", jid) and job["pids"] == [p.pid]
    # timeout 0: immediate answer
    r = c.call("wait", jid=jid, timeout=0)["result"]
    assert r["ended"] is False and r["job"]["state"] == "running"
    # a timed wait answers after about its timeout
    t0 = time.monotonic()
    r = c.call("wait", jid=jid, timeout=0.5)["result"]
    elapsed = time.monotonic() - t0
    assert r["ended"] is False and 0.45 <= elapsed < 1.5
    # an open-ended wait is answered when another client ends the job; meanwhile
    # this connection is not closed by the idle limit and other requests work
    c.request({"op": "wait", "jid": jid, "id": "w1"})
    other = RawConn(d.socket)
    assert other.call("status")["ok"]
    ended = other.call("end", jid=jid)["result"]
    assert ended["state"] == "ended" and ended["ended"] is not None
    r = c.reply()
    assert r["id"] == "w1" and r["result"]["ended"] is True
    assert r["result"]["job"]["state"] == "ended"
    # members are detached, not killed
    assert pid_alive(p.pid)
    # on an ended job: immediate
    assert c.call("wait", jid=jid)["result"]["ended"] is True
    assert err(c.call("end", jid=jid)) == "bad-job-state"
    assert err(c.call("attach", jid=jid, pids=[p.pid])) == "bad-job-state"
    assert c.call("pids", jid=jid)["result"] == {"jid": jid, "state": "ended", "pids": []}


def test_a_wait_answered_ended_finds_the_end_committed(elsad):
    """A script that waits for its job, then reports from the store, finds the job
    ended: the reply comes after the commit (both when the wait was waiting and when
    the job had just ended as it came)."""
    d = elsad()
    c = RawConn(d.socket)
    for _ in range(6):
        p = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE)
        jid = c.call("create", pids=[p.pid])["result"]["jid"]
        c.request({"op": "wait", "jid": jid, "id": "w"})
        p.stdin.close()
        p.wait()
        r = c.reply()
        assert r["id"] == "w" and r["result"]["ended"] is True
        db = sqlite3.connect(os.path.join(d.state_dir, "elsa.db"))
        try:
            row = db.execute("SELECT state FROM jobs WHERE jid = ?", (parse_jid(jid),)).fetchone()
        finally:
            db.close()
        assert row == ("ended",)


def test_pipelined_waits_are_capped_per_connection(elsad, spawned):
    d = elsad()
    p = sleeper(spawned)
    c = RawConn(d.socket)
    jid = c.call("create", pids=[p.pid])["result"]["jid"]
    c.send(b"".join(json.dumps({"op": "wait", "jid": jid, "id": i}).encode() + b"\n"
                    for i in range(100)))
    # The 36 beyond the cap are refused at once (in order); 64 stay outstanding.
    refused = [c.reply() for _ in range(36)]
    assert [r["id"] for r in refused] == list(range(64, 100))
    assert {err(r) for r in refused} == {"limit"}
    assert c.call("status")["result"]["control"]["waiters"] == 64
    RawConn(d.socket).call("end", jid=jid)
    ended = [c.reply() for _ in range(64)]
    assert sorted(r["id"] for r in ended) == list(range(64))
    assert all(r["result"]["ended"] for r in ended)


def test_wait_reply_while_client_vanished_does_not_hurt(elsad, spawned):
    d = elsad()
    p = sleeper(spawned)
    job = d.call("create", pids=[p.pid])
    for _ in range(20):
        c = RawConn(d.socket)
        c.request({"op": "wait", "jid": job["jid"]})
        c.close()
    wait_for(lambda: d.call("status")["control"]["waiters"] == 0, 5,
             what="waiters of vanished clients to go")
    assert d.call("end", jid=job["jid"])["state"] == "ended"


def test_kill_signals_every_member_and_the_job_ends(elsad, spawned):
    d = elsad()
    p = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    spawned.append(p)
    with d.client() as c:
        job = c.create(name="k", pids=[p.pid])
        jid = job["jid"]
        # The sleeps may have forked before the attach: attach whatever is there.
        kids = wait_for(lambda: _children(p.pid) if len(_children(p.pid)) == 2 else None,
                        what="two sleeps")
        c.attach(jid, kids)
        assert sorted(c.pids(jid)) == sorted([p.pid, *kids])
        res = c.kill(jid, "KILL")
        assert res["signal"] == signal.SIGKILL and res["signalled"] == 3
        assert res["skipped"] == 0
        done = c.wait(jid, timeout=10)
        assert done["ended"] is True and done["job"]["state"] == "ended"
    for pid in kids:
        wait_for(lambda pid=pid: not pid_alive(pid), what=f"{pid} to die")


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


# -- status counters ---------------------------------------------------------------------------

def test_status_counts_events_losses_and_resyncs(elsad, spawned):
    """Force real event loss: stop the daemon, fork a storm into a tiny buffer, resume."""
    d = elsad(extra="netlink_rcvbuf = 4096\n")
    gate = subprocess.Popen(["sh", "-c", "read x; sleep 300 & wait"], stdin=subprocess.PIPE,
                            start_new_session=True)
    spawned.append(gate)
    with d.client() as c:
        job = c.create(name="lossy", pids=[gate.pid])
        before = c.status()
    assert before["resyncs"] >= 1  # the recovery pass at start-up
    # (With a 4 KiB buffer, other activity on the machine may overflow it too:
    # compare with the counters before the storm, not with zero.)
    lost_before = sum(before["lost_events"].values())
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        gate.stdin.write(b"go\n")
        gate.stdin.flush()
        storm = subprocess.run(["sh", "-c", "for i in $(seq 400); do /bin/true; done"])
        assert storm.returncode == 0
        sleep_pid = wait_for(lambda: (_children(gate.pid) or [None])[0], what="the sleep")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    with d.client() as c:
        st = wait_for(lambda: (lambda s: s if s["resyncs"] > before["resyncs"] else None)(
            c.status()), what="a resync after the loss")
        assert sum(st["lost_events"].values()) > lost_before
        assert st["loss_notices"] > before["loss_notices"]
        assert st["events"] > before["events"]
        # The fork we missed was recovered from /proc ancestry.
        assert sleep_pid in c.pids(job["jid"])


def test_attaching_a_member_again_is_a_quick_no_op(elsad, spawned):
    """A child that joined by its fork event, then attached explicitly: no second
    membership (the store once miscounted that and stalled every flush for 10 s)."""
    d = elsad()
    gate = subprocess.Popen(["sh", "-c", "read x; sleep 300 & wait"], stdin=subprocess.PIPE,
                            start_new_session=True)
    spawned.append(gate)
    with d.client(timeout=5) as c:
        jid = c.create(pids=[gate.pid])["jid"]
        gate.stdin.write(b"go\n")
        gate.stdin.flush()
        kid = wait_for(lambda: (_children(gate.pid) or [None])[0], what="the sleep")
        wait_for(lambda: kid in c.pids(jid), what="the sleep to join by its fork")
        t0 = time.monotonic()
        res = c.attach(jid, [kid])
        assert res["attached"][0]["pid"] == kid
        c.create(name="after")  # a durable create right after must not stall either
        assert time.monotonic() - t0 < 2.0
        assert sorted(c.pids(jid)) == sorted([gate.pid, kid])


def _replies_per_send(trace: List[str]) -> List[int]:
    """How many replies each of elsad's traced sends carried (strace escapes the
    JSON's quotes)."""
    return [line.count('\\"ok\\":') for line in trace if line.startswith("sendto(")]


@pytest.mark.skipif(not shutil.which("strace"),
                    reason="needs strace (packaging/ci-apt-packages.txt)")
def test_replies_released_by_one_commit_share_one_send(elsad, tmp_path):
    """Durable replies wait for the store's commit; those one commit releases for a
    connection leave in one send, so a pipelining client (a launcher's attach of job
    k with the create of job k+1) wakes once. Counted with strace on the real daemon."""
    d = elsad()
    c = RawConn(d.socket)
    c.call("hello")
    out = tmp_path / "strace.out"
    tracer = subprocess.Popen(["strace", "-qq", "-e", "trace=sendto", "-s", "4096",
                               "-o", str(out), "-p", str(d.proc.pid)],
                              stderr=subprocess.PIPE)
    try:
        # strace is attached once elsad's next send shows in its output.
        wait_for(lambda: c.call("hello") and out.exists() and "sendto(" in out.read_text(),
                 what="strace to attach to elsad")
        per_send = []
        for attempt in range(3):
            before = len(out.read_text().splitlines())
            # Two durable creates in one write: one commit (group commit) holds both.
            c.send(b"".join(json.dumps({"op": "create", "name": f"pair{attempt}", "id": i})
                            .encode() + b"\n" for i in range(2)))
            assert [c.reply()["id"] for _ in range(2)] == [0, 1]
            c.call("hello")  # a reply after them: their sends are in the trace by now
            lines = out.read_text().splitlines()[before:]
            per_send = [n for n in _replies_per_send(lines) if n]
            if per_send[:1] == [2]:
                break  # (a timed commit may split the pair: then retry)
        assert per_send[:1] == [2], f"replies per send: {per_send}"
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
        c.close()


def _a_kernel_thread() -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == 2:
                        return int(entry)
            except (OSError, IndexError, ValueError):
                continue
    pytest.skip("no kernel thread found")


def test_init_and_kernel_threads_join_no_job_even_for_root(elsad):
    d = elsad()
    c = RawConn(d.socket)
    r = c.call("create", name="init", pids=[1])
    assert err(r) == "bad-request" and "init or a kernel thread" in r["error"]["message"]
    assert c.call("list")["result"] == []  # the refused create left no job
    jid = c.call("create", name="k")["result"]["jid"]
    assert err(c.call("attach", jid=jid, pids=[_a_kernel_thread()])) == "bad-request"
    assert c.call("pids", jid=jid)["result"]["pids"] == []
