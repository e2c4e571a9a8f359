"""Python client for elsad's control socket (used by ``elsa-jobmng``; importable by anyone).

Example::

    import os
    from elsa.client import Client

    with Client() as c:                      # socket from the config, see default_socket()
        job = c.create(name="build", tags={"queue": "short"}, pids=[os.getpid()])
        print(job["jid"], c.pids(job["jid"]))  # jid: "0x0035969e00000402"

Every method sends one request (docs/protocol.md) and returns its ``result``.
A refusal raises :class:`RequestFailed` whose ``code`` is the protocol's stable
error code; a daemon that is not running (or goes away) raises
:class:`~elsa.errors.DaemonUnavailable`. A :class:`Client` holds one
connection and is not thread-safe: use one per thread.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any, Dict, Iterable, List, Optional, Union

from elsa.errors import DaemonUnavailable, ElsaError, ProtocolError
from elsa.protocol import PROTOCOL_VERSION, encode, parse_reply

DEFAULT_SOCKET = "/run/elsa/elsad.sock"

# A job id as callers hold it: the hex string every reply carries
# ("0x0035969e00000402", docs/jobid.md), or the number it stands for.
JidLike = Union[str, int]


def _wire_jid(jid: JidLike) -> str:
    """The request's spelling of a job id: the zero-padded hex string."""
    if isinstance(jid, int) and not isinstance(jid, bool):
        return f"{jid:#018x}"
    return jid


#: Longest reply line accepted (a ``list --all`` of 10,000 jobs fits easily).
MAX_REPLY_BYTES = 64 * 1024 * 1024

CLOSED = ("elsad closed the connection (did it stop, or was this connection idle longer "
          "than limits.idle_timeout?)")
START_HINT = "start it with 'systemctl start elsad' (or run 'elsad' as root)"


class RequestFailed(ElsaError):
    """The daemon answered with an error object; ``code`` is its stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


def default_socket(config_path: Optional[str] = None) -> str:
    """The socket path from the config: ``config_path``, else ``$ELSA_CONFIG``, else
    /etc/elsa/elsa.toml if it exists, its ``socket`` key; else the built-in default."""
    from elsa import config

    path = config.resolve_path(config_path)
    if path is None:
        return DEFAULT_SOCKET
    return config.load(path).socket


class Client:
    """One connection to elsad; requests are answered in order."""

    def __init__(self, path: Optional[str] = None, timeout: Optional[float] = 30.0,
                 *, config_path: Optional[str] = None) -> None:
        self.path = path or default_socket(config_path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self._connect(timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise DaemonUnavailable(
                f"elsad is not running (nothing listens on {self.path}: "
                f"{exc.strerror}); {START_HINT}") from None
        except PermissionError:
            self.sock.close()
            raise DaemonUnavailable(
                f"cannot connect to {self.path}: permission denied (the socket or its "
                "directory is not accessible to this user)") from None
        except socket.timeout:
            self.sock.close()
            raise DaemonUnavailable(f"elsad did not accept a connection on {self.path} "
                                    f"within {timeout} s") from None
        except OSError as exc:
            self.sock.close()
            raise DaemonUnavailable(f"cannot connect to {self.path}: {exc.strerror or exc}"
                                    ) from None
        self._rfile = self.sock.makefile("rb")

    def _connect(self, timeout: Optional[float]) -> None:
        # EAGAIN on an AF_UNIX connect means the listen backlog is full (a burst
        # of clients, unix(7)): the daemon is alive, so retry until the timeout.
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                self.sock.connect(self.path)
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise socket.timeout("listen backlog full") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._rfile.close()
        finally:
            self.sock.close()

    def call(self, op: str, io_timeout: Optional[float] = None, **fields: Any) -> Any:
        """Send one request and return its ``result``; raise :class:`RequestFailed`.

        Fields whose value is ``None`` are left out (the daemon's default applies).
        """
        req_id = next(self._ids)
        req: Dict[str, Any] = {"v": PROTOCOL_VERSION, "id": req_id, "op": op}
        req.update({k: v for k, v in fields.items() if v is not None})
        try:
            line = encode(req)
        except ValueError as exc:  # NaN or Infinity: no JSON for them (RFC 8259)
            raise ProtocolError(f"cannot send '{op}': {exc}") from exc
        self.sock.settimeout(self.timeout if io_timeout is None else io_timeout)
        try:
            self.sock.sendall(line)
        except socket.timeout:
            raise DaemonUnavailable(f"elsad did not take '{op}' in time") from None
        except OSError as exc:
            # The daemon may have refused the connection with a reply (busy).
            reply = self._read_reply(op, quiet=True)
            if reply is not None:
                return self._result(reply, None)
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                raise DaemonUnavailable(CLOSED) from None
            raise DaemonUnavailable(f"connection to elsad failed: {exc}") from None
        reply = self._read_reply(op)
        return self._result(reply, req_id)

    def _read_reply(self, op: str, quiet: bool = False) -> Optional[Dict[str, Any]]:
        try:
            line = self._rfile.readline(MAX_REPLY_BYTES)
        except socket.timeout:
            if quiet:
                return None
            raise DaemonUnavailable(f"elsad did not answer '{op}' in time") from None
        except OSError as exc:
            if quiet:
                return None
            raise DaemonUnavailable(f"connection to elsad failed: {exc}") from None
        if not line:
            if quiet:
                return None
            raise DaemonUnavailable(CLOSED)
        return parse_reply(line)

    @staticmethod
    def _result(reply: Dict[str, Any], req_id: Optional[int]) -> Any:
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RequestFailed(str(err.get("code", "error")),
                                str(err.get("message", "unknown error")))
        if req_id is not None and reply.get("id") != req_id:
            raise ProtocolError(f"reply id {reply.get('id')!r} does not match request "
                                f"id {req_id}")
        return reply.get("result")

    # -- the operations (docs/protocol.md) ---------------------------------------------
    def hello(self) -> Dict[str, Any]:
        """Protocol versions, operations, limits, and who the daemon thinks we are."""
        return self.call("hello")

    def create(self, name: str = "", tags: Optional[Dict[str, str]] = None,
               params: Optional[Dict[str, str]] = None,
               pids: Optional[Iterable[int]] = None,
               owner_uid: Optional[int] = None) -> Dict[str, Any]:
        """Create a job (and attach *pids* to it); returns the job object."""
        return self.call("create", name=name, tags=tags or None, params=params or None,
                         pids=list(pids) if pids is not None else None, owner_uid=owner_uid)

    def attach(self, jid: JidLike, pids: Iterable[int]) -> Dict[str, Any]:
        return self.call("attach", jid=_wire_jid(jid), pids=list(pids))

    def detach(self, pids: Iterable[int]) -> Dict[str, Any]:
        return self.call("detach", pids=list(pids))

    def jobof(self, pid: int) -> str:
        """The job id (hex string) of *pid*; raises RequestFailed('not-in-job') when it has none."""
        return self.call("jobof", pid=pid)["jid"]

    def list(self, all: bool = False, owner_uid: Optional[int] = None,
             limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return self.call("list", all=all, owner_uid=owner_uid, limit=limit)

    def show(self, jid: JidLike) -> Dict[str, Any]:
        return self.call("show", jid=_wire_jid(jid))

    def pids(self, jid: JidLike) -> List[int]:
        return self.call("pids", jid=_wire_jid(jid))["pids"]

    def wait(self, jid: JidLike, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Block until *jid* ends or *timeout* s pass: ``{"ended": bool, "job": {...}}``."""
        # The socket must outlast the daemon-side timeout; None waits forever.
        io_timeout = None if timeout is None else timeout + 10.0
        return self.call("wait", io_timeout=io_timeout, jid=_wire_jid(jid), timeout=timeout)

    def kill(self, jid: JidLike, signal: Union[int, str] = 15) -> Dict[str, Any]:
        return self.call("kill", jid=_wire_jid(jid), signal=signal)

    def end(self, jid: JidLike) -> Dict[str, Any]:
        return self.call("end", jid=_wire_jid(jid))

    def freeze(self, jid: JidLike) -> Dict[str, Any]:
        return self.call("freeze", jid=_wire_jid(jid))

    def thaw(self, jid: JidLike) -> Dict[str, Any]:
        return self.call("thaw", jid=_wire_jid(jid))

    def status(self) -> Dict[str, Any]:
        return self.call("status")

    def tag(self, jid: int, tags: Dict[str, str]) -> Dict[str, Any]:
        """Set tags of a running or ended job (an empty value removes one)."""
        return self.call("tag", jid=jid, tags=tags)

    def ja(self) -> Dict[str, Any]:
        """The job the calling process is in, with its members (``elsa ja``)."""
        return self.call("ja")
