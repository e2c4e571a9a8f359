"""The ``taskstats`` source: per-task exit records over generic netlink.

Registers a cpumask listener (docs/kernel.md, "taskstats") on a
socket with a large receive buffer, folds each process's threads into one
record (by tgid; see elsa/kernel/taskstats.py) and hands it to the aggregator.
Records the kernel drops when the buffer overflows (ENOBUFS on the next
recv) are counted, every job that may have lost one (running, or with
members that exited recently) is flagged incomplete rather than silently short,
and the interval in which they were lost is recorded as a gap of the source, so
that the reports count the processes only bsdacct saw then.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from elsa import hookimpl
from elsa.config import Option, non_negative, positive, rcvbuf_size
from elsa.core.source import Source, SourceContext, SourceSpec, UsageRecord
from elsa.kernel import taskstats
from elsa.kernel.taskstats_socket import TaskstatsSocket
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.source.taskstats")

NAME = "taskstats"




OPTIONS: Dict[str, Option] = {
    "cpumask": Option(str, "", "CPUs whose exits to listen to, in cpulist syntax (\"0-3\");"
                      " empty: every possible CPU."),
    "rcvbuf": Option(int, 64 * 1024 * 1024, "Receive buffer in bytes (SO_RCVBUFFORCE); exits"
                     " come in bursts and overflow drops records; at most 1 GiB.",
                     check=rcvbuf_size),
    "read_interval": Option(float, 0.25, "Seconds the socket is left unwatched after each"
                            " read of the exit records queued on it; 0: read as soon as one"
                            " arrives. Reading in batches saves a loop wake-up per exit"
                            " (elsad's CPU per process, issue 6); the receive buffer holds"
                            " the records meanwhile (64 MiB: tens of thousands). An idle"
                            " socket wakes nothing.", check=non_negative),
    "fold_timeout": Option(float, 30.0, "Seconds to wait for the last thread of a"
                           " multi-threaded process before giving up on it (its record was"
                           " lost) and storing what arrived, flagged incomplete.",
                           check=positive),
}


#: Checks for multi-threaded processes whose last record was lost: a sixth of
#: fold_timeout apart (5 s for the default 30 s), so one is flagged at most that
#: much late. The check runs (and wakes elsad) only while such a process is
#: pending, which on a server with long-lived thread pools is most of the time.
EXPIRE_CHECKS_PER_TIMEOUT = 6


class TaskstatsSource(Source):
    name = NAME
    interval: Optional[float] = 5.0  # set from fold_timeout at start

    def __init__(self) -> None:
        self.sock: Optional[TaskstatsSocket] = None
        self.folder = taskstats.ThreadFolder()
        self.records = 0
        self.tasks = 0
        self.expired = 0
        self.versions: Dict[int, int] = {}
        self._enobufs_seen = 0
        self.read_interval = 0.0

    def start(self, ctx: SourceContext) -> None:
        super().start(ctx)
        self.fold_timeout = float(ctx.options["fold_timeout"])  # type: ignore[arg-type]
        self.interval = self.fold_timeout / EXPIRE_CHECKS_PER_TIMEOUT
        self.read_interval = float(ctx.options.get("read_interval", 0.0))  # type: ignore[arg-type]
        self.read_window = self.read_interval  # batches: see OPTIONS
        self.sock = TaskstatsSocket(rcvbuf=int(ctx.options["rcvbuf"]))  # type: ignore[arg-type]
        self.sock.register(str(ctx.options["cpumask"]) or None)
        log.info("taskstats listener registered", cpumask=self.sock.cpumask,
                 rcvbuf=self.sock.rcvbuf, family=self.sock.family)

    def fileno(self) -> Optional[int]:
        return self.sock.fileno() if self.sock else None

    def on_readable(self) -> None:
        """Hot path (one call per batch of exits on the whole machine): the
        adapter turns a single-threaded process's record straight into its
        usage row (:func:`elsa.kernel.taskstats.exit_rows`); the records of
        multi-threaded processes go through the ThreadFolder, as tuples."""
        assert self.sock is not None
        versions = self.versions
        rows, tuples = self.sock.receive_rows(NAME, self.folder.pending, versions)
        self.tasks += len(rows) + len(tuples)
        if tuples:
            usage_row = taskstats.usage_row
            fold = self.folder.add_tuple
            for t in tuples:
                versions[t[0]] = versions.get(t[0], 0) + 1  # (version, pid, tgid, ...)
                proc = fold(t)
                if proc is not None:
                    rows.append(usage_row(proc, NAME))
        # Store what was read before flagging the loss: a failure there must
        # not cost the records that did arrive.
        if rows:
            self.records += len(rows)
            self.ctx.emit_rows(NAME, rows)
        self._check_loss()

    def _check_loss(self) -> None:
        assert self.sock is not None
        if self.sock.enobufs != self._enobufs_seen:
            lost = self.sock.enobufs - self._enobufs_seen
            self._enobufs_seen = self.sock.enobufs
            span = self.sock.take_lost()
            log.warning("taskstats records lost (receive buffer overflow)", overflows=lost,
                        total=self.sock.enobufs, lost_from=span and round(span[0], 3),
                        lost_to=span and round(span[1], 3))
            self.ctx.flag_incomplete(None, "taskstats records lost (ENOBUFS)")
            if span is not None:
                self.ctx.gap(*span, lost="a socket overflow (ENOBUFS)")

    def has_poll_work(self) -> bool:
        return bool(self.folder.pending)  # threads of a process whose last one is awaited

    def poll(self) -> None:
        stale = self.folder.expire(self.fold_timeout)
        if stale:
            self.expired += len(stale)
            recs = []
            for rec in stale:
                u = rec.to_usage(NAME)
                recs.append(UsageRecord(**{**u.__dict__,
                                           "extra": {**u.extra, "incomplete": 1}}))
            self.records += len(recs)
            self.ctx.emit(recs)

    def stop(self) -> None:
        if self.sock is not None:
            self.on_readable()
            self.poll()
            self.sock.close()
            self.sock = None

    def status(self) -> Dict[str, object]:
        return {"records": self.records, "tasks": self.tasks,
                "lost_enobufs": self.sock.enobufs if self.sock else self._enobufs_seen,
                "pending_processes": len(self.folder.pending), "expired": self.expired,
                "struct_versions": dict(self.versions),
                "rcvbuf": self.sock.rcvbuf if self.sock else None}


@hookimpl
def elsa_sources() -> List[SourceSpec]:
    return [SourceSpec(name=NAME, factory=TaskstatsSource, options=OPTIONS,
                       description="Per-process exit statistics from the kernel's taskstats"
                                   " netlink family (µs CPU, peak RSS, I/O bytes).",
                       priority=20, default_enabled=True)]
