"""Dropping capabilities elsad does not need for its configuration (capset(2)).

The packaged unit's CapabilityBoundingSet= allows what any backend needs
(packaging/elsad.service); once started, elsad keeps only what its backend and
sources use at run time and drops the rest from its effective and permitted
sets, for good (it never execs). Numbers: include/uapi/linux/capability.h.
"""

from __future__ import annotations

import ctypes
import os
from typing import Dict, Iterable, List

from elsa.errors import KernelInterfaceError

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


def effective(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def keep_only(names: Iterable[str]) -> List[str]:
    """Drop every capability but *names* from the effective, permitted and
    inheritable sets of this thread group's main thread; returns the dropped
    ones that were held. A no-op for a process without capabilities."""
    keep = 0
    for n in names:
        keep |= 1 << CAPS[n]
    have = effective()
    if not have:
        return []
    low, high = keep & 0xFFFFFFFF, keep >> 32
    data = (_Data * 2)((low, low, 0), (high, high, 0))
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise KernelInterfaceError(f"capset: {os.strerror(err)}; elsad keeps its "
                                   "capabilities")
    dropped = [n for n, bit in CAPS.items() if have >> bit & 1 and not keep >> bit & 1]
    others = have & ~sum(1 << b for b in CAPS.values())
    if others:
        dropped.append(f"{bin(others).count('1')} others")
    return dropped
