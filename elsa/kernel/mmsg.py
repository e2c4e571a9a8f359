"""Many datagrams per system call: recvmmsg(2) into fixed slots of one buffer.

Python's socket module has no recvmmsg. The proc connector sends one
datagram per event, three or more per process on the whole machine, and a
``recv_into`` per datagram costs a system call and a release and re-take of
the GIL, which the store writer thread contends for (measured 0.9-1.0 µs
per datagram against 0.7 µs with one recvmmsg per 256; elsad's CPU per
process, issue 18). The call goes through ``ctypes.PyDLL``, which keeps the
GIL: with ``MSG_DONTWAIT`` it never blocks.

Where libc has no recvmmsg, :func:`open_reader` gives a :class:`OneAtATime`
instead: the same interface, one datagram per call, so that callers have one
read loop.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from typing import List, Optional, Union

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


_INTS_PER_ENTRY = ctypes.sizeof(_MMsgHdr) // 4
_LEN_AT = _MMsgHdr.len.offset // 4
_FLAGS_AT = (_MMsgHdr.hdr.offset + _MsgHdr.flags.offset) // 4


def _recvmmsg():
    try:
        fn = ctypes.PyDLL(None, use_errno=True).recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_RECVMMSG = _recvmmsg()


class BatchReader:
    """Reads up to *slots* datagrams of at most *slot_size* bytes per call.

    After :meth:`read` returned n > 0, datagram i (i < n) is
    ``buf[i * slot_size : i * slot_size + lens[i]]``; ``truncated(i)`` says
    whether it was longer than its slot (its tail is lost).
    """

    def __init__(self, fd: int, slots: int, slot_size: int) -> None:
        assert _RECVMMSG is not None
        self.fd = fd
        self.slots = slots
        self.slot_size = slot_size
        self.buf = bytearray(slots * slot_size)
        self._cbuf = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        self._iov = (_IoVec * slots)()
        self._hdrs = (_MMsgHdr * slots)()
        base = ctypes.addressof(self._cbuf)
        for i in range(slots):
            self._iov[i].base = base + i * slot_size
            self._iov[i].len = slot_size
            self._hdrs[i].hdr.iov = ctypes.addressof(self._iov[i])
            self._hdrs[i].hdr.iovlen = 1
        ints = memoryview(self._hdrs).cast("B").cast("I")
        self.lens = ints[_LEN_AT::_INTS_PER_ENTRY]
        self._flags = ints[_FLAGS_AT::_INTS_PER_ENTRY]
        self._addr = ctypes.addressof(self._hdrs)

    def read(self, limit: Optional[int] = None) -> int:
        """Datagrams read (0: none queued). Raises OSError (ENOBUFS...) like recv."""
        want = self.slots if limit is None or limit > self.slots else limit
        n = _RECVMMSG(self.fd, self._addr, want, MSG_DONTWAIT, None)
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")

    def truncated(self, i: int) -> bool:
        return bool(self._flags[i] & MSG_TRUNC)


def open_batch(fd: int, slots: int, slot_size: int) -> Optional[BatchReader]:
    """A :class:`BatchReader` on *fd*, or None where libc has no recvmmsg."""
    if _RECVMMSG is None:
        return None
    return BatchReader(fd, slots, slot_size)


class OneAtATime:
    """The :class:`BatchReader` interface over one ``recvmsg_into`` per call (a
    libc without recvmmsg): one datagram per read, into one slot of
    *slot_size* bytes; MSG_TRUNC tells a truncated one, as recvmmsg's flags do."""

    def __init__(self, sock: socket.socket, slot_size: int) -> None:
        self.buf = bytearray(slot_size)
        self.slot_size = slot_size
        self.lens: List[int] = [0]
        self._flags = 0
        self._recvmsg_into = sock.recvmsg_into

    def read(self, limit: Optional[int] = None) -> int:
        """Datagrams read (0 or 1). Raises OSError (ENOBUFS...) like recv."""
        try:
            n, _anc, self._flags, _addr = self._recvmsg_into([self.buf], 0, MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        self.lens[0] = n
        return 1

    def truncated(self, i: int) -> bool:
        return bool(self._flags & MSG_TRUNC)


def open_reader(sock: socket.socket, slots: int, slot_size: int
                ) -> Union[BatchReader, OneAtATime]:
    """A :class:`BatchReader` on *sock*, or a :class:`OneAtATime` where libc has
    no recvmmsg."""
    return open_batch(sock.fileno(), slots, slot_size) or OneAtATime(sock, slot_size)
