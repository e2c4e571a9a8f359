"""The control socket's server: transport, limits and flow control.

AF_UNIX stream, one JSON object per line (:mod:`elsa.protocol`); who may do
what is :mod:`elsa.core.authorization`, the operations are
:mod:`elsa.core.operations`.

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

The protocol (operations, fields, replies, error codes, limits, versioning)
is documented in docs/protocol.md.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from elsa.core.authorization import Authorizer, Caller
from elsa.core.background import Background
from elsa.core.model import Job
from elsa.core.operations import (
    DURABLE_OPS,
    AfterCommit,
    InThread,
    Operations,
    PollUntil,
    WaitFor,
)
from elsa.core.store import Store
from elsa.errors import ElsaError, PermissionDenied
from elsa.logsetup import structlog
from elsa.protocol import (
    ERROR_CODES,
    LimitReached,
    check_version,
    encode,
    error_reply,
    ok_reply,
    parse_request,
    request_id,
)

log = structlog.get_logger("elsa.control")

#: Stop reading a client whose unread replies exceed this (bytes).
OUTPUT_HIGH_WATER = 1024 * 1024
#: Requests handled per wake-up of one connection before yielding to the loop.
REQUESTS_PER_TURN = 32
#: ... or this many seconds, whichever comes first,
TURN_BUDGET = 0.002
#: ... but at least this many requests: a launcher pipelines two (the attach of
#: job k with the create of job k+1), and handled in one turn they share one
#: commit and one send, so it wakes once (docs/protocol.md).
MIN_REQUESTS_PER_TURN = 2
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


def check_socket_directory(directory: str) -> None:
    """Refuse a socket directory (or any directory above it) that a user other
    than root or elsad's own could write to: they could replace the socket and
    receive every client's requests. A sticky world-writable directory (/tmp)
    is safe: others cannot remove or rename what they do not own."""
    me = os.geteuid()
    d = os.path.abspath(directory)
    while True:
        try:
            st = os.stat(d)
        except OSError as exc:
            raise ElsaError(f"cannot check socket directory {d}: {exc.strerror}") from None
        if st.st_uid not in (0, me):
            raise ElsaError(f"socket directory {d} is owned by uid {st.st_uid}, who could "
                            "replace the socket; put 'socket' in a directory only root "
                            "(or elsad's user) can write, e.g. /run/elsa")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ElsaError(f"socket directory {d} is writable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):o}), who could replace the "
                            "socket; remove that permission or move 'socket'")
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


class ControlServer:
    """Accepts connections and dispatches requests to :class:`Operations`."""

    def __init__(self, path: str, ops: Operations, authz: Authorizer, store: Store, *,
                 limits: Dict[str, Any],
                 add_reader: Callable[[int, Callable[[], None]], None],
                 remove_reader: Callable[[int], None],
                 set_writer: Callable[[int, Optional[Callable[[], None]]], None],
                 after_pass: Optional[Callable[[Callable[[], None]], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.ops = ops
        self.authz = authz
        self.store = store
        self.limits = limits  # shared with ops (hello) and updated in place on reload
        self._add_reader = add_reader
        self._remove_reader = remove_reader
        self._set_writer = set_writer
        self.clock = clock
        self.conns: Dict[int, Connection] = {}
        self.per_uid: Dict[int, int] = {}
        self.waiters: List[Waiter] = []
        # Requests answered when the kernel finished (PollUntil): (conn, poll,
        # deadline, request id), checked by sweep() every 0.1 s.
        self.pollers: List[Tuple[Connection, PollUntil, float, Any]] = []
        self._holding: Set[Connection] = set()  # connections with held replies
        # The store mark to ask a commit for once the loop's pass is over: the
        # durable requests of one pass share a commit (instead of the writer
        # taking the first alone, and the GIL, while the pass goes on).
        self._kick_mark = 0
        self._defer_kicks = after_pass is not None
        if after_pass is not None:
            after_pass(self._kick)
        self.background: Optional[Background] = None  # started by the first report
        self.counters = {"accepted": 0, "requests": 0, "errors": 0, "too_large": 0,
                         "refused_connections": 0, "dropped_slow_clients": 0,
                         "idle_closed": 0, "deferred_turns": 0}
        self.sock = self._listen(path)
        add_reader(self.sock.fileno(), self._accept)

    # -- listening ---------------------------------------------------------------
    @staticmethod
    def _listen(path: str) -> socket.socket:
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ElsaError(f"cannot create socket directory {directory}: {exc.strerror}; "
                            "set 'socket' in the config to a writable place") from None
        check_socket_directory(directory)
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
        # Everyone may connect; every request is authorized from SO_PEERCRED.
        # bind() creates the file with 0777 & ~umask: set the mode there rather
        # than chmod the path afterwards, which would follow a symlink put in
        # its place (and Linux has no lchmod).
        old_umask = os.umask(0o111)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            # (an over-long path raises an OSError with no errno: its text says why)
            raise ElsaError(f"cannot bind control socket {path}: {exc.strerror or exc}; "
                            "set 'socket' in the config to a writable place") from None
        finally:
            os.umask(old_umask)
        # A deep backlog absorbs bursts of clients between two accept turns (the
        # kernel caps it at net.core.somaxconn).
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        if self.background is not None:
            self.background.close(self._remove_reader)
            self.background = None
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
                caller = self.authz.caller(sock)
            except OSError as exc:
                log.warning("cannot read peer credentials", error=str(exc))
                sock.close()
                continue
            refusal = self._admission(caller)
            if refusal:
                self.counters["refused_connections"] += 1
                try:
                    sock.send(encode(error_reply(None, "busy", refusal)))
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
        self._reply(conn, error_reply(None, "too-large",
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
                    handled >= MIN_REQUESTS_PER_TURN and self.clock() - start > TURN_BUDGET):
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
            req = parse_request(line)
            req_id = request_id(req)
            check_version(req)
            result = self.ops.dispatch(conn.caller, req)
            if isinstance(result, WaitFor):
                self.add_waiter(conn, result.jid, result.timeout, req_id)
                return
            if isinstance(result, PollUntil):
                self._add_poller(conn, result, req_id)
                return
            if isinstance(result, AfterCommit):
                mark = self.store.mark()
                if not self.store.is_committed(mark):
                    self._want_commit(mark)
                    self._reply(conn, _Later(req_id, result.compute), mark)  # type: ignore[arg-type]
                    return
                result = result.compute()
            if isinstance(result, InThread):
                self._in_thread(conn, result.fn, req_id)
                return
        except ElsaError as exc:
            self.counters["errors"] += 1
            code = exc.code if exc.code in ERROR_CODES else "internal"
            if isinstance(exc, PermissionDenied):
                # An audit trail of refused attempts (who, from which process).
                log.info("request denied", uid=conn.caller.uid, pid=conn.caller.pid,
                         op=str(req.get("op"))[:32], reason=exc.message)
            self._reply(conn, error_reply(req_id, code, exc.message))
            return
        except Exception as exc:  # a bug must not take the daemon down
            self.counters["errors"] += 1
            corrupt = self.store.read_failed(exc)
            if corrupt is not None:
                self._reply(conn, error_reply(req_id, "store", corrupt))
                return
            log.exception("request failed", error=str(exc))
            self._reply(conn, error_reply(req_id, "internal",
                                           f"internal error: {type(exc).__name__}: {exc}"))
            return
        mark = 0
        if req.get("op") in DURABLE_OPS:
            # The reply promises what the request changed survives a crash: send
            # it once the store committed it. The loop does not wait meanwhile,
            # and requests arriving during one commit share the next.
            store = self.store
            mark = store.mark()
            if store.is_committed(mark):
                mark = 0
            else:
                self._want_commit(mark)
        self._reply(conn, ok_reply(req_id, result), mark)

    def _materialize(self, later: _Later) -> Dict[str, Any]:
        """The reply of a request answered after a commit (or a poll)."""
        try:
            return ok_reply(later.req_id, later.compute())
        except ElsaError as exc:
            self.counters["errors"] += 1
            code = exc.code if exc.code in ERROR_CODES else "internal"
            return error_reply(later.req_id, code, exc.message)
        except Exception as exc:  # a bug must not take the daemon down
            self.counters["errors"] += 1
            log.exception("request failed", error=str(exc))
            return error_reply(later.req_id, "internal",
                               f"internal error: {type(exc).__name__}: {exc}")

    def _add_poller(self, conn: Connection, p: PollUntil, req_id: Any) -> None:
        if conn.waiting >= MAX_WAITS_PER_CONNECTION:
            raise LimitReached(f"this connection already has {conn.waiting} outstanding "
                               "requests; send fewer at once")
        conn.waiting += 1
        self.pollers.append((conn, p, self.clock() + p.timeout, req_id))
        self._poll(conn, p, self.clock() + p.timeout, req_id)

    def _poll(self, conn: Connection, p: PollUntil, deadline: float, req_id: Any) -> bool:
        """Answer *p* if it is done or timed out; True when answered."""
        def answer() -> Any:
            res = p.poll()
            if res is None:
                raise p.on_timeout()
            return res

        try:
            done = p.poll() is not None
        except ElsaError:
            done = True  # answer() raises it again: the error is the reply
        if not done and self.clock() < deadline:
            return False
        self.pollers = [x for x in self.pollers if x[1] is not p]
        conn.waiting -= 1
        conn.last_active = self.clock()
        self._reply(conn, self._materialize(_Later(req_id, answer)))
        if not conn.closed:
            self._process(conn)
        return True

    def on_commit(self) -> None:
        """The store committed, or a commit failed: send the held replies whose writes
        are durable. While the store cannot commit (a full disk), the replies still
        waiting get its error: their change is held in memory, not stored, and a
        client would otherwise wait out its timeout as if elsad hung."""
        store = self.store
        store.drain_notifications()
        failing = store.failing()
        for conn in list(self._holding):
            held = conn.held
            # The replies this commit releases go in one send (a pipelined
            # client, such as a launcher's attach + next create, wakes once).
            in_turn, conn.in_turn = conn.in_turn, True
            while held and (held[0][0] == 0 or store.is_committed(held[0][0]) or failing):
                mark, obj = held.popleft()
                if failing is not None and mark and not store.is_committed(mark):
                    self.counters["errors"] += 1
                    req_id = obj.req_id if isinstance(obj, _Later) else obj.get("id")
                    obj = error_reply(req_id, "store", failing)
                elif isinstance(obj, _Later):
                    obj = self._materialize(obj)
                self._send_reply(conn, obj)
            conn.in_turn = in_turn
            if not in_turn:
                self._flush(conn)
            if not held:
                self._holding.discard(conn)
            else:
                self._want_commit(held[0][0])

    def _want_commit(self, mark: int) -> None:
        if self._defer_kicks:
            self._kick_mark = max(self._kick_mark, mark)
        else:
            self.store.kick(mark)

    def _kick(self) -> None:
        """End of a loop pass: ask the store to commit what this pass's replies wait for."""
        if self._kick_mark:
            self.store.kick(self._kick_mark)
            self._kick_mark = 0

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
        conn.outbuf += encode(obj)
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
            self.pollers = [x for x in self.pollers if x[0] is not conn]
            conn.waiting = 0

    def stats(self) -> Dict[str, Any]:
        """Counters for the ``status`` reply (docs/protocol.md)."""
        return dict(self.counters, connections=len(self.conns), waiters=len(self.waiters),
                    denied=self.authz.denied)

    # -- timers --------------------------------------------------------------------------
    def has_sweep_work(self) -> bool:
        """Whether :meth:`sweep` has anything to look at: open connections, polls, waits."""
        return bool(self.conns or self.pollers or self.waiters)

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
        for conn, p, deadline, req_id in list(self.pollers):
            self._poll(conn, p, deadline, req_id)
        expired = [w for w in self.waiters if w.deadline is not None and now >= w.deadline]
        if expired:
            self.waiters = [w for w in self.waiters if not (w.deadline is not None
                                                            and now >= w.deadline)]
            for w in expired:
                try:
                    job = self.ops.job(w.jid)
                except ElsaError as exc:
                    w.conn.waiting -= 1
                    self._reply(w.conn, error_reply(w.req_id, exc.code, exc.message))
                    continue
                self._answer_wait(w, False, job)

    def next_deadline(self) -> Optional[float]:
        """The earliest wait deadline (monotonic), for a daemon that wants to wake for it."""
        deadlines = [w.deadline for w in self.waiters if w.deadline is not None]
        return min(deadlines) if deadlines else None

    def waits_for(self, jid: int) -> bool:
        """A client waits for job *jid* to end (``wait``)."""
        return any(w.jid == jid for w in self.waiters)

    def job_ended(self, job: Job) -> None:
        """Answer every ``wait`` on *job* (manager after-end callback)."""
        if not self.waits_for(job.jid):
            return
        done = [w for w in self.waiters if w.jid == job.jid]
        self.waiters = [w for w in self.waiters if w.jid != job.jid]
        for w in done:
            self._answer_wait(w, True, job)

    def _answer_wait(self, w: Waiter, ended: bool, job: Job) -> None:
        conn = w.conn
        conn.waiting -= 1
        conn.last_active = self.clock()
        mark = 0
        if ended:
            # Sent once the job's end (its state, its final readings) is committed:
            # a script that waits, then reports from the store, finds it ended.
            mark = self.store.mark()
            if self.store.is_committed(mark):
                mark = 0
            else:
                self._want_commit(mark)
        self._reply(conn, ok_reply(w.req_id, self.ops.wait_result(job, ended)), mark)
        if not conn.closed:
            self._process(conn)

    def _in_thread(self, conn: Connection, fn: Callable[[], Any], req_id: Any) -> None:
        """Run *fn* on the background worker; reply when it is done. Counted as
        an outstanding wait, so the connection is neither idle-closed nor
        answered out of order meanwhile."""
        if conn.waiting >= MAX_WAITS_PER_CONNECTION:
            raise LimitReached(f"this connection already has {conn.waiting} outstanding "
                               "requests; send fewer at once")
        if self.background is None:
            self.background = Background(self._add_reader)
        conn.waiting += 1

        def done(result: Any, error: Optional[BaseException]) -> None:
            conn.waiting -= 1
            conn.last_active = self.clock()
            if error is None:
                self._reply(conn, ok_reply(req_id, result))
            elif isinstance(error, ElsaError):
                self.counters["errors"] += 1
                code = error.code if error.code in ERROR_CODES else "internal"
                self._reply(conn, error_reply(req_id, code, error.message))
            else:
                self.counters["errors"] += 1
                log.error("request failed", error=f"{type(error).__name__}: {error}")
                self._reply(conn, error_reply(req_id, "internal", f"internal error: "
                                              f"{type(error).__name__}: {error}"))
            if not conn.closed:
                self._process(conn)

        self.background.submit(fn, done)

    def add_waiter(self, conn: Connection, jid: int, timeout: Optional[float],
                   req_id: Any) -> None:
        """Answer the request later: when job *jid* ends or *timeout* s pass."""
        if conn.waiting >= MAX_WAITS_PER_CONNECTION:
            raise LimitReached(f"this connection already has {conn.waiting} outstanding "
                               "waits; wait on fewer jobs per connection")
        deadline = None if timeout is None else self.clock() + timeout
        conn.waiting += 1
        self.waiters.append(Waiter(conn, jid, deadline, req_id))


def _hung_up(sock: socket.socket) -> bool:
    """True when the peer closed completely (POLLHUP), not just its sending side."""
    try:
        p = select.poll()
        p.register(sock.fileno(), select.POLLHUP)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return True


@dataclass(frozen=True)
class _Later:
    """A reply computed when it is sent (after a store commit or a poll)."""

    req_id: Any
    compute: Callable[[], Any]
