"""The backend conformance suite: a pytest plugin every grouping backend must pass.

It drives a **real** elsad subprocess (private socket and state directory)
with the backend under test through create -> attach -> inherit (nested fork,
double fork + setsid, threads are not processes) -> detach -> kill -> end ->
recover after ``kill -9`` of the daemon. It needs root and the real kernel
(the proc connector), like elsad itself.

Third-party backend authors run it against their backend::

    pytest -p elsa.testing --pyargs elsa.testing --elsa-backend NAME \\
        [--elsa-backend-config 'key = "value"']     # lines of [backends.NAME]

or subclass :class:`BackendConformance` in their own test module and provide
an ``elsa_backend`` fixture returning a :class:`BackendUnderTest` (with setup
and a cleanliness check, e.g. "no cgroup left behind")::

    from elsa.testing import BackendConformance, BackendUnderTest
    import pytest

    @pytest.fixture
    def elsa_backend():
        return BackendUnderTest("mybackend", config='base = "/tmp/x"')

    class TestMyBackend(BackendConformance):
        pass
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import pytest

from elsa.client import Client, RequestFailed
from elsa.errors import DaemonUnavailable, ElsaError
from elsa.kernel.procfs import ProcFS

# -- polling -------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
             what: Union[str, Callable[[], str]] = "condition") -> Any:
    """Poll *predicate* until it returns a truthy value or *timeout* passes.

    *what* names the condition in the timeout's message; a callable is called
    then, so the message can show what the polls saw."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            label = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {label}")
        time.sleep(interval)


def start_ticks(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat, or None when the process is gone."""
    try:
        return ProcFS().ident(pid).start_ticks
    except ElsaError:  # gone
        return None


def pid_alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        return not ProcFS().info(pid).exited
    except ElsaError:  # gone
        return False


# -- the daemon under test --------------------------------------------------------------------


class DaemonProc:
    """One elsad subprocess with a private config, socket and state directory."""

    def __init__(self, workdir: Path, backend: str = "cnproc", extra: str = "") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / "elsad.sock")
        self._socket_dir: Optional[str] = None
        if len(self.socket.encode()) > 100:
            # sun_path holds 108 bytes (unix(7)); deep pytest tmp paths exceed it.
            self._socket_dir = tempfile.mkdtemp(prefix="elsa-t-")
            self.socket = os.path.join(self._socket_dir, "elsad.sock")
        self.state_dir = str(workdir / "state")
        self.config_path = workdir / "elsa.toml"
        self.log_path = workdir / "elsad.log"
        self.config_path.write_text(
            f'backend = "{backend}"\nsocket = "{self.socket}"\n'
            f'state_dir = "{self.state_dir}"\nlog_level = "debug"\n' + extra)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 15.0) -> DaemonProc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elsa.elsad", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"elsad exited with {self.proc.returncode}:\n"
                                     + self.log_path.read_text()[-4000:])
            try:
                with Client(self.socket, timeout=2.0) as c:
                    c.status()
                return True
            except DaemonUnavailable:
                return False

        wait_for(ready, timeout, what="elsad to answer status")
        return self

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def call(self, op: str, **fields: Any) -> Any:
        with self.client() as c:
            return c.call(op, **fields)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            rc = self.proc.returncode if self.proc else 0
        else:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(timeout)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)  # elsad re-creates it
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()


# -- a controllable process tree ----------------------------------------------------------------

_HELPER = r'''
import json, os, sys, threading, time
out = sys.stdout
parent = os.getppid()
def reply(**kw):
    out.write(json.dumps(kw) + "\n"); out.flush()
def sleeper():
    # Dies with the test run even if teardown is skipped.
    for _ in range(3000):
        time.sleep(0.2)
        if not os.path.exists("/proc/%d" % parent):
            break
    os._exit(0)
def fork(body):
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid
reply(ready=os.getpid())
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "nested":
        r, w = os.pipe()
        def middle():
            os.write(w, b"%d\n" % fork(sleeper)); sleeper()
        mid = fork(middle)
        gc = int(os.read(r, 64)); os.close(r); os.close(w)
        reply(pids=[mid, gc])
    elif cmd == "daemon":
        r, w = os.pipe()
        def first():
            os.setsid(); os.write(w, b"%d\n" % fork(sleeper)); os._exit(0)
        f = fork(first)
        d = int(os.read(r, 64)); os.waitpid(f, 0); os.close(r); os.close(w)
        reply(pids=[d], exited=[f])
    elif cmd == "threads":
        ts = [threading.Thread(target=time.sleep, args=(600,), daemon=True)
              for _ in range(int(args[0]))]
        for t in ts:
            t.start()
        reply(tids=sorted(int(t) for t in os.listdir("/proc/self/task")))
    elif cmd == "child":
        reply(pids=[fork(sleeper)])
    elif cmd == "ping":
        reply(pong=True)
    elif cmd == "exit":
        reply(exiting=int(args[0])); os._exit(int(args[0]))
'''

PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


class Helper:
    """A helper process answering one JSON line per command on its stdin."""

    def __init__(self, tracker: List[Tuple[int, Optional[int]]]) -> None:
        self.tracker = tracker
        self.proc = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        self.pid = self.proc.pid
        self._buf = b""
        self.read(10.0)  # "ready": the interpreter is up, nothing forked yet
        self._track([self.pid])

    def _track(self, pids: List[int]) -> None:
        self.tracker.extend((p, start_ticks(p)) for p in pids)

    def read(self, timeout: float = 10.0) -> Optional[Dict[str, Any]]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"helper {self.pid} exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def send(self, *words: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((" ".join(map(str, words)) + "\n").encode())
        self.proc.stdin.flush()

    def cmd(self, *words: object, timeout: float = 10.0) -> Dict[str, Any]:
        self.send(*words)
        reply = self.read(timeout)
        if reply is None:
            raise AssertionError(f"helper {self.pid} did not answer {words!r} in {timeout} s")
        self._track(reply.get("pids", []))
        return reply


@dataclass
class BackendUnderTest:
    """A backend as the suite runs it.

    *config*: TOML lines for its ``[backends.<name>]`` table; *setup* runs before
    each daemon start and *check_clean* after each test, once the daemon stopped
    (e.g. "no job cgroup left"); *params*: job parameters for every create.
    """

    name: str
    config: str = ""
    setup: Callable[[], None] = lambda: None
    check_clean: Callable[[], None] = lambda: None
    params: Dict[str, str] = field(default_factory=dict)

    def extra_toml(self) -> str:
        return f"\n[backends.{self.name}]\n{self.config}\n" if self.config.strip() else ""


class Harness:
    """The daemon, the helper processes and their cleanup, for one test."""

    def __init__(self, backend: BackendUnderTest, workdir: Path) -> None:
        self.backend = backend
        self.workdir = workdir
        self.pids: List[Tuple[int, Optional[int]]] = []
        self.helpers: List[Helper] = []
        self.daemon: Optional[DaemonProc] = None
        self._libc = ctypes.CDLL(None, use_errno=True)
        # Orphans (double fork) are re-parented to us, not init, so we can reap them.
        self._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def start(self) -> DaemonProc:
        if self.daemon is None:
            self.backend.setup()
            self.daemon = DaemonProc(self.workdir, backend=self.backend.name,
                                     extra=self.backend.extra_toml())
        return self.daemon.start()

    def client(self) -> Client:
        assert self.daemon is not None
        return self.daemon.client()

    def helper(self) -> Helper:
        h = Helper(self.pids)
        self.helpers.append(h)
        return h

    def create(self, c: Client, pids: Optional[List[int]] = None, name: str = "conf") -> int:
        return c.create(name=name, pids=pids, params=dict(self.backend.params))["jid"]

    def close(self) -> None:
        # Kill what we started, by pid, checking it is still the same process.
        for pid, start in self.pids:
            if start is not None and start_ticks(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for h in self.helpers:
            try:
                h.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for f in (h.proc.stdin, h.proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
        self._reap()
        if self.daemon is not None and self.daemon.proc is not None \
                and self.daemon.proc.poll() is None:
            try:
                # Jobs end when their last member exits; let that happen first.
                with self.daemon.client() as c:
                    wait_for(lambda: not c.list(), 10, what="every job to end")
            except (AssertionError, DaemonUnavailable, RequestFailed):
                pass
            self.daemon.stop()
        self._libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return


# -- pytest plugin -----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("elsa", "ELSA backend conformance")
    group.addoption("--elsa-backend", default=None,
                    help="name of the backend to run the conformance suite against")
    group.addoption("--elsa-backend-config", default="",
                    help="TOML lines for the backend's [backends.NAME] table")


@pytest.fixture
def elsa_backend(request: pytest.FixtureRequest) -> BackendUnderTest:
    """The backend under test, from --elsa-backend (override this fixture to choose)."""
    try:
        name = request.config.getoption("--elsa-backend")
        config = request.config.getoption("--elsa-backend-config")
    except ValueError:
        name, config = None, ""
    if not name:
        pytest.skip("no backend chosen: pass --elsa-backend NAME (with -p elsa.testing)")
    return BackendUnderTest(name=name, config=config or "")


@pytest.fixture
def elsa_harness(elsa_backend: BackendUnderTest, tmp_path: Path) -> Iterator[Harness]:
    if os.geteuid() != 0:
        pytest.skip("the conformance suite needs root (elsad subscribes to the proc connector)")
    h = Harness(elsa_backend, tmp_path / "elsad")
    try:
        yield h
    finally:
        h.close()
    elsa_backend.check_clean()


def _pids(c: Client, jid: int) -> set:
    return set(c.pids(jid))


def _not_member(c: Client, pid: int) -> bool:
    try:
        c.jobof(pid)
    except RequestFailed as exc:
        return exc.code in ("no-such-job", "not-in-job")
    return False


class BackendConformance:
    """The suite. Collected for every ``Test*`` subclass (and ``TestElsaBackend`` below)."""

    def test_create_attach(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            st = c.status()
            assert st["backend"] == elsa_harness.backend.name
            jid = elsa_harness.create(c, pids=[h.pid])
            assert _pids(c, jid) == {h.pid}
            assert c.jobof(h.pid) == jid
            job = c.show(jid)
            assert job["state"] == "running" and job["backend"] == elsa_harness.backend.name
            # A second process attached later; a second job is independent.
            h2 = elsa_harness.helper()
            c.attach(jid, [h2.pid])
            assert _pids(c, jid) == {h.pid, h2.pid}
            other = elsa_harness.create(c)
            assert other != jid and _pids(c, other) == set()
            c.end(other)

    def test_inherit_nested_fork(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[h.pid])
            mid, gc = h.cmd("nested")["pids"]
            wait_for(lambda: _pids(c, jid) >= {h.pid, mid, gc}, 5,
                     what="child and grandchild to join")
            assert c.jobof(gc) == jid

    def test_inherit_double_fork_setsid(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[h.pid])
            r = h.cmd("daemon")
            (daemonized,) = r["pids"]
            # It left its session and its parent: still in the job.
            assert os.getsid(daemonized) != os.getsid(h.pid)
            wait_for(lambda: daemonized in _pids(c, jid), 5, what="the daemonized grandchild")
            wait_for(lambda: r["exited"][0] not in _pids(c, jid), 5,
                     what="the exited middle process to leave")

    def test_threads_are_not_processes(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[h.pid])
            tids = h.cmd("threads", 4)["tids"]
            assert len(tids) >= 5
            (child,) = h.cmd("child")["pids"]  # an event after the threads, to sync on
            wait_for(lambda: child in _pids(c, jid), 5, what="the child to join")
            assert _pids(c, jid) == {h.pid, child}

    def test_detach(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        stay, leave = elsa_harness.helper(), elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[stay.pid, leave.pid])
            c.detach([leave.pid])
            assert _not_member(c, leave.pid)
            assert _pids(c, jid) == {stay.pid}
            (later,) = leave.cmd("child")["pids"]
            (inside,) = stay.cmd("child")["pids"]
            wait_for(lambda: inside in _pids(c, jid), 5, what="the member's child to join")
            assert later not in _pids(c, jid) and _not_member(c, later)
            assert pid_alive(leave.pid)

    def test_kill(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[h.pid])
            pids = [h.pid, *h.cmd("nested")["pids"], *h.cmd("daemon")["pids"]]
            wait_for(lambda: _pids(c, jid) >= set(pids), 5, what="the tree to join")
            c.kill(jid, signal=signal.SIGKILL)
            wait_for(lambda: not any(pid_alive(p) for p in pids), 5,
                     what="every member to die")
            done = c.wait(jid, timeout=10)
            assert done["ended"] is True and done["job"]["state"] == "ended"

    def test_end_detaches_without_killing(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[h.pid])
            (child,) = h.cmd("child")["pids"]
            wait_for(lambda: child in _pids(c, jid), 5, what="the child to join")
            ended = c.end(jid)
            assert ended["state"] == "ended"
            assert pid_alive(h.pid) and pid_alive(child)
            assert _not_member(c, h.pid) and _not_member(c, child)
            (after,) = h.cmd("child")["pids"]
            assert _not_member(c, after)
            assert h.cmd("ping")["pong"]

    def test_last_exit_ends_job(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[h.pid])
            h.send("exit", 3)
            done = c.wait(jid, timeout=10)
            assert done["ended"] is True

    def test_recover_after_kill9(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        keep, gone = elsa_harness.helper(), elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[keep.pid], name="keep")
            jid_gone = elsa_harness.create(c, pids=[gone.pid], name="gone")
            (child,) = keep.cmd("child")["pids"]
            wait_for(lambda: child in _pids(c, jid), 5, what="the child to join")
        d.kill9()
        # While the daemon is down: a member forks, another job's last member exits.
        (born,) = keep.cmd("child")["pids"]
        gone.send("exit", 0)
        wait_for(lambda: not pid_alive(gone.pid), 5, what="the helper to exit")
        d.start()
        with d.client() as c:
            assert c.show(jid)["state"] == "running"
            assert _pids(c, jid) >= {keep.pid, child, born}
            assert c.show(jid_gone)["state"] == "ended"
            # Still tracking after the restart.
            (after,) = keep.cmd("child")["pids"]
            wait_for(lambda: after in _pids(c, jid), 5, what="a fork after restart")
            c.kill(jid, signal=signal.SIGKILL)
            assert c.wait(jid, timeout=10)["ended"] is True

    def test_freeze_thaw(self, elsa_harness: Harness) -> None:
        d = elsa_harness.start()
        h = elsa_harness.helper()
        with d.client() as c:
            jid = elsa_harness.create(c, pids=[h.pid])
            try:
                c.freeze(jid)
            except RequestFailed as exc:
                if exc.code == "backend":
                    pytest.skip(f"backend cannot freeze: {exc.message}")
                raise
            h.send("ping")
            assert h.read(timeout=0.5) is None, "a frozen process answered"
            c.thaw(jid)
            assert h.read(timeout=5)["pong"]


class TestElsaBackend(BackendConformance):
    """Collected by ``pytest -p elsa.testing --pyargs elsa.testing --elsa-backend NAME``."""
