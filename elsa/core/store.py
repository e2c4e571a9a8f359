"""The persistent store: SQLite in WAL mode, schema-versioned, written by one thread.

The event thread never waits on disk: it appends write operations to a queue
that a writer thread commits in batches (one transaction per batch). Requests
whose reply promises durability (``create``) call :meth:`Store.flush`, which
waits for the batch holding their write; with ``synchronous=NORMAL`` in WAL
mode a committed transaction survives the daemon being SIGKILLed
(https://www.sqlite.org/wal.html#durability), which is the failure that
matters here (ELSA's original jobd lost every job on restart).

The schema and its migrations are elsa/core/schema.py.

A commit that fails (disk full, I/O error) is rolled back and its writes go
back to the front of the queue: nothing is counted as committed, so a held
``create`` reply is not sent and a pacct read position is not saved. The
writer retries every :data:`RETRY_INTERVAL` seconds; while it fails, or once
more than ``spool_limit`` writes wait, :meth:`Store.check_accepting` refuses
new jobs, and :meth:`Store.health` (in ``status``) says why. A corrupt
database (SQLITE_CORRUPT, SQLITE_NOTADB) is reported with the recovery
command (``elsa store-salvage``, docs/security.md).
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import sqlite3
import stat
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from elsa.core.aggregator import INSERT_PROC, live_bulk
from elsa.core.attribution import JOB_MEMBERS_SQL
from elsa.core.carrying import CARRY_WAIT_S, HeldStays
from elsa.core.model import Job
from elsa.core.schema import migrate
from elsa.errors import StoreError
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.store")

DB_NAME = "elsa.db"

#: Seconds between attempts to commit while the store cannot write.
RETRY_INTERVAL = 1.0
#: Writes held in memory while the store cannot commit before new jobs are
#: refused (an accounting record or a membership change is one write; 200,000
#: are roughly 60 MB).
SPOOL_LIMIT = 200_000
#: Beyond this many held writes, accounting records are dropped (and counted in
#: ``health()``) rather than letting elsad grow without bound.
SPOOL_HARD_LIMIT = 4 * SPOOL_LIMIT
#: Permissions of the store files: the accounting data is private (command
#: names, usage and exit codes of every user; see docs/security.md).
STORE_MODE = 0o600
STATE_DIR_MODE = 0o711

_SALVAGE = ("stop elsad, then run 'elsa store-salvage {where}' to copy what is readable into "
            "a new store (the damaged file is kept beside it)")


def salvage_hint(path: str) -> str:
    """What to do about the damaged store file at *path*: ``elsa store-salvage`` on
    its state dir, or on the file itself (--db) when it is not a state dir's elsa.db."""
    if os.path.basename(path) == DB_NAME:
        return _SALVAGE.format(where=f"--state-dir {os.path.dirname(os.path.abspath(path))}")
    return _SALVAGE.format(where=f"--db {path}")


_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

#: A membership row; the writer inserts the pending rows of Store._members as they are.
MEMBER_COLUMNS = ("boot_id", "pid", "start_ticks", "jid", "joined", "how", "left", "exit_code",
                  "detached")
INSERT_MEMBER = (f"INSERT OR REPLACE INTO members({', '.join(MEMBER_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(MEMBER_COLUMNS))})")
#: What recovery reads at every start: the members not seen leaving (members_live), and
#: those of boot ? that left a job alive (members_detached), latest stay last.
LIVE_MEMBERS_SQL = "SELECT boot_id, jid, pid, start_ticks, how FROM members WHERE left IS NULL"
LEFT_ALIVE_SQL = ("SELECT pid, start_ticks, jid FROM members WHERE boot_id = ? AND detached = 1 "
                  "ORDER BY joined")


Runner = Callable[[sqlite3.Connection, List[Sequence[Any]]], None]
#: Statements every store runs through a runner instead of one executemany: usage rows
#: are added to the sums as they are inserted (schema.py, migration 7).
RUNNERS: Dict[str, Runner] = {INSERT_PROC: live_bulk}


def connect(path: str) -> sqlite3.Connection:
    """A connection to the store at *path* as elsad's reader and writer open it (WAL,
    its page cache): also for benchmarks/bench_store_writer.py."""
    try:
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # 1 MiB page cache per connection (SQLite's default is 2 MiB): the
        # OS page cache holds the rest, and elsad's RSS budget is tight
        # (40 MB with 100,000 tracked processes; benchmarks/bench_memory.py).
        db.execute("PRAGMA cache_size=-1024")
        db.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as exc:
        hint = (salvage_hint(path) if is_corruption(exc)
                else "check state_dir and free disk space")
        raise StoreError(f"cannot open store {path}: {exc}; {hint}") from exc
    return db


def execute_writes(db: sqlite3.Connection, sql: str, rows: List[Sequence[Any]]) -> None:
    """Run *sql* once per row of *rows* on *db* as the store's writer does (through
    its runner, if it has one): for code that writes a store without a Store."""
    _execute_grouped(db, [(sql, _Many(rows))], RUNNERS)


class Store:
    """Job table and membership history, persisted in ``<state_dir>/elsa.db``."""

    def __init__(self, state_dir: str, *, batch_interval: float = 0.25,
                 spool_limit: int = SPOOL_LIMIT, check_seconds: float = 10.0,
                 carry_wait: float = CARRY_WAIT_S) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DB_NAME)
        make_state_dir(state_dir)
        secure_store_files(state_dir)
        self.db = connect(self.path)
        check_integrity(self.db, self.path, check_seconds)
        migrate(self.db, self.path)
        secure_store_files(state_dir)
        self._queue: Deque[Tuple[str, Sequence[Any]]] = collections.deque()
        # Membership rows not yet written (in MEMBER_COLUMNS order, the writer
        # binds them as they are), keyed by identity: a process that joins and
        # exits within one batch (most of a fork storm) becomes one INSERT
        # instead of an INSERT and an UPDATE. _member_calls counts the calls
        # merged into them: the writer counts every call it commits, or
        # flush() would wait for calls that were merged away.
        self._members: Dict[Tuple[str, int, int, int], List[Any]] = {}
        self._member_calls = 0
        self._members_lock = threading.Lock()
        # Closed short fork stays held for the usage row that carries them (the
        # writer's alone). A crash loses them with the records in flight that would
        # carry them; bsdacct's records of those processes then find their job by the
        # ppid rule.
        self._held = HeldStays(carry_wait)
        self.carried = 0
        self._cond = threading.Condition()
        self._submitted = 0   # ops appended
        self._committed = 0   # ops committed
        self._stopping = False
        self._urgent = False  # a flush() waits: commit now
        # The writer sleeps with nothing to write instead of waking every batch
        # interval (an idle elsad wakes for nothing, elsa/core/loop.py add_timer);
        # the first write after that wakes it. Set before the writer looks at the
        # queue, so a write that it did not see finds it set (both under the GIL).
        self._asleep = False
        # Commit notifications for the event loop (see commit_notifications()).
        self._notify_at = 0
        self._notify_r: Optional[int] = None
        self._notify_w: Optional[int] = None
        # The last commit failed with this error (None: the store writes).
        self._failure: Optional[str] = None
        self._failed_since: Optional[float] = None
        self._retry_at = 0.0
        # Set once corruption is met; kept while later writes to spared pages succeed.
        self._corrupt_msg: Optional[str] = None
        self.write_failures = 0
        self.dropped = 0
        self.spool_limit = spool_limit
        self.batch_interval = batch_interval
        self.batches = 0
        self._writer = threading.Thread(target=self._write_loop, name="elsa-store-writer",
                                        daemon=True)
        self._writer.start()

    # -- schema -----------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    # -- the writer thread -------------------------------------------------------
    def submit(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Queue one write; returns at once (deque.append is atomic under the GIL).
        While the store cannot commit, writes wait in the queue (see health())."""
        self._queue.append((sql, params))
        self._submitted += 1
        if self._asleep:
            self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit_many(self, sql: str, rows: List[Sequence[Any]]) -> None:
        """Queue one statement for each of *rows* with one queue entry (the
        accounting hot path: one append per batch of records, not per record)."""
        if not rows:
            return
        if self._failure is not None and self.pending() > SPOOL_HARD_LIMIT:
            # Memory is the last line: elsad growing until the OOM killer
            # takes it would lose every held write, not just these.
            if not self.dropped:
                log.error("store spool full; dropping accounting records until the store "
                          "writes again", path=self.path, pending=self.pending())
            self.dropped += len(rows)
            return
        self._queue.append((sql, _Many(rows)))
        self._submitted += len(rows)
        if self._asleep:
            self._wake()

    # -- health ------------------------------------------------------------------------
    @property
    def corrupt(self) -> bool:
        """Corruption was met (by a commit or a read): ``elsa store-salvage`` is due."""
        return self._corrupt_msg is not None

    def pending(self) -> int:
        """Writes submitted but not committed yet."""
        return self._submitted - self._committed

    def health(self) -> Dict[str, Any]:
        """The store's state for ``status``: whether it writes, and if not why."""
        return {"ok": self._failure is None and not self.corrupt,
                "error": self._failure or self._corrupt_msg,
                "failing_since": self._failed_since, "corrupt": self.corrupt,
                "pending_writes": self.pending(), "spool_limit": self.spool_limit,
                "write_failures": self.write_failures, "dropped_records": self.dropped,
                "member_rows_carried": self.carried, "member_rows_waiting": len(self._held)}

    def _corrupt_message(self, exc: BaseException) -> str:
        """What status and clients are told of corruption: the error and the recovery."""
        return f"store is corrupt: {exc}; {salvage_hint(self.path)}"

    def read_failed(self, exc: BaseException) -> Optional[str]:
        """A read met *exc*: if it is corruption, mark the store corrupt (status,
        new jobs refused) and return the message for the client, else None."""
        if not isinstance(exc, sqlite3.DatabaseError) or not is_corruption(exc):
            return None
        msg = self._corrupt_message(exc)
        if not self.corrupt:
            log.error("store read failed", path=self.path, error=msg)
        with self._cond:
            if self._failure is None:
                self._failure = msg
                self._failed_since = time.time()
                self._retry_at = time.monotonic() + RETRY_INTERVAL
        self._corrupt_msg = msg
        return msg

    def failing(self) -> Optional[str]:
        """Why the store cannot commit (a full disk, corruption), or None when it can:
        cheap, for every commit's replies (ControlServer.on_commit)."""
        if self._failure is None and not self.corrupt:
            return None
        hint = (salvage_hint(self.path) if self.corrupt else
                f"free space on the file system of {self.state_dir}; held writes are "
                "committed as soon as it can, without a restart")
        why = self._failure or "corrupt"
        return (f"store {self.path} cannot be used ({why}); new jobs are refused until it "
                f"can; {self.pending()} writes are held in memory; {hint}")

    def check_accepting(self) -> None:
        """Raise StoreError when a new job could not be made durable soon: the
        store cannot commit, or too many writes wait for it."""
        failing = self.failing()
        if failing is not None:
            raise StoreError(failing)
        if self.pending() > self.spool_limit:
            raise StoreError(f"store {self.path} is {self.pending()} writes behind (limit "
                             f"{self.spool_limit}); new jobs are refused until it catches up")

    # -- durability marks (issue 5: a pacct follower persists its offset only
    # after the records it read are committed; see elsa/core/accounting.py) --
    def mark(self) -> int:
        """A mark for every write submitted so far (see :meth:`is_committed`)."""
        return self._submitted

    def is_committed(self, mark: int) -> bool:
        """True once every write submitted before *mark* was taken is committed."""
        return self._committed >= mark

    def commit_notifications(self) -> int:
        """A descriptor that becomes readable when a mark passed to :meth:`kick`
        is committed, so the event loop can answer requests whose writes are
        durable without ever waiting for the disk itself."""
        if self._notify_r is None:
            self._notify_r, self._notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return self._notify_r

    def drain_notifications(self) -> None:
        assert self._notify_r is not None
        try:
            while os.read(self._notify_r, 4096):
                pass
        except BlockingIOError:
            pass

    def kick(self, mark: int) -> None:
        """Commit soon, and notify (see :meth:`commit_notifications`) once *mark*
        is committed. Returns at once. Requests that arrive while a commit runs
        share the next one (group commit)."""
        with self._cond:
            done = self._committed >= mark
            if not done:
                # (Already set: the writer was woken for an earlier mark and
                # commits again until it has this one.)
                if not self._notify_at:
                    self._cond.notify_all()
                self._notify_at = max(self._notify_at, mark)
        if done:
            # A timed batch took it already: notify now. Setting _notify_at
            # instead would make the writer commit empty batches until the
            # next write arrives.
            self._notify()

    def _notify(self) -> None:
        if self._notify_w is not None:
            try:
                os.write(self._notify_w, b"c")
            except BlockingIOError:
                pass  # the pipe already holds a wake-up

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every write submitted so far is committed."""
        target = self._submitted
        with self._cond:
            self._urgent = True
            self._cond.notify_all()
            ok = self._cond.wait_for(
                lambda: self._committed >= target or self._failure is not None, timeout)
        if self._committed < target and self._failure is not None:
            raise StoreError(f"store {self.path} cannot write ({self._failure}); the change "
                             "is held and written when the store can write again")
        if not ok:
            raise StoreError(f"store {self.path}: commit did not finish in {timeout} s; "
                             "is the disk stalled?")

    def _write_loop(self) -> None:
        db = connect(self.path)
        next_commit = 0.0
        while True:
            with self._cond:
                # Commit at most every batch_interval unless a request waits
                # (kick, flush) or we stop: a batch of 0.25 s rewrites each hot
                # B-tree page (the random-pid indexes) once instead of at every
                # commit, which cut the writer's CPU per process by ~15 %.
                # While commits fail, retry every RETRY_INTERVAL whoever asks.
                while not self._stopping:
                    if self._failure is not None:
                        wait = self._retry_at - time.monotonic()
                    elif self._notify_at or self._urgent:
                        break
                    else:
                        self._asleep = True
                        if not (self._queue or self._members):
                            due = self._held.due()
                            if due is None or due > 0:
                                # Until a write, kick, flush, stop or a short stay's wait ends.
                                self._cond.wait(due)
                                self._asleep = False
                                # A write woke us: it opens a batch.
                                next_commit = time.monotonic() + self.batch_interval
                                continue
                            wait = 0.0
                        else:
                            wait = next_commit - time.monotonic()
                        self._asleep = False
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                self._urgent = False
                stopping = self._stopping
            ok = self._commit_batch(db, final=stopping)
            next_commit = time.monotonic() + self.batch_interval
            if stopping and not self._queue and not self._members:
                break
            if stopping and not ok:
                log.error("store cannot write at stop; held writes are lost", path=self.path,
                          pending=self.pending(), error=self._failure)
                break
        db.close()

    def _commit_batch(self, db: sqlite3.Connection, final: bool = False) -> bool:
        """Commit what is queued in one transaction; on failure put it back."""
        # Take the member rows first: a close that misses them from now on
        # is queued as an UPDATE and drained below, so it runs after them.
        with self._members_lock:
            members, self._members = self._members, {}
            calls, self._member_calls = self._member_calls, 0
        batch: List[Tuple[str, Sequence[Any]]] = []
        q = self._queue
        while q:
            batch.append(q.popleft())
        done = (sum(len(p) if type(p) is _Many else 1 for _, p in batch)
                + calls)
        due = self._held.due()
        if not done and (due is None or (due > 0 and not final)):
            return True
        rows, taken, carried = self._held.sort(
            members.values(), [p if type(p) is _Many else (p,) for sql, p in batch
                               if sql == INSERT_PROC], final)
        try:
            db.execute("BEGIN")
            if rows:
                db.executemany(INSERT_MEMBER, rows)
            _execute_grouped(db, batch, RUNNERS)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back (SQLITE_FULL does)
            self._held.put_back(members.values())
            self._requeue(batch, members, calls, taken)
            self._failed(exc)
            return False
        self.batches += 1
        self.carried += carried
        if self._failure is not None:
            log.warning("store writes again", path=self.path, after=self._failure,
                        failures=self.write_failures)
        with self._cond:
            self._failure = self._failed_since = None
            self._committed += done
            self._cond.notify_all()
            wake = bool(self._notify_at) and self._committed >= self._notify_at
            if wake:
                self._notify_at = 0
        if wake:
            self._notify()
        return True

    def _requeue(self, batch: List[Tuple[str, Sequence[Any]]],
                 members: Dict[Tuple[str, int, int, int], List[Any]], calls: int,
                 taken: Sequence[List[Any]] = ()) -> None:
        """Put a rolled-back batch back, ahead of what was queued since (and the
        member rows it took from the waiting short stays)."""
        self._queue.extendleft(reversed(batch))
        with self._members_lock:
            for key, row in members.items():
                # A row changed since is newer: it wins.
                self._members.setdefault(key, row)
            for row in taken:
                self._members.setdefault(tuple(row[:4]), row)
            self._member_calls += calls

    def _failed(self, exc: sqlite3.Error) -> None:
        self.write_failures += 1
        first = self._failure is None
        corrupt = is_corruption(exc)
        if corrupt:
            msg = self._corrupt_message(exc)
        else:
            msg = str(exc)
        with self._cond:
            self._failure = msg
            if first:
                self._failed_since = time.time()
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            self._cond.notify_all()  # flush() waiters learn of the failure
        if corrupt:
            self._corrupt_msg = msg
        if first:
            log.error("store write failed; writes are held and retried", path=self.path,
                      error=msg, pending=self.pending())
        if self._notify_at:
            # Replies wait for this commit: the event loop answers them with the
            # failure (ControlServer.on_commit) instead of leaving them to time out.
            self._notify()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._writer.join(timeout=30.0)
        self.db.close()
        for fd in (self._notify_r, self._notify_w):
            if fd is not None:
                os.close(fd)
        self._notify_r = self._notify_w = None

    def _read_own_writes(self) -> None:
        """Reads use their own connection and see only committed data; wait for
        queued writes first so a reply never contradicts an earlier one."""
        if self._submitted != self._committed and self._failure is None:
            self.flush()

    # -- metadata -----------------------------------------------------------------
    def get_meta(self, key: str, default: Optional[str] = None) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta_now(self, key: str, value: str) -> None:
        """Write a metadata value synchronously (used for the job-id block)."""
        self.submit("INSERT INTO meta(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
        self.flush()

    # -- jobs -----------------------------------------------------------------------
    def insert_job(self, job: Job) -> None:
        self.submit("INSERT INTO jobs(jid, name, owner_uid, tags, created, ended, state, "
                    "backend, params) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.jid, job.name, job.owner_uid, json.dumps(dict(job.tags)), job.created,
                     job.ended, job.state, job.backend, json.dumps(dict(job.params))))

    def set_tags(self, jid: int, tags: Mapping[str, str]) -> None:
        self.submit("UPDATE jobs SET tags = ? WHERE jid = ?", (json.dumps(dict(tags)), jid))

    def end_job(self, jid: int, ended: float, state: str,
                params: Optional[Mapping[str, str]] = None) -> None:
        """*params*: the job's parameters as they end (the backend read its limits
        once more); None keeps those stored."""
        self.submit("UPDATE jobs SET ended = ?, state = ?, params = COALESCE(?, params) "
                    "WHERE jid = ?",
                    (ended, state, None if params is None else json.dumps(dict(params)), jid))

    def running_jobs(self) -> List[Tuple[Job, bool]]:
        """Running jobs, oldest first, each with whether it ever had a member: a
        membership row of it exists (they are never deleted; store migration 10)."""
        self._read_own_writes()
        rows = self.db.execute(
            "SELECT jid, name, owner_uid, tags, created, ended, state, backend, params, "
            "EXISTS (SELECT 1 FROM members WHERE members.jid = jobs.jid) "
            "FROM jobs WHERE state = 'running' ORDER BY jid").fetchall()
        return [(_job_from_row(r), bool(r[9])) for r in rows]

    def job(self, jid: int, committed: bool = False) -> Optional[Job]:
        """*committed*: read what is committed now, without waiting for queued
        writes (the control server waited for its commit mark already)."""
        if not committed:
            self._read_own_writes()
        row = self.db.execute(
            "SELECT jid, name, owner_uid, tags, created, ended, state, backend, params "
            "FROM jobs WHERE jid = ?", (jid,)).fetchone()
        return _job_from_row(row) if row else None

    def jobs(self, *, include_ended: bool = True, limit: int = 10000,
             committed: bool = False) -> List[Job]:
        if not committed:
            self._read_own_writes()
        where = "" if include_ended else "WHERE state = 'running'"
        rows = self.db.execute(
            f"SELECT jid, name, owner_uid, tags, created, ended, state, backend, params "
            f"FROM jobs {where} ORDER BY jid DESC LIMIT ?", (limit,)).fetchall()
        return [_job_from_row(r) for r in rows]

    # -- members --------------------------------------------------------------------
    def add_member(self, boot_id: str, jid: int, pid: int, start_ticks: int, joined: float,
                   how: str) -> None:
        # A pending row for the same stay is replaced (INSERT OR REPLACE would
        # do the same on disk).
        row = [boot_id, pid, start_ticks, jid, joined, how, None, None, 0]
        with self._members_lock:
            self._members[(boot_id, pid, start_ticks, jid)] = row
            self._member_calls += 1
        self._submitted += 1
        if self._asleep:
            self._wake()

    def close_member(self, boot_id: str, jid: int, pid: int, start_ticks: int, left: float,
                     exit_code: Optional[int], detached: bool = False) -> None:
        with self._members_lock:
            row = self._members.get((boot_id, pid, start_ticks, jid))
            if row is not None:
                row[6:] = left, exit_code, int(detached)
                self._member_calls += 1
                self._submitted += 1
                return
        self.submit("UPDATE members SET left = ?, exit_code = ?, detached = ? "
                    "WHERE boot_id = ? AND pid = ? AND start_ticks = ? AND jid = ?",
                    (left, exit_code, int(detached), boot_id, pid, start_ticks, jid))

    def live_members(self) -> List[Tuple[str, int, int, int, str]]:
        """(boot_id, jid, pid, start_ticks, how) of every member not yet seen leaving."""
        self._read_own_writes()
        return self.db.execute(LIVE_MEMBERS_SQL).fetchall()

    def left_alive(self, boot_id: str) -> List[Tuple[int, int, int]]:
        """(pid, start_ticks, jid) of every process of boot *boot_id* that left a
        job without exiting (detached, moved out, job ended), latest stay last."""
        self._read_own_writes()
        return self.db.execute(LEFT_ALIVE_SQL, (boot_id,)).fetchall()

    def members_of(self, jid: int) -> List[Tuple[int, int, float, Optional[float],
                                                 Optional[int], str]]:
        """(pid, start_ticks, joined, left, exit_code, how) of every member a job ever
        had (elsa.core.attribution.JOB_MEMBERS_SQL: short fork stays may be held up to
        elsa.core.carrying.CARRY_WAIT_S for their carrier before they show)."""
        self._read_own_writes()
        return self.db.execute(JOB_MEMBERS_SQL, (jid,)).fetchall()


def is_corruption(exc: BaseException) -> bool:
    """True for SQLITE_CORRUPT / SQLITE_NOTADB (any extended code)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def check_integrity(db: sqlite3.Connection, path: str, seconds: float) -> None:
    """``PRAGMA quick_check`` within *seconds*: raise StoreError naming the
    recovery command on corruption. A check that runs out of time is logged
    and the start goes on (a store too big to check fully is not evidence of
    damage; run-time SQLITE_CORRUPT is still caught by the writer)."""
    deadline = time.monotonic() + seconds
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10000)
    try:
        rows = db.execute("PRAGMA quick_check(20)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupted" in str(exc):
            log.warning("store integrity check stopped at its time limit", path=path,
                        seconds=seconds)
            return
        raise StoreError(f"store {path} cannot be checked: {exc}; "
                         + salvage_hint(path)) from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"store {path} is corrupt: {exc}; "
                         + salvage_hint(path)) from exc
    finally:
        db.set_progress_handler(None, 0)
    problems = [r[0] for r in rows if r[0] != "ok"]
    if problems:
        raise StoreError(f"store {path} is corrupt ({problems[0]}; {len(problems)} problems "
                         "found); " + salvage_hint(path))


def make_state_dir(state_dir: str) -> None:
    try:
        os.makedirs(state_dir, mode=STATE_DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create state_dir {state_dir}: {exc.strerror}; "
                         "set state_dir in the config to a writable directory") from None


#: The daemon's lock on its state directory (lock_state_dir).
LOCK_NAME = "elsad.lock"


def lock_state_dir(state_dir: str) -> int:
    """Lock ``<state_dir>/elsad.lock`` (flock, exclusive) for the daemon's life and
    return its descriptor; the kernel drops the lock when the process ends, also
    after a kill -9. A second elsad on the same state dir (another config, a copy
    for a test) would migrate the store under the first, recover its jobs and
    track them twice, compact the backend's journals and switch kernel
    accounting: it is refused before it touches any of that. (flock, not fcntl:
    closing a descriptor drops every fcntl lock of the process on that file, and
    SQLite uses those.)"""
    make_state_dir(state_dir)
    path = os.path.join(state_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, STORE_MODE)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror}; set state_dir in the config "
                         "to a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise StoreError(f"another elsad{who} uses state_dir {state_dir}; stop it first, or "
                         "give this one its own state_dir and socket") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # named by the refusal of the next one
    return fd


def running_elsad(state_dir: str) -> Optional[str]:
    """The pid (as written, '' if unreadable) of the elsad holding *state_dir*'s lock
    (lock_state_dir), or None when no elsad runs on it."""
    try:
        fd = os.open(os.path.join(state_dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no elsad (of a version that locks) ever ran here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return None
    finally:
        os.close(fd)  # (drops the shared lock taken, if any)


def secure_store_files(state_dir: str) -> None:
    """Make the store private: the database and its -wal/-shm files 0600, the
    state directory not listable by others. Files created later inherit the
    database's mode (SQLite copies it to -wal and -shm)."""
    try:
        st = os.stat(state_dir)
        if st.st_mode & 0o022:
            os.chmod(state_dir, STATE_DIR_MODE)
    except OSError:
        return
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        # By path, never open()+close(): closing any descriptor of a file drops
        # every POSIX lock this process holds on it, SQLite's included (its
        # WAL index would then be rebuilt under a live writer).
        path = os.path.join(state_dir, name)
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                os.chmod(path, STORE_MODE)
        except OSError:
            continue


def _execute_grouped(db: sqlite3.Connection, batch: Iterable[Tuple[str, Sequence[Any]]],
                     runners: Mapping[str, Runner] = {}) -> None:
    """Run consecutive writes of the same statement with one executemany (one
    execute for a single write: any statement, DDL too), or that statement's
    registered runner (order kept)."""
    current: Optional[str] = None
    params: List[Sequence[Any]] = []

    def run() -> None:
        runner = runners.get(current)  # type: ignore[arg-type]
        if runner is not None:
            runner(db, params)
        elif len(params) == 1:
            db.execute(current, params[0])  # type: ignore[arg-type]
        else:
            db.executemany(current, params)  # type: ignore[arg-type]

    for sql, p in batch:
        if sql != current:
            if current is not None:
                run()
            current, params = sql, []
        if type(p) is _Many:
            params.extend(p)
        else:
            params.append(p)
    if current is not None:
        run()


class _Many(list):
    """A queue entry's parameters for several executions (Store.submit_many)."""

    __slots__ = ()


def _job_from_row(r: Sequence[Any]) -> Job:
    tags = json.loads(r[3])
    return Job(jid=r[0], name=r[1], owner_uid=r[2], tags=tuple(sorted(tags.items())),
               created=r[4], ended=r[5], state=r[6], backend=r[7], params=json.loads(r[8]))
