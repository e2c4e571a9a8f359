"""The accounting-source interface (BSD acct, taskstats, cgroup stats, third parties).

A source turns kernel accounting into :class:`UsageRecord` values and hands
them to the daemon through :attr:`SourceContext.emit`; the aggregator ties each
record to its job. All methods run on the daemon's event thread and must not
block for long: read what is ready, return.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from elsa.config import Option
from elsa.core.model import Job
from elsa.kernel.procfs import ProcFS


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


#: The per-process *usage row*: a plain tuple in this order, exactly the
#: columns of the store's ``proc_usage`` table (``extra`` is compact JSON or
#: None). Sources on the hot path (taskstats, bsdacct: one record per process
#: on the machine) build rows straight from kernel bytes and hand them to
#: :attr:`SourceContext.emit_rows`, skipping a frozen dataclass per process
#: (issue 6: elsad's CPU per process). :class:`UsageRecord` stays the
#: interface for everything else; :func:`record_row` and :func:`row_record`
#: convert, and both forms give identical rows.
ROW_FIELDS = ("source", "jid", "pid", "start_ticks", "start_time", "end_time", "ppid", "uid",
              "gid", "comm", "exit_code", "cpu_user_us", "cpu_system_us", "elapsed_us",
              "max_rss_kb", "max_vm_kb", "read_bytes", "write_bytes", "read_chars",
              "write_chars", "minflt", "majflt", "nvcsw", "nivcsw", "coremem_kb_us",
              "virtmem_kb_us", "extra")
UsageRow = Tuple[Any, ...]


def record_row(rec: UsageRecord, jid: Optional[int]) -> UsageRow:
    """The usage row of a per-process record (end time now when unknown)."""
    end = rec.end_time
    if end is None:
        end = time.time()
    return (rec.source, jid, rec.pid, rec.start_ticks, rec.start_time, end, rec.ppid, rec.uid,
            rec.gid, rec.comm, rec.exit_code, rec.cpu_user_us, rec.cpu_system_us,
            rec.elapsed_us, rec.max_rss_kb, rec.max_vm_kb, rec.read_bytes, rec.write_bytes,
            rec.read_chars, rec.write_chars, rec.minflt, rec.majflt, rec.nvcsw, rec.nivcsw,
            rec.coremem_kb_us, rec.virtmem_kb_us,
            json.dumps(dict(rec.extra), separators=(",", ":")) if rec.extra else None)


def row_record(row: Sequence[Any]) -> UsageRecord:
    """The :class:`UsageRecord` of a usage row (the inverse of :func:`record_row`)."""
    kw = dict(zip(ROW_FIELDS, row))
    extra = kw.pop("extra")
    return UsageRecord(**kw, extra=json.loads(extra) if extra else {})


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
    # The hot path: emit_rows(source, rows) with rows in ROW_FIELDS order. The
    # default converts them to records for ``emit`` (tests, tools).
    emit_rows: Optional[Callable[[str, List[UsageRow]], None]] = None

    def __post_init__(self) -> None:
        if self.emit_rows is None:
            self.emit_rows = lambda source, rows: self.emit([row_record(r) for r in rows])


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
