"""The ``cgroup2`` backend: one cgroup v2 per job; the kernel keeps children in.

Layout (the kernel's rules: docs/kernel.md, "cgroup v2")::

    <base>/                 controllers that exist enabled in subtree_control
    <base>/<jid>/           one leaf per job (jid as 0x%016x), params["cgroup_path"]
    <base>/released/        where a detached process goes when its origin is gone
    <base>/daemon/          elsad itself, only when <base> is its delegated cgroup
    <cgroup>/elsa-<jid>/    a job nested under the cgroup of a non-admin's process
                            whose limits (pids.max, memory.max, ...) it must keep

Job parameters ``cpu_limit`` (cores, ``"1.5"``) and ``memory_limit`` (bytes) set
the job cgroup's ``cpu.max`` and ``memory.max`` (``elsa-jobmng run --cpu-limit 2
--mem-limit 4G``), where the cpu / memory controller is enabled for job
cgroups. The job keeps the limits its cgroup holds: read back at creation (the
kernel rounds memory down to a page) and again when it ends, before the cgroup
is removed (an administrator may change them meanwhile, or set some on the
cgroup of a job created without).

``<base>`` is the ``base`` option, else the daemon's own cgroup when systemd
delegated it (``Delegate=yes``; elsad then moves itself into ``daemon/`` to obey
"no internal processes"), else ``<cgroup2 mount>/elsa``.

Truth is in the kernel: ``members()`` reads cgroup.procs, an emptied job is
seen on ``cgroup.events`` (``populated 0``, through inotify), and after a
restart the job cgroups are what jobs are recovered from. Where each attached
process came from is journaled in ``<state_dir>/<backend>-origins.jsonl``
(:mod:`elsa.backends.origins`) so ``detach`` can put it back after a restart too.
"""

from __future__ import annotations

import os
import signal as signal_mod
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

from elsa import hookimpl
from elsa.backends.origins import Origins
from elsa.config import Option, positive
from elsa.core.backend import Backend, BackendContext, BackendSpec, signal_each
from elsa.core.model import (
    CPU_LIMIT,
    MEMORY_LIMIT,
    Job,
    JobLimits,
    ProcessId,
    ProcessInfo,
    format_jid,
    parse_jid,
)
from elsa.errors import BackendError, ElsaError, ProcessGone
from elsa.kernel.cgroupfs import CgroupFS, EventsWatcher, cpu_quota_us
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.backends.cgroup2")

#: Controllers enabled for job cgroups when they exist.
DEFAULT_CONTROLLERS = ["cpu", "memory", "io", "pids"]
RELEASED = "released"
DAEMON_LEAF = "daemon"
#: The base below the cgroup2 mount when elsad is not in a delegated cgroup (no "base").
DEFAULT_BASE_NAME = "elsa"
NESTED_PREFIX = "elsa-"

def _check_base(v: object) -> Optional[str]:
    return None if v == "" or (isinstance(v, str) and os.path.isabs(v)) else \
        "must be empty (automatic) or an absolute path under the cgroup2 mount"



CGROUP2_OPTIONS: Dict[str, Option] = {
    "base": Option(str, "", "Parent cgroup of the job cgroups (absolute path under the cgroup2 "
                   "mount). Empty: the daemon's delegated cgroup under systemd Delegate=yes, "
                   "else <cgroup2 mount>/elsa.", check=_check_base),
    "delegation": Option(str, "auto", "Use the daemon's own cgroup as base: 'auto' (when run by "
                         "systemd and the cgroup is delegated), 'yes' or 'no'.",
                         choices=("auto", "yes", "no")),
    "controllers": Option(list, list(DEFAULT_CONTROLLERS), "Controllers to enable for job "
                          "cgroups where available; the missing ones are listed by 'status'.",
                          item_type=str),
    "kill_timeout": Option(float, 10.0, "Seconds 'kill' with SIGKILL (and 'freeze') wait for "
                           "the job to be empty (frozen) before failing.", check=positive),
}


class Cgroup2Backend(Backend):
    """One cgroup v2 per job. See the module docstring for the layout."""

    name = "cgroup2"
    inherits_in_kernel = True
    #: Key of this backend's origin in the origin journal records.
    origin_key = "v2"

    def __init__(self, cgroupfs: Optional[CgroupFS] = None) -> None:
        self.fs = cgroupfs or CgroupFS()
        self.mount = ""
        self.base = ""
        self.delegated = False
        # systemd started elsad in the delegated root, not in daemon/: it does the same on
        # the next start, which the kernel refuses while controllers are enabled there.
        self.started_in_root = False
        self.enabled: List[str] = []
        self.missing: List[str] = []
        self.kill_timeout = 10.0
        self.live: Dict[int, str] = {}           # jid -> cgroup path of running jobs
        self.pending: Dict[int, str] = {}        # ended jobs whose rmdir was EBUSY
        self.frozen: Set[int] = set()
        self.orphans: List[str] = []
        self.gone: Set[int] = set()
        self.watcher: Optional[EventsWatcher] = None
        self.origins: Optional[Origins] = None
        self.counters = {"created": 0, "removed": 0, "deferred_removals": 0,
                         "emptied_notices": 0, "kills": 0}

    # -- start/stop -------------------------------------------------------------------
    def start(self, ctx: BackendContext) -> None:
        super().start(ctx)
        fs = self.fs = ctx.extra.get("cgroupfs", self.fs)  # type: ignore[assignment]
        opts = ctx.options
        self.kill_timeout = float(opts.get("kill_timeout", 10.0))
        mount = fs.cgroup2_mount()
        if mount is None:
            raise BackendError(
                f"backend {self.name!r}: no cgroup2 filesystem in {fs.mountinfo_path}; mount "
                "it (mount -t cgroup2 none /sys/fs/cgroup/unified) or choose backend "
                "'cnproc'")
        self.mount = mount
        self.base, self.delegated = self._choose_base(str(opts.get("base", "")),
                                                      str(opts.get("delegation", "auto")))
        if self.delegated:
            # "No internal processes" (docs/kernel.md): the daemon leaves its cgroup for a
            # leaf before controllers are enabled for the job cgroups beside it.
            leaf = os.path.join(self.base, DAEMON_LEAF)
            self.started_in_root = os.path.normpath(
                self.mount + (fs.own_cgroup() or "/")) == self.base
            fs.mkdir(leaf)
            fs.move(leaf, os.getpid())
        else:
            fs.makedirs(self.base)
        self._enable_controllers(list(opts.get("controllers", DEFAULT_CONTROLLERS)))
        self.watcher = EventsWatcher()
        ctx.add_reader(self.watcher.fileno(), self._on_events)
        self.origins = Origins(os.path.join(ctx.state_dir, f"{self.name}-origins.jsonl"))
        os.makedirs(ctx.state_dir, exist_ok=True)
        self.origins.load(lambda key: ctx.procfs.alive(ProcessId(*key)))
        log.info("cgroup2 backend ready", base=self.base, delegated=self.delegated,
                 controllers=self.enabled, missing=self.missing)

    def _choose_base(self, base: str, delegation: str) -> Tuple[str, bool]:
        mount = self.mount
        if base:
            base = os.path.normpath(base)
            if not base.startswith(mount + "/"):
                raise BackendError(f"[backends.{self.name}] base = {base!r} is not below the "
                                   f"cgroup2 mount {mount}; use a path like {mount}/elsa")
            return base, False
        own = self.fs.own_cgroup() or "/"
        if delegation != "no" and own != "/":
            own_path = os.path.normpath(mount + own)
            # Already in the "daemon" leaf: an earlier start moved us, or systemd >= 254
            # did (DelegateSubgroup=daemon); the delegated cgroup is its parent.
            if os.path.basename(own_path) == DAEMON_LEAF:
                own_path = os.path.dirname(own_path)
            if delegation == "yes" or (_run_by_systemd() and _is_delegated(own_path)):
                return own_path, True
        return os.path.join(mount, DEFAULT_BASE_NAME), False

    def _enable_controllers(self, wanted: List[str]) -> None:
        available = self.fs.controllers(self.base)
        active = self.fs.subtree_control(self.base)
        todo = [c for c in wanted if c in available and c not in active]
        self.missing = [c for c in wanted if c not in available]
        enabled = [c for c in wanted if c in active]
        for c in todo:
            try:
                self.fs.enable_controllers(self.base, [c])
                enabled.append(c)
            except ElsaError as exc:
                log.warning("controller not enabled", controller=c, base=self.base,
                            error=exc.message)
                self.missing.append(c)
        self.enabled = enabled
        if self.missing:
            log.info("controllers unavailable for job cgroups (bound to cgroup v1 or not "
                     "delegated); their counters will be missing", missing=self.missing,
                     base=self.base)

    def stop(self) -> None:
        self._retry_pending()
        if self.started_in_root:
            self._release_controllers()
        if self.base:
            try:  # EBUSY while someone is still in it: then it stays
                self.fs.rmdir(os.path.join(self.base, RELEASED))
            except ElsaError:
                pass
        if self.watcher is not None:
            self.ctx.remove_reader(self.watcher.fileno())
            self.watcher.close()
            self.watcher = None
        if self.origins is not None:
            self.origins.close()

    def _release_controllers(self) -> None:
        """Let systemd < 254 (no DelegateSubgroup=) start the next elsad in the delegated
        root: the kernel puts no process into a cgroup with controllers enabled for its
        children ("no internal processes"). Jobs keep running; the next start enables
        the controllers again, with counters that start from zero for running jobs."""
        active = [c for c in self.enabled if c in self.fs.subtree_control(self.base)]
        for c in reversed(active):
            try:
                self.fs.write(os.path.join(self.base, "cgroup.subtree_control"), f"-{c}",
                              f"disable controller {c}")
            except ElsaError as exc:
                log.warning("controller left enabled: systemd < 254 cannot start elsad "
                            "again in this cgroup", controller=c, base=self.base,
                            error=exc.message)
        if self.live and active:
            log.warning("controllers disabled for restart by systemd < 254: the running "
                        "jobs' memory, io and pids counters start from zero with the next "
                        "elsad", controllers=active, jobs=len(self.live))

    # -- parameters ---------------------------------------------------------------------
    def validate_params(self, params: Mapping[str, str]) -> Dict[str, str]:
        unknown = sorted(set(params) - {CPU_LIMIT, MEMORY_LIMIT})
        if unknown:
            raise BackendError(f"backend {self.name!r} takes job parameters {CPU_LIMIT} and "
                               f"{MEMORY_LIMIT}; got {', '.join(unknown)}")
        limits = JobLimits.from_params(params)
        for key, value, wanted, controller in (
                (CPU_LIMIT, params.get(CPU_LIMIT), limits.cpus, "cpu"),
                (MEMORY_LIMIT, params.get(MEMORY_LIMIT), limits.memory, "memory")):
            if value is None:
                continue
            if wanted is None:
                what = "a number of cores like 1.5" if key == CPU_LIMIT else "a number of bytes"
                raise BackendError(f"job parameter {key}: {value!r} is not {what} (more than 0)")
            if controller not in self.enabled:
                raise BackendError(
                    f"job parameter {key}: the {controller} controller is not enabled for "
                    f"job cgroups below {self.base} (available there: "
                    f"{' '.join(sorted(self.fs.controllers(self.base))) or 'none'}); on a "
                    "hybrid host it is bound to cgroup v1. Run elsad on a pure cgroup v2 "
                    f"host (or with the {controller} controller delegated to it), or create "
                    "the job without the limit")
        page = os.sysconf("SC_PAGE_SIZE")
        if limits.memory is not None and not page <= limits.memory < 1 << 63:
            # memory.max is rounded down to a page: 0 would kill the job at once;
            # the kernel reads at most 64 bits.
            raise BackendError(f"job parameter {MEMORY_LIMIT}: {limits.memory} bytes is less "
                               f"than a page ({page} bytes) or more than 2^63")
        if limits.cpus is not None:
            try:
                cpu_quota_us(limits.cpus)
            except ValueError as exc:
                raise BackendError(f"job parameter {CPU_LIMIT}: {exc}") from None
        return limits.params()

    def _limits_readable(self, job: Job) -> Tuple[bool, bool]:
        """Whether the job cgroup has cpu.max and memory.max: where the controller is
        enabled for job cgroups, not for a job nested below a process's cgroup."""
        if job.params.get("nest_under"):
            return False, False
        return "cpu" in self.enabled, "memory" in self.enabled

    # -- paths ------------------------------------------------------------------------
    def job_path(self, job: Job) -> str:
        return job.params.get("cgroup_path") or os.path.join(self.base, format_jid(job.jid))

    def _released_leaf(self) -> str:
        path = os.path.join(self.base, RELEASED)
        self.fs.mkdir(path)
        return path

    # -- jobs ---------------------------------------------------------------------------
    def create_job(self, job: Job) -> Dict[str, str]:
        parent = job.params.get("nest_under")
        limits = JobLimits.from_params(job.params)
        if parent and limits != JobLimits():
            raise BackendError(
                f"cannot give the job limits ({', '.join(limits.params())}): it must be created "
                f"below {parent}, whose limits the process keeps, and no controller is enabled "
                "there for it; ask an administrator to create the job, or run it outside "
                "that limited cgroup")
        if parent:
            # Below the cgroup whose limits the first process must keep. The
            # parent holds processes, so it has no controllers for children
            # ("no internal processes"): the job gets only the core files.
            path = os.path.join(parent, NESTED_PREFIX + format_jid(job.jid))
            try:
                self.fs.mkdir(path)
            except ElsaError as exc:
                raise BackendError(
                    f"cannot create the job's cgroup below {parent}, where the process "
                    f"keeps its limits ({exc.message}); ask an administrator to attach "
                    "it, or run it outside that limited cgroup") from exc
        else:
            path = os.path.join(self.base, format_jid(job.jid))
            self.fs.mkdir(path)
        kept: Dict[str, str] = {}
        try:
            self._prepare_job(job, path)
            if limits != JobLimits():
                # Keep what the cgroup holds, not what was asked (memory.max is
                # rounded down to a page).
                self.fs.set_limits(path, limits)
                got = self.fs.read_limits(path, cpu=limits.cpus is not None,
                                          memory=limits.memory is not None)
                kept = (got or limits).params()
        except ElsaError:
            self.fs.rmdir(path)
            raise
        self.live[job.jid] = path
        self.counters["created"] += 1
        return {"cgroup_path": path, **kept}

    def _prepare_job(self, job: Job, path: str) -> None:
        """Subclass hook: configure the new job cgroup (cpuset writes cpus/mems)."""

    def _cgroup_of(self, pid: int) -> str:
        """The absolute path of *pid*'s v2 cgroup (a zombie's too: proc(5))."""
        return os.path.normpath(self.mount + (self.fs.own_cgroup(pid) or "/"))

    def _origin_of(self, pid: int, path: Optional[str] = None) -> Dict[str, str]:
        """Where *pid* is now (*path*, if already read), unless that is inside one
        of our job cgroups (a move between jobs keeps the first origin)."""
        if path is None:
            path = self._cgroup_of(pid)
        if self._in_own_tree(path):
            return {}
        return {self.origin_key: path}

    # -- limits a move must keep (docs/security.md) ------------------------------------------
    def _limits_between(self, cur: str, target: str) -> List[str]:
        """Limits set on *cur* and its ancestors that are not ancestors of *target*."""
        cur, target = os.path.normpath(cur), os.path.normpath(target)
        common = os.path.commonpath([cur, target])
        out: List[str] = []
        d = cur
        while d != common and d.startswith(self.mount + "/"):
            out.extend(f"{d}: {name}={value}" for name, value in self.fs.limits_set(d))
            d = os.path.dirname(d)
        return out

    def limits_left(self, job: Job, pid: int) -> List[str]:
        return self._limits_between(self._cgroup_of(pid), self.job_path(job))

    def nest_parent(self, pid: int) -> Optional[str]:
        cur = self._cgroup_of(pid)
        if self._in_own_tree(cur):
            return None  # already in one of our jobs: its limits were kept then
        if not self._limits_between(cur, os.path.join(self.base, "job")):
            return None
        return cur

    def _in_own_tree(self, path: str) -> bool:
        if path == self.base or path.startswith(self.base + "/"):
            return True
        return any(path == p or path.startswith(p + "/") for p in self.live.values())

    def holds(self, job: Job, proc: ProcessInfo) -> bool:
        try:
            return self._cgroup_of(proc.pid) == os.path.normpath(self.job_path(job))
        except ProcessGone:
            return False

    def watch_events(self, jid: int, path: str) -> None:
        """Watch the job's cgroup.events (populated 0: the job emptied) from the
        first attach on, not from its creation: a job whose process was born
        inside and exited before its attach (taken as a zombie, the job ends at
        once) then costs no watch and no notices (populated 1, then 0). Called
        before the process is placed, so no change after it goes unnoticed."""
        if self.watcher is not None and not self.watcher.watches(jid):
            self.watcher.watch(jid, path)

    def attach(self, job: Job, proc: ProcessInfo) -> Optional[bool]:
        path = self.job_path(job)
        assert self.origins is not None
        self.watch_events(job.jid, path)
        cur = self._cgroup_of(proc.pid)
        if cur == os.path.normpath(path):
            # Born inside (clone3 CLONE_INTO_CGROUP) or already
            # moved: a write to cgroup.procs would only take the threadgroup
            # rwsem for writing to move nothing. Its origin is the job's.
            self.origins.record(job.jid, proc.ident, self.origins.get(proc.ident) or {})
            return True
        if proc.exited:
            # Writing a zombie's pid to cgroup.procs "succeeds" and moves nothing.
            raise ProcessGone(f"process {proc.pid} has exited (zombie) outside job "
                              f"{format_jid(job.jid)}; nothing to attach")
        origin = self._origin_of(proc.pid, cur)
        self._move_checked(path, proc, cur)
        if not origin:
            origin = self.origins.get(proc.ident) or {}
        self.origins.record(job.jid, proc.ident, origin)
        return None

    def _move_checked(self, path: str, proc: ProcessInfo, cur: str) -> None:
        """Write *proc*'s pid to *path*'s cgroup.procs without moving another
        process that got its pid. cgroup.procs takes a pid number, which is
        reused once a process is reaped: a pidfd pins the process that was
        checked (its start time is verified through it), and if that process
        is gone after the write, the pid may have named a newcomer, which is
        moved back to where the checked process was."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            raise ProcessGone(f"process {proc.pid} is gone; nothing to attach") from None
        except (AttributeError, OSError):  # kernel < 5.3 / Python < 3.9: no pidfd
            self.fs.move(path, proc.pid)
            return
        try:
            if self.ctx.procfs.info(proc.pid).start_ticks != proc.start_ticks:
                raise ProcessGone(f"process {proc.pid} exited and its pid was reused; "
                                  "nothing attached")
            self.fs.move(path, proc.pid)
            try:
                signal_mod.pidfd_send_signal(pidfd, 0)
                return  # alive after the write: the pid was its own throughout
            except ProcessLookupError:
                pass
            # The checked process was reaped: whatever has its pid now (even
            # with the same start tick) is another process.
            try:
                moved = self._cgroup_of(proc.pid) == os.path.normpath(path)
            except ProcessGone:
                moved = False
            if moved:
                log.warning("pid reused during attach; moved the newcomer back",
                            pid=proc.pid, to=cur)
                self.fs.move(cur, proc.pid)
            raise ProcessGone(f"process {proc.pid} exited during the attach; nothing attached")
        finally:
            os.close(pidfd)

    def _return_to(self, pid: int, origin: Optional[Dict[str, str]]) -> str:
        """Move *pid* back to its origin, else into the ``released`` leaf."""
        target = (origin or {}).get(self.origin_key)
        if target and os.path.isdir(target):
            try:
                self.fs.move(target, pid)
                return target
            except ProcessGone:
                raise
            except ElsaError as exc:
                # E.g. the origin now enables controllers ("no internal processes").
                log.info("origin refused the process; using the released leaf", pid=pid,
                         origin=target, error=exc.message)
        leaf = self._released_leaf()
        self.fs.move(leaf, pid)
        return leaf

    def detach(self, job: Job, proc: ProcessId) -> None:
        assert self.origins is not None
        try:
            self._return_to(proc.pid, self.origins.get(proc)
                            or self.origins.job_default(job.jid))
        except ProcessGone:
            return

    def members(self, job: Job) -> Optional[Set[int]]:
        path = self.job_path(job)
        pids = self.members_of_path(path)
        if pids:  # (a resync takes them as members without an attach)
            self.watch_events(job.jid, path)
        return pids

    def members_of_path(self, path: str) -> Set[int]:
        pids = set(self.fs.procs(path))
        # A member could have created sub-cgroups (root-owned, but be thorough).
        for child in self.fs.children(path):
            pids.update(self.members_of_path(os.path.join(path, child)))
        return pids

    def signal(self, job: Job, sig: int, pids: Iterable[int]) -> int:
        path = self.job_path(job)
        members = self.members(job) or set()
        wanted = set(pids)
        self.counters["kills"] += 1
        if not members <= wanted:
            # Only some members (the control server applies kill(2)'s rule for
            # a non-admin caller): signal exactly those, never the whole cgroup.
            return signal_each(wanted & members, sig)
        if sig == signal_mod.SIGKILL and self.fs.has_kill(path):
            # cgroup.kill (Linux 5.14) kills the whole subtree atomically, even
            # processes forked while it runs.
            self.fs.kill(path)
        else:
            self._signal_frozen(job, path, sig)
        # For SIGKILL the caller learns when the cgroup is empty from settled():
        # the event thread does not wait for it.
        return len(members)

    def _signal_frozen(self, job: Job, path: str, sig: int) -> None:
        """Freeze, signal every process, thaw: no member can fork a child we miss
        between reading cgroup.procs and sending the signal."""
        freeze = self.fs.has_freeze(path) and job.jid not in self.frozen
        if freeze:
            self.fs.set_frozen(path, True)
            self.fs.wait_events(path, "frozen", 1, self.kill_timeout)
        try:
            for pid in self.members_of_path(path):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
        finally:
            if freeze:
                self.fs.set_frozen(path, False)

    def freeze(self, job: Job) -> None:
        path = self.job_path(job)
        self.fs.set_frozen(path, True)
        self.frozen.add(job.jid)

    def settled(self, job: Job, what: str) -> bool:
        """"killed": the job's cgroup is empty; "frozen": the kernel reports it
        frozen (cgroup.events). A removed cgroup has nothing left to settle."""
        path = self.job_path(job)
        try:
            if what == "killed":
                return not self.fs.populated(path)
            if what == "frozen":
                return self.fs.events(path).get("frozen") == 1
        except ElsaError:
            return not os.path.isdir(path)
        return True

    def thaw(self, job: Job) -> None:
        path = self.job_path(job)
        self.fs.set_frozen(path, False)
        self.frozen.discard(job.jid)

    def end_job(self, job: Job) -> Optional[Dict[str, Optional[str]]]:
        path = self.job_path(job)
        limits = self._final_limits(job, path)
        self.live.pop(job.jid, None)
        self.frozen.discard(job.jid)
        assert self.origins is not None
        default = self.origins.job_default(job.jid)
        self.origins.job_ended(job.jid)
        # Fast path: the manager detached the members it knows, or they exited.
        if self._rmdir_job(job.jid, path):
            return limits
        # Live processes left (not just tasks still exiting: "populated" ignores
        # those) go back where they came from; then remove, or retry on populated 0.
        for pid in self.members_of_path(path) if self.fs.populated(path) else ():
            try:
                self._return_to(pid, self.origins.get_pid(pid) or default)
            except ElsaError:
                continue
        self._remove(job.jid, path)
        return limits

    def _final_limits(self, job: Job, path: str) -> Optional[Dict[str, Optional[str]]]:
        """The limits the job's cgroup holds as it ends (two small reads, before
        the cgroup goes): they replace those kept at creation, since they may
        have been changed while the job ran. None: nothing to read (no
        controller, or the cgroup is gone)."""
        cpu, memory = self._limits_readable(job)
        if not (cpu or memory):
            return None
        try:
            got = self.fs.read_limits(path, cpu=cpu, memory=memory)
        except ElsaError as exc:
            log.warning("job limits not read at its end; those read at creation stay",
                        jid=format_jid(job.jid), error=exc.message)
            return None
        if got is None:
            return None
        kept = got.params()
        update: Dict[str, Optional[str]] = {}
        if cpu:
            update[CPU_LIMIT] = kept.get(CPU_LIMIT)  # None: no quota now, the key goes
        if memory:
            update[MEMORY_LIMIT] = kept.get(MEMORY_LIMIT)
        return update

    def _rmdir_job(self, jid: int, path: str) -> bool:
        try:
            removed = self.fs.rmdir(path)
        except ElsaError:
            return False
        # rmdir dropped the inotify watch (IN_IGNORED follows); inotify_rm_watch
        # would only wait for an SRCU grace period for nothing.
        if self.watcher is not None:
            self.watcher.forget(jid)
        self.pending.pop(jid, None)
        if removed:
            self.counters["removed"] += 1
        return True

    def _remove(self, jid: int, path: str, watch: bool = True) -> bool:
        try:
            self._remove_tree(path)
        except ElsaError as exc:
            # The last member's exit event does not prove the cgroup empty: the
            # event is sent when the group leader exits, while other threads of
            # the process may still be in the cgroup (docs/kernel.md). rmdir then sees
            # EBUSY; retried when cgroup.events says populated 0.
            log.debug("job cgroup busy; removal deferred", path=path, error=exc.message)
            if jid not in self.pending:
                self.counters["deferred_removals"] += 1
            self.pending[jid] = path
            if watch and self.watcher is not None and not self.watcher.watches(jid):
                # Never attached to, so not watched yet: watch it now, and look
                # once more in case it emptied before the watch.
                try:
                    self.watch_events(jid, path)
                    if not self.fs.populated(path):
                        return self._remove(jid, path, watch=False)
                except ElsaError:
                    pass
            return False
        self.pending.pop(jid, None)
        if self.watcher is not None:
            self.watcher.forget(jid)
        self.counters["removed"] += 1
        return True

    def _remove_tree(self, path: str) -> None:
        for child in self.fs.children(path):
            self._remove_tree(os.path.join(path, child))
        self.fs.rmdir(path)

    def _retry_pending(self) -> None:
        for jid, path in list(self.pending.items()):
            self._remove(jid, path)

    # -- notifications ---------------------------------------------------------------------
    def _on_events(self) -> None:
        assert self.watcher is not None
        for jid in self.watcher.read():
            if jid in self.pending:
                self._remove(jid, self.pending[jid])  # type: ignore[arg-type]
                continue
            path = self.live.get(jid)  # type: ignore[arg-type]
            if path is not None and not self.fs.populated(path):
                self.counters["emptied_notices"] += 1
                self.ctx.job_emptied(jid)  # type: ignore[arg-type]
        if self.pending:
            self._retry_pending()

    # -- recovery --------------------------------------------------------------------------
    def recover(self, jobs: Iterable[Job]) -> Dict[int, Set[int]]:
        out: Dict[int, Set[int]] = {}
        self.gone = set()
        running = {}
        for job in jobs:
            if job.backend != self.name:
                continue
            path = self.job_path(job)
            running[os.path.normpath(path)] = job.jid
            if not os.path.isdir(path):
                self.gone.add(job.jid)
                log.warning("job cgroup vanished while elsad was down; the job is ended",
                            jid=format_jid(job.jid), path=path)
                continue
            self.live[job.jid] = path
            if self.watcher is not None:
                self.watcher.watch(job.jid, path)
            try:
                if self.fs.events(path).get("frozen") == 1:
                    self.frozen.add(job.jid)
            except ElsaError:
                pass
            out[job.jid] = self.members(job) or set()
            self._recover_job(job)
        self._reconcile_leftovers(running)
        return out

    def _recover_job(self, job: Job) -> None:
        """Subclass hook: recover per-job kernel state besides the v2 cgroup."""

    def _reconcile_leftovers(self, running: Mapping[str, int]) -> None:
        """Job cgroups with no running job: finish removals deferred before a
        restart; report the populated ones (their processes are not adopted into
        a job that has no record)."""
        self.orphans = []
        for name in self.fs.children(self.base):
            try:
                jid = parse_jid(name)
            except ValueError:
                continue  # daemon/, released/ or someone else's
            path = os.path.join(self.base, name)
            if path in running:
                continue
            if self.fs.populated(path):
                self.orphans.append(path)
                log.warning("cgroup of an unknown or ended job still holds processes; "
                            "left alone (inspect it, then move or kill them)",
                            path=path, pids=sorted(self.members_of_path(path))[:20])
            elif not self._remove(jid, path, watch=False):
                self.pending.pop(jid, None)

    def gone_jobs(self) -> Set[int]:
        return set(self.gone)

    # -- status ----------------------------------------------------------------------------
    def status(self) -> Dict[str, object]:
        self._retry_pending()
        return {
            "cgroup2_mount": self.mount,
            "base": self.base,
            "delegated": self.delegated,
            "controllers_enabled": list(self.enabled),
            "controllers_missing": list(self.missing),
            "kill": "cgroup.kill" if self.fs.has_kill(self.base) else "freeze+signal",
            "jobs": len(self.live),
            "frozen_jobs": len(self.frozen),
            "pending_removals": len(self.pending),
            "orphan_cgroups": list(self.orphans),
            **self.counters,
        }


def _run_by_systemd() -> bool:
    # systemd sets INVOCATION_ID for every unit it starts (systemd.exec(5)).
    return bool(os.environ.get("INVOCATION_ID"))


def _is_delegated(path: str) -> bool:
    """systemd >= 251 marks delegated cgroups with the trusted.delegate xattr
    (https://systemd.io/CGROUP_DELEGATION/); older versions: the unit's cgroup
    is owned by the service user or writable subtree_control is the only hint."""
    for attr in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, attr).strip() in (b"1", b"yes", b"true"):
                return True
        except OSError:
            continue
    return False


@hookimpl
def elsa_backends() -> List[BackendSpec]:
    return [BackendSpec(name="cgroup2", factory=Cgroup2Backend, options=CGROUP2_OPTIONS,
                        description="one cgroup v2 per job; the kernel keeps children in "
                                    "(recommended)")]
