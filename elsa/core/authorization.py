"""Who may do what on the control socket.

Authorization uses SO_PEERCRED and SO_PEERGROUPS (socket(7)), never anything
the client claims: root and members of ``admin_group`` may do everything; any
other user may create jobs and act only on processes whose real uid is theirs
and jobs they own (cgrulesengd's socket had no such check: any client could
move any pid). ``kill`` from a non-admin signals only the members the caller
could signal itself under kill(2)'s rule, so the root daemon never becomes a
confused deputy for a job member that changed uid (``su``, ``sudo``).
"""

from __future__ import annotations

import grp
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, List, Optional, Tuple

from elsa.core.model import Job, ProcessInfo, format_jid
from elsa.errors import ElsaError, PermissionDenied, ProcessGone, ProtocolError
from elsa.kernel.procfs import ProcFS
from elsa.logsetup import structlog

if TYPE_CHECKING:
    from elsa.core.manager import JobManager

log = structlog.get_logger("elsa.control")

_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid (socket(7) SO_PEERCRED)
# SO_PEERGROUPS (Linux 4.13; docs/kernel.md, "Sockets and credentials"); Python
# has no constant for it. The peer's supplementary groups as of connect(), race-free,
# and without an NSS lookup on the event thread.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("=I")


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the kernel says (SO_PEERCRED at connect time)."""

    pid: int
    uid: int
    gid: int
    admin: bool


class Authorizer:
    """The rules above, applied to one request at a time (event thread)."""

    def __init__(self, admin_group: str, procfs: ProcFS, manager: JobManager) -> None:
        self.admin_gid = group_id(admin_group)
        self.procfs = procfs
        self.manager = manager
        self.denied = 0  # refusals, for ``status``

    def set_admin_group(self, name: str) -> None:
        """Apply a reloaded ``admin_group`` (connections already open keep the
        admin flag they were given at connect time)."""
        self.admin_gid = group_id(name)

    def is_admin(self, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        if uid == 0:
            return True
        if self.admin_gid is None:
            return False
        return gid == self.admin_gid or self.admin_gid in groups

    def caller(self, sock: socket.socket) -> Caller:
        """The peer of a freshly accepted connection."""
        pid, uid, gid = peer_credentials(sock)
        # Supplementary groups matter only for the admin group: fetch them then.
        needs_groups = uid != 0 and self.admin_gid is not None and gid != self.admin_gid
        groups = peer_groups(sock, pid, self.procfs) if needs_groups else ()
        return Caller(pid=pid, uid=uid, gid=gid, admin=self.is_admin(uid, gid, groups))

    def deny(self, message: str) -> PermissionDenied:
        self.denied += 1
        return PermissionDenied(message)

    def check_job(self, caller: Caller, job: Job) -> None:
        if not caller.admin and job.owner_uid != caller.uid:
            raise self.deny(f"job {format_jid(job.jid)} belongs to uid {job.owner_uid}; "
                            f"uid {caller.uid} may only manage its own jobs")

    def check_pid(self, caller: Caller, pid: int) -> Optional[ProcessInfo]:
        """A non-admin may act on a process whose *real* uid is the caller's.

        For an admin: /proc's view of the process (it exists), which the
        attach that follows in the same request reuses instead of reading it
        again."""
        if caller.admin:
            return self.procfs.info(pid)  # no-such-process if it is gone
        real = self._process_uids(pid)[0]
        if real != caller.uid:
            raise self.deny(f"process {pid} belongs to uid {real}; uid {caller.uid} may "
                            "only manage its own processes")
        return None

    @staticmethod
    def check_may_join(pid: int, info: Optional[ProcessInfo]) -> None:
        """Init and kernel threads join no job, whoever asks: every process descends
        from init, so in a job it would hand the job on to the whole machine; a
        kernel thread has no user to account. (*info*: /proc's view, when read.)"""
        if pid <= KTHREADD or (info is not None and info.ppid == KTHREADD):
            raise ProtocolError(f"process {pid} is init or a kernel thread: it cannot join "
                                "a job")

    def check_current_job(self, caller: Caller, pid: int) -> None:
        """Moving a process out of a job needs the right to manage that job too."""
        current = self.manager.job_of(pid)
        if current is not None:
            self.check_job(caller, self.manager.job(current, with_pids=False))

    def may_signal(self, caller: Caller, pid: int) -> bool:
        """kill(2): the sender's uid matches the target's real or saved set-user-ID."""
        if caller.admin:
            return True
        try:
            real, _eff, saved = self._process_uids(pid)
        except ElsaError:
            return False
        return caller.uid in (real, saved)

    def _process_uids(self, pid: int) -> Tuple[int, int, int]:
        return _uids(self.procfs.status_field(pid, "Uid"))


#: The kernel's thread daemon, parent of every kernel thread (pid 1 is init).
KTHREADD = 2


def _uids(status_value: Optional[str]) -> Tuple[int, int, int]:
    """(real, effective, saved) from the ``Uid:`` line of /proc/PID/status (proc(5))."""
    if not status_value:
        raise ProcessGone("process has no Uid line")
    fields = status_value.split()
    return int(fields[0]), int(fields[1]), int(fields[2])


def group_id(name: str) -> Optional[int]:
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


def peer_groups(sock: socket.socket, pid: int = 0, procfs: Optional[ProcFS] = None
                ) -> List[int]:
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
        value = (procfs or ProcFS()).status_field(pid, "Groups")
        return [int(g) for g in value.split()] if value else []
    except (ElsaError, ValueError):
        return []
