"""cgroupfs adapter: the only module that knows cgroup file names and mount layouts.

Covers cgroup v2 and the v1 cpuset hierarchy (docs/kernel.md, "cgroup v2" and
"cpuset"). Every path it
hands out is absolute in the *real* namespace of the caller; the injectable
roots exist so tests can point it at a fake tree for layouts this machine
cannot produce (pure v2, the v2 cpuset controller):

* ``mountinfo``: the file listing mounts (proc(5) ``/proc/self/mountinfo``);
* ``proc_root``: where ``<pid>/cgroup`` files are read;
* ``fs_root``: prefixed to every mount point read from mountinfo (a chroot view).

``OSError`` is translated here into :class:`~elsa.errors.ElsaError` with what,
where and what to do (the errnos: EBUSY for rmdir of a populated cgroup or
"no internal processes", EOPNOTSUPP for a domain cgroup rule violation,
ENOSPC for a v1 cpuset without cpus/mems).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import time
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Dict, Iterable, List, Optional, Set, Tuple

from elsa.core.model import JobLimits
from elsa.errors import (
    BackendError,
    ElsaError,
    KernelInterfaceError,
    PrivilegeError,
    ProcessGone,
)
from elsa.kernel.cgroupstats import parse_cpulist, parse_flat_keyed
from elsa.kernel.procfs import read_small

# cgroup v2 core files.
PROCS = "cgroup.procs"
#: A cgroup file that is gone, or whose cgroup is being removed: kernfs
#: answers ENODEV for a node deactivated while the file was open or the
#: directory still listed, ENOENT once it is unlinked.
_REMOVED = (errno.ENOENT, errno.ENODEV)

EVENTS = "cgroup.events"
KILL = "cgroup.kill"
FREEZE = "cgroup.freeze"
CONTROLLERS = "cgroup.controllers"
SUBTREE_CONTROL = "cgroup.subtree_control"
#: The CPU and memory limits of a cgroup (docs/kernel.md, "cgroup v2"): ``cpu.max``
#: is "QUOTA PERIOD" in microseconds, the group's processes together may run QUOTA
#: per PERIOD ("max": no quota); ``memory.max`` is bytes ("max": none), rounded down
#: to a page by the kernel. They exist where the cpu / memory controller is enabled.
CPU_MAX = "cpu.max"
MEMORY_MAX = "memory.max"
#: The period ELSA writes: the kernel's default (100 ms).
CPU_PERIOD_US = 100_000
#: The kernel refuses a quota below 1 ms or above 2^44 - 1 µs (EINVAL; kernel/sched
#: max_cfs_runtime): 0.01 core at CPU_PERIOD_US, and some 176 million cores.
CPU_QUOTA_MIN_US = 1000
CPU_QUOTA_MAX_US = (1 << 44) - 1

#: Interface files that limit what the processes of a cgroup and its
#: descendants may use (docs/kernel.md, "cgroup v2"), with the value meaning "no limit".
#: hugetlb.<size>.max files are found by name.
LIMIT_FILES = {
    "pids.max": "max", "memory.max": "max", "memory.high": "max",
    "memory.swap.max": "max", "memory.zswap.max": "max", "cpu.max": "max",
    "io.max": "", "rdma.max": "", "misc.max": "", "cpuset.cpus": "", "cpuset.mems": "",
    "cgroup.max.descendants": "max", "cgroup.max.depth": "max",
}


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_id: int
    parent_id: int
    root: str          # the path inside the filesystem that is mounted here
    mount_point: str
    fstype: str
    source: str
    options: Tuple[str, ...]        # per-mount options
    super_options: Tuple[str, ...]  # per-superblock options (v1: the controllers)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> List[Mount]:
    """Parse mountinfo; optional fields end at the lone ``-`` separator."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 10 or "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        try:
            mounts.append(Mount(
                mount_id=int(parts[0]), parent_id=int(parts[1]), root=_unescape(parts[3]),
                mount_point=_unescape(parts[4]), fstype=parts[sep + 1],
                source=_unescape(parts[sep + 2]) if len(parts) > sep + 2 else "",
                options=tuple(parts[5].split(",")),
                super_options=tuple(parts[sep + 3].split(",")) if len(parts) > sep + 3 else ()))
        except ValueError:
            continue
    return mounts


def parse_proc_cgroup(text: str) -> Dict[str, str]:
    """Parse /proc/PID/cgroup: ``"0::/x"`` -> ``{"": "/x"}`` (v2), v1 lines keyed by
    each controller (``"3:cpuset:/"`` -> ``{"cpuset": "/"}``)."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            out[""] = path
            continue
        for c in ctrls.split(","):
            out[c] = path
    return out


def parse_cpu_max(text: str) -> Optional[Decimal]:
    """Cores that a ``cpu.max`` line allows: quota ÷ period (``"150000 100000"``: 1.5);
    None for ``"max ..."`` (no quota). Raises ValueError on anything else."""
    parts = text.split()
    if not parts or len(parts) > 2:
        raise ValueError(f"expected 'QUOTA PERIOD' or 'max PERIOD', got {text.strip()!r}")
    if parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1]) if len(parts) == 2 else CPU_PERIOD_US
    if quota <= 0 or period <= 0:
        raise ValueError(f"quota and period must be positive, got {text.strip()!r}")
    return Decimal(quota) / Decimal(period)


def cpu_quota_us(cores: Decimal) -> int:
    """The ``cpu.max`` quota (µs per :data:`CPU_PERIOD_US`) allowing *cores*.
    Raises ValueError below the kernel's minimum quota."""
    quota = int((cores * CPU_PERIOD_US).to_integral_value(rounding=ROUND_HALF_EVEN))
    if quota < CPU_QUOTA_MIN_US:
        raise ValueError(f"{cores} cores is below the smallest CPU quota the kernel takes "
                         f"({Decimal(CPU_QUOTA_MIN_US) / CPU_PERIOD_US} cores: "
                         f"{CPU_QUOTA_MIN_US} µs per {CPU_PERIOD_US} µs)")
    if quota > CPU_QUOTA_MAX_US:
        raise ValueError(f"{cores} cores is above the largest CPU quota the kernel takes "
                         f"({CPU_QUOTA_MAX_US // CPU_PERIOD_US} cores)")
    return quota


def translate(exc: OSError, what: str, where: str) -> ElsaError:
    """Turn an OSError from cgroupfs into an ElsaError saying what to do."""
    e = exc.errno
    reason = exc.strerror or str(exc)
    if e in (errno.EPERM, errno.EACCES):
        return PrivilegeError(f"{what}: {where}: permission denied ({reason}); elsad must run "
                              "as root or own this cgroup subtree (systemd Delegate=yes)")
    if e == errno.ESRCH:
        return ProcessGone(f"{what}: {where}: no such process ({reason})")
    if e == errno.ENOENT:
        return BackendError(f"{what}: {where} does not exist ({reason}); was the cgroup "
                            "removed behind elsad's back?")
    if e == errno.EBUSY and what.startswith("remove"):
        return BackendError(f"{what}: {where} is busy ({reason}): it still holds processes "
                            "or child cgroups; detach or kill them first")
    if e == errno.EBUSY:
        return BackendError(f"{what}: {where}: busy ({reason}); cgroup v2 forbids processes in "
                            "a cgroup that enables controllers for its children (\"no internal "
                            "processes\"), move them to a leaf first")
    if e == errno.EOPNOTSUPP:
        return BackendError(f"{what}: {where}: not supported ({reason}); cgroup v2's \"no "
                            "internal processes\" rule forbids a process here once controllers "
                            "are enabled below; use a leaf cgroup")
    if e == errno.ENOSPC:
        return BackendError(f"{what}: {where}: no space ({reason}); a v1 cpuset needs "
                            "cpuset.cpus and cpuset.mems set before tasks can join")
    if e == errno.EINVAL:
        return BackendError(f"{what}: {where}: invalid value ({reason})")
    if e == errno.ENODEV:
        return KernelInterfaceError(f"{what}: {where}: controller not available ({reason}); "
                                    "it may be bound to a cgroup v1 hierarchy")
    return KernelInterfaceError(f"{what}: {where}: {reason}")


class CgroupFS:
    """cgroup v2 and v1-cpuset file access with injectable roots."""

    def __init__(self, mountinfo: str = "/proc/self/mountinfo", proc_root: str = "/proc",
                 fs_root: str = "") -> None:
        self.mountinfo_path = mountinfo
        self.proc_root = proc_root
        self.fs_root = fs_root.rstrip("/")

    # -- discovery ------------------------------------------------------------------
    def mounts(self) -> List[Mount]:
        try:
            with open(self.mountinfo_path) as fh:
                return parse_mountinfo(fh.read())
        except OSError as exc:
            raise translate(exc, "read mount table", self.mountinfo_path) from exc

    def cgroup2_mount(self) -> Optional[str]:
        """Where cgroup2 is mounted (hybrid hosts: /sys/fs/cgroup/unified; pure v2:
        /sys/fs/cgroup), or None. The first mount of the filesystem root wins."""
        for m in self.mounts():
            if m.fstype == "cgroup2" and m.root == "/":
                return self.fs_root + m.mount_point
        return None

    def cpuset_v1_mount(self) -> Optional[str]:
        """Where the v1 hierarchy with the cpuset controller is mounted, or None."""
        for m in self.mounts():
            if m.fstype == "cgroup" and "cpuset" in m.super_options and m.root == "/":
                return self.fs_root + m.mount_point
        return None

    def proc_cgroups(self, pid: object = "self") -> Dict[str, str]:
        path = f"{self.proc_root}/{pid}/cgroup"
        try:
            return parse_proc_cgroup(read_small(path).decode("utf-8", "surrogateescape"))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                raise ProcessGone(f"read {path}: process {pid} is gone") from exc
            raise translate(exc, "read process cgroups", path) from exc

    def own_cgroup(self, pid: object = "self") -> Optional[str]:
        """The v2 cgroup of *pid* relative to the cgroup2 mount ("/" = root), or None."""
        return self.proc_cgroups(pid).get("")

    def v1_cgroup(self, controller: str, pid: object = "self") -> Optional[str]:
        return self.proc_cgroups(pid).get(controller)

    # -- plain files ---------------------------------------------------------------------
    @staticmethod
    def read(path: str, what: str = "read cgroup file") -> str:
        try:
            with open(path) as fh:
                return fh.read()
        except OSError as exc:
            raise translate(exc, what, path) from exc

    @staticmethod
    def write(path: str, value: str, what: str = "write cgroup file") -> None:
        # One write(2) per value: cgroup files act on each write call.
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            raise translate(exc, what, path) from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise translate(exc, what, path) from exc
        finally:
            os.close(fd)

    @staticmethod
    def exists(path: str, name: str = "") -> bool:
        return os.path.exists(os.path.join(path, name) if name else path)

    # -- directories -------------------------------------------------------------------
    def mkdir(self, path: str, exist_ok: bool = True) -> bool:
        """Create a cgroup; returns False when it already existed."""
        try:
            os.mkdir(path)
            return True
        except FileExistsError:
            if exist_ok:
                return False
            raise BackendError(f"create cgroup: {path} already exists") from None
        except OSError as exc:
            raise translate(exc, "create cgroup", path) from exc

    def makedirs(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent and parent != path and not os.path.isdir(parent):
            self.makedirs(parent)
        self.mkdir(path)

    def rmdir(self, path: str, missing_ok: bool = True) -> bool:
        """Remove an empty cgroup (its files go with it); True if it was removed."""
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            if missing_ok:
                return False
            raise BackendError(f"remove cgroup: {path} does not exist") from None
        except OSError as exc:
            raise translate(exc, "remove cgroup", path) from exc

    def children(self, path: str) -> List[str]:
        """Names of child cgroups (directories) of *path*."""
        try:
            return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise translate(exc, "list cgroup", path) from exc

    # -- membership --------------------------------------------------------------------
    def procs(self, path: str) -> List[int]:
        """Process ids in the cgroup itself (not its descendants)."""
        try:
            return [int(x) for x in read_small(os.path.join(path, PROCS)).split()]
        except OSError as exc:
            if exc.errno in _REMOVED:
                return []
            raise translate(exc, "read members", os.path.join(path, PROCS)) from exc

    def move(self, path: str, pid: int) -> None:
        """Move process *pid* (all its threads) into cgroup *path*."""
        target = os.path.join(path, PROCS)
        try:
            fd = os.open(target, os.O_WRONLY)
        except OSError as exc:
            raise translate(exc, "move process", target) from exc
        try:
            os.write(fd, b"%d" % pid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessGone(f"move process {pid} to {target}: process is gone") from exc
            raise translate(exc, f"move process {pid}", target) from exc
        finally:
            os.close(fd)

    def events(self, path: str) -> Dict[str, int]:
        return parse_flat_keyed(self.read(os.path.join(path, EVENTS), "read cgroup events"))

    def populated(self, path: str) -> bool:
        """True while the cgroup or a descendant holds a live process (zombies do not count)."""
        try:
            data = read_small(os.path.join(path, EVENTS))
        except OSError as exc:
            if exc.errno in _REMOVED:
                return False
            raise translate(exc, "read cgroup events", os.path.join(path, EVENTS)) from exc
        return b"populated 1" in data

    def has_kill(self, path: str) -> bool:
        # cgroup.kill appeared in Linux 5.14.
        return os.path.exists(os.path.join(path, KILL))

    def kill(self, path: str) -> None:
        """SIGKILL every process in the cgroup and its descendants (cgroup.kill)."""
        self.write(os.path.join(path, KILL), "1", "kill cgroup")

    def has_freeze(self, path: str) -> bool:
        # cgroup.freeze appeared in Linux 5.2 (not in the root cgroup).
        return os.path.exists(os.path.join(path, FREEZE))

    def set_frozen(self, path: str, frozen: bool) -> None:
        self.write(os.path.join(path, FREEZE), "1" if frozen else "0",
                   "freeze cgroup" if frozen else "thaw cgroup")

    def wait_events(self, path: str, key: str, value: int, timeout: float) -> bool:
        """Wait until ``cgroup.events`` says ``key value`` or *timeout* passes.

        A change of a value in cgroup.events generates a file modified event
        and POLLPRI (docs/kernel.md, "cgroup v2"), so poll() wakes without busy-waiting; a
        short poll interval also covers kernels that miss a notification.
        """
        target = os.path.join(path, EVENTS)
        deadline = time.monotonic() + timeout
        try:
            fd = os.open(target, os.O_RDONLY)
        except FileNotFoundError:
            return key == "populated" and value == 0
        except OSError as exc:
            raise translate(exc, "watch cgroup events", target) from exc
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                try:
                    data = os.pread(fd, 4096, 0)
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # removed while we waited
                        return key == "populated" and value == 0
                    raise translate(exc, "read cgroup events", target) from exc
                if parse_flat_keyed(data.decode()).get(key) == value:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(min(left, 0.05) * 1000)
        finally:
            os.close(fd)

    # -- limits ------------------------------------------------------------------------
    def limits_set(self, path: str) -> List[Tuple[str, str]]:
        """(file, value) of each limit set on cgroup *path* itself (:data:`LIMIT_FILES`
        whose value is not the "no limit" one), by file name; none when it is gone."""
        try:
            names = os.listdir(path)
        except OSError:
            return []
        out = []
        for name in sorted(names):
            unlimited = LIMIT_FILES.get(name)
            if unlimited is None:
                if not (name.startswith("hugetlb.") and name.endswith(".max")):
                    continue
                unlimited = "max"
            try:
                value = read_small(os.path.join(path, name)).decode().split()
            except OSError:
                continue
            if (value[0] if value else "") != unlimited:
                out.append((name, " ".join(value)))
        return out

    def read_limits(self, path: str, cpu: bool = True, memory: bool = True
                    ) -> Optional[JobLimits]:
        """The CPU and memory limits set on cgroup *path* itself ("max": None). Only
        the files of the controllers asked for are read (*cpu*, *memory*: the
        caller knows which are enabled; a lookup of an absent file costs a kernfs
        miss). None when an asked file is not there: the cgroup is gone, or the
        controller is not enabled for it. An unparsable value gives no limit."""
        cpus = mem = None
        if cpu:
            text = self._read_optional(os.path.join(path, CPU_MAX))
            if text is None:
                return None
            try:
                cpus = parse_cpu_max(text)
            except ValueError:
                cpus = None
        if memory:
            text = self._read_optional(os.path.join(path, MEMORY_MAX))
            if text is None:
                return None
            mem = int(text) if text.isdigit() else None
        return JobLimits(cpus=cpus, memory=mem)

    @staticmethod
    def _read_optional(path: str) -> Optional[str]:
        try:
            return read_small(path).decode().strip()
        except OSError as exc:
            if exc.errno in _REMOVED:
                return None
            raise translate(exc, "read cgroup limit", path) from exc

    def set_limits(self, path: str, limits: JobLimits) -> None:
        """Write the limits that are set (not None) to cgroup *path*."""
        if limits.cpus is not None:
            self.write(os.path.join(path, CPU_MAX),
                       f"{cpu_quota_us(limits.cpus)} {CPU_PERIOD_US}", "set the CPU limit")
        if limits.memory is not None:
            self.write(os.path.join(path, MEMORY_MAX), str(limits.memory),
                       "set the memory limit")

    # -- controllers -------------------------------------------------------------------
    def controllers(self, path: str) -> Set[str]:
        """Controllers available to *path* (``cgroup.controllers``)."""
        try:
            with open(os.path.join(path, CONTROLLERS)) as fh:
                return set(fh.read().split())
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise translate(exc, "read controllers", path) from exc

    def subtree_control(self, path: str) -> Set[str]:
        try:
            with open(os.path.join(path, SUBTREE_CONTROL)) as fh:
                return set(fh.read().split())
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise translate(exc, "read subtree_control", path) from exc

    def enable_controllers(self, path: str, names: Iterable[str]) -> None:
        """Enable controllers for *path*'s children ("+cpu +memory"), one at a time so a
        single unavailable one does not block the rest."""
        for name in names:
            self.write(os.path.join(path, SUBTREE_CONTROL), f"+{name}",
                       f"enable controller {name}")

    # -- cpuset (v2 files and v1 files share names) -------------------------------------
    @staticmethod
    def cpuset_effective_files(path: str, v2: bool) -> Tuple[str, str]:
        """The files naming the CPUs and memory nodes *path* may hand to children:
        v2 ``cpuset.cpus.effective``, v1 ``cpuset.effective_cpus`` (docs/kernel.md,
        "cpuset")."""
        if v2:
            return (os.path.join(path, "cpuset.cpus.effective"),
                    os.path.join(path, "cpuset.mems.effective"))
        return (os.path.join(path, "cpuset.effective_cpus"),
                os.path.join(path, "cpuset.effective_mems"))

    def cpuset_effective(self, path: str, v2: bool) -> Tuple[Set[int], Set[int]]:
        """(cpus, mems) a child of *path* may use."""
        cpus_f, mems_f = self.cpuset_effective_files(path, v2)
        try:
            return (parse_cpulist(self.read(cpus_f, "read cpuset")),
                    parse_cpulist(self.read(mems_f, "read cpuset")))
        except ValueError as exc:
            raise KernelInterfaceError(f"read cpuset: {cpus_f}: unparsable list ({exc})") from None

    def cpuset_get(self, path: str) -> Tuple[str, str]:
        return (self.read(os.path.join(path, "cpuset.cpus"), "read cpuset").strip(),
                self.read(os.path.join(path, "cpuset.mems"), "read cpuset").strip())

    def cpuset_set(self, path: str, cpus: str, mems: str) -> None:
        """Write cpuset.cpus then cpuset.mems (v1 requires both before tasks join)."""
        self.write(os.path.join(path, "cpuset.cpus"), cpus, "set cpuset.cpus")
        self.write(os.path.join(path, "cpuset.mems"), mems, "set cpuset.mems")


# -- inotify on cgroup.events -------------------------------------------------------------
# inotify(7): struct inotify_event { int wd; uint32_t mask, cookie, len; char name[]; }
_IN_EVENT = struct.Struct("iIII")
IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


class EventsWatcher:
    """One inotify descriptor watching many ``cgroup.events`` files.

    "populated" changes generate file modified events — one fd
    for all jobs scales better than an open file (and POLLPRI) per job.
    """

    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(name, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise translate(OSError(err, os.strerror(err)), "create inotify instance",
                            "inotify_init1")
        self.fd = fd
        self._wd_key: Dict[int, object] = {}
        self._key_wd: Dict[object, int] = {}

    def fileno(self) -> int:
        return self.fd

    def watch(self, key: object, cgroup_path: str) -> None:
        path = os.path.join(cgroup_path, EVENTS).encode()
        wd = self._libc.inotify_add_watch(self.fd, path, IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            raise translate(OSError(err, os.strerror(err)), "watch cgroup events",
                            path.decode())
        self._wd_key[wd] = key
        self._key_wd[key] = wd

    def watches(self, key: object) -> bool:
        return key in self._key_wd

    def unwatch(self, key: object) -> None:
        wd = self._key_wd.pop(key, None)
        if wd is not None:
            self._wd_key.pop(wd, None)
            # Fails harmlessly (EINVAL) when rmdir already dropped the watch.
            self._libc.inotify_rm_watch(self.fd, wd)

    def forget(self, key: object) -> None:
        """Drop *key* after its cgroup was removed: the kernel already dropped the
        watch (and queues IN_IGNORED), so no inotify_rm_watch, which waits for an
        SRCU grace period — milliseconds under load."""
        wd = self._key_wd.pop(key, None)
        if wd is not None:
            self._wd_key.pop(wd, None)

    def read(self) -> List[object]:
        """Keys whose events file changed since the last call (each once)."""
        changed: List[object] = []
        seen = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                break
            if not data:
                break
            off = 0
            while off + _IN_EVENT.size <= len(data):
                wd, mask, _cookie, length = _IN_EVENT.unpack_from(data, off)
                off += _IN_EVENT.size + length
                if mask & IN_IGNORED:
                    # The file went away (rmdir): the kernel dropped the watch.
                    key = self._wd_key.pop(wd, None)
                    if key is not None and self._key_wd.get(key) == wd:
                        del self._key_wd[key]
                    continue
                key = self._wd_key.get(wd)
                if key is not None and key not in seen:
                    seen.add(key)
                    changed.append(key)
        return changed

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
