"""The taskstats socket: the generic netlink family lookup, the exit listener
(every CPU's exit records, read in recvmmsg batches) and pid queries.

The records' layouts, their decoding and the folding of threads into processes
are elsa/kernel/taskstats.py; kernel facts in docs/kernel.md, "taskstats".
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Container, Dict, Iterator, List, Optional, Tuple

from elsa.core.source import UsageRow
from elsa.errors import KernelInterfaceError, ProcessGone, from_oserror
from elsa.kernel import mmsg
from elsa.kernel.taskstats import (
    GENLHDR,
    NETLINK_GENERIC,
    NLATTR,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGHDR,
    SO_RCVBUFFORCE,
    TASKSTATS_CMD_ATTR_DEREGISTER_CPUMASK,
    TASKSTATS_CMD_ATTR_PID,
    TASKSTATS_CMD_ATTR_REGISTER_CPUMASK,
    TASKSTATS_CMD_GET,
    U16,
    U32,
    Batch,
    ExitMessage,
    TaskRecord,
    decode_messages,
    exit_rows,
    fast_exit_tuple,
)

# Generic netlink controller: the family id lookup (docs/kernel.md, "taskstats").
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2


def family_id() -> int:
    """The TASKSTATS generic netlink family id: one CTRL_CMD_GETFAMILY request.

    Written here rather than through pyroute2's GenericNetlinkSocket: importing
    pyroute2's netlink package costs elsad 20 MB of RSS (measured, half of the
    memory target of bench_memory.py) for a lookup of a few dozen bytes."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        body = GENLHDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + _nla(CTRL_ATTR_FAMILY_NAME,
                                                              b"TASKSTATS\0")
        sock.send(NLMSGHDR.pack(16 + len(body), GENL_ID_CTRL, NLM_F_REQUEST, 1, 0) + body)
        sock.settimeout(5.0)
        data = sock.recv(65536)
    except OSError as exc:
        raise KernelInterfaceError(
            f"taskstats: generic netlink family lookup failed: {exc}") from exc
    finally:
        sock.close()
    mlen, mtype = NLMSGHDR.unpack_from(data, 0)[:2]
    if mtype == NLMSG_ERROR:
        err = -struct.unpack_from("=i", data, 16)[0]
        raise KernelInterfaceError(
            f"taskstats: generic netlink family TASKSTATS not found ({os.strerror(err)}); the "
            "kernel needs CONFIG_TASKSTATS")
    pos = 16 + GENLHDR.size  # the attributes follow nlmsghdr and genlmsghdr
    while pos + 4 <= min(mlen, len(data)):
        alen, atype = NLATTR.unpack_from(data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == CTRL_ATTR_FAMILY_ID:
            return U16.unpack_from(data, pos + 4)[0]
        pos += (alen + 3) & ~3
    raise KernelInterfaceError("taskstats: the generic netlink controller's answer has no "
                               "family id (unexpected kernel reply)")


def _cpulist() -> str:
    """Every possible CPU, as the kernel's cpulist syntax (/sys/devices/system/cpu/possible)."""
    try:
        with open("/sys/devices/system/cpu/possible") as fh:
            return fh.read().strip()
    except OSError:
        return f"0-{(os.cpu_count() or 1) - 1}"


def _nla(atype: int, payload: bytes) -> bytes:
    raw = NLATTR.pack(4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


#: recvmmsg slots per read and bytes per slot (elsa/kernel/mmsg.py): an exit
#: message (a struct taskstats per pid and tgid) is under 1 KiB today.
MMSG_SLOTS = 32
MMSG_SLOT = 4096


class TaskstatsSocket:
    """A generic netlink socket speaking TASKSTATS: exit listener and pid queries."""

    def __init__(self, *, rcvbuf: int = 64 * 1024 * 1024, family: Optional[int] = None) -> None:
        self.family = family_id() if family is None else family
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        except OSError as exc:
            raise from_oserror(exc, "open taskstats socket", "NETLINK_GENERIC") from exc
        try:
            # SO_RCVBUFFORCE may exceed net.core.rmem_max (needs CAP_NET_ADMIN);
            # exits come in bursts and the kernel drops what does not fit (ENOBUFS).
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, 0))
        self.seq = 0
        self.cpumask: Optional[str] = None
        self.enobufs = 0
        #: (from, to), epoch seconds: when the records counted in ``enobufs`` since the
        #: last :meth:`take_lost` were lost (see :meth:`_lost`); None: nothing lost.
        self.lost: Optional[Tuple[float, float]] = None
        self._emptied_at = 0  # CLOCK_BOOTTIME ns: see _datagrams
        self._batch = mmsg.open_reader(self.sock, MMSG_SLOTS, MMSG_SLOT)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def rcvbuf(self) -> int:
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def _send(self, attr: int, payload: bytes) -> int:
        self.seq += 1
        body = GENLHDR.pack(TASKSTATS_CMD_GET, 1, 0) + _nla(attr, payload)
        msg = NLMSGHDR.pack(16 + len(body), self.family, NLM_F_REQUEST, self.seq, 0) + body
        try:
            self.sock.send(msg)
        except OSError as exc:
            raise from_oserror(exc, "taskstats request", "TASKSTATS",
                               hint="taskstats needs root (CAP_NET_ADMIN)") from exc
        return self.seq

    def register(self, cpumask: Optional[str] = None) -> None:
        """Ask for exit records of tasks on *cpumask* (default: every possible CPU)."""
        self.cpumask = cpumask or _cpulist()
        # No exit before this can be sent to us (exit_time_ns's lower bound).
        self._emptied_at = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self._send(TASKSTATS_CMD_ATTR_REGISTER_CPUMASK, self.cpumask.encode() + b"\0")

    def deregister(self) -> None:
        if self.cpumask:
            try:
                self._send(TASKSTATS_CMD_ATTR_DEREGISTER_CPUMASK, self.cpumask.encode() + b"\0")
            except Exception:
                pass  # closing the socket deregisters too
            self.cpumask = None

    def take_lost(self) -> Optional[Tuple[float, float]]:
        """When the records lost since the last call were lost (epoch seconds), or None."""
        span, self.lost = self.lost, None
        return span

    def _lost(self, until_boot_ns: int, real_offset_ns: int) -> None:
        """Note that records were lost after the socket was last emptied and before
        *until_boot_ns*. The kernel drops a record only while the queue is full, or
        congested since a drop (netlink_attachskb; the flag is cleared when a read
        empties the queue, netlink_rcv_wake), and reports the drop on the next read:
        nothing queued before the socket was last emptied was lost, and every drop
        before a read that found the queue empty was reported by then."""
        lo = (self._emptied_at + real_offset_ns) / 1e9
        hi = (until_boot_ns + real_offset_ns) / 1e9
        if self.lost is not None:
            lo, hi = min(lo, self.lost[0]), max(hi, self.lost[1])
        self.lost = (lo, hi)

    def _recv(self) -> Optional[bytes]:
        """One datagram, or None when the kernel dropped records (ENOBUFS:
        counted, not raised; the caller flags affected jobs). BlockingIOError
        and socket.timeout pass through; other errors become ElsaErrors."""
        try:
            return self.sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            raise
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.enobufs += 1
                now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
                self._lost(now, time.time_ns() - now)
                return None
            raise from_oserror(exc, "read taskstats", "TASKSTATS") from exc

    def _datagrams(self) -> Iterator[Tuple[bytes, int, int, int]]:
        """Every datagram ready now (non-blocking), with its CLOCK_BOOTTIME
        receive time, CLOCK_REALTIME - CLOCK_BOOTTIME and when the previous
        call emptied the socket (the arguments of :func:`exit_time_ns`).
        A datagram may be a view into a buffer the next one reuses."""
        for buf, lens, slot, n, now, real_offset, after in self._batches():
            view = memoryview(buf)
            for i in range(n):
                if lens[i]:  # (0: a truncated datagram, counted and blanked)
                    off = i * slot
                    yield view[off:off + lens[i]], now, real_offset, after

    def receive(self) -> List[ExitMessage]:
        """Every message ready now (non-blocking); see :meth:`_datagrams`."""
        out: List[ExitMessage] = []
        for data, now, real_offset, after in self._datagrams():
            out.extend(decode_messages(bytes(data), now, real_offset, after)[0])
        return out

    def receive_tuples(self) -> List[Tuple]:
        """Like :meth:`receive`, each exit's task record as a plain tuple of
        :class:`TaskRecord`'s fields (``TaskRecord(*t)`` gives the dataclass;
        the benchmarks and tests read records so). The common one-message
        datagram is decoded with one unpack at fixed offsets
        (:func:`fast_exit_tuple`); anything else goes through
        :func:`decode_messages`."""
        out: List[Tuple] = []
        fast = fast_exit_tuple
        append = out.append
        for data, now, real_offset, after in self._datagrams():
            t = fast(data, now, real_offset, after)
            if t is not None:
                append(t)
                continue
            msgs, _errs = decode_messages(bytes(data), now, real_offset, after)
            out.extend(m.task.as_tuple() for m in msgs if m.task is not None)
        return out

    def receive_rows(self, source: str, multi: Container[int], versions: Dict[int, int]
                     ) -> Tuple[List[UsageRow], List[Tuple]]:
        """Every message ready now, as :func:`exit_rows` returns them: usage
        rows of single-threaded processes, task tuples for the folder."""
        return exit_rows(self._batches(), source, multi, versions)

    def _batches(self) -> Iterator[Batch]:
        """Every datagram ready now (non-blocking), one recvmmsg read at a time
        (:data:`Batch`; :func:`exit_rows` takes them so, with no object per
        datagram). A truncated datagram (longer than MMSG_SLOT) is lost, like
        one the kernel dropped: it is counted and blanked (length 0) before the
        batch is handed on. The times are those of :meth:`_datagrams`."""
        batch = self._batch
        read = batch.read
        buf = batch.buf
        lens = batch.lens
        slot = batch.slot_size
        clock = time.clock_gettime_ns
        boottime = time.CLOCK_BOOTTIME
        after = self._emptied_at
        before = clock(boottime)  # taken before each read
        real_offset = time.time_ns() - before
        lost = self.enobufs
        while True:
            try:
                n = read()
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    self._lost(clock(boottime), real_offset)
                    continue
                raise from_oserror(exc, "read taskstats", "TASKSTATS") from exc
            if not n:
                if self.enobufs != lost:  # drops go on until the queue is empty
                    self._lost(clock(boottime), real_offset)
                # Whatever was queued before *before* has been read: what the
                # next call reads was queued after it.
                self._emptied_at = before
                return
            now = clock(boottime)
            if max(lens[:n]) >= slot:  # (a truncated datagram fills its slot)
                for i in range(n):
                    if batch.truncated(i):
                        self.enobufs += 1
                        self._lost(now, real_offset)
                        lens[i] = 0
            yield buf, lens, slot, n, now, real_offset, after
            before = now

    def query_pid(self, pid: int, timeout: float = 1.0) -> TaskRecord:
        """Statistics of one live task (TASKSTATS_CMD_ATTR_PID), so far."""
        seq = self._send(TASKSTATS_CMD_ATTR_PID, U32.pack(pid))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelInterfaceError(f"taskstats: no reply for pid {pid} in {timeout} s")
            self.sock.settimeout(left)
            try:
                data = self._recv()
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(None)
            if data is None:
                continue
            (rseq,) = struct.unpack_from("=I", data, 8)
            msgs, errs = decode_messages(data, time.clock_gettime_ns(time.CLOCK_BOOTTIME))
            if rseq != seq:
                continue  # an exit record for a listener on this socket; not ours
            if errs:
                if errs[0] == errno.ESRCH:
                    raise ProcessGone(f"taskstats: pid {pid} does not exist")
                raise KernelInterfaceError(f"taskstats: query pid {pid}: "
                                           f"{os.strerror(errs[0])}")
            for m in msgs:
                if m.task is not None:
                    return m.task

    def close(self) -> None:
        self.deregister()
        self.sock.close()
