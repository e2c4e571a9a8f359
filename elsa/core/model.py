"""Frozen value types shared by the core, the backends and the sources.

Kernel names and byte layouts never appear here: the adapters (cnproc, procfs,
taskstats, pacct, cgroupfs) convert to these types at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

#: USER_HZ: the unit of /proc/PID/stat start times (clock ticks). It is 100 on
#: every Linux architecture userspace sees (docs/kernel.md, "procfs").
CLOCK_TICKS = 100

#: Start times taken from a cn_proc fork timestamp are estimates: the kernel
#: stamps the event a few microseconds after setting task->start_boottime, so a
#: 10 ms tick boundary may fall in between. Two identities match when their
#: start times differ by at most this many ticks; a pid cannot be reused within
#: 20 ms without cycling through pid_max other pids first.
START_TOLERANCE_TICKS = 1


@dataclass(frozen=True)
class ProcessId:
    """A process identity: pid plus start time (ticks since boot).

    A bare pid is not an identity: pids are reused. The boot is implied (the
    store records the boot id and drops every identity from another boot).
    """

    pid: int
    start_ticks: int

    def same_process(self, other: ProcessId) -> bool:
        """True when *other* is this process (start times within tolerance)."""
        return (self.pid == other.pid
                and abs(self.start_ticks - other.start_ticks) <= START_TOLERANCE_TICKS)


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc says about one live process."""

    pid: int
    ppid: int
    start_ticks: int
    uid: int  # owner of /proc/PID: the effective uid (see ProcFS.info)
    comm: str
    sid: int = 0
    pgid: int = 0
    state: str = "R"  # proc(5) state letter; "Z"/"X": exited, not yet reaped
    #: A zombie's wait status (proc(5) field 52, Linux 3.5), else None.
    exit_code: Optional[int] = None

    @property
    def exited(self) -> bool:
        """A zombie has exited (its exit event was sent); only its pid is held."""
        return self.state in ("Z", "X")

    @property
    def ident(self) -> ProcessId:
        return ProcessId(self.pid, self.start_ticks)


JOB_RUNNING = "running"
JOB_ENDED = "ended"


@dataclass(frozen=True)
class Job:
    """A snapshot of one job. The job manager owns the mutable state."""

    jid: int
    name: str
    owner_uid: int
    tags: Tuple[Tuple[str, str], ...]
    created: float
    ended: Optional[float]
    state: str
    backend: str
    pids: Tuple[int, ...] = ()
    # Backend-specific settings (e.g. cpuset cpus/mems, cgroup path).
    params: Mapping[str, str] = field(default_factory=dict)

    def to_json(self, with_pids: bool = True) -> dict:
        """The stable JSON form used by the protocol and ``--json`` output."""
        out = {
            "jid": self.jid, "name": self.name, "owner_uid": self.owner_uid,
            "state": self.state, "created": self.created, "ended": self.ended,
            "tags": dict(self.tags), "backend": self.backend, "params": dict(self.params),
        }
        if with_pids:
            out["pids"] = list(self.pids)
        return out


def format_jid(jid: int) -> str:
    """Job ids are shown in hex, as CSA showed them (host id in the high half)."""
    return f"{jid:#018x}"


def parse_jid(text: str) -> int:
    """Accept a job id in hex (0x…) or decimal."""
    text = text.strip()
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        raise ValueError(f"not a job id: {text!r} (expected 0x… hex or a decimal number)") from None
    if not 0 < value < 2 ** 63:
        raise ValueError(f"job id out of range: {text!r}")
    return value
