"""Robustness: >10,000 hostile requests plus slow and vanishing clients, while a job's
workload forks; afterwards elsad answers correctly and its event path lost nothing.

Safety (the fuzzer runs as root against a private daemon with the in-memory
``cnproc`` backend): every integer the generators produce is negative, or at least
pid_max, or at least 2^63, so a request can never name a live process or an
existing job (job ids are host_id << 32 | counter, below 2^63 and above 2^32).
"""

from __future__ import annotations

import json
import os
import random
import socket
import string
import subprocess
import threading
import time
from typing import Any, Dict, List, Set

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elsa.protocol import ERROR_CODES
from tests.conftest import wait_for
from tests.test_control_protocol import RawConn

pytestmark = pytest.mark.root

LIMIT = 4096
OPS = ["hello", "create", "attach", "detach", "jobof", "list", "show", "pids", "wait",
       "kill", "end", "status", "freeze", "thaw"]
FIELDS = ["jid", "pid", "pids", "name", "tags", "params", "owner_uid", "all", "limit",
          "timeout", "signal", "id", "v"]
WHITESPACE = b" \t\r\x0b\x0c"


def _pid_max() -> int:
    with open("/proc/sys/kernel/pid_max") as fh:
        return int(fh.read())


PID_MAX = _pid_max()


class Gen:
    """Random hostile request lines (one reply each: no '\\n' inside, never blank)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def safe_int(self) -> int:
        r = self.r
        return r.choice([
            lambda: -r.randrange(1, 2 ** 70),
            lambda: r.randrange(PID_MAX, 2 ** 31),
            lambda: r.randrange(2 ** 63, 2 ** 80),
            lambda: 0,
        ])()

    def value(self, depth: int = 0) -> Any:
        r = self.r
        kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
        kind = r.choice(kinds)
        if kind == "int":
            return self.safe_int()
        if kind == "float":
            return r.choice([0.5, -1.25, 1e300, -0.0, 3.0, 1e-9])
        if kind == "str":
            n = r.choice([0, 1, 5, 40, 300])
            return "".join(r.choice(string.printable + "\u00e9\u2603\x00\x07")
                           for _ in range(n))
        if kind == "bool":
            return r.random() < 0.5
        if kind == "null":
            return None
        if kind == "list":
            return [self.value(depth + 1) for _ in range(r.randrange(0, 5))]
        return {self.key(): self.value(depth + 1) for _ in range(r.randrange(0, 5))}

    def key(self) -> str:
        return self.r.choice(FIELDS + ["", "x", "op", "\u2603", "a=b"])

    def request(self) -> Dict[str, Any]:
        r = self.r
        req: Dict[str, Any] = {}
        if r.random() < 0.9:
            req["op"] = r.choice(OPS) if r.random() < 0.85 else self.value()
        for _ in range(r.randrange(0, 5)):
            req[r.choice(FIELDS)] = self.value()
        if "v" in req and r.random() < 0.7:
            req["v"] = 1
        return req

    def line(self) -> bytes:
        r = self.r
        kind = r.choices(["typed", "truncated", "random", "json", "oversized", "deep"],
                         weights=[40, 20, 15, 15, 4, 6])[0]
        if kind == "typed":
            data = json.dumps(self.request()).encode()
        elif kind == "truncated":
            full = json.dumps(self.request()).encode()
            data = full[: r.randrange(1, max(2, len(full)))]
        elif kind == "random":
            data = bytes(r.randrange(256) for _ in range(r.randrange(1, 200)))
        elif kind == "json":
            data = json.dumps(self.value()).encode()
        elif kind == "oversized":
            pad = "p" * r.randrange(LIMIT, 4 * LIMIT)
            data = json.dumps({"op": "status", "pad": pad}).encode()
        else:
            depth = r.randrange(100, LIMIT // 2)
            data = b"[" * depth + b"]" * r.randrange(0, depth)
        data = data.replace(b"\n", b" ")
        if not data.strip(WHITESPACE):
            data += b"?"
        return data + b"\n"


def _check_reply(line: bytes, sent: bytes, stats: Dict[str, int]) -> None:
    obj = json.loads(line)  # a reply is always valid JSON ...
    assert isinstance(obj, dict) and obj["v"] == 1, obj  # ... and an object
    if obj["ok"]:
        stats["ok"] += 1
        return
    code = obj["error"]["code"]
    assert code in ERROR_CODES and code != "internal", (code, obj, sent[:200])
    if len(sent) > LIMIT + 1:
        assert code == "too-large", sent[:100]
    stats[code] = stats.get(code, 0) + 1


def _descendants(pid: int) -> Set[int]:
    out: Set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except OSError:
            kids = []
        for k in kids:
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def test_fuzz_and_misbehaving_clients_leave_the_event_path_intact(elsad, spawned):
    d = elsad(extra=f"[limits]\nmax_request_bytes = {LIMIT}\nidle_timeout = 2.0\n"
                    "max_connections = 1000\n")
    # A job whose workload forks throughout the fuzz.
    forker = subprocess.Popen(
        ["sh", "-c", "read x; i=0; while [ $i -lt 100 ]; do sleep 300 & i=$((i+1)); "
                     "sleep 0.04; done; wait"],
        stdin=subprocess.PIPE, start_new_session=True)
    spawned.append(forker)
    with d.client() as c:
        job = c.create(name="workload", pids=[forker.pid])
        base = c.status()
    assert base["lost_events"]["enobufs"] == 0
    forker.stdin.write(b"go\n")
    forker.stdin.flush()

    stop = threading.Event()
    problems: List[str] = []
    latencies: List[float] = []

    def guard(fn):
        def run():
            try:
                fn()
            except Exception as exc:  # reported by the main thread
                problems.append(f"{fn.__name__}: {exc!r}")
        return threading.Thread(target=run, name=fn.__name__, daemon=True)

    def probe():
        # A well-behaved client must keep getting prompt answers.
        while not stop.is_set():
            t0 = time.monotonic()
            with d.client(timeout=10) as c:
                c.status()
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)

    lorises: List[socket.socket] = []

    def slow_loris():
        for i in range(10):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            s.sendall(b'{"op":"stat' if i % 2 else b'{"op":"status"')
            lorises.append(s)  # then silence

    def vanishing():
        for i in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            if i % 3 == 1:
                s.sendall(b'{"op":"list","all":true}\n')  # gone before the reply
            elif i % 3 == 2:
                s.sendall(json.dumps({"op": "wait", "jid": job["jid"]}).encode() + b"\n")
            s.close()

    def non_reader():
        # Pipelines requests and never reads a reply.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket)
        s.settimeout(1.0)
        chunk = b'{"op":"hello"}\n' * 2000
        try:
            for _ in range(50):
                s.sendall(chunk)
        except (socket.timeout, BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading us: that is the point
        lorises.append(s)

    threads = [guard(f) for f in (probe, slow_loris, vanishing, non_reader)]
    for t in threads:
        t.start()

    # The fuzzer proper: pipelined batches on one connection, one reply per line.
    gen = Gen(seed=int(os.environ.get("ELSA_FUZZ_SEED", "20240607")))
    fuzz = RawConn(d.socket, timeout=30)
    stats: Dict[str, int] = {"ok": 0}
    total = 0
    t0 = time.monotonic()
    while total < 10_000:
        batch = [gen.line() for _ in range(100)]
        fuzz.send(b"".join(batch))
        for sent in batch:
            line = fuzz.line()
            assert line is not None, "daemon closed the fuzz connection"
            _check_reply(line, sent, stats)
        total += len(batch)
    fuzz_seconds = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(30)
    assert problems == []
    print(f"fuzz: {total} requests in {fuzz_seconds:.1f} s; replies {stats}")
    assert stats.get("too-large", 0) > 100 and stats.get("bad-request", 0) > 3000
    assert max(latencies) < 1.0, f"status latency up to {max(latencies):.2f} s"

    # Slow clients are cut off (idle_timeout 2 s), the daemon still answers.
    def cut_off() -> bool:
        ctl = d.call("status")["control"]
        return ctl["idle_closed"] >= 10 and ctl["dropped_slow_clients"] >= 1
    try:
        wait_for(cut_off, 10, what="slow clients to be closed")
    except AssertionError:
        print(d.call("status")["control"])
        raise
    for s in lorises:
        s.close()
    wait_for(lambda: d.call("status")["control"]["connections"] <= 1
             and d.call("status")["control"]["waiters"] == 0, 10,
             what="connections to drain")

    # The event path lost nothing: every descendant of the forker is a member.
    wait_for(lambda: len(_descendants(forker.pid)) >= 100, 30, what="the forker's 100 sleeps")
    with d.client() as c:
        st = c.status()
        members = set(c.pids(job["jid"]))
    # elsad kept up with the kernel: no receive-buffer overflow. (The kernel itself
    # drops about 1 event in 40k when nlmsg_new(GFP_NOWAIT) fails, seen here as
    # seq_gap; that is no fault of the control path, and the resync it triggers
    # must still leave every member in place, checked below.)
    assert st["lost_events"]["enobufs"] == 0
    print(f"seq_gap {st['lost_events']['seq_gap']}, resyncs {st['resyncs']}, "
          f"events {st['events']}")
    alive = _descendants(forker.pid) | {forker.pid}
    assert alive <= members, f"missing members: {sorted(alive - members)[:10]}"
    assert st["counters"]["member_forks"] >= 100


@pytest.fixture
def fuzz_daemon(elsad):
    return elsad(extra=f"[limits]\nmax_request_bytes = {LIMIT}\n")


JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(max_value=-1) | st.integers(min_value=PID_MAX, max_value=2 ** 31 - 1)
    | st.integers(min_value=2 ** 63) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=4),
    max_leaves=6)


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(op=st.sampled_from(OPS) | JSON,
       fields=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5))
def test_hypothesis_wrong_typed_requests(fuzz_daemon, op, fields):
    conn = _conn(fuzz_daemon)
    req = dict(fields)
    req["op"] = op
    data = json.dumps(req).encode()
    conn.send(data + b"\n")
    line = conn.line()
    assert line is not None
    _check_reply(line, data, {"ok": 0})


_conns: Dict[str, RawConn] = {}


def _conn(daemon) -> RawConn:
    conn = _conns.get(daemon.socket)
    if conn is None:
        _conns.clear()
        conn = _conns[daemon.socket] = RawConn(daemon.socket)
    return conn

