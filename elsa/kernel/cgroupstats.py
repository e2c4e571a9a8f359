"""cgroup v2 statistics files, and the cpuset list format: the only module that
knows their formats (light: the reports import it, e.g. ``elsa ja``).

Formats: docs/kernel.md, "cgroup v2". ``cpu.stat`` is a core file, present even
without the cpu controller; ``memory.*``, ``io.stat`` and ``pids.peak`` exist
only where the controller is enabled for the cgroup (in the parent's
``cgroup.subtree_control``). We read what exists and report what is missing,
so a job on a host with few v2 controllers still gets its CPU figures.

This module only parses files in a directory it is given; finding the
cgroup2 mount and a job's cgroup belongs to the cgroup backends (cgroupfs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, Mapping, Optional, Sequence, Set, Tuple

from elsa.errors import CgroupGone, from_oserror
from elsa.kernel.procfs import read_small

if TYPE_CHECKING:
    from elsa.core.source import UsageRecord

#: Files read, in order. Missing ones are listed in :attr:`CgroupStats.missing`.
STAT_FILES = ("cpu.stat", "memory.peak", "memory.current", "memory.stat", "memory.events",
              "io.stat", "pids.peak", "pids.current")


@dataclass(frozen=True)
class CgroupStats:
    """One reading of a cgroup's statistics files. ``None``: file missing."""

    path: str
    cpu: Mapping[str, int] = field(default_factory=dict)            # cpu.stat (µs, counts)
    memory_peak: Optional[int] = None                                # bytes
    memory_current: Optional[int] = None                             # bytes
    memory_stat: Mapping[str, int] = field(default_factory=dict)     # bytes / counts
    memory_events: Mapping[str, int] = field(default_factory=dict)
    io: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # "maj:min" -> keys
    pids_peak: Optional[int] = None
    pids_current: Optional[int] = None
    missing: Tuple[str, ...] = ()

    @property
    def cpu_user_us(self) -> Optional[int]:
        return self.cpu.get("user_usec")

    @property
    def cpu_system_us(self) -> Optional[int]:
        return self.cpu.get("system_usec")

    @property
    def cpu_usage_us(self) -> Optional[int]:
        return self.cpu.get("usage_usec")

    def io_total(self, key: str) -> Optional[int]:
        """A key of io.stat (rbytes, wbytes, rios, wios, dbytes, dios) summed over devices."""
        if "io.stat" in self.missing:
            return None
        return sum(dev.get(key, 0) for dev in self.io.values())

    def to_usage(self, jid: Optional[int], source: str = "cgroupstat",
                 final: bool = True) -> UsageRecord:
        """A job-level record (``pid == 0``)."""
        # Imported here: elsa.core.source brings the usage model, sqlite3 and json,
        # ~10 ms that `elsa ja`, which reads cgroups through this module, would
        # add to its start-up (a benchmark row).
        from elsa.core.source import UsageRecord

        extra: Dict[str, int] = {}
        for k in ("oom", "oom_kill", "max", "high"):
            if k in self.memory_events:
                extra[f"memory_events_{k}"] = self.memory_events[k]
        for k in ("nr_throttled", "throttled_usec", "usage_usec"):
            if k in self.cpu:
                extra[f"cpu_{k}"] = self.cpu[k]
        if self.pids_peak is not None:
            extra["pids_peak"] = self.pids_peak
        if self.memory_current is not None:
            extra["memory_current"] = self.memory_current
        for k in ("pgfault", "pgmajfault"):
            if k in self.memory_stat:
                extra[f"memory_{k}"] = self.memory_stat[k]
        return UsageRecord(
            source=source, pid=0, jid=jid, cpu_user_us=self.cpu_user_us,
            cpu_system_us=self.cpu_system_us,
            max_rss_kb=None if self.memory_peak is None else self.memory_peak // 1024,
            read_bytes=self.io_total("rbytes"), write_bytes=self.io_total("wbytes"),
            minflt=(None if "pgfault" not in self.memory_stat
                    else self.memory_stat["pgfault"] - self.memory_stat.get("pgmajfault", 0)),
            majflt=self.memory_stat.get("pgmajfault"), extra=extra, final=final)


def parse_flat_keyed(text: str) -> Dict[str, int]:
    """Parse a flat-keyed file: cpu.stat, memory.stat, memory.events, and the
    cgroupfs adapter's cgroup.events (``"populated 1\\nfrozen 0"``)."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k:
            try:
                out[k] = int(v)
            except ValueError:
                continue
    return out


def parse_single(text: str) -> Optional[int]:
    """A single-value file (memory.peak, pids.peak); "max" reads as None."""
    text = text.strip()
    return None if text in ("", "max") else int(text)


def parse_nested_keyed(text: str) -> Dict[str, Dict[str, int]]:
    """'name key=value ...' lines (io.stat: "8:16 rbytes=1 wbytes=2 ...")."""
    out: Dict[str, Dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        vals: Dict[str, int] = {}
        for kv in parts[1:]:
            k, sep, v = kv.partition("=")
            if sep:
                try:
                    vals[k] = int(v)
                except ValueError:
                    continue
        out[parts[0]] = vals
    return out


_PARSERS = {
    "cpu.stat": ("cpu", parse_flat_keyed),
    "memory.peak": ("memory_peak", parse_single),
    "memory.current": ("memory_current", parse_single),
    "memory.stat": ("memory_stat", parse_flat_keyed),
    "memory.events": ("memory_events", parse_flat_keyed),
    "io.stat": ("io", parse_nested_keyed),
    "pids.peak": ("pids_peak", parse_single),
    "pids.current": ("pids_current", parse_single),
}


#: The controller whose interface files these are; cpu.stat is a core file.
_CONTROLLER = {"memory.peak": "memory", "memory.current": "memory", "memory.stat": "memory",
               "memory.events": "memory", "io.stat": "io", "pids.peak": "pids",
               "pids.current": "pids"}


def read_stats(directory: str, files: Sequence[str] = STAT_FILES) -> CgroupStats:
    """Read the statistics *files* (default: all) present in the cgroup *directory*.

    Raises :class:`~elsa.errors.CgroupGone` when the directory itself is gone
    (the cgroup was removed), another ElsaError for other failures.
    """
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CgroupGone(f"read cgroup stats: {directory} is gone") from None
    except OSError as exc:
        raise from_oserror(exc, "read cgroup stats", directory) from exc
    values: Dict[str, object] = {}
    missing = []
    try:
        # A controller's files exist only where it is enabled (cgroup.controllers
        # lists those): not opening the others saves a failed lookup each, most
        # of the files on a host with few v2 controllers. Without the file this
        # is no cgroup (a test's directory of samples): try every file.
        try:
            enabled: Optional[Set[bytes]] = set(read_small("cgroup.controllers",
                                                         dir_fd=dfd).split())
        except FileNotFoundError:
            enabled = None
        for name in files:
            attr, parse = _PARSERS[name]
            controller = _CONTROLLER.get(name)
            if controller and enabled is not None and controller.encode() not in enabled:
                missing.append(name)
                continue
            try:
                text = read_small(name, dir_fd=dfd).decode()
            except FileNotFoundError:
                missing.append(name)
                continue
            except OSError as exc:
                raise from_oserror(exc, "read cgroup stats",
                                   os.path.join(directory, name)) from exc
            values[attr] = parse(text)
    finally:
        os.close(dfd)
    return CgroupStats(path=directory, missing=tuple(missing), **values)  # type: ignore[arg-type]


def parse_cpulist(text: str) -> Set[int]:
    """Parse a kernel list format (``"0-3,8,10-11"``), as cpuset.cpus uses.

    Raises ValueError on malformed text; ``""`` is the empty set.
    """
    out: Set[int] = set()
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo_s, hi_s = part.split("-", 1)
            # The kernel also accepts "a-b:stride/group"; ELSA does not need it.
            lo, hi = int(lo_s), int(hi_s)
            if lo < 0 or hi < lo:
                raise ValueError(f"bad range {part!r}")
            out.update(range(lo, hi + 1))
        else:
            n = int(part)
            if n < 0:
                raise ValueError(f"bad number {part!r}")
            out.add(n)
    return out


def format_cpulist(items: Iterable[int]) -> str:
    """The canonical list format: sorted, ranges collapsed (``{0,1,2,5}`` -> ``"0-2,5"``)."""
    nums = sorted(set(items))
    parts = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(parts)
