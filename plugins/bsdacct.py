"""The ``bsdacct`` source: BSD process accounting (acct(2), pacct v3 files).

Two modes (``[sources.bsdacct] mode``):

* ``managed``: elsad switches kernel accounting to its own file under
  ``<state_dir>/pacct/`` with acct(2), follows it, and rotates it when it
  reaches ``rotate_size`` bytes: a new file is created, acct(2) switches to it
  (the kernel writes each record under the accounting lock, so after acct()
  returns nothing more goes to the old file — docs/kernel.md), and the old
  file is read to its end before it is deleted. On stop, accounting is
  switched back to the file that was active before (if one of
  ``probe_files`` was growing) or off — but only if elsad switched it on and
  still owns it.

  The kernel's accounting file is shared state: another ``accton FILE``
  (psacct's service, atop, a second elsad) takes it over without telling
  anyone. elsad notices: when its file stopped growing for ``ownership_check``
  seconds it forks one short child, whose exit the kernel must account
  (do_exit writes the record before the parent's wait returns); if that
  record does not land in elsad's file, accounting was displaced. elsad then
  says so in ``status`` (``displaced``), flags the running jobs incomplete for
  bsdacct, records a gap of bsdacct for the reports (from the last time its
  file is known to have been written, to the next start, when elsad takes
  accounting back; kept in ``<dir>/displaced.json`` across the restart), and
  never switches off or redirects accounting it no longer owns.
  The file that was active before elsad took over is kept in
  ``<dir>/previous.json`` with its size at that moment, so a stop after a
  crash (``kill -9``) still restores it.

  While elsad is stopped the kernel writes to the file a clean stop handed
  accounting back to (after a crash it writes to elsad's own, read at the next
  start). That stop keeps where the file then ended in ``<dir>/handback.json``,
  and the next start, once accounting is elsad's again, reads the file from there
  to its end: the processes that ended while elsad was stopped. Where that file
  cannot be read (accounting was off before elsad, or the file was rotated away
  and compressed), bsdacct missed that time and records it as its gap.
* ``external``: another tool (psacct/acct's service, atop) owns accounting;
  elsad follows ``file`` (default ``/var/log/account/pacct``) through its
  rotations and never calls acct(2).

Either way the follower persists (device, inode, offset) in the state dir
once the records read are committed to the store, so a restart neither loses
nor doubles records.

Only one accounting file exists per pid namespace (acct(2)); the kernel
pauses accounting below 2 % free disk and resumes at 4 % (/proc/sys/kernel/acct).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import time
from typing import Dict, List, Optional

from elsa import hookimpl
from elsa.config import Option, non_negative, positive
from elsa.core.source import Source, SourceContext, SourceSpec, UsageRow
from elsa.errors import AccountingFormatError, from_oserror
from elsa.jsonfile import read_object, write_atomic
from elsa.kernel.pacct_follower import PacctFollower
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.source.bsdacct")

NAME = "bsdacct"
DEFAULT_EXTERNAL = "/var/log/account/pacct"
#: What a displacement's gap lost its records to ("bsdacct records lost to ...": status).
TAKEOVER = "another program's takeover of kernel accounting (accton; {})"




def _abs_or_empty(v: object) -> Optional[str]:
    return None if v == "" or os.path.isabs(str(v)) else "must be an absolute path (or empty)"


OPTIONS: Dict[str, Option] = {
    "mode": Option(str, "managed", "'managed': elsad runs acct(2) on its own file and rotates"
                   " it; 'external': follow a file another tool manages.",
                   choices=("managed", "external")),
    "file": Option(str, "", "External mode: the pacct file to follow (empty: "
                   f"{DEFAULT_EXTERNAL}). Managed mode: the directory for elsad's files"
                   " (empty: <state_dir>/pacct).", check=_abs_or_empty),
    "rotate_size": Option(int, 64 * 1024 * 1024, "Managed mode: switch to a new file when the"
                          " current one reaches this many bytes (0: never).", check=non_negative),
    "keep_files": Option(int, 1, "Managed mode: fully read files kept after rotation.",
                         check=non_negative),
    "interval": Option(float, 1.0, "Seconds between reads of the accounting file.",
                       check=positive),
    "ownership_check": Option(float, 10.0, "Managed mode: seconds without a new record in"
                              " elsad's file after which it checks (one short child) that"
                              " kernel accounting still writes there.", check=positive),
    "probe_files": Option(list, [DEFAULT_EXTERNAL, "/var/account/pacct"],
                          "Managed mode: files checked at start for an accounting file"
                          " already in use (restored on stop).", item_type=str),
}


def _libc_acct(path: Optional[str]) -> None:
    """acct(2) through libc (os has no binding). ``None`` switches accounting off."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    arg = None if path is None else os.fsencode(path)
    if libc.acct(arg) != 0:
        err = ctypes.get_errno()
        raise from_oserror(OSError(err, os.strerror(err)), "acct(2)", path or "(off)",
                           hint="acct(2) needs CAP_SYS_PACCT (root)")


class BsdAcctSource(Source):
    name = NAME

    def __init__(self, acct_fn=_libc_acct) -> None:
        self.acct = acct_fn
        self.follower: Optional[PacctFollower] = None
        self.switched_on = False
        self.previous: Optional[str] = None
        self.records = 0
        self.problems = 0
        self.rotations = 0
        self.last_problem = ""
        # External mode: why the followed file is not read (it does not exist), while so.
        self.missing = ""
        self.dir = ""
        self.seq = 0
        self.displaced: Optional[Dict[str, object]] = None
        self._last_size = -1
        self._last_growth = 0.0
        # Wall-clock times: the last ownership check, and when accounting was last
        # known to write to elsad's file (where a displacement's gap begins).
        self._checked = 0.0
        self._ours_at = 0.0
        self._gap_told = 0.0  # monotonic: the displaced gap's end last recorded

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, ctx: SourceContext) -> None:
        super().start(ctx)
        opts = ctx.options
        self.mode = str(opts["mode"])
        self.interval = float(opts["interval"])  # type: ignore[arg-type]
        self.rotate_size = int(opts["rotate_size"])  # type: ignore[arg-type]
        self.keep_files = int(opts["keep_files"])  # type: ignore[arg-type]
        if self.mode == "external":
            path = str(opts["file"] or DEFAULT_EXTERNAL)
            state = os.path.join(ctx.state_dir, "bsdacct-external.json")
            self.follower = PacctFollower(path, state)
            log.info("following an external accounting file", file=path)
            if not os.path.exists(path):
                # The follower waits for it (the tool that writes it may start later),
                # but a typo would wait for ever: say so until it appears.
                self.missing = self.last_problem = (
                    f"{path} does not exist (yet): no bsdacct records until it appears; "
                    "check [sources.bsdacct] file, and that the tool that writes it "
                    "(psacct/acct's service, accton) runs")
                log.warning("external accounting file not found", file=path,
                            error=self.missing)
            return
        self.dir = str(opts["file"] or os.path.join(ctx.state_dir, "pacct"))
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        state = os.path.join(self.dir, "state.json")
        self.follower = PacctFollower(self._path(self._latest_seq() or 1), state)
        self.seq = self._latest_seq() or 1
        # Resume the file we were writing (the follower found its offset), or
        # start the first one.
        current = self._path(self.seq)
        if not os.path.exists(current):
            self._create(current)
        self.ownership_check = float(opts["ownership_check"])  # type: ignore[arg-type]
        saved = self._load_previous()
        if saved is not None:
            # A previous run switched accounting and did not restore it (crash):
            # what was active before is what it found, not what is active now.
            self.previous = saved.get("file")  # type: ignore[assignment]
        else:
            self.previous = self._probe(list(opts["probe_files"]))  # type: ignore[arg-type]
            self._save_previous()
        displaced_from = self._load_displaced()
        self.acct(current)
        self.switched_on = True
        self._take_back()  # nothing more goes to the handed-back file from here
        self._last_growth = time.monotonic()
        self._checked = self._ours_at = time.time()
        if displaced_from is not None:
            # Displaced in an earlier run: the records since then went to another file
            # until now. Forgotten once the gap is in the store.
            self.ctx.gap(displaced_from, self._ours_at,
                         lost=TAKEOVER.format("taken back at this start"))
            self.ctx.when_stored(lambda: self._forget_displaced(displaced_from))
        log.info("kernel accounting switched to our file", file=current,
                 previous=self.previous or "(off)")

    def _previous_path(self) -> str:
        return os.path.join(self.dir, "previous.json")

    def _load_previous(self) -> Optional[Dict[str, object]]:
        return read_object(self._previous_path())

    def _save_previous(self) -> None:
        """Persist the file active before elsad took over, with its size then."""
        size = None
        if self.previous:
            try:
                size = os.stat(self.previous).st_size
            except OSError:
                pass
        write_atomic(self._previous_path(),
                     {"file": self.previous, "size": size, "taken": time.time()})

    def _handback_path(self) -> str:
        return os.path.join(self.dir, "handback.json")

    def _handback(self) -> Dict[str, object]:
        """Where the file accounting is handed back to ends now, before the switch (the
        kernel appends there from the switch on), in :class:`PacctFollower`'s position
        format, and when."""
        data: Dict[str, object] = {"file": self.previous, "at": time.time()}
        if self.previous:
            try:
                st = os.stat(self.previous)
            except OSError:
                return data
            data.update(path=self.previous, dev=st.st_dev, inode=st.st_ino,
                        offset=st.st_size)
        return data

    def _take_back(self) -> None:
        """The records of the processes that ended while elsad was stopped, from the
        file a clean stop handed accounting back to (handback.json); a gap of bsdacct
        over that time where they cannot be read. Forgotten once stored."""
        path = self._handback_path()
        if not os.path.exists(path):
            return
        handed = read_object(path) or {}  # unreadable: nothing known of the downtime
        rows = None
        if handed.get("file"):
            # The follower finds the file by its inode (also rotated beside its path)
            # and starts at the offset it had at the handback; nothing found: -1.
            follower = PacctFollower(str(handed["file"]), path)
            if follower.position()["inode"] != -1:
                try:
                    rows = follower.read(final=True, rows=NAME)
                except AccountingFormatError as exc:
                    log.error("records of the downtime not read", file=handed["file"],
                              error=exc.message)
                self._take_problems(follower)
        at = handed.get("at")
        if rows is None:
            if isinstance(at, (int, float)):
                self.ctx.gap(float(at), time.time(),
                             lost="elsad's downtime (its stop handed kernel accounting back to "
                                  "a file it cannot read, or switched it off)")
                # The jobs recovered as running ran across that time: their bsdacct
                # figures miss the processes that ended in it, as taskstats' do.
                stamp = "%Y-%m-%d %H:%M:%S"
                self.ctx.flag_incomplete(None, (
                    f"no bsdacct records from {time.strftime(stamp, time.localtime(at))} "
                    f"to {time.strftime(stamp)} (elsad's stop switched kernel accounting "
                    "off, or handed it back to a file it cannot read)"))
            log.warning("bsdacct missed the processes that ended while elsad was stopped "
                        "(accounting was handed back to a file it cannot read, or off)",
                        file=handed.get("file"))
        elif rows:
            self.records += len(rows)
            self.ctx.emit_rows(NAME, rows)
            log.info("records of the downtime read from the handed-back file",
                     file=handed["file"], records=len(rows))
        self.ctx.when_stored(lambda: _unlink(path))

    def _displaced_path(self) -> str:
        return os.path.join(self.dir, "displaced.json")

    def _load_displaced(self) -> Optional[float]:
        """Since when accounting was not elsad's, as an earlier run found (displaced.json)."""
        try:
            return float((read_object(self._displaced_path()) or {})["from"])
        except (ValueError, KeyError, TypeError):
            return None

    def _forget_displaced(self, since: float) -> None:
        if self._load_displaced() == since:  # (not a displacement of this run)
            _unlink(self._displaced_path())

    def _displace(self) -> None:
        """Accounting is not elsad's any more: say so, and keep where the gap began
        for the next start (which takes accounting back and ends the gap)."""
        self.displaced = {"since": time.time(), "file": self._path(self.seq),
                          "gap_from": round(self._ours_at, 3)}
        self.switched_on = False  # not ours any more: never switch it off or back
        _unlink(self._previous_path())  # nothing of ours to restore any more
        try:
            write_atomic(self._displaced_path(), {"from": self._ours_at})
        except OSError as exc:  # the gap is still stored up to now; only its end is short
            log.exception("could not keep the displacement for the next start",
                          file=self._displaced_path(), error=str(exc))

    def _tell_gap(self) -> None:
        """The displacement's gap, up to now (recorded again as it goes on)."""
        assert self.displaced is not None
        self._gap_told = time.monotonic()
        self.ctx.gap(float(self.displaced["gap_from"]), time.time(),  # type: ignore[arg-type]
                     lost=TAKEOVER.format("elsad takes it back at its next start"))

    def owns_accounting(self) -> bool:
        """Whether the kernel writes to elsad's current file (one short child tells)."""
        current = self._path(self.seq)
        return self._probe([current]) == current

    def _check_ownership(self) -> None:
        size = self._current_size()
        now = time.monotonic()
        previous, self._checked = self._checked, time.time()
        if size != self._last_size:
            self._last_size = size
            self._last_growth = now
            self._ours_at = previous  # a record landed since the previous check
            return
        if now - self._last_growth < self.ownership_check:
            return
        self._last_growth = now  # at most one probe per ownership_check
        if self.owns_accounting():  # (its child exited after this check began)
            self._last_size = self._current_size()
            self._ours_at = self._checked
            return
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        # The other program took over after the last record elsad's file got: the
        # processes that ended since are in its file, not ours.
        self._displace()
        log.warning("kernel accounting was taken over by another acct(2) caller; elsad "
                    "leaves it alone", file=self._path(self.seq))
        self.ctx.flag_incomplete(None, f"bsdacct: kernel accounting taken over by another "
                                       f"program at {when} (accton); records missing")
        self._tell_gap()

    def _path(self, seq: int) -> str:
        return os.path.join(self.dir, f"pacct.{seq}")

    def _latest_seq(self) -> int:
        seqs = [int(n.split(".", 1)[1]) for n in os.listdir(self.dir)
                if n.startswith("pacct.") and n.split(".", 1)[1].isdigit()]
        return max(seqs, default=0)

    @staticmethod
    def _create(path: str) -> None:
        # Command names of every user: root-only (0600), like psacct's file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)

    def _probe(self, candidates: List[str]) -> Optional[str]:
        """Which of *candidates* the kernel is writing to now, if any.

        acct(2) cannot be queried; but the kernel writes a record when a
        process exits, before its parent's wait() returns (do_exit calls
        acct_process before exit_notify), so one short child tells.
        """
        sizes = {}
        for c in candidates:
            try:
                sizes[c] = os.stat(c).st_size
            except OSError:
                continue
        if not sizes:
            return None
        subprocess.run(["true"], check=False)
        for c, size in sizes.items():
            try:
                if os.stat(c).st_size > size:
                    return c
            except OSError:
                continue
        return None

    # -- reading -----------------------------------------------------------------------------
    def poll(self) -> None:
        if self.follower is None:
            return
        if self.mode == "managed" and self.switched_on:
            if self.rotate_size and self._current_size() >= self.rotate_size:
                self._rotate()
            self._check_ownership()
        elif (self.displaced is not None
              and time.monotonic() - self._gap_told >= self.ownership_check):
            self._tell_gap()  # the gap goes on until elsad takes accounting back
        if self.missing and os.path.exists(self.follower.path):
            log.info("external accounting file appeared", file=self.follower.path)
            if self.last_problem == self.missing:
                self.last_problem = ""
            self.missing = ""
        self._emit(self.follower.read(rows=NAME))

    def _current_size(self) -> int:
        try:
            return os.stat(self._path(self.seq)).st_size
        except OSError:
            return 0

    def _rotate(self) -> None:
        assert self.follower is not None
        new = self._path(self.seq + 1)
        self._create(new)
        self.acct(new)
        old_seq = self.seq
        self.seq += 1
        self.rotations += 1
        self._emit(self.follower.switch_to(new, rows=NAME))
        # Delete fully read files once their records are in the store.
        doomed = [self._path(s) for s in range(1, old_seq + 1 - self.keep_files)]
        self.ctx.when_stored(lambda: [_unlink(p) for p in doomed])
        log.info("accounting file rotated", new=new, seq=self.seq)

    def _take_problems(self, follower: PacctFollower) -> None:
        """Count and log the corrupt data *follower* skipped since the last call."""
        problems = follower.problems
        if problems:
            self.problems += len(problems)
            self.last_problem = problems[-1].message
            for p in problems[:5]:
                log.warning("corrupt accounting data skipped", error=p.message)
            follower.problems = []

    def _emit(self, rows: List[UsageRow]) -> None:
        """Hand usage rows (pacct.usage_rows: no dataclass per record on this
        path, which sees every process of the machine) to the aggregator."""
        assert self.follower is not None
        self._take_problems(self.follower)
        pos = self.follower.position()
        if rows:
            self.records += len(rows)
            self.ctx.emit_rows(NAME, rows)
        follower = self.follower
        self.ctx.when_stored(lambda: follower.commit(pos))

    def stop(self) -> None:
        if self.follower is None:
            return
        if self.switched_on and not self.owns_accounting():
            log.warning("kernel accounting is not elsad's any more; left as it is")
            self._displace()
        if self.displaced is not None:
            self._tell_gap()  # up to the stop; the next start ends it (displaced.json)
        if self.switched_on:
            handback = self._handback()
            try:
                self.acct(self.previous)
                log.info("kernel accounting restored", file=self.previous or "(off)")
            except Exception as exc:
                log.exception("could not restore kernel accounting", error=str(exc))
            else:
                try:
                    write_atomic(self._handback_path(), handback)
                except OSError as exc:
                    log.error("could not keep where the restored accounting file ends: the "
                              "next start cannot read the records of the downtime",
                              file=self._handback_path(), error=str(exc))
                _unlink(self._previous_path())  # restored: nothing to restore after a crash
            self.switched_on = False
        try:
            self._emit(self.follower.read(final=False, rows=NAME))
        except AccountingFormatError as exc:
            log.error("final read failed", error=exc.message)
        # The commit callbacks run when the daemon's accounting glue drains.

    def status(self) -> Dict[str, object]:
        pos = self.follower.position() if self.follower else {}
        return {"mode": self.mode, "file": pos.get("path"), "offset": pos.get("offset"),
                "records": self.records, "corrupt": self.problems,
                "last_problem": self.last_problem, "rotations": self.rotations,
                "switched_on": self.switched_on, "previous": self.previous,
                "displaced": self.displaced}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@hookimpl
def elsa_sources() -> List[SourceSpec]:
    return [SourceSpec(name=NAME, factory=BsdAcctSource, options=OPTIONS,
                       description="BSD process accounting (acct v3 pacct files): managed or"
                                   " external file, followed with persisted offsets.",
                       priority=30, covers_downtime=True)]
