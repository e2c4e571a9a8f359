"""Shared fixtures: a real elsad in a subprocess with its own socket and store.

Tests marked ``root`` need root and the real kernel interfaces (cn_proc,
cgroupfs, taskstats, acct); they are skipped elsewhere, and run in CI (root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from elsa.client import Client
from elsa.errors import DaemonUnavailable

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root and the real kernel interfaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> object:
    """Poll *predicate* until it returns a truthy value or *timeout* passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class DaemonProc:
    """One elsad subprocess with a private config, socket and state directory."""

    def __init__(self, workdir: Path, backend: str = "cnproc", extra: str = "") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / "elsad.sock")
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

    def call(self, op: str, **fields):
        with self.client() as c:
            return c.call(op, **fields)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def elsad(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Factory: ``elsad(backend="cnproc", extra="...toml lines...")`` starts a daemon."""
    started: List[DaemonProc] = []

    def start(backend: str = "cnproc", extra: str = "", workdir: Optional[Path] = None,
              ) -> DaemonProc:
        d = DaemonProc(workdir or tmp_path, backend=backend, extra=extra)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        try:
            d.stop()
        except Exception:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()


@pytest.fixture
def spawned() -> Iterator[List[subprocess.Popen]]:
    """Processes a test starts; killed by pid (and process group) at teardown."""
    procs: List[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
            p.wait(5)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False
