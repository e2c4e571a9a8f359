"""procfs adapter: the only module that knows /proc's file layouts.

The root is injectable (tests, containers). Files vanish mid-read when a
process exits; that is reported as :class:`~elsa.errors.ProcessGone`, never as
a crash.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

from elsa.core.model import CLOCK_TICKS, ProcessId, ProcessInfo
from elsa.errors import KernelInterfaceError, ProcessGone, from_oserror


def read_small(path: str, size: int = 4096, dir_fd: Optional[int] = None) -> bytes:
    """Read a small kernel-generated file whole: open, read, close.

    ``open()`` would add an fstat, an isatty ioctl and a second read to every
    file (strace shows them), and elsad reads a /proc or cgroupfs file or two
    per job. seq_file and kernfs fill the buffer as far as the file goes, so a
    short read is the end; a full one reads on. *path* is relative to the
    directory *dir_fd* when given (several files of one directory: the kernel
    walks the directory's path once).
    Raises OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        data = os.read(fd, size)
        if len(data) < size:
            return data
        chunks = [data]
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def line_value(data: bytes, key: bytes) -> Optional[bytes]:
    """The rest of the line of *data* that starts with *key*, stripped; None when no
    line does. For the /proc files of one fact per line: ``status`` ("Uid:\t0 0 0 0"),
    ``stat`` ("processes 1234")."""
    if data.startswith(key):
        at = 0
    else:
        at = data.find(b"\n" + key) + 1
        if at == 0:
            return None
    end = data.find(b"\n", at)
    return data[at + len(key):end if end >= 0 else len(data)].strip()


class LiveUsage(NamedTuple):
    """A running process's figures so far (:meth:`ProcFS.live_usage`); None where
    the file could not be read (/proc/PID/io of another user's process)."""

    pid: int
    ppid: int
    comm: str
    cpu_user_us: int
    cpu_system_us: int
    max_rss_kb: Optional[int]
    read_bytes: Optional[int]
    write_bytes: Optional[int]


def io_bytes(data: bytes) -> Tuple[int, int]:
    """(read_bytes, write_bytes) of a /proc/PID/io file: its fifth and sixth of seven
    "name: value" lines, in the order proc(5) gives. Raises ValueError or IndexError
    on another layout."""
    tok = data.split()
    return int(tok[9]), int(tok[11])


def _own_io(dfd: int) -> Tuple[int, int]:
    """(read_bytes, write_bytes) a process did itself: its threads' ``task/TID/io``
    summed (*dfd*: its /proc/PID). /proc/PID/io also holds the I/O of the children
    it has waited for (the kernel adds a reaped child's to its parent's, as it adds
    CPU to cutime), which those children's own records count. Raises OSError."""
    tfd = os.open("task", _DIR_FLAGS, dir_fd=dfd)
    try:
        rbytes = wbytes = 0
        for tid in os.listdir(tfd):
            try:
                r, w = io_bytes(read_small(f"{tid}/io", dir_fd=tfd))
            except (FileNotFoundError, ProcessLookupError):
                continue  # the thread exited meanwhile
            rbytes += r
            wbytes += w
    finally:
        os.close(tfd)
    return rbytes, wbytes


#: Facts of a process at an exec (:meth:`ProcFS.exec_facts`), tuple positions.
(F_PATH, F_DEV, F_INO, F_DELETED, F_STATUS, F_COMM, F_PPID, F_START, F_UTIME, F_STIME,
 F_UID, F_EUID, F_GID, F_EGID, F_RBYTES, F_WBYTES) = range(16)
_TICK_US = 1_000_000 // CLOCK_TICKS
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class ProcFS:
    """Reads process facts from a procfs mounted at *root*."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    # -- single process ---------------------------------------------------
    def info(self, pid: int) -> ProcessInfo:
        """Parse /proc/PID/stat (proc(5)) and the owner of /proc/PID.

        The owner is the process's *effective* uid (root for a non-dumpable
        process, proc(5)): good for reports, not for authorization, which
        reads the real uid from /proc/PID/status (elsa/core/authorization.py)."""
        path = f"{self.root}/{pid}/stat"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The files of /proc/PID have the owner of /proc/PID itself
                # (docs/kernel.md, "procfs"): no second lookup.
                uid = os.fstat(fd).st_uid
                data = os.read(fd, 4096)  # one seq_file read: the line is < 1 KiB
            finally:
                os.close(fd)
        except OSError as exc:
            raise from_oserror(exc, "read process", path, process=True) from exc
        return parse_stat(pid, data, uid)

    def ident(self, pid: int) -> ProcessId:
        """The (pid, start time) identity of a live process."""
        return self.info(pid).ident

    def alive(self, proc: ProcessId) -> bool:
        """True when *proc* still runs (same pid and start time, not a zombie)."""
        try:
            info = self.info(proc.pid)
        except ProcessGone:
            return False
        return not info.exited and info.ident.same_process(proc)

    def threads(self, pid: int) -> List[int]:
        """Thread ids of process *pid*."""
        path = f"{self.root}/{pid}/task"
        try:
            return sorted(int(t) for t in os.listdir(path))
        except OSError as exc:
            raise from_oserror(exc, "list threads", path, process=True) from exc

    def tgid(self, tid: int) -> int:
        """The thread-group id (process id) of thread *tid*."""
        value = self.status_field(tid, "Tgid")
        if value is None:
            raise ProcessGone(f"read process status: {self.root}/{tid}/status has no Tgid "
                              "line")
        return int(value)

    def status_field(self, pid: int, name: str) -> Optional[str]:
        """One ``Name:`` value of /proc/PID/status (e.g. Cpus_allowed_list)."""
        path = f"{self.root}/{pid}/status"
        try:
            data = read_small(path)
        except OSError as exc:
            raise from_oserror(exc, "read process status", path, process=True) from exc
        value = line_value(data, name.encode() + b":")
        return None if value is None else value.decode()

    def argv(self, pid: int) -> Optional[List[str]]:
        """The arguments of *pid* (/proc/PID/cmdline, NUL-terminated strings), None
        when gone or not readable."""
        try:
            raw = read_small(f"{self.root}/{pid}/cmdline")
        except OSError:
            return None
        return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]

    def exec_facts(self, pid: int) -> Tuple[Any, ...]:
        """What /proc says about *pid* now, as application accounting reads it at
        each exec: a tuple in F_* order (one per exec of a storm, so no dataclass);
        None for what could not be read. F_STATUS says how the exe link read:
        ``resolved``, ``denied`` or ``gone`` (a zombie has no exe).

        Every file is opened relative to one descriptor of /proc/PID: all the
        facts are of the same process even if its pid were reused meanwhile,
        and the kernel looks the pid up once instead of five times."""
        path = dev = ino = deleted = None
        status = "resolved"
        comm = ppid = start = utime = stime = None
        uid = euid = gid = egid = rbytes = wbytes = None
        try:
            dfd = os.open(f"{self.root}/{pid}", _DIR_FLAGS)
        except OSError:
            return (None, None, None, None, "gone", None, None, None, None, None,
                    None, None, None, None, None, None)
        try:
            try:
                path = os.readlink("exe", dir_fd=dfd)
                st = os.stat("exe", dir_fd=dfd)
                dev, ino = st.st_dev, st.st_ino
                deleted = 0
                if path.endswith(" (deleted)"):
                    path, deleted = path[:-10], 1
            except PermissionError:
                path = None
                status = "denied"
            except OSError:  # ENOENT: a zombie has no address space, no exe
                path = None
                status = "gone"
            try:
                name, rest = split_stat(read_small("stat", dir_fd=dfd))
                comm = name.decode("utf-8", "replace")
                ppid = int(rest[1])
                utime = int(rest[11]) * _TICK_US
                stime = int(rest[12]) * _TICK_US
                start = int(rest[19])
                owner = os.fstat(dfd)
                if status == "gone":
                    # A zombie's /proc/PID belongs to its effective ids; the
                    # real ones come with its exit record.
                    euid, egid = owner.st_uid, owner.st_gid
                elif owner.st_uid != 0 and owner.st_gid != 0:
                    # /proc/PID belongs to the effective uid and gid of a
                    # dumpable process, else to root; an exec leaves the
                    # process dumpable only if its real and effective ids
                    # are equal (docs/applications.md, "Resolution"). One
                    # fstat instead of reading and parsing status.
                    uid = euid = owner.st_uid
                    gid = egid = owner.st_gid
                else:
                    data = read_small("status", dir_fd=dfd)
                    ids = line_value(data, b"Uid:")
                    if ids is not None:
                        uid, euid = map(int, ids.split()[:2])
                    ids = line_value(data, b"Gid:")
                    if ids is not None:
                        gid, egid = map(int, ids.split()[:2])
                rbytes, wbytes = io_bytes(read_small("io", dir_fd=dfd))
            except (OSError, ValueError, IndexError):
                pass  # gone (or a zombie without io): keep what was read
        finally:
            os.close(dfd)
        return (path, dev, ino, deleted, status, comm, ppid, start, utime, stime,
                uid, euid, gid, egid, rbytes, wbytes)

    def live_usage(self, pid: int) -> Optional[LiveUsage]:
        """What a running process has used so far (``elsa ja``): CPU from stat,
        peak RSS (``VmHWM``) from status, bytes read and written from its
        threads' io (:func:`_own_io`). None
        when it is gone. All from one descriptor of /proc/PID, so of one process."""
        try:
            dfd = os.open(f"{self.root}/{pid}", _DIR_FLAGS)
        except OSError:
            return None
        try:
            try:
                name, rest = split_stat(read_small("stat", dir_fd=dfd))
                ppid, utime, stime = int(rest[1]), int(rest[11]), int(rest[12])
            except (OSError, ValueError, IndexError):
                return None
            hwm = rbytes = wbytes = None
            try:
                value = line_value(read_small("status", dir_fd=dfd), b"VmHWM:")
                hwm = None if value is None else int(value.split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a zombie has no VmHWM line
            try:
                rbytes, wbytes = _own_io(dfd)
            except (OSError, ValueError, IndexError):
                pass  # another user's process: io is not readable
        finally:
            os.close(dfd)
        return LiveUsage(pid, ppid, name.decode("utf-8", "replace"), utime * _TICK_US,
                         stime * _TICK_US, hwm, rbytes, wbytes)

    # -- whole system -----------------------------------------------------
    def pids(self) -> List[int]:
        """Every process (thread-group) id visible in this procfs."""
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            raise from_oserror(exc, "list processes", self.root) from exc
        return [int(n) for n in names if n.isdigit()]

    def snapshot(self) -> Dict[int, ProcessInfo]:
        """Every live process, keyed by pid. Processes exiting meanwhile, and
        zombies (exited, waiting to be reaped), are left out."""
        out: Dict[int, ProcessInfo] = {}
        for pid in self.pids():
            try:
                info = self.info(pid)
            except ProcessGone:
                continue
            if not info.exited:
                out[pid] = info
        return out

    def snapshot_of(self, pids: Iterable[int]) -> Dict[int, ProcessInfo]:
        """Like :meth:`snapshot`, for the given pids only."""
        out: Dict[int, ProcessInfo] = {}
        for pid in pids:
            try:
                info = self.info(pid)
            except ProcessGone:
                continue
            if not info.exited:
                out[pid] = info
        return out

    def forks(self) -> int:
        """Processes and threads created on the machine since boot: the
        ``processes`` line of /proc/stat (proc(5))."""
        return int(self._kernel_counter(b"processes "))

    def busy_cpu_seconds(self) -> float:
        """CPU seconds all the machine's CPUs spent busy since boot: the ``cpu``
        line of /proc/stat (proc(5)) less idle and iowait (its user time includes
        guest time already)."""
        user, nice, system, _idle, _iowait, irq, softirq, steal = self._cpu_line()[:8]
        return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS

    def steal_cpu_seconds(self) -> float:
        """CPU seconds the hypervisor ran something else while this machine's
        CPUs wanted to run, since boot: the ``steal`` column of /proc/stat's
        ``cpu`` line (proc(5)); 0 on bare metal."""
        return self._cpu_line()[7] / CLOCK_TICKS

    def _cpu_line(self) -> List[int]:
        return [int(v) for v in self._kernel_counter(b"cpu ").split()]

    def _kernel_counter(self, key: bytes) -> bytes:
        path = f"{self.root}/stat"
        try:
            data = read_small(path)
        except OSError as exc:
            raise from_oserror(exc, "read the kernel's counters", path) from exc
        value = line_value(data, key)
        if value is None:
            raise KernelInterfaceError(f"read the kernel's counters: {path} has no "
                                       f"{key.decode().strip()!r} line; is a procfs "
                                       "mounted there?")
        return value

    def cpu_times(self, pid: int) -> Tuple[float, float]:
        """User and system CPU seconds of process *pid*, its ended threads included
        (/proc/PID/stat fields 14 and 15, in clock ticks)."""
        path = f"{self.root}/{pid}/stat"
        try:
            data = read_small(path)
        except OSError as exc:
            raise from_oserror(exc, "read process", path, process=True) from exc
        try:
            rest = split_stat(data)[1]
            return int(rest[11]) / CLOCK_TICKS, int(rest[12]) / CLOCK_TICKS
        except (ValueError, IndexError):
            raise ProcessGone(f"read process: {path} is malformed: {data[:80]!r}") from None

    def thread_cpu(self, pid: int) -> Dict[int, Tuple[float, float]]:
        """User and system CPU seconds of each live thread of *pid*, by thread id
        (/proc/PID/task/TID/stat fields 14 and 15, in clock ticks)."""
        out: Dict[int, Tuple[float, float]] = {}
        for tid in self.threads(pid):
            path = f"{self.root}/{pid}/task/{tid}/stat"
            try:
                data = read_small(path)
            except OSError:
                continue  # the thread ended meanwhile
            rest = split_stat(data)[1]  # fields 14 and 15: utime, stime
            out[tid] = (int(rest[11]) / CLOCK_TICKS, int(rest[12]) / CLOCK_TICKS)
        return out

    def wakeups_and_cpu(self, pid: int) -> Tuple[int, int]:
        """(voluntary context switches, CPU nanoseconds) summed over the live
        threads of *pid*. A thread that slept and was woken counts one switch
        (/proc/PID/task/TID/status ``voluntary_ctxt_switches``); the CPU is
        schedstat's first field, finer than stat's clock ticks."""
        switches = cpu_ns = 0
        for tid in self.threads(pid):
            task = f"{self.root}/{pid}/task/{tid}"
            try:
                status = read_small(f"{task}/status")
                schedstat = read_small(f"{task}/schedstat")
            except OSError:
                continue  # the thread ended meanwhile
            value = line_value(status, b"voluntary_ctxt_switches:")
            if value is not None:
                switches += int(value)
            cpu_ns += int(schedstat.split()[0])
        return switches, cpu_ns

    def boot_id(self) -> str:
        """The kernel's boot id: identities are only comparable within one boot."""
        path = f"{self.root}/sys/kernel/random/boot_id"
        try:
            with open(path) as fh:
                return fh.read().strip()
        except OSError as exc:
            raise from_oserror(exc, "read boot id", path) from exc


def split_stat(data: bytes) -> Tuple[bytes, List[bytes]]:
    """A /proc/PID/stat line as its comm and the fields after it: item 0 is field 3
    (state), field N is item N - 3 (proc(5)). comm is in parentheses and may itself
    contain spaces and ')', so it ends at the *last* ')'. Raises ValueError when the
    line has no comm."""
    lpar = data.find(b"(")
    rpar = data.rfind(b")")
    if lpar < 0 or rpar < 0:
        raise ValueError(f"no (comm) in {data[:80]!r}")
    return data[lpar + 1:rpar], data[rpar + 2:].split()


def parse_stat(pid: int, data: bytes, uid: int = -1) -> ProcessInfo:
    """Parse a /proc/PID/stat line. Field 4 is ppid, 6 session, 5 pgrp, 22 starttime."""
    try:
        name, rest = split_stat(data)
    except ValueError:
        raise ProcessGone(f"read process: /proc/{pid}/stat is malformed: {data[:80]!r}"
                          ) from None
    comm = name.decode("utf-8", "replace")
    state = rest[0].decode("ascii", "replace")
    # Field 52 (exit_code, Linux 3.5) is meaningful once the process is a zombie.
    exit_code = int(rest[49]) if state in ("Z", "X") and len(rest) > 49 else None
    return ProcessInfo(pid=pid, ppid=int(rest[1]), pgid=int(rest[2]), sid=int(rest[3]),
                       start_ticks=int(rest[19]), uid=uid, comm=comm, state=state,
                       exit_code=exit_code)


def boottime_offset_ns() -> int:
    """CLOCK_BOOTTIME minus CLOCK_MONOTONIC, in ns.

    cn_proc stamps events with ktime_get_ns() (monotonic) while /proc/PID/stat
    start times count from boot including suspend; the offset converts one
    into the other.
    """
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def boot_epoch() -> float:
    """Wall-clock time of boot (for turning start ticks into dates)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
