"""Dropping capabilities elsad does not need for its configuration (capset(2)).

The packaged unit's CapabilityBoundingSet= allows what any backend needs
(packaging/elsad.service); at start elsad drops those of them its backend and
sources do not use from its effective and permitted sets, for good.
Numbers and rules: docs/kernel.md, "Sockets and credentials".
"""

from __future__ import annotations

import ctypes
import os
from typing import Dict, Iterable, List, Optional

from elsa.errors import ElsaError, KernelInterfaceError
from elsa.kernel.procfs import ProcFS

CAPS: Dict[str, int] = {
    "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_NET_ADMIN": 12, "CAP_SYS_PACCT": 20,
    "CAP_SYS_NICE": 23,
}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def needed(backend: str, sources: Iterable[str]) -> List[str]:
    """The capabilities elsad uses at run time with *backend* and *sources*.

    CAP_NET_ADMIN: proc connector and taskstats. CAP_KILL: the ``kill``
    operation on other users' processes. CAP_SYS_NICE: the ``nice`` boost
    (and a reload that sets ``nice``), and cpuset moves. CAP_DAC_OVERRIDE: job
    cgroups under a 0555 cgroup root (every cgroup backend). CAP_SYS_PACCT:
    the bsdacct source switches acct(2) at start, rotation and stop.
    """
    out = ["CAP_NET_ADMIN", "CAP_KILL", "CAP_SYS_NICE"]
    if backend != "cnproc":
        out.append("CAP_DAC_OVERRIDE")
    if "bsdacct" in sources:
        out.append("CAP_SYS_PACCT")
    return out


def effective(procfs: Optional[ProcFS] = None) -> int:
    """This process's effective capabilities (the ``CapEff`` mask of its status);
    0 when that cannot be read."""
    try:
        value = (procfs or ProcFS()).status_field(os.getpid(), "CapEff")
    except ElsaError:
        return 0
    return int(value, 16) if value else 0


def drop_unneeded(needed_caps: Iterable[str]) -> List[str]:
    """Drop the capabilities of :data:`CAPS` (the unit's bounding set) that are
    not in *needed_caps* from the effective, permitted and inheritable sets of
    the calling thread; returns the dropped ones that were held. Others are left
    as they are (outside the unit, root keeps e.g. CAP_SYS_PTRACE, without
    which /proc hides the exit code of a process holding more capabilities)."""
    want = set(needed_caps)
    drop = 0
    for n, bit in CAPS.items():
        if n not in want:
            drop |= 1 << bit
    have = effective()
    if not have & drop:
        return []
    keep = have & ~drop
    low, high = keep & 0xFFFFFFFF, keep >> 32
    data = (_Data * 2)((low, low, 0), (high, high, 0))
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise KernelInterfaceError(f"capset: {os.strerror(err)}; elsad keeps its "
                                   "capabilities")
    return [n for n, bit in CAPS.items() if (have & drop) >> bit & 1]
