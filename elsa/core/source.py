"""The accounting-source interface (BSD acct, taskstats, cgroup stats, third parties).

A source turns kernel accounting into :class:`UsageRecord` values and hands
them to the daemon through :attr:`SourceContext.emit`; the aggregator ties each
record to its job. All methods run on the daemon's event thread and must not
block for long: read what is ready, return.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Mapping, Optional

from elsa.config import Option
from elsa.core.model import Job
from elsa.core.procfs import ProcFS


@dataclass(frozen=True)
class UsageRecord:
    """Usage of one process (or, with ``jid`` set and ``pid == 0``, one whole job)
    as one source saw it. Units are fixed: µs, KiB, bytes, counts. ``None``
    means the source does not measure that metric."""

    source: str
    pid: int
    start_ticks: Optional[int] = None  # identity; None when the source cannot tell
    jid: Optional[int] = None          # set by job-level sources (cgroupstat)
    ppid: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    comm: str = ""
    start_time: Optional[float] = None  # epoch seconds
    end_time: Optional[float] = None    # epoch seconds
    exit_code: Optional[int] = None
    cpu_user_us: Optional[int] = None
    cpu_system_us: Optional[int] = None
    elapsed_us: Optional[int] = None
    max_rss_kb: Optional[int] = None
    max_vm_kb: Optional[int] = None
    read_bytes: Optional[int] = None
    write_bytes: Optional[int] = None
    read_chars: Optional[int] = None
    write_chars: Optional[int] = None
    minflt: Optional[int] = None
    majflt: Optional[int] = None
    nvcsw: Optional[int] = None
    nivcsw: Optional[int] = None
    coremem_kb_us: Optional[int] = None  # RSS integral, KiB·µs
    virtmem_kb_us: Optional[int] = None
    extra: Mapping[str, int] = field(default_factory=dict)
    final: bool = True  # False for interim job-level readings that later ones supersede


@dataclass
class SourceContext:
    """What the daemon hands a source when it starts."""

    options: Mapping[str, object]  # the validated [sources.<name>] table
    procfs: ProcFS
    state_dir: str
    emit: Callable[[Iterable[UsageRecord]], None] = lambda records: None
    # Running jobs as the manager knows them (snapshots, without pids).
    jobs: Callable[[], Iterable[Job]] = lambda: ()
    # Mark a job's usage incomplete (e.g. records lost to ENOBUFS); jid None:
    # every job that may have lost records (running, or with members that
    # exited recently).
    flag_incomplete: Callable[[Optional[int], str], None] = lambda jid, why: None
    # Run a callback once every record emitted so far is committed to the
    # store (a file follower persists its offset then: a restart neither loses
    # nor doubles records). The default runs it at once (no store).
    when_stored: Callable[[Callable[[], None]], None] = lambda cb: cb()
    extra: Dict[str, object] = field(default_factory=dict)


class Source(abc.ABC):
    """A producer of usage records."""

    name: str = ""
    #: Seconds between :meth:`poll` calls, or ``None`` to never poll.
    interval: Optional[float] = None

    def start(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    def fileno(self) -> Optional[int]:
        """A descriptor the event loop watches; :meth:`on_readable` runs when it is readable."""
        return None

    def on_readable(self) -> None:
        """Read what is ready on :meth:`fileno` and emit records."""

    def poll(self) -> None:
        """Periodic work (every :attr:`interval` seconds)."""

    def job_ending(self, job: Job) -> None:
        """Take final readings of *job* before the backend removes its kernel object."""

    def stop(self) -> None:
        """Flush and release resources."""

    @abc.abstractmethod
    def status(self) -> Dict[str, object]:
        """Counters for the ``status`` request (records, lost, errors...)."""


@dataclass(frozen=True)
class SourceSpec:
    """A source as a plugin declares it in ``elsa_sources``."""

    name: str
    factory: Callable[[], Source]
    options: Mapping[str, Option] = field(default_factory=dict)
    description: str = ""
