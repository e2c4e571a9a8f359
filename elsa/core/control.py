"""The control socket: AF_UNIX stream, one JSON object per line, per-request authorization.

Runs on the daemon's event thread with non-blocking sockets, so a slow or
half-open client can never stall the proc-connector path: reads and writes
happen only when the selector says they will not block, partial lines are
buffered (bounded by ``limits.max_request_bytes``), idle connections are
closed after ``limits.idle_timeout`` and clients that do not read their
replies are dropped once their output backlog passes a bound.

Authorization uses SO_PEERCRED (unix(7)), never anything the client claims:
root and members of ``admin_group`` may do everything; any other user may
create jobs and act only on processes whose uid is theirs and jobs they own.
cgrulesengd's socket had no such check (any client could move any pid).

The protocol is documented in docs/protocol.md.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import structlog

from elsa import __version__
from elsa.core.model import Job, format_jid
from elsa.errors import (
    ElsaError,
    JobNotFound,
    PermissionDenied,
    ProtocolError,
)

log = structlog.get_logger("elsa.control")

PROTOCOL_VERSION = 1
MAX_OUTPUT_BACKLOG = 4 * 1024 * 1024
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    admin: bool


@dataclass
class Connection:
    sock: socket.socket
    caller: Caller
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    last_active: float = 0.0
    closing: bool = False
    waiting: int = 0  # outstanding 'wait' requests


@dataclass
class Waiter:
    conn: Connection
    jid: int
    deadline: Optional[float]
    req_id: Any


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
        self.waiters: List[Waiter] = []
        self.counters = {"requests": 0, "errors": 0, "refused_connections": 0,
                         "dropped_slow_clients": 0, "idle_closed": 0}
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
        sock.listen(128)
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
        for _ in range(64):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed", error=str(exc))
                return
            sock.setblocking(False)
            if len(self.conns) >= self.limits["max_connections"]:
                self.counters["refused_connections"] += 1
                try:
                    sock.send(_encode(_error_reply(None, "busy", "too many connections; "
                                                   "retry later")))
                except OSError:
                    pass
                sock.close()
                continue
            pid, uid, gid = peer_credentials(sock)
            caller = Caller(pid=pid, uid=uid, gid=gid, admin=self.ops.is_admin(uid, gid))
            conn = Connection(sock=sock, caller=caller, last_active=self.clock())
            self.conns[sock.fileno()] = conn
            self._add_reader(sock.fileno(), lambda c=conn: self._readable(c))

    def _readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.last_active = self.clock()
        conn.inbuf += data
        limit = self.limits["max_request_bytes"]
        while not conn.closing:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                if len(conn.inbuf) > limit:
                    self._reply(conn, _error_reply(None, "too-large",
                                                   f"request longer than {limit} bytes"))
                    conn.closing = True
                    conn.inbuf.clear()
                break
            line = bytes(conn.inbuf[:nl])
            del conn.inbuf[:nl + 1]
            if len(line) > limit:
                self._reply(conn, _error_reply(None, "too-large",
                                               f"request longer than {limit} bytes"))
                continue
            if line.strip():
                self._handle(conn, line)
        if conn.closing and not conn.outbuf:
            self._close(conn)

    def _handle(self, conn: Connection, line: bytes) -> None:
        self.counters["requests"] += 1
        req_id = None
        try:
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ProtocolError(f"request is not valid JSON: {exc}") from None
            if not isinstance(req, dict):
                raise ProtocolError("request must be a JSON object")
            req_id = req.get("id")
            if isinstance(req_id, (dict, list)):
                req_id = None
                raise ProtocolError("'id' must be a string or a number")
            version = req.get("v", PROTOCOL_VERSION)
            if version != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {version!r} not supported; this "
                                    f"daemon speaks v{PROTOCOL_VERSION}")
            result = self.ops.dispatch(conn, req)
        except ElsaError as exc:
            self.counters["errors"] += 1
            self._reply(conn, _error_reply(req_id, exc.code, exc.message))
            return
        except Exception as exc:  # a bug must not take the daemon down
            self.counters["errors"] += 1
            log.exception("request failed", error=str(exc))
            self._reply(conn, _error_reply(req_id, "internal", f"internal error: {exc}"))
            return
        if result is _DEFERRED:
            return
        self._reply(conn, {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result})

    def _reply(self, conn: Connection, obj: Dict[str, Any]) -> None:
        if obj.get("id") is None:
            obj.pop("id", None)
        conn.outbuf += _encode(obj)
        if len(conn.outbuf) > MAX_OUTPUT_BACKLOG:
            # The client does not read its replies; drop it rather than buffer forever.
            self.counters["dropped_slow_clients"] += 1
            self._close(conn)
            return
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            self._set_writer(fd, lambda c=conn: self._flush(c))
            return
        except OSError:
            self._close(conn)
            return
        self._set_writer(fd, None)
        if conn.closing:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and fd in self.conns:
            del self.conns[fd]
            self._remove_reader(fd)
        conn.sock.close()
        self.waiters = [w for w in self.waiters if w.conn is not conn]

    # -- timers --------------------------------------------------------------------------
    def sweep(self) -> None:
        """Close idle connections and answer waits that timed out (timer, every ~0.5 s)."""
        now = self.clock()
        idle = self.limits["idle_timeout"]
        for conn in list(self.conns.values()):
            if conn.waiting == 0 and now - conn.last_active > idle:
                self.counters["idle_closed"] += 1
                self._close(conn)
        expired = [w for w in self.waiters if w.deadline is not None and now >= w.deadline]
        if expired:
            self.waiters = [w for w in self.waiters if w not in expired]
            for w in expired:
                w.conn.waiting -= 1
                w.conn.last_active = now
                job = self.ops.manager.job(w.jid)
                self._reply(w.conn, {"v": PROTOCOL_VERSION, "id": w.req_id, "ok": True,
                                     "result": {"ended": False, "job": _job_json(job)}})

    def job_ended(self, job: Job) -> None:
        """Answer every ``wait`` on *job* (manager after-end callback)."""
        done = [w for w in self.waiters if w.jid == job.jid]
        if not done:
            return
        self.waiters = [w for w in self.waiters if w.jid != job.jid]
        for w in done:
            w.conn.waiting -= 1
            w.conn.last_active = self.clock()
            self._reply(w.conn, {"v": PROTOCOL_VERSION, "id": w.req_id, "ok": True,
                                 "result": {"ended": True, "job": _job_json(job)}})

    def add_waiter(self, conn: Connection, jid: int, timeout: Optional[float],
                   req_id: Any) -> None:
        deadline = None if timeout is None else self.clock() + timeout
        conn.waiting += 1
        self.waiters.append(Waiter(conn, jid, deadline, req_id))


_DEFERRED = object()


def _encode(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _error_reply(req_id: Any, code: str, message: str) -> Dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False,
            "error": {"code": code, "message": message}}


def _job_json(job: Job, with_pids: bool = True) -> Dict[str, Any]:
    out = job.to_json(with_pids)
    out["jid_hex"] = format_jid(job.jid)
    return out


# -- request validation helpers --------------------------------------------------------

def _int(req: Dict[str, Any], key: str, *, required: bool = True, minimum: int = 0,
         maximum: int = 2 ** 63 - 1) -> Optional[int]:
    value = req.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"'{key}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{key}' must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ProtocolError(f"'{key}' out of range: {value}")
    return value


def _str(req: Dict[str, Any], key: str, default: str = "", max_len: int = 256) -> str:
    value = req.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise ProtocolError(f"'{key}' longer than {max_len} characters")
    return value


def _str_map(req: Dict[str, Any], key: str) -> Dict[str, str]:
    value = req.get(key, {})
    if not isinstance(value, dict):
        raise ProtocolError(f"'{key}' must be an object of strings")
    if len(value) > 64:
        raise ProtocolError(f"'{key}' has more than 64 entries")
    for k, v in value.items():
        if not isinstance(v, str) or len(k) > 128 or len(v) > 1024 or not k:
            raise ProtocolError(f"'{key}' must map non-empty names (<=128 chars) to "
                                "strings (<=1024 chars)")
    return dict(value)


def _pids(req: Dict[str, Any], key: str = "pids") -> List[int]:
    value = req.get(key)
    if not isinstance(value, list) or not value:
        raise ProtocolError(f"'{key}' must be a non-empty array of pids")
    if len(value) > 4096:
        raise ProtocolError(f"'{key}' has more than 4096 pids")
    out = []
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 2 ** 31:
            raise ProtocolError(f"'{key}' must contain positive integers, got {p!r}")
        out.append(p)
    return out


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
        self._handlers: Dict[str, Callable[[Connection, Dict[str, Any]], Any]] = {
            "create": self.op_create, "attach": self.op_attach, "detach": self.op_detach,
            "jobof": self.op_jobof, "list": self.op_list, "show": self.op_show,
            "pids": self.op_pids, "wait": self.op_wait, "kill": self.op_kill,
            "end": self.op_end, "status": self.op_status, "freeze": self.op_freeze,
            "thaw": self.op_thaw,
        }

    def is_admin(self, uid: int, gid: int) -> bool:
        if uid == 0:
            return True
        if self.admin_gid is None:
            return False
        if gid == self.admin_gid:
            return True
        try:
            name = pwd.getpwuid(uid).pw_name
            return self.admin_gid in os.getgrouplist(name, gid)
        except KeyError:
            return False

    def dispatch(self, conn: Connection, req: Dict[str, Any]) -> Any:
        op = req.get("op")
        if not isinstance(op, str):
            raise ProtocolError("'op' is required and must be a string")
        handler = self._handlers.get(op)
        if handler is None:
            raise ProtocolError(f"unknown op {op[:64]!r}; known: "
                                f"{', '.join(sorted(self._handlers))}")
        return handler(conn, req)

    # -- authorization ---------------------------------------------------------------
    def _deny(self, message: str) -> PermissionDenied:
        self.denied += 1
        return PermissionDenied(message)

    def _check_job(self, caller: Caller, job: Job) -> None:
        if not caller.admin and job.owner_uid != caller.uid:
            raise self._deny(f"job {format_jid(job.jid)} belongs to uid {job.owner_uid}; "
                             f"uid {caller.uid} may only manage its own jobs")

    def _check_pid(self, caller: Caller, pid: int) -> None:
        if caller.admin:
            return
        uid = self.manager.owner_of_pid(pid)
        if uid != caller.uid:
            raise self._deny(f"process {pid} belongs to uid {uid}; uid {caller.uid} may only "
                             "manage its own processes")

    # -- operations -------------------------------------------------------------------
    def op_create(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        caller = conn.caller
        owner = _int(req, "owner_uid", required=False, maximum=2 ** 32 - 2)
        if owner is None:
            owner = caller.uid
        elif owner != caller.uid and not caller.admin:
            raise self._deny("only root or the admin group may create jobs for another user")
        job = self.manager.create(name=_str(req, "name"), owner_uid=owner,
                                  tags=_str_map(req, "tags"), params=_str_map(req, "params"))
        pids = req.get("pids")
        if pids is not None:
            for pid in _pids(req):
                self._check_pid(caller, pid)
                self.manager.attach(job.jid, pid)
            job = self.manager.job(job.jid)
        return _job_json(job)

    def op_attach(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        jid = _int(req, "jid", minimum=1)
        pids = _pids(req)
        job = self.manager.job(jid)
        self._check_job(conn.caller, job)
        attached = []
        for pid in pids:
            self._check_pid(conn.caller, pid)
            current = self.manager.job_of(pid)
            if current is not None and current != jid:
                self._check_job(conn.caller, self.manager.job(current))
            ident = self.manager.attach(jid, pid)
            attached.append({"pid": ident.pid, "start_ticks": ident.start_ticks})
        return {"jid": jid, "attached": attached}

    def op_detach(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        out = []
        for pid in _pids(req):
            jid = self.manager.job_of(pid)
            if jid is None:
                raise JobNotFound(f"pid {pid} is not in any job")
            self._check_pid(conn.caller, pid)
            self._check_job(conn.caller, self.manager.job(jid))
            self.manager.detach(pid)
            out.append({"pid": pid, "jid": jid})
        return {"detached": out}

    def op_jobof(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        pid = _int(req, "pid", minimum=1, maximum=2 ** 31)
        jid = self.manager.job_of(pid)
        if jid is None:
            raise JobNotFound(f"pid {pid} is not in any job")
        return {"pid": pid, "jid": jid, "jid_hex": format_jid(jid)}

    def op_list(self, conn: Connection, req: Dict[str, Any]) -> List[Dict[str, Any]]:
        include_ended = req.get("all", False)
        if not isinstance(include_ended, bool):
            raise ProtocolError("'all' must be a boolean")
        running = {j.jid: j for j in self.manager.running()}
        out = [_job_json(j, with_pids=False) for j in running.values()]
        if include_ended:
            out += [_job_json(j, with_pids=False)
                    for j in self.manager.store.jobs(include_ended=True)
                    if j.jid not in running]
        out.sort(key=lambda j: j["jid"])
        return out

    def op_show(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        return _job_json(self.manager.job(_int(req, "jid", minimum=1)))

    def op_pids(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        jid = _int(req, "jid", minimum=1)
        return {"jid": jid, "pids": self.manager.member_pids(jid)}

    def op_wait(self, conn: Connection, req: Dict[str, Any]) -> Any:
        jid = _int(req, "jid", minimum=1)
        timeout = req.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout <= 10 ** 7):
            raise ProtocolError("'timeout' must be a number of seconds (0 to 1e7)")
        job = self.manager.job(jid)
        if job.state != "running":
            return {"ended": True, "job": _job_json(job)}
        assert self.server is not None
        self.server.add_waiter(conn, jid, timeout, req.get("id"))
        return _DEFERRED

    def op_kill(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        jid = _int(req, "jid", minimum=1)
        sig = _int(req, "signal", required=False, minimum=1, maximum=64) or 15
        self._check_job(conn.caller, self.manager.job(jid))
        return {"jid": jid, "signal": sig, "signalled": self.manager.signal(jid, sig)}

    def op_end(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        jid = _int(req, "jid", minimum=1)
        self._check_job(conn.caller, self.manager.job(jid))
        return _job_json(self.manager.end(jid))

    def op_freeze(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        jid = _int(req, "jid", minimum=1)
        job = self.manager.job(jid)
        self._check_job(conn.caller, job)
        self.manager.backend.freeze(job)
        return {"jid": jid, "frozen": True}

    def op_thaw(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
        jid = _int(req, "jid", minimum=1)
        job = self.manager.job(jid)
        self._check_job(conn.caller, job)
        self.manager.backend.thaw(job)
        return {"jid": jid, "frozen": False}

    def op_status(self, conn: Connection, req: Dict[str, Any]) -> Dict[str, Any]:
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


