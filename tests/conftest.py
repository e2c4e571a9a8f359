"""Shared fixtures: a real elsad in a subprocess with its own socket and store.

Tests marked ``root`` need root and the real kernel interfaces (cn_proc,
cgroupfs, taskstats, acct); they are skipped elsewhere, and run in CI (root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from elsa.testing import DaemonProc, pid_alive, wait_for

__all__ = ["DaemonProc", "pid_alive", "python_out", "wait_for"]  # tests import these from here

IS_ROOT = os.geteuid() == 0


def python_out(code: str) -> str:
    """The stdout of *code* run by this interpreter in a child process: for what
    a test must see from a fresh interpreter (imports) or must not change in the
    test run's own (nice values)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="session", autouse=True)
def _default_cgroup_base() -> Iterator[None]:
    """Tests that run elsad on its default configuration (backend auto, no base) make
    its default cgroup base; one the session made is removed after it (an empty
    cgroup: rmdir fails on one that holds anything)."""
    from elsa.backends.cgroup2 import DEFAULT_BASE_NAME
    from elsa.errors import ElsaError
    from elsa.kernel.cgroupfs import CgroupFS

    try:
        mount = CgroupFS().cgroup2_mount()
    except ElsaError:
        mount = None
    base = os.path.join(mount, DEFAULT_BASE_NAME) if mount else None
    made = base if base is not None and not os.path.isdir(base) else None
    yield
    if made is not None and os.path.isdir(made):
        try:
            os.rmdir(made)
        except OSError:
            pass  # a process or a job cgroup is still in it: left as it is


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root and the real kernel interfaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
def host_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Sets this process's time zone (``TZ``, as the host's) for the test; the
    machine's own is back afterwards."""
    import time

    def use(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield use
    monkeypatch.undo()
    time.tzset()
