"""The ``cpuset`` backend: a ``cgroup2`` job pinned to a CPU list and memory nodes.

Grouping, membership, kill, freeze and recovery are the ``cgroup2`` backend's
(the job is a cgroup v2 leaf, the kernel keeps children in). Pinning uses:

* the **v2 cpuset controller** when it is available to the base cgroup
  (``cpuset`` in its ``cgroup.controllers``): ``cpuset.cpus``/``cpuset.mems``
  in the job's own cgroup;
* else the **v1 cpuset hierarchy** (hybrid hosts, like this one: the
  controller is bound to ``/sys/fs/cgroup/cpuset``): a twin directory
  ``<v1 base>/<jid>`` whose ``cpuset.cpus`` and ``cpuset.mems`` are written
  before any task joins (a cpuset without them refuses tasks with ENOSPC:
  docs/kernel.md, "cpuset"); attach moves the process into both.

Job parameters ``cpus`` and ``mems`` (``elsa-jobmng create --cpus 0-1 --mems 0``)
default to the ``[backends.cpuset]`` options; lists outside the parent's
effective set are refused, naming the allowed set.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Set, Tuple

from elsa import hookimpl
from elsa.backends.cgroup2 import CGROUP2_OPTIONS, Cgroup2Backend
from elsa.config import Option
from elsa.core.backend import BackendContext, BackendSpec
from elsa.core.model import Job, ProcessInfo, format_jid, parse_jid
from elsa.errors import BackendError, ElsaError, ProcessGone
from elsa.kernel.cgroupstats import format_cpulist, parse_cpulist
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.backends.cpuset")


def _list_ok(v: str) -> Optional[str]:
    try:
        parse_cpulist(v)
    except ValueError as exc:
        return f"is not a CPU/node list like '0-3,8' ({exc})"
    return None


def _abs_or_empty(v: str) -> Optional[str]:
    return None if v == "" or os.path.isabs(v) else "must be empty or an absolute path"


CPUSET_OPTIONS: Dict[str, Option] = {
    **CGROUP2_OPTIONS,
    "cpus": Option(str, "", "Default CPU list of a job (e.g. '0-3'); empty: every CPU the "
                   "parent allows.", check=_list_ok),
    "mems": Option(str, "", "Default memory-node list of a job; empty: every node the parent "
                   "allows.", check=_list_ok),
    "mode": Option(str, "auto", "'v2' (cpuset controller of cgroup v2), 'v1' (the v1 cpuset "
                   "hierarchy) or 'auto' (v2 where available).", choices=("auto", "v2", "v1")),
    "v1_base": Option(str, "", "Parent of the v1 job cpusets; empty: <v1 cpuset mount>/elsa.",
                      check=_abs_or_empty),
}


class CpusetBackend(Cgroup2Backend):
    name = "cpuset"
    origin_key = "v2"

    def __init__(self, cgroupfs=None) -> None:
        super().__init__(cgroupfs)
        self.mode = ""
        self.v1_base = ""
        self.v1_mount = ""
        self.default_cpus = ""
        self.default_mems = ""
        self.v1_pending: Set[str] = set()

    # -- start -----------------------------------------------------------------------------
    def start(self, ctx: BackendContext) -> None:
        opts = ctx.options
        controllers = list(opts.get("controllers", []))
        if "cpuset" not in controllers:
            controllers.append("cpuset")
        super().start(BackendContext(
            options={**opts, "controllers": controllers}, procfs=ctx.procfs,
            state_dir=ctx.state_dir, job_emptied=ctx.job_emptied, add_reader=ctx.add_reader,
            remove_reader=ctx.remove_reader, extra=ctx.extra))
        want = str(opts.get("mode", "auto"))
        v2_ok = "cpuset" in self.enabled
        if want == "v2" and not v2_ok:
            raise BackendError(
                f"[backends.cpuset] mode = 'v2' but the cpuset controller is not available to "
                f"{self.base} (cgroup.controllers: "
                f"{' '.join(sorted(self.fs.controllers(self.base))) or 'none'}); it is "
                "probably bound to the v1 hierarchy: use mode = 'v1' or 'auto'")
        if want == "v1" or not v2_ok:
            self.mode = "v1"
            self._start_v1(str(opts.get("v1_base", "")))
        else:
            self.mode = "v2"
        if "cpuset" in self.missing:
            self.missing.remove("cpuset")  # v1 pinning replaces it; not "missing"
        allowed_cpus, allowed_mems = self.allowed()
        self.default_cpus = self._check("cpus", str(opts.get("cpus", "")), allowed_cpus,
                                        where="[backends.cpuset] cpus")
        self.default_mems = self._check("mems", str(opts.get("mems", "")), allowed_mems,
                                        where="[backends.cpuset] mems")
        log.info("cpuset backend ready", mode=self.mode, v1_base=self.v1_base or None,
                 cpus=self.default_cpus, mems=self.default_mems)

    def _start_v1(self, v1_base: str) -> None:
        mount = self.fs.cpuset_v1_mount()
        if mount is None:
            raise BackendError(
                f"backend 'cpuset': the cpuset controller is neither available to {self.base} "
                f"(cgroup v2) nor mounted as a v1 hierarchy ({self.fs.mountinfo_path}); "
                "enable it in the parent's cgroup.subtree_control or mount it")
        self.v1_mount = mount
        base = os.path.normpath(v1_base) if v1_base else os.path.join(mount, "elsa")
        if not base.startswith(mount + "/"):
            raise BackendError(f"[backends.cpuset] v1_base = {base!r} is not below the v1 "
                               f"cpuset mount {mount}")
        self.v1_base = base
        # Each level of a v1 cpuset starts empty (unless cgroup.clone_children):
        # give it its parent's CPUs and nodes before anything can join below it.
        parts = os.path.relpath(base, mount).split(os.sep)
        cur = mount
        for part in parts:
            parent = cur
            cur = os.path.join(cur, part)
            self.fs.mkdir(cur)
            cpus, mems = self.fs.cpuset_get(cur)
            if not cpus or not mems:
                pcpus, pmems = self.fs.cpuset_get(parent)
                self.fs.cpuset_set(cur, cpus or pcpus, mems or pmems)

    # -- parameters --------------------------------------------------------------------------
    def allowed(self) -> Tuple[Set[int], Set[int]]:
        """CPUs and memory nodes a job may use: the base's effective sets."""
        if self.mode == "v1":
            return self.fs.cpuset_effective(self.v1_base, v2=False)
        return self.fs.cpuset_effective(self.base, v2=True)

    def _check(self, key: str, text: str, allowed: Set[int], where: str) -> str:
        what = "CPUs" if key == "cpus" else "memory nodes"
        if not text.strip():
            return format_cpulist(allowed)
        try:
            want = parse_cpulist(text)
        except ValueError as exc:
            raise BackendError(f"{where}: {text!r} is not a list like '0-3,8' ({exc}); "
                               f"allowed {what}: {format_cpulist(allowed)}") from None
        if not want:
            raise BackendError(f"{where}: empty list; allowed {what}: "
                               f"{format_cpulist(allowed)}")
        extra = want - allowed
        if extra:
            raise BackendError(f"{where}: {what} {format_cpulist(extra)} are not available; "
                               f"allowed {what}: {format_cpulist(allowed)}")
        return format_cpulist(want)

    def validate_params(self, params: Mapping[str, str]) -> Dict[str, str]:
        unknown = sorted(set(params) - {"cpus", "mems"})
        if unknown:
            raise BackendError(f"backend 'cpuset' takes job parameters cpus and mems; got "
                               f"{', '.join(unknown)}")
        allowed_cpus, allowed_mems = self.allowed()
        cpus = params.get("cpus") or self.default_cpus
        mems = params.get("mems") or self.default_mems
        return {"cpus": self._check("cpus", cpus, allowed_cpus, where="job parameter cpus"),
                "mems": self._check("mems", mems, allowed_mems, where="job parameter mems")}

    # -- jobs --------------------------------------------------------------------------------
    def v1_path(self, job: Job) -> str:
        return job.params.get("cpuset_path") or os.path.join(self.v1_base, format_jid(job.jid))

    def _prepare_job(self, job: Job, path: str) -> None:
        cpus = job.params.get("cpus") or self.default_cpus
        mems = job.params.get("mems") or self.default_mems
        if self.mode == "v2":
            self.fs.cpuset_set(path, cpus, mems)
            return
        v1 = os.path.join(self.v1_base, format_jid(job.jid))
        self.fs.mkdir(v1)
        try:
            self.fs.cpuset_set(v1, cpus, mems)
        except ElsaError:
            self.fs.rmdir(v1)
            raise

    def create_job(self, job: Job) -> Dict[str, str]:
        out = super().create_job(job)
        if self.mode == "v1":
            out["cpuset_path"] = os.path.join(self.v1_base, format_jid(job.jid))
        return out

    def _origin_of(self, pid: int, path: Optional[str] = None) -> Dict[str, str]:
        origin = super()._origin_of(pid, path)
        if self.mode == "v1" and origin:
            cur = self.fs.v1_cgroup("cpuset", pid) or "/"
            path = os.path.normpath(self.v1_mount + cur)
            if not (path == self.v1_base or path.startswith(self.v1_base + "/")):
                origin["v1"] = path
        return origin

    def holds(self, job: Job, proc: ProcessInfo) -> bool:
        # v1 mode: a process born in the v2 job cgroup is still outside the v1 cpuset.
        return self.mode != "v1" and super().holds(job, proc)

    def attach(self, job: Job, proc: ProcessInfo) -> Optional[bool]:
        if self.mode != "v1":
            return super().attach(job, proc)
        # A process born in the v2 job cgroup is still outside the v1 cpuset:
        # v1 mode always moves (and so never reports "already placed").
        if proc.exited:
            raise ProcessGone(f"process {proc.pid} has exited (zombie); nothing to attach")
        self.watch_events(job.jid, self.job_path(job))
        origin = self._origin_of(proc.pid)
        # v1 first: once in the v2 job cgroup the process counts as a member, and it
        # must not run a single instruction of the job unpinned.
        self.fs.move(self.v1_path(job), proc.pid)
        try:
            self.fs.move(self.job_path(job), proc.pid)
        except ElsaError:
            try:
                self.fs.move(origin.get("v1") or self.v1_mount, proc.pid)
            except ElsaError:
                pass
            raise
        assert self.origins is not None
        if not origin:
            origin = self.origins.get(proc.ident) or {}
        self.origins.record(job.jid, proc.ident, origin)
        return None

    def _return_to(self, pid: int, origin: Optional[Dict[str, str]]) -> str:
        where = super()._return_to(pid, origin)
        if self.mode == "v1":
            target = (origin or {}).get("v1")
            if not target or not os.path.isdir(target):
                target = self.v1_mount  # the root cpuset: every CPU and node
            try:
                self.fs.move(target, pid)
            except ProcessGone:
                pass
        return where

    def end_job(self, job: Job) -> Optional[Dict[str, Optional[str]]]:
        limits = super().end_job(job)
        if self.mode == "v1":
            self._remove_v1(self.v1_path(job))
        return limits

    def _remove_v1(self, path: str) -> bool:
        for pid in self.fs.procs(path):
            try:
                self.fs.move(self.v1_mount, pid)
            except ElsaError:
                continue
        try:
            self.fs.rmdir(path)
            return True
        except ElsaError as exc:
            self.v1_pending.add(path)
            log.debug("v1 cpuset busy; removal deferred", path=path, error=exc.message)
            return False

    def _retry_pending(self) -> None:
        super()._retry_pending()
        if self.mode == "v1":
            for path in list(self.v1_pending):
                self.v1_pending.discard(path)
                self._remove_v1(path)

    def _remove(self, jid: int, path: str) -> bool:
        done = super()._remove(jid, path)
        if done and self.mode == "v1":
            v1 = os.path.join(self.v1_base, format_jid(jid))
            if v1 in self.v1_pending:
                self.v1_pending.discard(v1)
                self._remove_v1(v1)
        return done

    def _reconcile_leftovers(self, running: Mapping[str, int]) -> None:
        super()._reconcile_leftovers(running)
        if self.mode != "v1":
            return
        live_names = {os.path.basename(p) for p in running}
        for name in self.fs.children(self.v1_base):
            try:
                parse_jid(name)
            except ValueError:
                continue
            if name in live_names:
                continue
            path = os.path.join(self.v1_base, name)
            if self.fs.procs(path):
                self.orphans.append(path)
                log.warning("v1 cpuset of an unknown or ended job still holds processes; "
                            "left alone", path=path)
            else:
                self._remove_v1(path)

    def status(self) -> Dict[str, object]:
        out = super().status()
        cpus, mems = self.allowed()
        out.update({"cpuset_mode": self.mode, "v1_base": self.v1_base or None,
                    "allowed_cpus": format_cpulist(cpus), "allowed_mems": format_cpulist(mems),
                    "default_cpus": self.default_cpus, "default_mems": self.default_mems,
                    "v1_pending_removals": len(self.v1_pending)})
        return out


@hookimpl
def elsa_backends() -> List[BackendSpec]:
    return [BackendSpec(name="cpuset", factory=CpusetBackend, options=CPUSET_OPTIONS,
                        description="a cgroup v2 job pinned to CPUs and memory nodes "
                                    "(v2 cpuset controller, else the v1 cpuset hierarchy)")]
