"""Proc connector (cn_proc) adapter: the only module that knows its byte layout.

Layout (docs/kernel.md, "cn_proc")::

    nlmsghdr   16 bytes  len u32, type u16, flags u16, seq u32, pid u32
    cn_msg     20 bytes  idx u32, val u32, seq u32, ack u32, len u16, flags u16
    proc_event           what u32, cpu u32, timestamp_ns u64, then event_data

Why not pyroute2 here: its ``ProcEventSocket.get()`` costs about nine times a
plain ``struct`` loop per event, and its reader stops on ENOBUFS. A fork storm
produces tens of thousands of events a second, so the socket is plain
``socket`` and the decode one precompiled ``struct.Struct`` per event type.
For the same reason the hot path (:meth:`ProcConnector.drain`) hands a sink
plain integers instead of building a frozen dataclass per event;
:func:`decode` gives the dataclasses for everything else (tests, tools).

Loss: the kernel sends with GFP_NOWAIT and drops when our buffer is full; the
next recv fails with ENOBUFS (netlink(7)). ``cn_msg.seq`` counts events per
CPU (``proc_event.cpu``), so a gap in one CPU's sequence reveals loss too
(docs/kernel.md, "cn_proc"). Both are reported to the sink's
``on_loss`` so it can resync from /proc.

Event filter: since Linux 6.6 (commit 2aa1f7a1f47c, "connector/cn_proc: Add
filtering") a LISTEN may carry an event mask, and the kernel delivers only
those events to the socket. elsad needs fork, exec and exit; comm and sid
events are half the messages of a shell pipeline or a fork storm, and each one
read costs elsad a recvmmsg slot and a loop turn. The kernel numbers every
event before it filters (``send_msg``), so a filtered socket sees gaps in
``cn_msg.seq`` by design: its loss signals are ENOBUFS and the socket's drop
counter (``SO_MEMINFO``), not the sequence. Older kernels ignore a LISTEN of
the new size altogether (no events, no ack), so the mask is only sent where
the kernel release says it is understood.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Tuple, Union

from elsa.errors import KernelInterfaceError, PrivilegeError
from elsa.kernel import mmsg

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33  # socket(7); not exported by Python's socket module
#: getsockopt(SOL_SOCKET, SO_MEMINFO) fills u32[SK_MEMINFO_VARS]; index 0 is
#: SK_MEMINFO_RMEM_ALLOC (bytes queued), 1 SK_MEMINFO_RCVBUF (capacity).
#: Linux 4.12 (docs/kernel.md, "cn_proc").
SO_MEMINFO = 55
_MEMINFO = struct.Struct("=II")
#: SK_MEMINFO_DROPS (index 8): messages the kernel dropped for this socket (buffer full).
_MEMINFO_DROPS = struct.Struct("=32xI")

# proc_event.what
PROC_EVENT_NONE = 0x00000000
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_GID = 0x00000040
PROC_EVENT_SID = 0x00000080
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_COMM = 0x00000200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000
#: The kernel's PROC_EVENT_ALL (docs/kernel.md, "cn_proc"): every event, no filter.
PROC_EVENT_ALL = (PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_UID | PROC_EVENT_GID
                  | PROC_EVENT_SID | PROC_EVENT_PTRACE | PROC_EVENT_COMM
                  | PROC_EVENT_NONZERO_EXIT | PROC_EVENT_COREDUMP | PROC_EVENT_EXIT)
#: What elsad acts on (membership, applications, exits).
NEEDED_EVENTS = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT
#: The first release whose LISTEN takes an event mask (see the module docstring).
FILTER_RELEASE = (6, 6)

_HDR = struct.Struct("=I12x8xI8xIIQ")  # nl len, cn seq, what, cpu, timestamp
_WHAT = struct.Struct("=I")
_FORK = struct.Struct("=IIII")       # parent_pid, parent_tgid, child_pid, child_tgid
_EXEC = struct.Struct("=II")         # process_pid, process_tgid
_IDS = struct.Struct("=IIII")        # pid, tgid, r(u|g)id, e(u|g)id
_SID = struct.Struct("=II")
_COMM = struct.Struct("=II16s")
_EXIT = struct.Struct("=IIIIII")     # pid, tgid, exit_code, exit_signal, parent_pid, parent_tgid
_EVENT_OFFSET = 52
_MIN_LEN = _EVENT_OFFSET
#: What :meth:`ProcConnector.drain` reads of each recvmmsg slot: cn seq, what,
#: cpu, timestamp and the first six u32 of event_data (the slot's rest is padding).
_SLOT_FORMAT = "=24xI8xIIQIIIIII"
_SLOT_FIELDS = struct.Struct(_SLOT_FORMAT)
_CONTROL = struct.Struct("=IHHII" + "IIIIHH" + "I")
_CONTROL_MASK = struct.Struct("=IHHII" + "IIIIHH" + "II")  # struct proc_input


# -- the frozen event types the rest of the code sees -------------------------------

@dataclass(frozen=True)
class ForkEvent:
    cpu: int
    timestamp_ns: int
    parent_pid: int
    parent_tgid: int
    child_pid: int
    child_tgid: int

    @property
    def is_thread(self) -> bool:
        """A new thread: same thread group as an existing task."""
        return self.child_pid != self.child_tgid


@dataclass(frozen=True)
class ExecEvent:
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int


@dataclass(frozen=True)
class UidEvent:
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    ruid: int
    euid: int


@dataclass(frozen=True)
class CommEvent:
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    comm: str


@dataclass(frozen=True)
class ExitEvent:
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    exit_code: int
    exit_signal: int
    parent_pid: int
    parent_tgid: int

    @property
    def is_thread(self) -> bool:
        return self.pid != self.tgid


@dataclass(frozen=True)
class LossEvent:
    """Events were lost: ``reason`` is "enobufs", "seq-gap" or, on a filtered
    socket, "lost-fork" (elsa.core.events.ProcEvents.lost_fork); ``missing`` is
    the gap size when known (0 otherwise: the kernel does not say how many)."""

    reason: str
    cpu: int = -1
    missing: int = 0


@dataclass(frozen=True)
class OtherEvent:
    cpu: int
    timestamp_ns: int
    what: int


Event = Union[ForkEvent, ExecEvent, UidEvent, CommEvent, ExitEvent, LossEvent, OtherEvent]


class EventSink(Protocol):
    """What :meth:`ProcConnector.drain` calls, in event order."""

    def on_fork(self, parent_tgid: int, child_pid: int, child_tgid: int, ts_ns: int) -> None: ...
    def on_exit(self, pid: int, tgid: int, exit_code: int, ts_ns: int) -> None: ...
    def on_exec(self, pid: int, tgid: int, ts_ns: int) -> None: ...
    def on_loss(self, event: LossEvent) -> None: ...


#: How long a hole in one CPU's sequence may stay open before it counts as
#: loss: some kernels deliver one CPU's events out of order, and a gap that
#: fills within the window was reordering, not loss. Some events are dropped
#: for every listener without ENOBUFS; only the gap reveals that loss
#: (docs/kernel.md, "cn_proc"). Judged by the events' own timestamps: no clock read.
REORDER_WINDOW_NS = 200_000_000
MAX_HOLES = 4096
_NEVER = 1 << 64
_M = 0xFFFFFFFF


class SeqTracker:
    """Detects loss from gaps in the per-CPU cn_msg sequence numbers, tolerating
    reordering within :data:`REORDER_WINDOW_NS`."""

    def __init__(self, window_ns: int = REORDER_WINDOW_NS) -> None:
        self.last: Dict[int, int] = {}              # cpu -> highest seq seen
        self.holes: Dict[Tuple[int, int], int] = {}  # (cpu, seq) -> deadline ns
        self.window_ns = window_ns
        self.deadline = _NEVER                     # earliest hole deadline
        self.reordered = 0

    def observe(self, cpu: int, seq: int, ts: int) -> List[LossEvent]:
        """Record *seq* on *cpu* at event time *ts*; return loss now certain."""
        prev = self.last.get(cpu)
        lost: List[LossEvent] = []
        if prev is None or seq == (prev + 1) & _M:
            self.last[cpu] = seq
        else:
            lost = self.slow(cpu, seq, prev, ts)
        return lost + self.expire(ts) if ts >= self.deadline else lost

    def slow(self, cpu: int, seq: int, prev: int, ts: int) -> List[LossEvent]:
        """A gap, a late arrival or the wrap-around (the hot path handles the
        in-order case)."""
        ahead = (seq - prev) & _M
        if ahead < 0x80000000:  # seq is ahead of prev: open holes for what is missing
            self.last[cpu] = seq
            missing = ahead - 1
            lost_now = max(0, missing - MAX_HOLES)
            deadline = ts + self.window_ns
            for i in range(lost_now + 1, ahead):
                self.holes[(cpu, (prev + i) & _M)] = deadline
            self.deadline = min(self.deadline, deadline)
            return [LossEvent("seq-gap", cpu, lost_now)] if lost_now else []
        if self.holes.pop((cpu, seq), None) is not None:
            self.reordered += 1  # a late event filled its hole: no loss
            if not self.holes:
                self.deadline = _NEVER
        return []

    def expire(self, now_ns: int) -> List[LossEvent]:
        """Holes older than the window are loss; one LossEvent per CPU."""
        if now_ns < self.deadline:
            return []
        per_cpu: Dict[int, int] = {}
        for key, deadline in list(self.holes.items()):
            if deadline <= now_ns:
                del self.holes[key]
                per_cpu[key[0]] = per_cpu.get(key[0], 0) + 1
        self.deadline = min(self.holes.values(), default=_NEVER)
        return [LossEvent("seq-gap", cpu, n) for cpu, n in sorted(per_cpu.items())]

    def reset(self) -> None:
        self.last.clear()
        self.holes.clear()
        self.deadline = _NEVER


def decode(buf: bytes, seqs: Optional[SeqTracker] = None) -> List[Event]:
    """Decode one netlink datagram into events (a LossEvent first on a seq gap)."""
    out: List[Event] = []
    if len(buf) < _MIN_LEN:
        return out
    _nl_len, seq, what, cpu, ts = _HDR.unpack_from(buf)
    if seqs is not None and what != PROC_EVENT_NONE:
        out.extend(seqs.observe(cpu, seq, ts))
    off = _EVENT_OFFSET
    if what == PROC_EVENT_FORK:
        out.append(ForkEvent(cpu, ts, *_FORK.unpack_from(buf, off)))
    elif what == PROC_EVENT_EXIT:
        out.append(ExitEvent(cpu, ts, *_EXIT.unpack_from(buf, off)))
    elif what == PROC_EVENT_EXEC:
        out.append(ExecEvent(cpu, ts, *_EXEC.unpack_from(buf, off)))
    elif what == PROC_EVENT_UID:
        out.append(UidEvent(cpu, ts, *_IDS.unpack_from(buf, off)))
    elif what == PROC_EVENT_COMM:
        pid, tgid, comm = _COMM.unpack_from(buf, off)
        out.append(CommEvent(cpu, ts, pid, tgid,
                             comm.split(b"\0", 1)[0].decode("utf-8", "replace")))
    else:
        out.append(OtherEvent(cpu, ts, what))
    return out


def control_message(op: int, events: Optional[int] = None) -> bytes:
    """The netlink message that subscribes (LISTEN) or unsubscribes (IGNORE);
    with *events*, a ``struct proc_input`` that also sets the event mask."""
    if events is None:
        return _CONTROL.pack(_CONTROL.size, NLMSG_DONE, 0, 0, os.getpid(),
                             CN_IDX_PROC, CN_VAL_PROC, 0, 0, 4, 0, op)
    return _CONTROL_MASK.pack(_CONTROL_MASK.size, NLMSG_DONE, 0, 0, os.getpid(),
                              CN_IDX_PROC, CN_VAL_PROC, 0, 0, 8, 0, op, events)


def kernel_filters(release: str) -> bool:
    """Whether a kernel of this ``uname -r`` release takes an event mask in LISTEN.
    An unparsable release counts as old: the unfiltered LISTEN works everywhere."""
    parts = release.split(".", 2)
    try:
        version = (int(parts[0]), int("".join(c for c in parts[1][:3] if c.isdigit())))
    except (IndexError, ValueError):
        return False
    return version >= FILTER_RELEASE


#: recvmmsg slots per call and bytes per slot: a proc_event message is under
#: 100 bytes today; the slack is for fields newer kernels append.
MMSG_SLOTS = 256
MMSG_SLOT = 512


_UNPACKERS: Dict[int, Callable[[memoryview], Iterator[Tuple[int, ...]]]] = {}


def _slot_unpacker(slot: int) -> Callable[[memoryview], Iterator[Tuple[int, ...]]]:
    """iter_unpack of :data:`_SLOT_FORMAT` over consecutive slots of *slot* bytes."""
    unpack = _UNPACKERS.get(slot)
    if unpack is None:
        unpack = _UNPACKERS[slot] = struct.Struct(
            _SLOT_FORMAT + f"{slot - _SLOT_FIELDS.size}x").iter_unpack
    return unpack


class ProcConnector:
    """A subscribed proc-connector socket.

    *events* is the event mask to ask for; the kernel filters it only where
    :func:`kernel_filters` says so for *release* (default: the running
    kernel's), and :attr:`filtered` tells which it is."""

    filtered = False

    def __init__(self, rcvbuf: int = 32 * 1024 * 1024, events: int = PROC_EVENT_ALL,
                 release: Optional[str] = None) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise KernelInterfaceError(
                f"cannot open the proc connector (NETLINK_CONNECTOR): {exc.strerror}; the "
                "kernel needs CONFIG_CONNECTOR and CONFIG_PROC_EVENTS") from None
        self.rcvbuf = self._set_rcvbuf(rcvbuf)
        self.filtered = (events != PROC_EVENT_ALL
                         and kernel_filters(os.uname().release if release is None else release))
        self.event_mask = events if self.filtered else PROC_EVENT_ALL
        try:
            self.sock.bind((0, CN_IDX_PROC))
            self.sock.send(control_message(PROC_CN_MCAST_LISTEN,
                                           events if self.filtered else None))
        except PermissionError:
            self.sock.close()
            raise PrivilegeError(
                "cannot subscribe to the proc connector: permission denied; elsad needs "
                "CAP_NET_ADMIN in the initial user namespace (run it as root)") from None
        except OSError as exc:
            self.sock.close()
            raise KernelInterfaceError(
                f"cannot subscribe to the proc connector: {exc.strerror}") from None
        self.sock.setblocking(False)
        self.seqs = SeqTracker()
        self._buf = bytearray(4096)
        self._view = memoryview(self._buf)
        self.events = 0
        self.enobufs = 0
        self.seq_lost = 0
        self._reader = mmsg.open_reader(self.sock, MMSG_SLOTS, MMSG_SLOT)

    def _set_rcvbuf(self, size: int) -> int:
        try:
            # SO_RCVBUFFORCE (CAP_NET_ADMIN) may exceed net.core.rmem_max.
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        # The kernel doubles the value for bookkeeping overhead (socket(7)).
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def fileno(self) -> int:
        return self.sock.fileno()

    def queued(self) -> Tuple[int, int]:
        """(bytes queued unread, capacity in bytes): the kernel's charge for the
        messages waiting in the socket (skb truesize, ~832 bytes a message on
        x86-64) against the doubled receive buffer."""
        # The kernel copies the first *buflen* bytes of its array (sock_getsockopt).
        return _MEMINFO.unpack(self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO,
                                                    _MEMINFO.size))

    def dropped(self) -> int:
        """Messages the kernel dropped for this socket since it was opened
        (SK_MEMINFO_DROPS): the loss count of a filtered socket, whose
        sequence numbers have gaps by design."""
        return _MEMINFO_DROPS.unpack(self.sock.getsockopt(
            socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO_DROPS.size))[0]

    def close(self) -> None:
        try:
            # Unsubscribe explicitly: the kernel counts listeners per LISTEN
            # message and only sends events while the count is positive.
            self.sock.setblocking(True)
            self.sock.send(control_message(PROC_CN_MCAST_IGNORE))
        except OSError:
            pass
        self.sock.close()

    def read(self, limit: int = 1 << 30) -> Iterator[Event]:
        """Decoded events currently queued (frozen dataclasses; not the hot path)."""
        n = 0
        while n < limit:
            try:
                size = self.sock.recv_into(self._buf)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    yield LossEvent("enobufs")
                    continue
                raise
            for ev in decode(bytes(self._view[:size]), None if self.filtered else self.seqs):
                if isinstance(ev, LossEvent):
                    self.seq_lost += ev.missing
                else:
                    self.events += 1
                n += 1
                yield ev

    def drain(self, sink: EventSink, limit: int = 4096) -> int:
        """Read up to *limit* queued messages and dispatch them to *sink*, in order.

        Returns how many messages were read; fewer than *limit* means the
        socket is empty. This is the daemon's hot path: one recvmmsg per
        batch of messages (elsa/kernel/mmsg.py), one or two unpacks per
        event, no allocation beyond the tuple unpack.
        """
        reader = self._reader
        read = reader.read
        view = memoryview(reader.buf)
        lens = reader.lens
        slot = reader.slot_size
        slots = _slot_unpacker(slot)
        seqs = self.seqs
        last = seqs.last
        deadline = seqs.deadline
        on_fork = sink.on_fork
        on_exit = sink.on_exit
        on_exec = sink.on_exec
        check_seq = not self.filtered
        n = 0
        while n < limit:
            try:
                got = read(limit - n)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    sink.on_loss(LossEvent("enobufs"))
                    continue
                raise
            if not got:
                break
            n += got
            if min(lens[:got]) < _MIN_LEN:
                self._drop_short(got)
            # One unpack per slot, in C: the header and the event's first six
            # u32 (fork: parent pid, tgid, child pid, tgid; exit: pid, tgid,
            # code, signal, parent pid, tgid; exec: pid, tgid). A message
            # longer than its slot lost only its tail: these fields are at
            # fixed offsets well inside MMSG_SLOT.
            for seq, what, cpu, ts, a, b, c, d, _e, _f in slots(view[:got * slot]):
                if what == PROC_EVENT_NONE:
                    continue  # the ack of our LISTEN (or a short message, blanked)
                if not check_seq:  # filtered: gaps are the events we did not ask for
                    pass
                elif last.get(cpu, -2) + 1 == seq:  # in order (wrap-around: below)
                    last[cpu] = seq
                else:
                    prev = last.get(cpu)
                    if prev is None:  # this CPU's first event
                        last[cpu] = seq
                    else:
                        for loss in seqs.slow(cpu, seq, prev, ts):
                            self._lost(sink, loss)
                        deadline = seqs.deadline
                if ts >= deadline:
                    for loss in seqs.expire(ts):
                        self._lost(sink, loss)
                    deadline = seqs.deadline
                if what == PROC_EVENT_FORK:
                    on_fork(b, c, d, ts)
                elif what == PROC_EVENT_EXIT:
                    on_exit(a, b, c, ts)
                elif what == PROC_EVENT_EXEC:
                    on_exec(a, b, ts)
        self.events += n
        return n

    def _drop_short(self, got: int) -> None:
        """Blank the slots of messages too short for a proc_event (never sent
        by the kernel) so that the drain skips them as PROC_EVENT_NONE."""
        reader = self._reader
        for i in range(got):
            if reader.lens[i] < _MIN_LEN:
                off = i * reader.slot_size
                reader.buf[off:off + _EVENT_OFFSET] = bytes(_EVENT_OFFSET)

    def _lost(self, sink: EventSink, loss: LossEvent) -> None:
        self.seq_lost += loss.missing
        sink.on_loss(loss)

    def expire_holes(self, sink: EventSink, now_ns: int) -> None:
        """Report holes that stayed open past the window while no event came
        (called from a timer with CLOCK_MONOTONIC, the events' clock)."""
        for loss in self.seqs.expire(now_ns):
            self._lost(sink, loss)
