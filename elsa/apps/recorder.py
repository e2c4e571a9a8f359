"""The daemon side of application accounting: exec events in, app_runs rows out.

At each exec event elsad reads, at once and on the event thread, what /proc
says about the new image: the resolved ``/proc/PID/exe`` and the device and
inode of the file it points to (a replaced or deleted binary is told apart),
``stat`` (comm, ppid, start time, CPU so far), the owner of ``/proc/PID``
(real and effective uid/gid where they are equal; ``status`` otherwise) and
``io`` (bytes so far), through the procfs adapter (``ProcFS.exec_facts``). These
are small kernel-generated files: reading them never waits on a disk. The CPU and
I/O read at an exec are both the end figures of the image it replaced and the
base of the new one, except for an exec right after the fork, which counts from
zero (:data:`FORK_EXEC_S`), and a process read only after it ended, whose figures
are its end ones.

An image ends at the process's next exec (figures: /proc then minus /proc at
its own exec; its peak RSS is gone with its address space, so NULL) or at its
exit. The last image's figures come from the process's exit record (taskstats,
else bsdacct) minus the base: the record arrives on another socket, in either
order with the exit event, so the row waits ``exit_wait`` seconds for it. The
aggregator hands the recorder every usage row it stores (:meth:`on_usage`): a
row is offered to the ending images of its pid, and kept a few seconds
(:data:`RECENT_S`) for an exit event not read yet; the best source's record
(elsa.core.usage priorities, the first to arrive among equals) gives the
figures. Matching in memory, not by joining the stored row, spares
the store an index of every process by pid (each process paid for it at
insert, more as the history grew: docs/accounting.md, "Store writes") and
gives figures to the processes a ``[thresholds]`` fold keeps no row of.

A process gone before elsad read /proc keeps what could be read (a zombie
still has comm and ids) and ``path_status`` says why the path is unknown: the
record is never dropped. Reading /proc is a race with the process: if the
process exec'd again before elsad read the first image, /proc shows the second
one. The exec event is stamped after the kernel switched the image
(docs/kernel.md, "cn_proc"), so an image whose read
ended later than :data:`REPLACED_MARGIN_NS` before the next exec's stamp may
show the next image: its path is recorded as unknown (``replaced``), never
as a wrong binary.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from elsa.apps import record
from elsa.apps.options import glob_regex
from elsa.apps.packages import PackageIndex
from elsa.core import usage
from elsa.core.attribution import TASKSTATS_TOLERANCE_TICKS
from elsa.core.listener import EventListener, ListenerContext
from elsa.core.model import CLOCK_TICKS
from elsa.core.usage import ROW_FIELDS, UsageRow
from elsa.errors import ElsaError
from elsa.kernel.procfs import (
    F_COMM,
    F_DELETED,
    F_DEV,
    F_EGID,
    F_EUID,
    F_INO,
    F_PATH,
    F_PPID,
    F_RBYTES,
    F_START,
    F_STATUS,
    F_STIME,
    F_UID,
    F_UTIME,
    F_WBYTES,
    boottime_offset_ns,
)
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.apps")

#: An image whose /proc read ended less than this before the next exec's
#: kernel stamp may have been read after the switch (the kernel loads the new
#: binary between the switch and the stamp: tens of µs; 2 ms is generous).
REPLACED_MARGIN_NS = 2_000_000
#: A process's first image that began at most this long after the process itself (the
#: usual fork and exec) takes zero as its base: the kernel starts a child's CPU and I/O
#: counters at zero, and what it used before the exec fits in that time, usually
#: microseconds. /proc read at the exec event would be later by up to the event window
#: and count the image's first milliseconds as the base, and a process read only after
#: it ended shows its end figures (everything), not a base. With /proc's start time
#: (clock ticks) the test is "at most one tick apart"; with none (the process was
#: reaped before the read) the exit record's elapsed time dates the fork.
FORK_EXEC_S = 2 / CLOCK_TICKS
_ZERO_BASE = (0, 0, 0, 0)
_NO_BASE = (None, None, None, None)


def _at_fork(exec_boot_ns: int, start_ticks: int) -> bool:
    """An exec (kernel stamp, ns since boot) came right after its process's fork."""
    return exec_boot_ns * CLOCK_TICKS // 1_000_000_000 - start_ticks < FORK_EXEC_S * CLOCK_TICKS

_ELAPSED = ROW_FIELDS.index("elapsed_us")
_EXTRA = ROW_FIELDS.index("extra")
_COMM = ROW_FIELDS.index("comm")
#: Binaries learnt from resolved reads, (device, inode) -> path: a program gone before
#: elsad read /proc is named by its exit record's device and inode (taskstats v12+,
#: docs/kernel.md). Bounded: cleared when full (a storm runs few binaries).
BINARIES_MAX = 4096
#: ... and a binary never seen is looked for under its command name (the exit record's
#: comm) in the directories of root's default PATH, taken only when a file there has that
#: device and inode: a short `make` in a build elsad has not seen before.
SEARCH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
SWEEP_INTERVAL = 60.0
FLUSH_INTERVAL = 1.0
#: After a burst hold ends, the exit records it kept waiting are read, attributed and
#: queued to the store within this; a last image due meanwhile waits for them.
HOLD_SETTLE = 1.0
#: ... but at most this many times exit_wait in all, so back-to-back holds under a
#: sustained storm cannot grow the queue without bound.
MAX_EXIT_WAITS = 4

_N = len(record.NAMES)
# Row positions (elsa.apps.record.COLUMNS order).
(R_HOST_ID, R_BOOT_ID, R_PID, R_START_TICKS, R_EXEC_NS, R_HOSTNAME, R_JID, R_PPID, R_EXEC_TIME,
 R_END_TIME, R_END_REASON, R_EXE_PATH, R_EXE_DEV, R_EXE_INO, R_EXE_DELETED, R_PATH_STATUS, R_COMM,
 R_UID, R_EUID, R_GID, R_EGID, R_EXIT_CODE, R_EXIT_SIGNAL, R_CPU_USER_US, R_CPU_SYSTEM_US,
 R_MAX_RSS_KB, R_READ_BYTES, R_WRITE_BYTES, R_FIGURES_SOURCE, R_PACKAGE, R_PACKAGE_VERSION,
 R_ARGV) = range(len(record.NAMES))
assert record.NAMES[R_ARGV] == "argv" and record.NAMES[R_CPU_USER_US] == "cpu_user_us"

_COLS = ", ".join(record.NAMES)
INSERT = (f"INSERT OR REPLACE INTO {record.TABLE}({_COLS}) "
          f"VALUES ({', '.join('?' * _N)})")



#: A usage row is the exit record of an ending image's process when its pid is the
#: image's, its start ticks, where it has them, within the taskstats tolerance of the
#: image's (elsa.core.attribution) and its end within END_WINDOW_S of the exit event (an
#: end time computed from the boot time can be a second off: docs/kernel.md,
#: "taskstats").
END_WINDOW_S = 5.0
#: A usage row is kept this long, at least (at most twice), for an exit event not yet
#: read: the aggregator may store a record whose process's exec and exit events still
#: wait on the proc connector's socket (its fork event was read, so it is attributed).
#: With a prompt listener those events are read at once, so a second is already long;
#: the rows kept (which the store's writer would have let go: about 0.9 KB each, with
#: their values) cost up to 4 MB per 1,000 processes a second.
RECENT_S = 2.0

# Usage row positions beyond those the aggregator reads (elsa.core.usage.SRC, PID, ...).
_U_UID, _U_GID, _U_COMM, _U_MAX_RSS = (ROW_FIELDS.index(n) for n in (
    "uid", "gid", "comm", "max_rss_kb"))
#: (record position, index of its base read at the exec, usage row position): the
#: figures a last image takes from its exit record.
_FIGURES = tuple((R, b, ROW_FIELDS.index(record.NAMES[R])) for R, b in (
    (R_CPU_USER_US, 0), (R_CPU_SYSTEM_US, 1), (R_READ_BYTES, 2), (R_WRITE_BYTES, 3)))


class _Image:
    """One open program image: its row so far and the figures read at its exec."""

    __slots__ = ("row", "base", "read_ns")

    def __init__(self, row: List[Any], base: Optional[Tuple[Optional[int], ...]],
                 read_ns: int) -> None:
        self.row = row
        # utime_us, stime_us, read_bytes, write_bytes at the exec; None: /proc was not
        # read (gone): zero if the exit record shows an exec at the fork, else unknown.
        self.base = base
        self.read_ns = read_ns


class _Ending:
    """A last image waiting until *due* for its process's exit record."""

    __slots__ = ("due", "row", "base", "record", "rank")

    def __init__(self, due: float, row: List[Any],
                 base: Optional[Tuple[Optional[int], ...]]) -> None:
        self.due = due
        self.row = row
        self.base = base
        self.record: Optional[UsageRow] = None  # the best exit record so far
        self.rank = 0

    def offer(self, rec: UsageRow, prios: Mapping[str, int]) -> None:
        """Keep *rec* if it is this process's exit record from a better source."""
        row = self.row
        start = row[R_START_TICKS]
        rstart = rec[usage.START_TICKS]
        if (start >= 0 and rstart is not None
                and abs(rstart - start) > TASKSTATS_TOLERANCE_TICKS) \
                or abs(rec[usage.END] - row[R_END_TIME]) > END_WINDOW_S:
            return
        rank = usage.priority(rec[usage.SRC], prios)
        if self.record is None or rank < self.rank:
            self.record, self.rank = rec, rank

    def final(self) -> List[Any]:
        """The row to store: the exit record's figures minus the base read at the exec
        (none without a record); comm, ids, job and start from the record where /proc
        had none."""
        row, rec = self.row, self.record
        if rec is None:
            return row
        base = self.base
        if base is None:
            elapsed = rec[_ELAPSED]
            at_fork = (elapsed is not None and row[R_END_TIME] is not None and
                       row[R_EXEC_TIME] - (row[R_END_TIME] - elapsed / 1e6) <= FORK_EXEC_S)
            base = _ZERO_BASE if at_fork else _NO_BASE
        for r, b, u in _FIGURES:
            v = rec[u]
            row[r] = None if v is None or base[b] is None else max(0, v - base[b])
        row[R_MAX_RSS_KB] = rec[_U_MAX_RSS]
        row[R_FIGURES_SOURCE] = rec[usage.SRC]
        for r, u in ((R_COMM, _U_COMM), (R_UID, _U_UID), (R_GID, _U_GID), (R_JID, usage.JID)):
            if row[r] is None:
                row[r] = rec[u]
        if row[R_START_TICKS] < 0 and rec[usage.START_TICKS] is not None:
            row[R_START_TICKS] = rec[usage.START_TICKS]
        return row


class AppRecorder(EventListener):
    """Keeps one open image per process; writes a record when an image ends."""

    name = "apps"
    prompt = True

    def __init__(self, ctx: ListenerContext, options: Dict[str, Any],
                 packages: Optional[PackageIndex] = None) -> None:
        self.ctx = ctx
        self.options = options
        self.facts = ctx.procfs.exec_facts
        self.job_of = ctx.job_of
        self.store = ctx.store
        self.uids = frozenset(options["uids"])
        self.min_uid = options["min_uid"]
        self.include = glob_regex(options["include"])
        self.exclude = glob_regex(options["exclude"])
        self.argv = glob_regex(options["argv"])
        self.exit_wait = options["exit_wait"]
        self.prompt = options["prompt"]
        self.packages = packages if packages is not None else PackageIndex(options["packages"])
        self.open: Dict[int, _Image] = {}
        self.done: List[List[Any]] = []          # rows ready to write
        self.ended: List[_Ending] = []           # last images in due order
        self.ending: Dict[int, List[_Ending]] = {}  # the same, by pid
        # Usage rows by pid, in two generations that turn over every RECENT_S.
        self.recent: Dict[int, List[UsageRow]] = {}
        self.recent_old: Dict[int, List[UsageRow]] = {}
        self.recent_since = time.monotonic()
        self.sources_held = ctx.sources_held
        self.settled_at = 0.0  # monotonic time by which a hold's held records are stored
        self.hostname = socket.gethostname()
        self.mono_to_wall = time.time() - time.monotonic()
        self.mono_to_boot_ns = boottime_offset_ns()
        self.prios = dict(ctx.source_priority)
        self.binaries: Dict[Tuple[int, int], str] = {}
        self.not_found: Set[Tuple[int, int, str]] = set()  # searched for in vain
        self.counters = {"execs": 0, "records": 0, "resolved": 0, "gone": 0, "inode": 0,
                         "replaced": 0, "denied": 0, "excluded": 0, "lost": 0, "reopened": 0}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.packages.start()
        self._reopen()
        self.ctx.add_timer(FLUSH_INTERVAL, self.flush, "apps-flush", active=self._has_work)
        self.ctx.add_timer(SWEEP_INTERVAL, self.sweep, "apps-sweep")

    def _reopen(self) -> None:
        """Images left open by the previous elsad: carry on with those whose
        process still runs; the others ended unseen ('lost')."""
        db = self.store.db
        rows = db.execute(f"SELECT {_COLS} FROM {record.TABLE} WHERE end_reason = 'open' "
                          "AND host_id = ?", (self.ctx.host_id,)).fetchall()
        lost = []
        for r in rows:
            row = list(r)
            pid, start = row[R_PID], row[R_START_TICKS]
            alive = False
            if row[R_BOOT_ID] == self.ctx.boot_id:
                try:
                    info = self.ctx.procfs.info(pid)
                    alive = not info.exited and abs(info.start_ticks - start) <= 1
                except Exception:
                    alive = False
            if alive and pid not in self.open:
                # The base read at the exec was not kept; an image begun with its
                # process (a job's program) counts from zero, as at its exec.
                base = _ZERO_BASE if _at_fork(row[R_EXEC_NS], start) else _NO_BASE
                self.open[pid] = _Image(row, base, 0)
                self.counters["reopened"] += 1
            else:
                row[R_END_REASON] = "lost"
                lost.append(row)
        if lost:
            self.store.submit_many(INSERT, lost)
            self.counters["lost"] += len(lost)

    def stop(self) -> None:
        for img in self.open.values():
            self.done.append(img.row)  # end_reason 'open', end_time NULL
        self.open.clear()
        self.flush(force=True)

    def status(self) -> Dict[str, Any]:
        return {**self.counters, "open_images": len(self.open),
                "waiting_exit_records": len(self.ended), "packages": self.packages.status()}

    # -- events (event thread) ----------------------------------------------------------------
    def on_exec(self, pid: int, tgid: int, ts_ns: int) -> None:
        self.counters["execs"] += 1
        prev = self.open.pop(tgid, None)
        f = self.facts(tgid)
        read_ns = time.monotonic_ns()
        start = f[F_START]
        exec_boot_ns = ts_ns + self.mono_to_boot_ns
        if prev is not None:
            prow = prev.row
            pstart = prow[R_START_TICKS]
            if start is not None and pstart >= 0 and abs(start - pstart) > 1:
                # Another process under the same pid: the exit was not seen.
                prow[R_END_REASON] = "lost"
                self.counters["lost"] += 1
                self.done.append(prow)
            else:
                self._end_by_exec(prev, f, ts_ns)
        if not self._uid_admits(f[F_UID] if f[F_UID] is not None else f[F_EUID]):
            self.counters["excluded"] += 1
            return
        path = f[F_PATH]
        if path is not None and f[F_INO] is not None and not f[F_DELETED]:
            # Also a binary the filters exclude: a later run of it gone before the
            # read is then known as excluded, not kept as an unknown program.
            self._learn(f[F_DEV], f[F_INO], path)
        if path is not None and not self._admits(path):
            self.counters["excluded"] += 1
            return
        row: List[Any] = [None] * _N
        row[R_HOST_ID] = self.ctx.host_id
        row[R_BOOT_ID] = self.ctx.boot_id
        row[R_PID] = tgid
        row[R_START_TICKS] = -1 if start is None else start
        row[R_EXEC_NS] = exec_boot_ns
        row[R_HOSTNAME] = self.hostname
        row[R_JID] = self.job_of(tgid)
        row[R_PPID] = f[F_PPID]
        row[R_EXEC_TIME] = ts_ns / 1e9 + self.mono_to_wall
        row[R_END_REASON] = "open"
        row[R_EXE_PATH:R_PATH_STATUS + 1] = f[F_PATH:F_STATUS + 1]
        row[R_COMM] = f[F_COMM]
        row[R_UID:R_EGID + 1] = f[F_UID:F_EGID + 1]
        if path is not None:
            owner = self.packages.owners.get(path)
            if owner is not None:
                row[R_PACKAGE], row[R_PACKAGE_VERSION] = owner
            if self.argv is not None and self.argv.match(path):
                row[R_ARGV] = self._argv(tgid)
                # The read of the image ends here: a next exec within the margin of
                # it may have given the next image's command line.
                read_ns = time.monotonic_ns()
        base: Optional[Tuple[Optional[int], ...]]
        if prev is None and start is None:
            base = None  # reaped before the read: the exit record dates its fork
        elif prev is None and _at_fork(exec_boot_ns, start or 0):
            base = _ZERO_BASE  # exec'd right after its fork
        elif f[F_STATUS] == "gone":
            base = _NO_BASE  # read after it ended: its end figures, not the exec's
        else:
            base = (f[F_UTIME], f[F_STIME], f[F_RBYTES], f[F_WBYTES])
        self.open[tgid] = _Image(row, base, read_ns)

    def _end_by_exec(self, img: _Image, f: Tuple[Any, ...], ts_ns: int) -> None:
        row = img.row
        row[R_END_TIME] = ts_ns / 1e9 + self.mono_to_wall
        row[R_END_REASON] = "exec"
        if ts_ns <= img.read_ns + REPLACED_MARGIN_NS:
            # /proc may have shown the next image: keep nothing read from it.
            row[R_EXE_PATH:R_EXE_DELETED + 1] = [None, None, None, None]
            row[R_PATH_STATUS] = "replaced"
            row[R_COMM] = row[R_EUID] = row[R_EGID] = None  # they change at an exec
            row[R_PACKAGE] = row[R_PACKAGE_VERSION] = row[R_ARGV] = None
            self._count(row)
            self.done.append(row)
            return
        b = img.base
        if b is None or f[F_STATUS] == "gone":
            # No base, or read after the process ended: the figures would include the
            # next image's.
            self._count(row)
            self.done.append(row)
            return
        now = (f[F_UTIME], f[F_STIME], f[F_RBYTES], f[F_WBYTES])
        if now[0] is not None and b[0] is not None:
            row[R_CPU_USER_US] = max(0, now[0] - b[0])
            row[R_CPU_SYSTEM_US] = max(0, now[1] - b[1])
            row[R_FIGURES_SOURCE] = "procfs"
        if now[2] is not None and b[2] is not None:
            row[R_READ_BYTES] = max(0, now[2] - b[2])
            row[R_WRITE_BYTES] = max(0, now[3] - b[3])
            row[R_FIGURES_SOURCE] = "procfs"
        self._count(row)
        self.done.append(row)

    def on_exit(self, pid: int, tgid: int, exit_status: int, ts_ns: int) -> None:
        if pid != tgid:
            return  # a thread; the process ends with its leader
        img = self.open.pop(tgid, None)
        if img is None:
            return
        row = img.row
        row[R_END_TIME] = ts_ns / 1e9 + self.mono_to_wall
        row[R_END_REASON] = "exit"
        row[R_EXIT_CODE] = (exit_status >> 8) & 0xFF
        row[R_EXIT_SIGNAL] = exit_status & 0x7F
        self._count(row)
        end = _Ending(time.monotonic() + self.exit_wait, row, img.base)
        for recent in (self.recent_old, self.recent):
            for rec in recent.get(tgid, ()):
                end.offer(rec, self.prios)
        self.ended.append(end)
        self.ending.setdefault(tgid, []).append(end)

    def on_usage(self, rows: List[UsageRow]) -> None:
        """Exit records (every process's, as the aggregator stores them): offered to
        the pid's ending images, and kept RECENT_S for an exit event still unread."""
        ending, recent = self.ending, self.recent
        for rec in rows:
            pid = rec[usage.PID]
            waiting = ending.get(pid)
            if waiting is not None:
                for end in waiting:
                    end.offer(rec, self.prios)
            kept = recent.get(pid)
            if kept is None:
                recent[pid] = [rec]
            else:
                kept.append(rec)

    def _count(self, row: List[Any]) -> None:
        self.counters[row[R_PATH_STATUS]] += 1

    def _argv(self, pid: int) -> Optional[str]:
        args = self.ctx.procfs.argv(pid)
        return None if args is None else json.dumps(args)

    # -- writing (event thread queues; the store's writer thread commits) --------------------
    def _has_work(self) -> bool:
        """Whether :meth:`flush` has rows to write or maps to age."""
        return bool(self.done or self.ended or self.recent or self.recent_old)

    def flush(self, force: bool = False) -> None:
        if time.monotonic() - self.recent_since >= RECENT_S:
            self.recent_old, self.recent = self.recent, {}
            self.recent_since = time.monotonic()
        if self.done:
            rows, self.done = self.done, []
            self.store.submit_many(INSERT, rows)
            self.counters["records"] += len(rows)
        if not self.ended:
            return
        now = time.monotonic()
        if self.sources_held():
            self.settled_at = now + HOLD_SETTLE
        # While a hold keeps the exit records unread, only rows overdue by all their
        # waits go (without figures).
        ready = now if now >= self.settled_at else now - (MAX_EXIT_WAITS - 1) * self.exit_wait
        if force or self.ended[0].due <= ready:
            n = len(self.ended) if force else next(
                (i for i, end in enumerate(self.ended) if end.due > ready), len(self.ended))
            due, self.ended = self.ended[:n], self.ended[n:]
            for end in due:
                pid = end.row[R_PID]
                waiting = self.ending[pid]
                waiting.remove(end)
                if not waiting:
                    del self.ending[pid]
            rows = []
            for end in due:
                # A process reaped before the read had no uid at its exec: its exit
                # record gives the real uid, which the uid filters judge as at an exec.
                uid_read = end.row[R_UID] is not None
                row = end.final()
                if end.row[R_PATH_STATUS] == "gone" and end.record is not None \
                        and not self._binary(row, end.record):
                    admitted = False  # its binary is one the filters exclude
                else:
                    admitted = uid_read or self._uid_admits(row[R_UID])
                if not admitted:
                    self.counters[row[R_PATH_STATUS]] -= 1  # counted at its end
                    self.counters["excluded"] += 1
                    continue
                rows.append(row)
            if rows:
                self.store.submit_many(INSERT, rows)
            self.counters["records"] += len(rows)

    def _uid_admits(self, uid: Optional[int]) -> bool:
        """The uid filters let *uid* in (an unknown uid always)."""
        return uid is None or not ((self.uids and uid not in self.uids) or uid < self.min_uid)

    def _admits(self, path: str) -> bool:
        """The include and exclude filters let *path* in."""
        return ((self.include is None or self.include.match(path) is not None)
                and (self.exclude is None or self.exclude.match(path) is None))

    def _learn(self, dev: int, ino: int, path: str) -> None:
        if len(self.binaries) >= BINARIES_MAX:
            self.binaries.clear()
        self.binaries[(dev, ino)] = path

    def _binary(self, row: List[Any], rec: UsageRow) -> bool:
        """A gone last image's binary from its exit record: the device and inode it
        names, and the path of an earlier resolved run of that file while the path
        still names it (a file replaced at the path since has another inode), else
        the file of its command name in SEARCH_DIRS with that device and inode.
        False: that binary is one the filters exclude (the row is not to be stored)."""
        extra = rec[_EXTRA]
        if not extra or '"exe_inode"' not in extra:
            return True
        try:
            ids = json.loads(extra)
            dev, ino = int(ids["exe_dev"]), int(ids["exe_inode"])
        except (ValueError, KeyError, TypeError):
            return True
        if not ino:
            return True
        row[R_EXE_DEV], row[R_EXE_INO] = dev, ino
        known = self.binaries.get((dev, ino))
        path = known if known is not None else self._search(rec[_COMM], dev, ino)
        if path is None:
            return True
        if known is not None:
            try:
                st = os.stat(path)
            except OSError:
                return True
            if (st.st_dev, st.st_ino) != (dev, ino):
                return True
        if not self._admits(path):
            return False
        row[R_EXE_PATH], row[R_EXE_DELETED], row[R_PATH_STATUS] = path, 0, "inode"
        self.counters["gone"] -= 1
        self.counters["inode"] += 1
        owner = self.packages.owners.get(path)
        if owner is not None:
            row[R_PACKAGE], row[R_PACKAGE_VERSION] = owner
        return True

    def _search(self, comm: str, dev: int, ino: int) -> Optional[str]:
        """The file named *comm* in SEARCH_DIRS whose device and inode are these (then
        remembered as a resolved binary)."""
        key = (dev, ino, comm)
        if not comm or "/" in comm or key in self.not_found:
            return None
        for directory in SEARCH_DIRS:
            path = os.path.join(directory, comm)
            try:
                st = os.stat(path)
            except (OSError, ValueError):  # ValueError: a NUL in a source's comm
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                # As /proc/PID/exe names it: /bin is a link to /usr/bin on merged-/usr
                # systems, and the filters match the path a live read gives.
                path = os.path.realpath(path)
                self._learn(dev, ino, path)
                return path
        # Not there: a program run from elsewhere, many times too briefly to be read,
        # costs the search once.
        if len(self.not_found) >= BINARIES_MAX:
            self.not_found.clear()
        self.not_found.add(key)
        return None

    def sweep(self) -> None:
        """Images whose exit event was lost (ENOBUFS): their process is gone."""
        gone = []
        for tgid, img in self.open.items():
            try:
                start: Optional[int] = self.ctx.procfs.ident(tgid).start_ticks
            except (ElsaError, ValueError, IndexError):  # gone (or a line not parsed)
                start = None
            known = img.row[R_START_TICKS]
            if start is None or (known >= 0 and abs(start - known) > 1):
                gone.append(tgid)
        for tgid in gone:
            row = self.open.pop(tgid).row
            row[R_END_REASON] = "lost"
            self.counters["lost"] += 1
            self.done.append(row)
