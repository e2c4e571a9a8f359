"""Python client for elsad's control socket (used by ``elsa-jobmng``; importable by anyone).

Example::

    from elsa.client import Client
    with Client() as c:
        job = c.create(name="build", tags={"queue": "short"})
        c.attach(job["jid"], [os.getpid()])
"""

from __future__ import annotations

import itertools
import json
import socket
from typing import Any, Dict, Iterable, List, Optional

from elsa.errors import DaemonUnavailable, ElsaError, ProtocolError

DEFAULT_SOCKET = "/run/elsa/elsad.sock"
PROTOCOL_VERSION = 1


class RequestFailed(ElsaError):
    """The daemon answered with an error object; ``code`` is its stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """One connection to elsad; requests are answered in order."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: Optional[float] = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise DaemonUnavailable(
                f"elsad is not running (no listener on {path}: {exc.strerror}); start it "
                "with 'systemctl start elsad' or 'elsad &' as root") from None
        except PermissionError:
            self.sock.close()
            raise DaemonUnavailable(f"cannot connect to {path}: permission denied") from None
        self._rfile = self.sock.makefile("rb")

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
        """Send one request and return its ``result``; raise :class:`RequestFailed`."""
        req_id = next(self._ids)
        req = {"v": PROTOCOL_VERSION, "id": req_id, "op": op}
        req.update({k: v for k, v in fields.items() if v is not None})
        self.sock.settimeout(self.timeout if io_timeout is None else io_timeout)
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
            line = self._rfile.readline()
        except socket.timeout:
            raise DaemonUnavailable(f"elsad did not answer '{op}' in time") from None
        except OSError as exc:
            raise DaemonUnavailable(f"connection to elsad failed: {exc}") from None
        if not line:
            raise DaemonUnavailable("elsad closed the connection")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ProtocolError(f"elsad sent a malformed reply: {line[:200]!r}") from None
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RequestFailed(err.get("code", "error"), err.get("message", "unknown error"))
        return reply.get("result")

    # -- the operations (docs/protocol.md) ---------------------------------------------
    def create(self, name: str = "", tags: Optional[Dict[str, str]] = None,
               params: Optional[Dict[str, str]] = None,
               pids: Optional[Iterable[int]] = None,
               owner_uid: Optional[int] = None) -> Dict[str, Any]:
        return self.call("create", name=name, tags=tags or {}, params=params or {},
                         pids=list(pids) if pids is not None else None, owner_uid=owner_uid)

    def attach(self, jid: int, pids: Iterable[int]) -> Dict[str, Any]:
        return self.call("attach", jid=jid, pids=list(pids))

    def detach(self, pids: Iterable[int]) -> Dict[str, Any]:
        return self.call("detach", pids=list(pids))

    def jobof(self, pid: int) -> int:
        return self.call("jobof", pid=pid)["jid"]

    def list(self, all: bool = False) -> List[Dict[str, Any]]:
        return self.call("list", all=all)

    def show(self, jid: int) -> Dict[str, Any]:
        return self.call("show", jid=jid)

    def pids(self, jid: int) -> List[int]:
        return self.call("pids", jid=jid)["pids"]

    def wait(self, jid: int, timeout: Optional[float] = None) -> Dict[str, Any]:
        # The socket must outlast the daemon-side timeout; None waits forever.
        io_timeout = None if timeout is None else timeout + 10.0
        return self.call("wait", io_timeout=io_timeout, jid=jid, timeout=timeout)

    def kill(self, jid: int, signal: int = 15) -> Dict[str, Any]:
        return self.call("kill", jid=jid, signal=signal)

    def end(self, jid: int) -> Dict[str, Any]:
        return self.call("end", jid=jid)

    def freeze(self, jid: int) -> Dict[str, Any]:
        return self.call("freeze", jid=jid)

    def thaw(self, jid: int) -> Dict[str, Any]:
        return self.call("thaw", jid=jid)

    def status(self) -> Dict[str, Any]:
        return self.call("status")
