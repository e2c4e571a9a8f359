"""The accounting-source interface (BSD acct, taskstats, cgroup stats, third parties).

A source turns kernel accounting into :class:`UsageRecord` values and hands
them to the daemon through :attr:`SourceContext.emit`; the aggregator ties each
record to its job. All methods run on the daemon's event thread and must not
block for long: read what is ready, return.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Protocol

from elsa.config import Option
from elsa.core.model import Job
from elsa.core.usage import ROW_FIELDS, UsageRecord, UsageRow, record_row, row_record
from elsa.kernel.procfs import ProcFS

__all__ = ["ROW_FIELDS", "GapFn", "UsageRecord", "UsageRow", "record_row", "row_record",
           "Source", "SourceContext", "SourceSpec"]


class GapFn(Protocol):
    """SourceContext.gap: *lost* completes "<source> records lost to ..." for the
    ``status`` reply (e.g. "a socket overflow (ENOBUFS)"); empty: no cause told."""

    def __call__(self, start: float, end: float, lost: str = "") -> None: ...


def _no_gap(start: float, end: float, lost: str = "") -> None:
    return None


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
    # Record for the reports that this source missed records from *start* to *end*
    # (epoch seconds; e.g. records lost to ENOBUFS), so that the processes only
    # other sources saw then are counted (elsa.core.usage, "its gaps"). Returns at
    # once: the store's writer thread writes it. A gap that begins before the
    # source's previous one ended (or shortly after) extends that one. ``status``
    # shows the latest ones with *lost*, what the records were lost to (GapFn).
    gap: GapFn = _no_gap
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
    #: Seconds the event loop leaves :meth:`fileno` unwatched after each
    #: :meth:`on_readable`, so that one wake-up reads a batch of what the kernel
    #: queued meanwhile; 0: a wake-up whenever it is readable.
    read_window: float = 0.0

    def start(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    def fileno(self) -> Optional[int]:
        """A descriptor the event loop watches; :meth:`on_readable` runs when it is readable."""
        return None

    def on_readable(self) -> None:
        """Read what is ready on :meth:`fileno` and emit records."""

    def poll(self) -> None:
        """Periodic work (every :attr:`interval` seconds)."""

    def has_poll_work(self) -> bool:
        """Whether :meth:`poll` has work now; while False the event loop does not
        wake for it (an idle daemon sleeps). Called before each wait of the loop:
        keep it to a field test."""
        return True

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
    #: Rank of this source's figures where sources overlap (lower wins): the
    #: reports' and the aggregator's "best" figure per metric, and the source
    #: whose per-process records summaries count (elsa.core.usage).
    priority: int = 50
    #: Started without a [sources.<name>] table (``enabled = false`` turns it off).
    default_enabled: bool = False
    #: Whether the source still delivers, after a restart, what happened while
    #: elsad was not running (a pacct file with a saved offset, cumulative cgroup
    #: counters). A source that cannot (taskstats: nobody listened, nothing was
    #: queued) gets the jobs that ran meanwhile flagged incomplete with the gap.
    covers_downtime: bool = False
