"""Shared test fixtures that are not pytest fixtures: golden kernel samples and
a stand-in for the job manager's resolver."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
