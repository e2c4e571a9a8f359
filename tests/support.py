"""Shared test fixtures that are not pytest fixtures: golden kernel samples, a
stand-in for the job manager's resolver, and the kernel accounting lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

DATA = Path(__file__).parent / "data"


def taskstats_golden_messages() -> List[bytes]:
    """tests/data/taskstats_v16_exit_thread_group.bin: three exit datagrams this
    kernel (6.18, struct v16) sent for a python3 process with two extra
    threads, each prefixed by its length (u32 LE)."""
    raw = (DATA / "taskstats_v16_exit_thread_group.bin").read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


class FakeManager:
    """Membership: pid -> [(start_ticks, jid)], like JobManager.resolve."""

    def __init__(self) -> None:
        self.members: Dict[int, List[Tuple[int, int]]] = {}

    def resolve(self, pid: int, start: Optional[int], tol: int) -> Optional[int]:
        for s, jid in self.members.get(pid, ()):
            if start is None or abs(s - start) <= tol:
                return jid
        return None


KACCT_LOCK = "/tmp/elsa-kacct.lock"


def _ancestors() -> List[int]:
    out, pid = [], os.getpid()
    while pid > 1:
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            break
        pid = int(data[data.rfind(b")") + 2:].split()[1])
    return out


def _held_by_ancestor(path: str) -> bool:
    """Whether a process we descend from holds the flock on *path* (a suite run
    under `flock /tmp/elsa-kacct.lock pytest ...`): taking it again would wait
    for ourselves."""
    try:
        st = os.stat(path)
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    mine = set(_ancestors())
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == ident:
            if f[4].isdigit() and int(f[4]) in mine:
                return True
    return False


@contextlib.contextmanager
def kernel_acct_lock(timeout: float = 600.0) -> Iterator[None]:
    """The machine-wide lock of kernel BSD accounting (acct(2) is one file for
    the whole machine), unless a parent process of this test run holds it."""
    if _held_by_ancestor(KACCT_LOCK):
        yield
        return
    fd = os.open(KACCT_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{KACCT_LOCK} still locked after {timeout} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)
