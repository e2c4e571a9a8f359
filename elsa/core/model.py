"""Frozen value types shared by the core, the backends and the sources.

Kernel names and byte layouts never appear here: the adapters (cnproc, procfs,
taskstats, pacct, cgroupfs) convert to these types at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Dict, Mapping, Optional, Tuple, Union

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
            "jid": format_jid(self.jid), "name": self.name, "owner_uid": self.owner_uid,
            "state": self.state, "created": self.created, "ended": self.ended,
            "tags": dict(self.tags), "backend": self.backend, "params": dict(self.params),
        }
        if with_pids:
            out["pids"] = list(self.pids)
        return out


#: Job parameters holding the limits (docs/sacct.md, "Where the limits come from").
CPU_LIMIT = "cpu_limit"        # cores a CPU quota allows, decimal text: "1.5"
MEMORY_LIMIT = "memory_limit"  # bytes, decimal text
#: A quota is kept to this many places of a core: the kernel's quota is whole
#: microseconds of a period up to one second (cpu.max), 1e-6 of a core at best.
_CORE_PLACES = Decimal("0.000001")


@dataclass(frozen=True)
class JobLimits:
    """What a job's processes together were allowed: *cpus* cores of CPU time
    (a quota: 1.5 means one and a half CPUs' worth per period) and *memory*
    bytes. None: no limit (or none known). The cgroupfs adapter reads them from
    a cgroup; jobs keep them as parameters (:meth:`params`)."""

    cpus: Optional[Decimal] = None
    memory: Optional[int] = None

    def params(self) -> Dict[str, str]:
        """The job parameters holding these limits (a limit that is None: no key)."""
        out = {}
        if self.cpus is not None:
            out[CPU_LIMIT] = format(self.cpus.quantize(_CORE_PLACES).normalize(), "f")
        if self.memory is not None:
            out[MEMORY_LIMIT] = str(self.memory)
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> JobLimits:
        """The limits a job's parameters hold; a value that is not a positive
        number counts as no limit (stored jobs are read, never refused)."""
        memory = _positive(params.get(MEMORY_LIMIT))
        return cls(cpus=_positive(params.get(CPU_LIMIT)),
                   memory=int(memory) if memory is not None and memory % 1 == 0 else None)


def _positive(text: object) -> Optional[Decimal]:
    """A positive finite number written as text, else None."""
    if not isinstance(text, (str, int)) or isinstance(text, bool):
        return None
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() and value > 0 else None


def cores_allowed(params: Mapping[str, object]) -> Optional[Decimal]:
    """Cores a job could use at most: the CPUs of its cpuset (``cpus``), the
    cores its CPU quota allows (:class:`JobLimits`), the smaller where both are
    set; None when neither is (it could use every CPU of the host)."""
    from elsa.kernel.cgroupstats import parse_cpulist  # (the adapters import this module)

    found = []
    cpus = params.get("cpus")
    if isinstance(cpus, str) and cpus.strip():
        try:
            n = len(parse_cpulist(cpus))
        except ValueError:
            n = 0
        if n:
            found.append(Decimal(n))
    quota = JobLimits.from_params(params).cpus
    if quota is not None:
        found.append(quota)
    return min(found) if found else None


def format_jid(jid: int) -> str:
    """The one spelling of a job id: zero-padded hex, ``0x0035969e00000402``
    (docs/jobid.md). Commands, logs, tables, CSV, JSON and the wire protocol all
    carry this string; JSON never carries the 64-bit integer, which JavaScript
    and jq would round above 2^53."""
    return f"{jid:#018x}"


def parse_jid(text: Union[str, int]) -> int:
    """A job id from its hex string (``0x…``, padded or not) or decimal text.

    An ``int`` passes through (range-checked), for callers holding a number."""
    if isinstance(text, bool):
        raise ValueError(f"not a job id: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        if not isinstance(text, str):
            raise ValueError(f"not a job id: {text!r} (expected a string like 0x0035969e00000402)")
        stripped = text.strip()
        try:
            if "_" in stripped:  # int() takes 1_000; no job id is written so
                raise ValueError(stripped)
            value = (int(stripped, 16) if stripped.lower().startswith("0x")
                     else int(stripped, 10))
        except ValueError:
            raise ValueError(f"not a job id: {text!r} (expected 0x… hex or a decimal number)"
                             ) from None
    if not 0 < value < 2 ** 63:
        raise ValueError(f"job id out of range: {text!r}")
    return value


def split_exit(status: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
    """(exit code, signal) of a raw wait(2) status, as sacct shows ``code:signal``.

    taskstats and pacct both carry the kernel's ``task->exit_code``, which is a
    wait status: the low 7 bits are the terminating signal, bits 8–15 the code
    passed to exit(2). ``None`` (unknown) stays unknown."""
    if status is None:
        return None, None
    sig = status & 0x7F
    if sig:
        return 0, sig
    return (status >> 8) & 0xFF, 0


def format_exit(code: Optional[int], sig: Optional[int]) -> str:
    """``code:signal`` (``2:0`` exited 2, ``0:9`` killed by SIGKILL); ``-`` unknown."""
    if code is None and sig is None:
        return "-"
    return f"{code if code is not None else 0}:{sig if sig is not None else 0}"
