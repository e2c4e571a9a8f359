"""The control socket: AF_UNIX stream, one JSON object per line, per-request authorization.

Runs on the daemon's event thread with non-blocking sockets, so a slow or
half-open client can never stall the proc-connector path:

* reads and writes happen only when the selector says they will not block;
* a connection handles at most ``REQUESTS_PER_TURN`` requests (or
  ``TURN_BUDGET`` seconds) per wake-up, then yields to the event loop and
  continues when the loop comes round again (it asks for write-readiness,
  which an AF_UNIX socket with room in its buffer reports at once);
* a client that does not read its replies stops being read once its output
  backlog passes ``OUTPUT_HIGH_WATER`` (the kernel then blocks *its* writes,
  not ours), and is dropped when no reply byte left for ``idle_timeout``;
* a partial line is buffered up to ``limits.max_request_bytes``; a longer one
  is answered with ``too-large`` and skipped up to its newline, the
  connection carries on; an unfinished line older than ``idle_timeout`` and
  an idle connection are closed;
* at most ``limits.max_connections`` connections; a non-admin uid may hold at
  most half of them, and admins get ``ADMIN_RESERVE`` extra slots so root can
  still manage a daemon another user floods.

Authorization uses SO_PEERCRED and SO_PEERGROUPS (socket(7)), never anything
the client claims: root and members of ``admin_group`` may do everything; any
other user may create jobs and act only on processes whose real uid is theirs
and jobs they own (cgrulesengd's socket had no such check: any client could
move any pid). ``kill`` from a non-admin signals only the members the caller
could signal itself under kill(2)'s rule, so the root daemon never becomes a
confused deputy for a job member that changed uid (``su``, ``sudo``).

The protocol (operations, fields, replies, error codes, limits, versioning)
is documented in docs/protocol.md; ``ERROR_CODES`` below is its error table.
"""

from __future__ import annotations

import collections
import grp
import json
import os
import select
import signal as signal_mod
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from elsa import __version__
from elsa.client import parse_signal
from elsa.core.backend import signal_each
from elsa.core.model import JOB_RUNNING, Job, ProcessInfo, format_jid, parse_jid
from elsa.errors import (
    ElsaError,
    JobNotFound,
    PermissionDenied,
    ProcessGone,
    ProtocolError,
)
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.control")

#: The protocol version this daemon speaks, and every version it accepts.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: Stop reading a client whose unread replies exceed this (bytes).
OUTPUT_HIGH_WATER = 1024 * 1024
#: Requests handled per wake-up of one connection before yielding to the loop.
REQUESTS_PER_TURN = 32
#: ... or this many seconds, whichever comes first (at least one request).
TURN_BUDGET = 0.002
#: Connections admins may open beyond ``max_connections``.
ADMIN_RESERVE = 8
#: Outstanding ``wait`` requests one connection may hold (each is answered
#: later, so pipelined waits would otherwise grow without backpressure).
MAX_WAITS_PER_CONNECTION = 64
#: listen() backlog, and connections accepted per wake-up.
LISTEN_BACKLOG = 1024
ACCEPTS_PER_TURN = 256
#: Bytes read per recv().
RECV_SIZE = 65536

_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid (socket(7) SO_PEERCRED)
# SO_PEERGROUPS (Linux 4.13, include/uapi/asm-generic/socket.h); Python has no
# constant for it. The peer's supplementary groups as of connect(), race-free,
# and without an NSS lookup on the event thread.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("=I")

#: Every error code a reply can carry (docs/protocol.md, "Errors"). Stable:
#: codes are never renamed or reused; new ones may be added.
ERROR_CODES: Dict[str, str] = {
    "bad-request": "the line is not a JSON object, or a field is missing, of the wrong "
                   "type or out of range",
    "unknown-op": "'op' names no operation this daemon knows",
    "unsupported-version": "'v' names a protocol version this daemon does not speak",
    "too-large": "the request line is longer than limits.max_request_bytes",
    "busy": "too many connections; sent once, then the connection is closed",
    "limit": "a per-connection limit was reached (more than 64 outstanding waits)",
    "permission-denied": "the caller may not act on that process or job",
    "no-such-job": "no job has that id",
    "not-in-job": "the pid is not a member of any job",
    "no-such-process": "the process does not exist (or exited meanwhile)",
    "bad-job-state": "the job has ended; the operation needs a running job",
    "backend": "the grouping backend refused or failed (e.g. freeze on cnproc, bad cpus)",
    "kernel": "a kernel interface failed",
    "no-privilege": "the daemon lacks a privilege it needs for this",
    "store": "the persistent store failed",
    "internal": "a bug in elsad; the message says what; the daemon carries on",
}


class UnknownOperation(ProtocolError):
    code = "unknown-op"


class UnsupportedVersion(ProtocolError):
    code = "unsupported-version"


class NotInJob(JobNotFound):
    code = "not-in-job"


class LimitReached(ProtocolError):
    code = "limit"


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the kernel says (SO_PEERCRED at connect time)."""

    pid: int
    uid: int
    gid: int
    admin: bool


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    fd: int
    caller: Caller
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    last_active: float = 0.0  # last byte in or out
    write_progress: float = 0.0  # last time outbuf shrank (or became non-empty)
    partial_since: Optional[float] = None  # an unfinished line started then
    discarding: bool = False  # skipping the rest of an oversized line
    eof: bool = False  # the client shut down its sending side
    closed: bool = False
    waiting: int = 0  # outstanding 'wait' requests
    reg_read: bool = False
    reg_write: bool = False
    in_turn: bool = False  # inside _process: replies are sent in one go at its end
    # Replies waiting for the store to commit what their request wrote, in
    # order: (store mark, reply). Once one waits, later replies queue behind it.
    held: Deque[Tuple[int, Dict[str, Any]]] = field(default_factory=collections.deque)


@dataclass(eq=False)
class Waiter:
    conn: Connection
    jid: int
    deadline: Optional[float]
    req_id: Any


_DEFERRED = object()

#: Operations whose reply promises a change that must survive a crash.
DURABLE_OPS = frozenset({"create", "attach", "detach", "end"})


class ControlServer:
    """Accepts connections and dispatches requests to :class:`Operations`."""

    def __init__(self, path: str, ops: Operations, *, limits: Dict[str, Any],
                 add_reader: Callable[[int, Callable[[], None]], None],
                 remove_reader: Callable[[int], None],
                 set_writer: Callable[[int, Optional[Callable[[], None]]], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.ops = ops
        self.limits = dict(limits)
        self._add_reader = add_reader
        self._remove_reader = remove_reader
        self._set_writer = set_writer
        self.clock = clock
        self.conns: Dict[int, Connection] = {}
        self.per_uid: Dict[int, int] = {}
        self.waiters: List[Waiter] = []
        self._holding: Set[Connection] = set()  # connections with held replies
        self.counters = {"accepted": 0, "requests": 0, "errors": 0, "too_large": 0,
                         "refused_connections": 0, "dropped_slow_clients": 0,
                         "idle_closed": 0, "deferred_turns": 0}
        self.sock = self._listen(path)
        add_reader(self.sock.fileno(), self._accept)
        ops.server = self

    # -- listening ---------------------------------------------------------------
    @staticmethod
    def _listen(path: str) -> socket.socket:
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ElsaError(f"cannot create socket directory {directory}: {exc.strerror}; "
                            "set 'socket' in the config to a writable place") from None
        try:
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ElsaError(f"{path} exists and is not a socket; remove it or change "
                                "'socket' in the config")
            # A socket file left by a killed daemon: refuse only if someone answers.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise ElsaError(f"another elsad is already listening on {path}; stop it "
                                "first (or use a different 'socket')")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                probe.close()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ElsaError(f"cannot bind control socket {path}: {exc.strerror}") from None
        # Everyone may connect; every request is authorized from SO_PEERCRED.
        os.chmod(path, 0o666)
        # A deep backlog absorbs bursts of clients between two accept turns (the
        # kernel caps it at net.core.somaxconn).
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self._remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    # -- connections ----------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wake-up
                log.warning("accept failed", error=str(exc))
                return
            sock.setblocking(False)
            try:
                caller = self._caller(sock)
            except OSError as exc:
                log.warning("cannot read peer credentials", error=str(exc))
                sock.close()
                continue
            refusal = self._admission(caller)
            if refusal:
                self.counters["refused_connections"] += 1
                try:
                    sock.send(_encode(_error_reply(None, "busy", refusal)))
                except OSError:
                    pass
                sock.close()
                continue
            now = self.clock()
            conn = Connection(sock=sock, fd=sock.fileno(), caller=caller, last_active=now,
                              write_progress=now)
            self.conns[conn.fd] = conn
            self.per_uid[caller.uid] = self.per_uid.get(caller.uid, 0) + 1
            self.counters["accepted"] += 1
            self._interest(conn, read=True, write=False)

    def _caller(self, sock: socket.socket) -> Caller:
        pid, uid, gid = peer_credentials(sock)
        # Supplementary groups matter only for the admin group: fetch them then.
        needs_groups = uid != 0 and self.ops.admin_gid is not None and gid != self.ops.admin_gid
        groups = peer_groups(sock, pid) if needs_groups else ()
        return Caller(pid=pid, uid=uid, gid=gid, admin=self.ops.is_admin(uid, gid, groups))

    def _admission(self, caller: Caller) -> Optional[str]:
        cap = self.limits["max_connections"]
        if caller.admin:
            if len(self.conns) >= cap + ADMIN_RESERVE:
                return f"too many connections ({len(self.conns)}); retry later"
            return None
        if len(self.conns) >= cap:
            return f"too many connections ({len(self.conns)} of {cap}); retry later"
        per_uid = max(1, cap // 2)
        if self.per_uid.get(caller.uid, 0) >= per_uid:
            return (f"uid {caller.uid} already holds {per_uid} connections (half of "
                    "limits.max_connections); close some and retry")
        return None

    def _interest(self, conn: Connection, *, read: bool, write: bool) -> None:
        """Register exactly the readiness *conn* needs with the event loop."""
        if conn.closed:
            return
        if not read and conn.reg_read:
            self._remove_reader(conn.fd)  # also drops the writer (daemon.remove_reader)
            conn.reg_read = conn.reg_write = False
        if read and not conn.reg_read:
            self._add_reader(conn.fd, lambda c=conn: self._readable(c))
            conn.reg_read = True
        if write != conn.reg_write:
            self._set_writer(conn.fd, (lambda c=conn: self._writable(c)) if write else None)
            conn.reg_write = write

    def _readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        now = self.clock()
        if not data:
            # The client shut down its sending side (or went away). Answer what
            # it sent, then close: `printf '{"op":"status"}' | socat - UNIX:…`
            # sends without a final newline and half-closes.
            conn.eof = True
            conn.partial_since = None
            if conn.inbuf and not conn.inbuf.endswith(b"\n") and not conn.discarding:
                conn.inbuf += b"\n"
        else:
            conn.last_active = now
            self._take(conn, data)
        self._process(conn)

    def _take(self, conn: Connection, data: bytes) -> None:
        """Append *data* to the input buffer, bounding an unfinished line.

        An unfinished line longer than the limit is cut to ``limit + 1`` bytes
        and terminated, so :meth:`_process` answers ``too-large`` in request
        order; the rest of it is skipped up to its newline.
        """
        limit = self.limits["max_request_bytes"]
        if conn.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            conn.discarding = False
            data = data[nl + 1:]
            conn.partial_since = None
        conn.inbuf += data
        last_nl = conn.inbuf.rfind(b"\n")
        tail = len(conn.inbuf) - (last_nl + 1)
        if tail > limit:
            del conn.inbuf[last_nl + 1 + limit + 1:]
            conn.inbuf += b"\n"
            conn.discarding = True
            conn.partial_since = None
        elif tail == 0:
            conn.partial_since = None
        elif conn.partial_since is None or b"\n" in data:
            conn.partial_since = self.clock()  # a new unfinished line began

    def _too_large(self, conn: Connection) -> None:
        self.counters["too_large"] += 1
        self.counters["errors"] += 1
        limit = self.limits["max_request_bytes"]
        self._reply(conn, _error_reply(None, "too-large",
                                       f"request longer than {limit} bytes "
                                       "(limits.max_request_bytes); skipped"))

    def _process(self, conn: Connection) -> None:
        """Handle complete lines within this turn's budget, then set the interest."""
        limit = self.limits["max_request_bytes"]
        start = self.clock()
        handled = 0
        conn.in_turn = True
        while not conn.closed and len(conn.outbuf) < OUTPUT_HIGH_WATER:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                break
            if handled >= REQUESTS_PER_TURN or (
                    handled and self.clock() - start > TURN_BUDGET):
                self.counters["deferred_turns"] += 1
                break
            line = bytes(conn.inbuf[:nl])
            del conn.inbuf[:nl + 1]
            if len(line) > limit:
                self._too_large(conn)
            elif line.strip():
                self._handle(conn, line)
            handled += 1
        conn.in_turn = False
        if conn.closed:
            return
        # One send for the whole turn: fewer syscalls, and fewer socket buffers
        # (AF_UNIX charges each send's skb to our send buffer).
        self._flush(conn)
        if conn.closed:
            return
        complete = conn.inbuf.find(b"\n") >= 0
        if (conn.eof and not complete and not conn.outbuf and conn.waiting == 0
                and not conn.held):
            self._close(conn)
            return
        backlog = len(conn.outbuf) >= OUTPUT_HIGH_WATER
        # Pending lines continue on write-readiness: it comes round on the next
        # loop pass (after the proc connector had its turn), and never while the
        # client leaves its replies unread.
        want_write = bool(conn.outbuf) or complete
        want_read = not conn.eof and not complete and not backlog
        if want_read != conn.reg_read and conn.inbuf:
            # The age of an unfinished line counts only while we are reading:
            # not while we held the client back ourselves.
            conn.partial_since = self.clock() if want_read else None
        self._interest(conn, read=want_read, write=want_write)

    def _writable(self, conn: Connection) -> None:
        self._flush(conn)
        if not conn.closed:
            self._process(conn)

    def _handle(self, conn: Connection, line: bytes) -> None:
        self.counters["requests"] += 1
        req_id = None
        req: Dict[str, Any] = {}
        try:
            req = _parse(line)
            req_id = _request_id(req)
            version = req.get("v", PROTOCOL_VERSION)
            if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
                raise UnsupportedVersion(
                    f"protocol version {str(version)[:32]!r} not supported; this daemon speaks "
                    f"{', '.join(f'v{v}' for v in SUPPORTED_VERSIONS)}")
            result = self.ops.dispatch(conn, req, req_id)
        except ElsaError as exc:
            self.counters["errors"] += 1
            code = exc.code if exc.code in ERROR_CODES else "internal"
            if isinstance(exc, PermissionDenied):
                # An audit trail of refused attempts (who, from which process).
                log.info("request denied", uid=conn.caller.uid, pid=conn.caller.pid,
                         op=str(req.get("op"))[:32], reason=exc.message)
            self._reply(conn, _error_reply(req_id, code, exc.message))
            return
        except Exception as exc:  # a bug must not take the daemon down
            self.counters["errors"] += 1
            log.exception("request failed", error=str(exc))
            self._reply(conn, _error_reply(req_id, "internal",
                                           f"internal error: {type(exc).__name__}: {exc}"))
            return
        if result is _DEFERRED:
            return
        mark = 0
        if req.get("op") in DURABLE_OPS:
            # The reply promises what the request changed survives a crash: send
            # it once the store committed it. The loop does not wait meanwhile,
            # and requests arriving during one commit share the next.
            store = self.ops.manager.store
            mark = store.mark()
            if store.is_committed(mark):
                mark = 0
            else:
                store.kick(mark)
        self._reply(conn, _ok_reply(req_id, result), mark)

    def on_commit(self) -> None:
        """The store committed: send the held replies whose writes are durable."""
        store = self.ops.manager.store
        store.drain_notifications()
        for conn in list(self._holding):
            held = conn.held
            while held and (held[0][0] == 0 or store.is_committed(held[0][0])):
                self._send_reply(conn, held.popleft()[1])
            if not held:
                self._holding.discard(conn)
                if not conn.closed and not conn.in_turn:
                    self._flush(conn)
            else:
                store.kick(held[0][0])

    def _reply(self, conn: Connection, obj: Dict[str, Any], mark: int = 0) -> None:
        if conn.closed:
            return
        if mark or conn.held:
            conn.held.append((mark, obj))
            self._holding.add(conn)
            return
        self._send_reply(conn, obj)

    def _send_reply(self, conn: Connection, obj: Dict[str, Any]) -> None:
        if conn.closed:
            return
        if not conn.outbuf:
            conn.write_progress = self.clock()
        conn.outbuf += _encode(obj)
        if not conn.in_turn:
            self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        if conn.closed or not conn.outbuf:
            return
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
                conn.write_progress = conn.last_active = self.clock()
        except (BlockingIOError, InterruptedError):
            self._interest(conn, read=conn.reg_read, write=True)
            return
        except OSError:  # EPIPE/ECONNRESET: the client went away
            self._close(conn)
            return
        if (conn.eof and conn.waiting == 0 and not conn.held
                and conn.inbuf.find(b"\n") < 0):
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self.conns.pop(conn.fd, None) is not None:
            left = self.per_uid.get(conn.caller.uid, 1) - 1
            if left > 0:
                self.per_uid[conn.caller.uid] = left
            else:
                self.per_uid.pop(conn.caller.uid, None)
        if conn.reg_read or conn.reg_write:
            self._remove_reader(conn.fd)
        conn.reg_read = conn.reg_write = False
        conn.sock.close()
        conn.held.clear()
        self._holding.discard(conn)
        if conn.waiting:
            self.waiters = [w for w in self.waiters if w.conn is not conn]
            conn.waiting = 0

    def stats(self) -> Dict[str, Any]:
        """Counters for the ``status`` reply (docs/protocol.md)."""
        return dict(self.counters, connections=len(self.conns), waiters=len(self.waiters),
                    denied=self.ops.denied)

    # -- timers --------------------------------------------------------------------------
    def sweep(self) -> None:
        """Close stuck connections and answer waits that timed out (daemon timer)."""
        now = self.clock()
        idle = self.limits["idle_timeout"]
        for conn in list(self.conns.values()):
            stuck = conn.outbuf or (conn.reg_write and not conn.reg_read)
            if stuck and now - conn.write_progress > idle:
                # Replies (or requests held back behind them) left unread for a
                # whole idle period: the client does not read.
                self.counters["dropped_slow_clients"] += 1
                self._close(conn)
            elif conn.partial_since is not None and now - conn.partial_since > idle:
                # Slow-loris: a line that never ends.
                self.counters["idle_closed"] += 1
                self._close(conn)
            elif conn.waiting == 0 and not conn.outbuf and now - conn.last_active > idle:
                self.counters["idle_closed"] += 1
                self._close(conn)
            elif conn.eof and conn.waiting and _hung_up(conn.sock):
                self._close(conn)  # nobody left to read the wait's answer
        expired = [w for w in self.waiters if w.deadline is not None and now >= w.deadline]
        if expired:
            self.waiters = [w for w in self.waiters if not (w.deadline is not None
                                                            and now >= w.deadline)]
            for w in expired:
                try:
                    job = self.ops.manager.job(w.jid)
                except ElsaError as exc:
                    w.conn.waiting -= 1
                    self._reply(w.conn, _error_reply(w.req_id, exc.code, exc.message))
                    continue
                self._answer_wait(w, False, job)

    def next_deadline(self) -> Optional[float]:
        """The earliest wait deadline (monotonic), for a daemon that wants to wake for it."""
        deadlines = [w.deadline for w in self.waiters if w.deadline is not None]
        return min(deadlines) if deadlines else None

    def job_ended(self, job: Job) -> None:
        """Answer every ``wait`` on *job* (manager after-end callback)."""
        if not any(w.jid == job.jid for w in self.waiters):
            return
        done = [w for w in self.waiters if w.jid == job.jid]
        self.waiters = [w for w in self.waiters if w.jid != job.jid]
        for w in done:
            self._answer_wait(w, True, job)

    def _answer_wait(self, w: Waiter, ended: bool, job: Job) -> None:
        conn = w.conn
        conn.waiting -= 1
        conn.last_active = self.clock()
        self._reply(conn, _ok_reply(w.req_id, {"ended": ended, "job": job_json(job)}))
        if not conn.closed:
            self._process(conn)

    def add_waiter(self, conn: Connection, jid: int, timeout: Optional[float],
                   req_id: Any) -> None:
        deadline = None if timeout is None else self.clock() + timeout
        conn.waiting += 1
        self.waiters.append(Waiter(conn, jid, deadline, req_id))


# -- wire format ------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity)")


def _parse(line: bytes) -> Dict[str, Any]:
    try:
        req = json.loads(line, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("request nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ProtocolError(f"request must be a JSON object, got {_kind(req)}")
    return req


def _request_id(req: Dict[str, Any]) -> Any:
    req_id = req.get("id")
    if req_id is None:
        return None
    if isinstance(req_id, str) and len(req_id) <= 256:
        return req_id
    if isinstance(req_id, int) and not isinstance(req_id, bool) and abs(req_id) < 2 ** 63:
        return req_id
    raise ProtocolError("'id' must be a string (<= 256 chars) or a 64-bit integer")


def _encode(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _ok_reply(req_id: Any, result: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": True, "result": result}
    if req_id is not None:
        out["id"] = req_id
    return out


def _error_reply(req_id: Any, code: str, message: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": False,
                           "error": {"code": code, "message": message}}
    if req_id is not None:
        out["id"] = req_id
    return out


def _hung_up(sock: socket.socket) -> bool:
    """True when the peer closed completely (POLLHUP), not just its sending side."""
    try:
        p = select.poll()
        p.register(sock.fileno(), select.POLLHUP)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return True


def job_json(job: Job, with_pids: bool = True) -> Dict[str, Any]:
    """The protocol's job object (Job.to_json: ``jid`` is the hex string)."""
    return job.to_json(with_pids)


# -- request validation helpers --------------------------------------------------------

def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _int(req: Dict[str, Any], key: str, *, required: bool = True, minimum: int = 0,
         maximum: int = 2 ** 63 - 1) -> Optional[int]:
    value = req.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"'{key}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{key}' must be an integer, got {_kind(value)}")
    if not minimum <= value <= maximum:
        raise ProtocolError(f"'{key}' out of range [{minimum}, {maximum}]: {value}")
    return value


def _jid(req: Dict[str, Any]) -> int:
    """The job id of a request: the hex string (``0x0035969e00000402``) as every
    reply carries it; an integer is accepted too, for clients of protocol 1."""
    value = req.get("jid")
    if value is None:
        raise ProtocolError("'jid' is required")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ProtocolError(f"'jid' must be a job id string like 0x0035969e00000402, "
                            f"got {_kind(value)}")
    if isinstance(value, str) and (len(value) > 40 or not value.lower().startswith("0x")):
        raise ProtocolError("'jid' must be a hex job id like 0x0035969e00000402, "
                            f"got {value[:40]!r}")
    try:
        return parse_jid(value)
    except ValueError as exc:
        raise ProtocolError(f"'jid': {exc}") from exc


def _printable(text: str) -> bool:
    # No control characters: names and tags end up in terminals and reports.
    return text.isprintable()


def _str(req: Dict[str, Any], key: str, default: str = "", max_len: int = 256) -> str:
    value = req.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string, got {_kind(value)}")
    if len(value) > max_len:
        raise ProtocolError(f"'{key}' longer than {max_len} characters")
    if not _printable(value):
        raise ProtocolError(f"'{key}' contains control characters")
    return value


def _str_map(req: Dict[str, Any], key: str, max_entries: int = 64) -> Dict[str, str]:
    value = req.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"'{key}' must be an object mapping names to strings, "
                            f"got {_kind(value)}")
    if len(value) > max_entries:
        raise ProtocolError(f"'{key}' has more than {max_entries} entries")
    for k, v in value.items():
        if (not k or len(k) > 128 or "=" in k or not k.isprintable() or " " in k
                or not isinstance(v, str) or len(v) > 1024 or not _printable(v)):
            raise ProtocolError(
                f"'{key}' must map names (1-128 printable characters, no '=' or space) to "
                f"strings (<= 1024 printable characters); bad entry {k[:64]!r}")
    return dict(value)


def _pids(req: Dict[str, Any], key: str = "pids") -> List[int]:
    value = req.get(key)
    if not isinstance(value, list) or not value:
        raise ProtocolError(f"'{key}' must be a non-empty array of pids, got {_kind(value)}")
    if len(value) > 4096:
        raise ProtocolError(f"'{key}' has more than 4096 pids")
    out: List[int] = []
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 2 ** 31:
            raise ProtocolError(f"'{key}' must contain pids (1 to 2^31-1), got {p!r:.40}")
        if p not in out:
            out.append(p)
    return out


def _signal(req: Dict[str, Any]) -> int:
    value = req.get("signal", int(signal_mod.SIGTERM))
    if isinstance(value, str):
        return parse_signal(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'signal' must be a number or a name, got {_kind(value)}")
    if not 1 <= value <= signal_mod.SIGRTMAX:
        raise ProtocolError(f"'signal' out of range [1, {int(signal_mod.SIGRTMAX)}]: {value}")
    return value


def _uids(status_value: Optional[str]) -> Tuple[int, int, int]:
    """(real, effective, saved) from the ``Uid:`` line of /proc/PID/status (proc(5))."""
    if not status_value:
        raise ProcessGone("process has no Uid line")
    fields = status_value.split()
    return int(fields[0]), int(fields[1]), int(fields[2])


class Operations:
    """The request set (CSA jobd's, derived from ELSA's), with authorization."""

    def __init__(self, manager, *, backend_name: str, admin_group: str,
                 status: Callable[[], Dict[str, Any]]) -> None:
        self.manager = manager
        self.backend_name = backend_name
        self.status_fn = status
        self.admin_gid = _group_id(admin_group)
        self.server: Optional[ControlServer] = None
        self.denied = 0
        self._handlers: Dict[str, Callable[[Connection, Dict[str, Any], Any], Any]] = {
            "hello": self.op_hello, "create": self.op_create, "attach": self.op_attach,
            "detach": self.op_detach, "jobof": self.op_jobof, "list": self.op_list,
            "show": self.op_show, "pids": self.op_pids, "wait": self.op_wait,
            "kill": self.op_kill, "end": self.op_end, "status": self.op_status,
            "freeze": self.op_freeze, "thaw": self.op_thaw,
        }

    @property
    def names(self) -> List[str]:
        return sorted(self._handlers)

    def is_admin(self, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        if uid == 0:
            return True
        if self.admin_gid is None:
            return False
        return gid == self.admin_gid or self.admin_gid in groups

    def dispatch(self, conn: Connection, req: Dict[str, Any], req_id: Any = None) -> Any:
        op = req.get("op")
        if not isinstance(op, str):
            raise ProtocolError(f"'op' is required and must be a string, got {_kind(op)}")
        handler = self._handlers.get(op)
        if handler is None:
            raise UnknownOperation(f"unknown op {op[:64]!r}; known: {', '.join(self.names)}")
        return handler(conn, req, req_id)

    # -- authorization ---------------------------------------------------------------
    def _deny(self, message: str) -> PermissionDenied:
        self.denied += 1
        return PermissionDenied(message)

    def _check_job(self, caller: Caller, job: Job) -> None:
        if not caller.admin and job.owner_uid != caller.uid:
            raise self._deny(f"job {format_jid(job.jid)} belongs to uid {job.owner_uid}; "
                             f"uid {caller.uid} may only manage its own jobs")

    def _process_uids(self, pid: int) -> Tuple[int, int, int]:
        return _uids(self.manager.procfs.status_field(pid, "Uid"))

    def _check_pid(self, caller: Caller, pid: int) -> Optional[ProcessInfo]:
        """A non-admin may act on a process whose *real* uid is the caller's.

        For an admin: /proc's view of the process (it exists), which the
        attach that follows in the same request reuses instead of reading it
        again."""
        if caller.admin:
            return self.manager.procfs.info(pid)  # no-such-process if it is gone
        real = self._process_uids(pid)[0]
        if real != caller.uid:
            raise self._deny(f"process {pid} belongs to uid {real}; uid {caller.uid} may "
                             "only manage its own processes")
        return None

    def _may_signal(self, caller: Caller, pid: int) -> bool:
        """kill(2): the sender's uid matches the target's real or saved set-user-ID."""
        if caller.admin:
            return True
        try:
            real, _eff, saved = self._process_uids(pid)
        except ElsaError:
            return False
        return caller.uid in (real, saved)

    # -- operations -------------------------------------------------------------------
    def op_hello(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        c = conn.caller
        server = self.server
        return {"protocol": PROTOCOL_VERSION, "versions": list(SUPPORTED_VERSIONS),
                "daemon": __version__, "backend": self.backend_name, "ops": self.names,
                "caller": {"pid": c.pid, "uid": c.uid, "gid": c.gid, "admin": c.admin},
                "limits": dict(server.limits) if server else {}}

    def op_create(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        caller = conn.caller
        owner = _int(req, "owner_uid", required=False, maximum=2 ** 32 - 2)
        if owner is None:
            owner = caller.uid
        elif owner != caller.uid and not caller.admin:
            raise self._deny("only root or the admin group may create jobs for another user")
        name = _str(req, "name")
        tags = _str_map(req, "tags")
        params = _str_map(req, "params", max_entries=16)
        pids = _pids(req) if req.get("pids") is not None else []
        # Check every pid before the job exists: a refused create leaves nothing behind.
        infos = []
        for pid in pids:
            infos.append(self._check_pid(caller, pid))
            self._check_current_job(caller, pid)
        # Not durable here: the server holds the reply until the store commits
        # (DURABLE_OPS), without blocking the event loop.
        job = self.manager.create(name=name, owner_uid=owner, tags=tags, params=params,
                                  durable=False)
        try:
            for pid, info in zip(pids, infos):
                self.manager.attach(job.jid, pid, durable=False, info=info)
        except ElsaError:
            # A pid exited between the check and the attach: do not leave an empty job.
            self.manager.end(job.jid, reason="create failed")
            raise
        return job_json(self.manager.job(job.jid))

    def _check_current_job(self, caller: Caller, pid: int) -> None:
        """Moving a process out of a job needs the right to manage that job too."""
        current = self.manager.job_of(pid)
        if current is not None:
            self._check_job(caller, self.manager.job(current))

    def op_attach(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        jid = _jid(req)
        pids = _pids(req)
        job = self.manager.job(jid)
        self._check_job(conn.caller, job)
        if job.state != JOB_RUNNING:
            self.manager.member_pids(jid)  # raises bad-job-state with the usual message
        infos = []
        for pid in pids:
            infos.append(self._check_pid(conn.caller, pid))
            self._check_current_job(conn.caller, pid)
        attached = []
        for pid, info in zip(pids, infos):
            ident = self.manager.attach(jid, pid, durable=False, info=info)
            attached.append({"pid": ident.pid, "start_ticks": ident.start_ticks})
        return {"jid": format_jid(jid), "attached": attached}

    def op_detach(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        pids = _pids(req)
        plan = []
        for pid in pids:
            jid = self.manager.job_of(pid)
            if jid is None:
                raise NotInJob(f"pid {pid} is not in any job")
            self._check_job(conn.caller, self.manager.job(jid))
            self._check_pid(conn.caller, pid)
            plan.append((pid, jid))
        for pid, _jid_of_pid in plan:
            self.manager.detach(pid)
        return {"detached": [{"pid": p, "jid": format_jid(j)} for p, j in plan]}

    def op_jobof(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        pid = _int(req, "pid", minimum=1, maximum=2 ** 31 - 1)
        assert pid is not None
        jid = self.manager.job_of(pid)
        if jid is None:
            raise NotInJob(f"pid {pid} is not in any job")
        return {"pid": pid, "jid": format_jid(jid)}

    def op_list(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> List[Dict[str, Any]]:
        include_ended = req.get("all", False)
        if not isinstance(include_ended, bool):
            raise ProtocolError(f"'all' must be a boolean, got {_kind(include_ended)}")
        owner = _int(req, "owner_uid", required=False, maximum=2 ** 32 - 2)
        limit = _int(req, "limit", required=False, minimum=1, maximum=10000) or 10000
        manager = self.manager
        out = []
        for state in list(manager.jobs.values()):
            job = state.snapshot(with_pids=False)
            item = job_json(job, with_pids=False)
            item["nprocs"] = len(state.members)
            out.append(item)
        if include_ended:
            running = {j["jid"] for j in out}
            for job in manager.store.jobs(include_ended=True, limit=limit):
                if format_jid(job.jid) not in running:
                    item = job_json(job, with_pids=False)
                    item["nprocs"] = 0
                    out.append(item)
        if owner is not None:
            out = [j for j in out if j["owner_uid"] == owner]
        out.sort(key=lambda j: j["jid"])
        return out[-limit:]

    def op_show(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        return job_json(self.manager.job(_jid(req)))

    def op_pids(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        jid = _jid(req)
        job = self.manager.job(jid)
        pids = self.manager.member_pids(jid) if job.state == JOB_RUNNING else []
        return {"jid": format_jid(jid), "state": job.state, "pids": pids}

    def op_wait(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Any:
        jid = _jid(req)
        timeout = req.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout <= 10 ** 7):
            raise ProtocolError("'timeout' must be a number of seconds (0 to 1e7) or null")
        job = self.manager.job(jid)
        if job.state != JOB_RUNNING:
            return {"ended": True, "job": job_json(job)}
        if timeout == 0:
            return {"ended": False, "job": job_json(job)}
        if conn.waiting >= MAX_WAITS_PER_CONNECTION:
            raise LimitReached(f"this connection already has {conn.waiting} outstanding "
                               "waits; wait on fewer jobs per connection")
        assert self.server is not None
        self.server.add_waiter(conn, jid, timeout, req_id)
        return _DEFERRED

    def op_kill(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        jid = _jid(req)
        sig = _signal(req)
        job = self.manager.job(jid)
        self._check_job(conn.caller, job)
        members = self.manager.member_pids(jid)
        allowed = [p for p in members if self._may_signal(conn.caller, p)]
        if len(allowed) == len(members):
            # The backend signals the whole job (cgroup2: freeze-signal-thaw or
            # cgroup.kill, which also reaches children forked meanwhile).
            sent = self.manager.signal(jid, sig)
        else:
            # Some members changed uid (su, sudo): a backend signals the whole
            # cgroup, so signal the allowed ones one by one instead.
            sent = signal_each(allowed, sig)
        return {"jid": format_jid(jid), "signal": sig, "signalled": sent,
                "skipped": len(members) - len(allowed)}

    def op_end(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        jid = _jid(req)
        self._check_job(conn.caller, self.manager.job(jid))
        return job_json(self.manager.end(jid))

    def op_freeze(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        return self._freeze(conn, req, True)

    def op_thaw(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        return self._freeze(conn, req, False)

    def _freeze(self, conn: Connection, req: Dict[str, Any], freeze: bool) -> Dict[str, Any]:
        jid = _jid(req)
        job = self.manager.job(jid)
        self._check_job(conn.caller, job)
        self.manager.member_pids(jid)  # bad-job-state for an ended job
        if freeze:
            self.manager.backend.freeze(job)
        else:
            self.manager.backend.thaw(job)
        return {"jid": format_jid(jid), "frozen": freeze}

    def op_status(self, conn: Connection, req: Dict[str, Any], req_id: Any) -> Dict[str, Any]:
        out = self.status_fn()
        out["version"] = __version__
        out["protocol"] = PROTOCOL_VERSION
        return out


def _group_id(name: str) -> Optional[int]:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("admin_group does not exist; only root is admin", admin_group=name)
        return None


def peer_credentials(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected AF_UNIX socket."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def peer_groups(sock: socket.socket, pid: int = 0) -> List[int]:
    """Supplementary groups of the peer (SO_PEERGROUPS; /proc/PID/status as fallback)."""
    size = 4 * 256
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
            return [g for (g,) in _GID.iter_unpack(raw[: len(raw) // 4 * 4])]
        except OSError as exc:
            if exc.errno == 34 and size < 4 * 65536:  # ERANGE: buffer too small
                size *= 4
                continue
            break
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []
