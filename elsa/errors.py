"""One error hierarchy for ELSA.

Every message says *what* went wrong, *where* (file, key, pid, job, offset) and
*what to do*. ``OSError`` from the kernel interfaces is translated in one place,
:func:`from_oserror`, so callers never see a bare errno.
"""

from __future__ import annotations

import errno


class ElsaError(Exception):
    """Base of every error ELSA raises on purpose.

    ``code`` is a stable, machine-readable identifier (used by the control
    protocol and documented in docs/protocol.md); the message is for humans.
    """

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ElsaError):
    """A configuration file or value is unusable."""

    code = "bad-config"


class PrivilegeError(ElsaError):
    """The process lacks a capability or permission it needs."""

    code = "no-privilege"


class KernelInterfaceError(ElsaError):
    """A kernel interface (netlink, cgroupfs, acct) failed or is missing."""

    code = "kernel"


class ProcessGone(ElsaError):
    """The process exited (or its pid now names another process)."""

    code = "no-such-process"


class JobNotFound(ElsaError):
    """No job has that id."""

    code = "no-such-job"


class JobStateError(ElsaError):
    """The operation does not fit the job's state (e.g. attaching to an ended job)."""

    code = "bad-job-state"


class PermissionDenied(ElsaError):
    """The caller may not act on that process or job."""

    code = "permission-denied"


class BackendError(ElsaError):
    """A grouping backend could not do what was asked."""

    code = "backend"


class PluginError(ElsaError):
    """A plugin is missing, failed to load, or misbehaved."""

    code = "plugin"


class StoreError(ElsaError):
    """The persistent store is unreadable, too new, or failed a write."""

    code = "store"


class ProtocolError(ElsaError):
    """A control-socket request or reply is malformed."""

    code = "bad-request"


class DaemonUnavailable(ElsaError):
    """elsad is not running or its socket cannot be reached."""

    code = "unavailable"


class CgroupGone(ElsaError):
    """A job's cgroup directory was removed (its last readings stand)."""

    code = "gone"


class AccountingFormatError(ElsaError):
    """An accounting record or file is corrupt or of an unsupported version."""

    code = "bad-format"


def from_oserror(exc: OSError, what: str, where: str, hint: str = "",
                 process: bool = False) -> ElsaError:
    """Translate an ``OSError`` raised while doing *what* on *where*.

    *process*: *where* is a process's own file (/proc/PID/...). Only there do
    ENOENT/ESRCH mean the process is gone (psutil does the same: a /proc file
    vanishing mid-read is normal, not an error); a missing boot_id file or
    cgroup directory is a fault of the system, reported as such.
    """
    reason = exc.strerror or str(exc)
    if process and exc.errno in (errno.ENOENT, errno.ESRCH):
        return ProcessGone(f"{what}: {where} is gone ({reason})")
    if exc.errno == errno.ENOENT:
        msg = f"{what}: {where} does not exist ({reason})"
        return KernelInterfaceError(msg + (f"; {hint}" if hint else ""))
    if exc.errno in (errno.EPERM, errno.EACCES):
        msg = f"{what}: {where}: permission denied ({reason})"
        return PrivilegeError(msg + (f"; {hint}" if hint else "; run as root"))
    msg = f"{what}: {where}: {reason}"
    return KernelInterfaceError(msg + (f"; {hint}" if hint else ""))
