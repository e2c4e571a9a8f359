"""The job manager: jobs, their members, and the pid -> job index.

Runs only on the daemon's event thread. The index is keyed by tgid (a thread
is never a member: cn_proc reports thread creation as a fork with
child_pid != child_tgid). Every identity carries its start time, so a pid that
is reused after its process exited never inherits the old job.

Exited members stay resolvable for ``exited_linger`` seconds: the proc
connector's exit event and the accounting record (taskstats, pacct) arrive in
either order (CSA shipped that race as a bug, commit 12b6a9d).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import (
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
)

from elsa.core.backend import Backend
from elsa.core.jobid import JidAllocator
from elsa.core.membership import SLOT_SHIFT, START_MASK, ExitHistory, Members
from elsa.core.model import (
    CLOCK_TICKS,
    JOB_ENDED,
    JOB_RUNNING,
    START_TOLERANCE_TICKS,
    Job,
    ProcessId,
    ProcessInfo,
    format_jid,
)
from elsa.core.pidindex import PidIndex
from elsa.core.resync import Reconciliation
from elsa.core.store import Store
from elsa.errors import JobNotFound, JobStateError, ProcessGone
from elsa.kernel.procfs import ProcFS, boottime_offset_ns
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.manager")


@dataclass
class _JobState:
    jid: int
    name: str
    owner_uid: int
    tags: Tuple[Tuple[str, str], ...]
    created: float
    backend: str
    params: Dict[str, str]
    members: Members = field(default=None)  # type: ignore[assignment]  # set by the manager
    had_members: bool = False
    ended: Optional[float] = None
    state: str = JOB_RUNNING

    def snapshot(self, with_pids: bool = True) -> Job:
        return Job(jid=self.jid, name=self.name, owner_uid=self.owner_uid, tags=self.tags,
                   created=self.created, ended=self.ended, state=self.state,
                   backend=self.backend,
                   # (skip the index scan for an empty job: create, end)
                   pids=tuple(sorted(self.members)) if with_pids and self.members else (),
                   params=dict(self.params))


class Counters:
    """Event-path counters reported by ``status``."""

    def __init__(self) -> None:
        self.forks = 0
        self.thread_forks = 0
        self.exits = 0
        self.member_forks = 0
        self.member_exits = 0
        self.resyncs = 0
        self.resync_adopted = 0
        self.resync_exited = 0
        self.exits_unseen = 0  # a member's pid forked anew: its exit event was lost

    def as_dict(self) -> Dict[str, int]:
        return dict(vars(self))


class JobManager(Reconciliation):
    """Owns every running job and the membership index (resync and recovery:
    elsa/core/resync.py)."""

    def __init__(self, *, store: Store, backend: Backend, procfs: ProcFS, boot_id: str,
                 job_end: str = "last-exit", exited_linger: float = 15.0,
                 allocator: Optional[JidAllocator] = None,
                 hooks=None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.backend = backend
        self.procfs = procfs
        self.boot_id = boot_id
        self.job_end = job_end
        self.allocator = allocator or JidAllocator(store)
        self.hooks = hooks
        self.clock = clock
        self.jobs: Dict[int, _JobState] = {}
        # tgid -> (job slot << SLOT_SHIFT) | start_ticks; see Members.
        self.index = PidIndex()
        self._slot_jid: Dict[int, int] = {}
        self._next_slot = 1
        self.detached: Set[Tuple[int, int]] = set()  # (pid, start_ticks) kept out of jobs
        # Processes that left a job alive (detached, moved out, job ended):
        # pid -> (jid, start_ticks). Their accounting records still resolve to
        # that job, as the persisted history would resolve them; the entry
        # moves to the exit history when the process exits. Lets the
        # aggregator settle a record without the store (see resolve()).
        self.left_alive: Dict[int, Tuple[int, int]] = {}
        self.exited = ExitHistory(exited_linger, clock)
        # jid -> why, for the jobs recover() found ended while elsad was down.
        self.ended_while_down: Dict[int, str] = {}
        # (pid, start_ticks) -> when, for live members that joined by attach: what
        # they forked before is not the job's (the ppid rule, parent_member()).
        self.attached: Dict[Tuple[int, int], float] = {}
        self.counters = Counters()
        self._boot_offset_ns = boottime_offset_ns()
        # Called with the job snapshot just before the backend removes the job
        # (sources take final readings), and after it ended (waiters, hooks).
        self.before_end: List[Callable[[Job], None]] = []
        self.after_end: List[Callable[[Job], None]] = []
        self._hook_joined = bool(hooks and hooks.has_impls("elsa_process_joined"))
        self._hook_exited = bool(hooks and hooks.has_impls("elsa_process_exited"))

    # -- queries ------------------------------------------------------------------
    def job(self, jid: int, committed: bool = False, with_pids: bool = True) -> Job:
        """Job *jid*, running or stored (*committed*: see Store.job). Listing a
        running job's pids scans the whole index: *with_pids* False when only
        its owner or state is wanted (authorization)."""
        state = self.jobs.get(jid)
        if state is not None:
            return state.snapshot(with_pids)
        stored = self.store.job(jid, committed=committed)
        if stored is None:
            raise JobNotFound(f"no job {format_jid(jid)}; list jobs with 'elsa-jobmng list --all'")
        return stored

    def is_running(self, jid: int) -> bool:
        return jid in self.jobs

    def running(self, with_pids: bool = False) -> List[Job]:
        return [s.snapshot(with_pids) for s in self.jobs.values()]

    def set_tags(self, jid: int, changes: Mapping[str, str], durable: bool = True) -> Job:
        """Set tags of a job, running or ended (an empty value removes the tag): batch
        ids and accounts are often known, or corrected, after the job started."""
        job = self.job(jid)
        tags = dict(job.tags)
        for k, v in changes.items():
            if v:
                tags[k] = v
            else:
                tags.pop(k, None)
        new = tuple(sorted(tags.items()))
        state = self.jobs.get(jid)
        if state is not None:
            state.tags = new
        self.store.set_tags(jid, tags)
        if durable:
            self.store.flush()
        log.info("job tags set", jid=f"{jid:#x}", tags=tags)
        return state.snapshot() if state is not None else self.job(jid)

    def running_with_counts(self) -> List[Tuple[Job, int]]:
        """Each running job (without its pids) and its number of live members."""
        return [(s.snapshot(with_pids=False), len(s.members)) for s in list(self.jobs.values())]

    def stored_jobs(self, limit: int, committed: bool = False) -> List[Job]:
        """The newest *limit* jobs of the store, ended ones included."""
        return self.store.jobs(include_ended=True, limit=limit, committed=committed)

    def settled(self, jid: int, what: str) -> bool:
        """Whether the backend finished *what* ("killed", "frozen") for *jid*; an
        ended job has nothing left to finish."""
        state = self.jobs.get(jid)
        if state is None:
            return True
        return self.backend.settled(state.snapshot(with_pids=False), what)

    def settle_timeout(self) -> float:
        """How long a kill or freeze may take to finish (the backend's limit)."""
        return float(getattr(self.backend, "kill_timeout", 10.0))

    def _entry(self, pid: int) -> Optional[Tuple[int, int]]:
        """(jid, start_ticks) of member *pid*, or None."""
        v = self.index.get(pid)
        if v is None:
            return None
        return self._slot_jid[v >> SLOT_SHIFT], v & START_MASK

    def _new_state(self, **fields) -> _JobState:
        state = _JobState(**fields)
        slot = self._next_slot
        self._next_slot += 1
        state.members = Members(self.index, slot)
        self._slot_jid[slot] = state.jid
        return state

    def job_of(self, pid: int) -> Optional[int]:
        entry = self._entry(pid)
        return entry[0] if entry else None

    def resolve(self, pid: int, start_ticks: Optional[int], tolerance: int = 0) -> Optional[int]:
        """The job *pid* (started at *start_ticks*) belongs or belonged to.

        Live members first, then members that exited within ``exited_linger``.
        *tolerance* widens the start-time match for sources with coarse start
        times (pacct's btime has 1 s resolution).
        """
        tol = tolerance if tolerance > START_TOLERANCE_TICKS else START_TOLERANCE_TICKS
        v = self.index.get(pid)  # (self._entry, inline: once per record on the machine)
        if v is not None and (start_ticks is None or abs((v & START_MASK) - start_ticks) <= tol):
            return self._slot_jid[v >> SLOT_SHIFT]
        jid = self.exited.find(pid, start_ticks, tol)
        if jid is None and self.left_alive:
            left = self.left_alive.get(pid)
            if left is not None and (start_ticks is None or abs(left[1] - start_ticks) <= tol):
                return left[0]
        return jid

    def parent_member(self, pid: int, start_ticks: int, tolerance: int,
                      start_epoch: float) -> Optional[int]:
        """The job live member *pid* was in when a child that started at
        *start_ticks* (epoch *start_epoch*) forked, or None: the in-memory part
        of the ppid rule (:func:`elsa.core.attribution.attribute_by_parent`), for
        joins the store may not have committed yet. A member started after the
        child is a later process with the same pid; one attached after the
        child's start did not pass the job on to it."""
        entry = self._entry(pid)
        if entry is None or entry[1] > start_ticks + tolerance:
            return None
        joined = self.attached.get((pid, entry[1])) if self.attached else None
        # Attached surely before the child started (PARENT_SQL's rule).
        if joined is not None and joined > start_epoch - tolerance / CLOCK_TICKS:
            return None
        return entry[0]

    def running_count(self, owner_uid: int) -> int:
        """Running jobs of *owner_uid* (the per-user cap, limits.max_jobs_per_user)."""
        return sum(1 for s in self.jobs.values() if s.owner_uid == owner_uid)

    def end_never_joined(self, timeout: float) -> int:
        """End the jobs that never had a member within *timeout* seconds of their
        creation (each is a kernel object with a cgroup backend). 0: never."""
        if timeout <= 0:
            return 0
        cutoff = self.clock() - timeout
        idle = [s.jid for s in self.jobs.values()
                if not s.had_members and not s.members and s.created < cutoff]
        for jid in idle:
            self.end(jid, reason=f"no process joined within {timeout:g} s")
        return len(idle)

    # -- job lifecycle --------------------------------------------------------------
    def create(self, *, name: str, owner_uid: int, tags: Mapping[str, str] = {},
               params: Mapping[str, str] = {}, durable: bool = True,
               nest_under: Optional[str] = None) -> Job:
        params = self.backend.validate_params(dict(params))
        if nest_under:  # set after validation: never a client's parameter
            params["nest_under"] = nest_under
        # A job the store cannot make durable would be acknowledged and then
        # lost: refuse it while the store cannot write (disk full).
        self.store.check_accepting()
        jid = self.allocator.next()
        state = self._new_state(jid=jid, name=name, owner_uid=owner_uid,
                                tags=tuple(sorted(tags.items())), created=self.clock(),
                                backend=self.backend.name, params=dict(params))
        extra = self.backend.create_job(state.snapshot())
        state.params.update(extra)
        self.jobs[jid] = state
        job = state.snapshot()
        self.store.insert_job(job)
        if durable:  # the reply promises the job exists; make it durable first
            # (the control server passes durable=False: it holds its reply
            # until the store reports the commit, without blocking the loop)
            self.store.flush()
        log.info("job created", jid=format_jid(jid), name=name, owner_uid=owner_uid)
        if self.hooks:
            self.hooks.job_created(job)
        return job

    def _running(self, jid: int) -> _JobState:
        state = self.jobs.get(jid)
        if state is None:
            if self.store.job(jid) is not None:
                raise JobStateError(f"job {format_jid(jid)} has ended; create a new job")
            raise JobNotFound(f"no job {format_jid(jid)}; list jobs with 'elsa-jobmng list'")
        return state

    def attach(self, jid: int, pid: int, how: str = "attach", durable: bool = True,
               info: Optional[ProcessInfo] = None) -> ProcessId:
        """Make live process *pid* (and its future children) a member of *jid*.

        *info* is /proc's view of *pid* when the caller has just read it. A
        process the kernel already placed in the job (a launcher started it
        there with clone3 CLONE_INTO_CGROUP) is taken as it is, even after it
        exited (a zombie its launcher has not reaped yet): see
        :meth:`_adopt_born_inside`.
        """
        state = self._running(jid)
        if info is None or info.pid != pid:
            info = self.procfs.info(pid)
        if info.exited and not self.backend.holds(state.snapshot(with_pids=False), info):
            raise ProcessGone(f"process {pid} has exited (zombie); nothing to attach")
        # (A zombie the backend holds is where it will stay: nothing to place.)
        old = self._entry(pid)
        if (old is not None and old[0] == jid
                and abs(old[1] - info.start_ticks) <= START_TOLERANCE_TICKS):
            # Already a member (its fork event came first): joining twice would
            # record a second membership row for the same stay.
            if durable:
                self.store.flush()
            return info.ident
        # Place it first, then leave the old job: leaving may end that job, and a
        # cgroup backend would then find the process still in the old job's cgroup
        # (and move it out to remove the cgroup). A failed placement leaves the
        # process where it was.
        placed = info.exited or self.backend.attach(state.snapshot(with_pids=False),
                                                    info) is True
        if old is not None and old[0] != jid:
            self._leave(old[0], ProcessId(pid, old[1]), exit_code=None, detached=True)
        self.detached.discard((pid, info.start_ticks))
        ident = info.ident
        self._join(state, ident, how)
        if placed:
            self._adopt_born_inside(state, info)
        # The reply promises membership: with the in-memory backend the store is the
        # only record of it across a kill -9 (found by the conformance suite's
        # recover test), so make it durable first, as create() does. (The
        # control server passes durable=False and holds its reply until the
        # store reports the commit instead: see ControlServer.on_commit.)
        if durable:
            self.store.flush()
        # Children forked before the attach stay where they are: a job holds a
        # process and what it forks *afterwards* (CSA/ELSA semantics).
        return ident

    def _adopt_born_inside(self, state: _JobState, info: ProcessInfo) -> None:
        """*info* was already in the job's kernel object when attached.

        The kernel marks an exiting task a zombie (exit_notify) before it sends
        the exit event (docs/kernel.md, "cn_proc"), so a
        process /proc shows alive has not sent its exit event yet and the event
        path will close it. A zombie's event may have been sent already
        (ignored then: the pid was no member) or may still come (it then finds
        no member): the zombie is closed here, with its wait status from /proc
        (the job may end with it). Processes it forked before the attach were
        born inside too, but their fork events (from a parent that was not a
        member yet) were ignored: the kernel's member list adds the live ones.
        """
        if info.exited:
            self._leave(state.jid, info.ident, info.exit_code)
            return
        truth = self.backend.members(state.snapshot(with_pids=False))
        for pid in truth or ():
            if pid in self.index:
                continue
            try:
                child = self.procfs.info(pid)
            except ProcessGone:
                continue
            if not child.exited:
                self._join(state, child.ident, "fork")

    def detach(self, pid: int) -> int:
        """Take *pid* out of its job; its future children are not members either."""
        entry = self._entry(pid)
        if entry is None:
            raise JobNotFound(f"pid {pid} is not in any job")
        jid, start = entry
        state = self.jobs[jid]
        ident = ProcessId(pid, start)
        self.backend.detach(state.snapshot(with_pids=False), ident)
        self.detached.add((pid, start))
        self._leave(jid, ident, exit_code=None, detached=True)
        return jid

    def end(self, jid: int, reason: str = "request") -> Job:
        """End a job: members are detached (not killed), the job is closed."""
        state = self._running(jid)
        for pid, start in list(state.members.items()):
            ident = ProcessId(pid, start)
            try:
                self.backend.detach(state.snapshot(with_pids=False), ident)
            except Exception as exc:  # the process may have just exited
                log.debug("detach at end failed", pid=pid, error=str(exc))
            self.detached.add((pid, start))
            self._leave(jid, ident, exit_code=None, detached=True, may_end=False)
        return self._finish(state, reason)

    def _finish(self, state: _JobState, reason: str) -> Job:
        snap = state.snapshot()
        for cb in self.before_end:
            try:
                cb(snap)
            except Exception as exc:
                log.error("before-end callback failed", jid=format_jid(state.jid), error=str(exc))
        try:
            update = self.backend.end_job(snap)
        except Exception as exc:
            update = None
            log.error("backend could not remove job", jid=format_jid(state.jid), error=str(exc))
        for key, value in (update or {}).items():
            if value is None:
                state.params.pop(key, None)
            else:
                state.params[key] = value
        state.state = JOB_ENDED
        state.ended = self.clock()
        del self.jobs[state.jid]
        if state.members:  # none should be left, but never leak index entries
            for pid, _start in state.members.items():
                state.members.pop(pid)
        self._slot_jid.pop(state.members.tag >> SLOT_SHIFT, None)
        self.store.end_job(state.jid, state.ended, JOB_ENDED,
                           params=state.params if update else None)
        job = state.snapshot()
        log.info("job ended", jid=format_jid(state.jid), reason=reason)
        for cb in self.after_end:
            try:
                cb(job)
            except Exception as exc:
                log.error("after-end callback failed", jid=format_jid(state.jid), error=str(exc))
        if self.hooks:
            self.hooks.job_ended(job)
        return job

    # -- membership primitives --------------------------------------------------------
    def _join(self, state: _JobState, ident: ProcessId, how: str) -> None:
        state.members[ident.pid] = ident.start_ticks
        if how == "attach":
            self.attached[(ident.pid, ident.start_ticks)] = self.clock()
        if self.left_alive:
            self.left_alive.pop(ident.pid, None)
        state.had_members = True  # the store keeps it as the member row below
        self.store.add_member(self.boot_id, state.jid, ident.pid, ident.start_ticks,
                              self.clock(), how)
        if self._hook_joined:
            self.hooks.process_joined(state.snapshot(with_pids=False), ident, how)

    def _leave(self, jid: int, ident: ProcessId, exit_code: Optional[int], *,
               detached: bool = False, may_end: bool = True) -> None:
        state = self.jobs.get(jid)
        now = self.clock()
        if state is not None:
            state.members.pop(ident.pid)
        else:
            self.index.pop(ident.pid, None)
        if self.attached:
            self.attached.pop((ident.pid, ident.start_ticks), None)
        self.store.close_member(self.boot_id, jid, ident.pid, ident.start_ticks, now,
                                exit_code, detached)
        if detached:
            self.left_alive[ident.pid] = (jid, ident.start_ticks)
        else:
            self.exited.add(ident.pid, jid, ident.start_ticks)
            if self._hook_exited:
                self.hooks.process_exited(jid, ident, -1 if exit_code is None else exit_code)
        if (may_end and state is not None and not state.members and state.had_members
                and self.job_end == "last-exit"):
            self._finish(state, "last member exited")

    def expire_exited(self) -> None:
        """Forget exits older than ``exited_linger`` (called from a timer)."""
        self.exited.expire()

    @property
    def exited_linger(self) -> float:
        return self.exited.linger

    @exited_linger.setter
    def exited_linger(self, seconds: float) -> None:
        self.exited.linger = seconds

    # -- event path (hot: keep it lean) --------------------------------------------------
    def on_fork(self, parent_tgid: int, child_pid: int, child_tgid: int, ts_ns: int) -> None:
        counters = self.counters
        counters.forks += 1
        if child_pid != child_tgid:
            counters.thread_forks += 1  # a new thread, not a process
            return
        index = self.index
        v = index.get(parent_tgid)
        if v is None:
            known = index.get(child_tgid)
            if known is not None:  # a member's pid, reused: see _exited_unseen
                self._exited_unseen(child_tgid, self._fork_start(ts_ns), known)
            return
        counters.member_forks += 1
        start = (ts_ns + self._boot_offset_ns) * CLOCK_TICKS // 1_000_000_000  # _fork_start
        detached = self.detached
        if detached and (child_tgid, start) in detached:
            known = index.get(child_tgid)
            if known is None:
                return  # kept out of jobs
        else:
            # _join() inlined: this runs once per member fork in a storm. The
            # parent is a member, so the job already had members.
            known = index.insert(child_tgid, (v & ~START_MASK) | start)
            if known is None:
                jid = self._slot_jid[v >> SLOT_SHIFT]
                self.jobs[jid].members.count += 1
                self.store.add_member(self.boot_id, jid, child_tgid, start, self.clock(), "fork")
                if self._hook_joined:
                    self.hooks.process_joined(self.jobs[jid].snapshot(with_pids=False),
                                              ProcessId(child_tgid, start), "fork")
                return
        self._fork_known(v, child_tgid, start, known)

    def _fork_start(self, ts_ns: int) -> int:
        """A fork event's time as a /proc start time: the event timestamp is
        CLOCK_MONOTONIC, /proc counts CLOCK_BOOTTIME ticks (procfs.boottime_offset_ns)."""
        return (ts_ns + self._boot_offset_ns) * CLOCK_TICKS // 1_000_000_000

    def _exited_unseen(self, pid: int, start: int, known: int) -> bool:
        """A fork made *pid* (started at *start*) while the index holds it for a
        member (its value *known*). False when that is the same process (a
        resync read /proc after this fork and adopted it). Otherwise the
        member exited and its exit event never came: the kernel queues a
        process's exit before its pid can be reused, so the event was lost
        (on a filtered proc connector nothing else shows it). The member is
        closed with its exit status unknown; True."""
        if abs((known & START_MASK) - start) <= START_TOLERANCE_TICKS:
            return False
        self.counters.exits_unseen += 1
        self._leave(self._slot_jid[known >> SLOT_SHIFT], ProcessId(pid, known & START_MASK), None)
        return True

    def _fork_known(self, parent: int, child: int, start: int, known: int) -> None:
        """A member's fork whose child pid the index holds already (its value *known*)."""
        if not self._exited_unseen(child, start, known):
            return  # already adopted by a resync that read /proc after this fork
        jid = self._slot_jid[parent >> SLOT_SHIFT]
        if jid not in self.jobs or (self.detached and (child, start) in self.detached):
            return
        state = self.jobs[jid]
        self.index[child] = (parent & ~START_MASK) | start
        state.members.count += 1
        self.store.add_member(self.boot_id, jid, child, start, self.clock(), "fork")
        if self._hook_joined:
            self.hooks.process_joined(state.snapshot(with_pids=False),
                                      ProcessId(child, start), "fork")

    def on_exit(self, pid: int, tgid: int, exit_code: int, ts_ns: int) -> None:
        counters = self.counters
        counters.exits += 1
        if pid != tgid:
            return  # a thread exited; the process lives on
        index = self.index
        v = index.pop(tgid)  # (put back below in the rare cases)
        if v is None:
            if self.left_alive:
                left = self.left_alive.pop(tgid, None)
                if left is not None:  # resolvable for exited_linger more, like a member
                    self.exited.add(tgid, left[0], left[1])
            return
        start = v & START_MASK
        # An exit queued before a resync snapshot may name a pid that resync
        # already gave to a newer process: an exit cannot precede its start.
        if ((ts_ns + self._boot_offset_ns) * CLOCK_TICKS // 1_000_000_000
                < start - START_TOLERANCE_TICKS):
            index[tgid] = v
            return
        counters.member_exits += 1
        jid = self._slot_jid[v >> SLOT_SHIFT]
        state = self.jobs.get(jid)
        if state is None or self._hook_exited or state.members.count <= 1:
            index[tgid] = v
            self._leave(jid, ProcessId(tgid, start), exit_code)
            return
        # _leave() inlined for the common case (once per member exit in a
        # storm): the job keeps other members, no hook wants the exit.
        state.members.count -= 1
        if self.attached:
            self.attached.pop((tgid, start), None)
        now = self.clock()
        self.store.close_member(self.boot_id, jid, tgid, start, now, exit_code, False)
        self.exited.add(tgid, jid, start, now)

    def job_emptied(self, jid: int) -> None:
        """The backend saw *jid*'s kernel object empty (cgroup.events ``populated 0``).

        Cheaper than :meth:`resync`: only this job's members are checked against
        the kernel's answer; members still alive elsewhere were moved out.
        """
        state = self.jobs.get(jid)
        if state is None:
            return
        # No member to check (a process born inside exited before its attach,
        # which takes the zombie): neither the kernel's list nor a scan of the index.
        truth = self.backend.members(state.snapshot(with_pids=False)) if state.members else set()
        if truth is None:
            self.resync(f"job {format_jid(jid)} emptied")
            return
        for pid, start in list(state.members.items()) if state.members else ():
            if pid in truth:
                continue
            ident = ProcessId(pid, start)
            self._leave(jid, ident, None, detached=self.procfs.alive(ident), may_end=False)
        if (state.had_members and not state.members and jid in self.jobs
                and self.job_end == "last-exit"):
            self._finish(state, "last member exited (kernel: job emptied)")

    # -- signalling ----------------------------------------------------------------------
    def signal(self, jid: int, sig: int, pids: Optional[Iterable[int]] = None) -> int:
        """Signal *jid*'s members, or only *pids* among them (the control server
        passes the members a non-admin caller may signal under kill(2)'s rule)."""
        state = self._running(jid)
        targets = list(state.members) if pids is None else [
            p for p in pids if p in state.members]
        return self.backend.signal(state.snapshot(with_pids=False), sig, targets)

    def member_pids(self, jid: int, among: Iterable[int] = ()) -> List[int]:
        """The sorted member pids of running job *jid*. *among*: pids that may be
        all of them (those just attached): when they are, the index is not
        scanned (listing members scans all of it, 100,000+ slots on a busy node)."""
        members = self._running(jid).members
        found = [p for p in among if p in members]
        if len(found) == len(members):
            return sorted(found)
        return sorted(members)

    def set_frozen(self, jid: int, frozen: bool) -> None:
        """Freeze or thaw running job *jid* (the backend may refuse: cnproc cannot)."""
        state = self._running(jid)
        if frozen:
            self.backend.freeze(state.snapshot())
        else:
            self.backend.thaw(state.snapshot())
