"""Re-learning membership from the kernel instead of from events: after events
were lost (:meth:`Reconciliation.resync`) and after a (re)start
(:meth:`Reconciliation.recover`).

A part of the job manager (elsa/core/manager.py), kept in a module of its own:
the event path follows forks and exits one at a time, this reads /proc and the
backend's kernel objects (cgroups) and repairs the index in one pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple

from elsa.core.membership import SLOT_SHIFT, START_MASK, ExitHistory
from elsa.core.model import START_TOLERANCE_TICKS, ProcessId, ProcessInfo, format_jid
from elsa.logsetup import structlog

if TYPE_CHECKING:
    from elsa.core.backend import Backend
    from elsa.core.manager import Counters
    from elsa.core.pidindex import PidIndex
    from elsa.core.store import Store
    from elsa.kernel.procfs import ProcFS

log = structlog.get_logger("elsa.manager")


class Reconciliation:
    """``resync`` and ``recover`` of :class:`elsa.core.manager.JobManager`, whose
    state and membership steps they use (documented there)."""

    if TYPE_CHECKING:
        jobs: Dict[int, Any]
        index: PidIndex
        backend: Backend
        procfs: ProcFS
        store: Store
        counters: Counters
        boot_id: str
        job_end: str
        clock: Callable[[], float]
        detached: Set[Tuple[int, int]]
        left_alive: Dict[int, Tuple[int, int]]
        exited: ExitHistory
        _slot_jid: Dict[int, int]
        ended_while_down: Dict[int, str]

        def _entry(self, pid: int) -> Optional[Tuple[int, int]]: ...
        def _new_state(self, **fields: Any) -> Any: ...
        def _join(self, state: Any, ident: ProcessId, how: str) -> None: ...
        def _leave(self, jid: int, ident: ProcessId, exit_code: Optional[int], *,
                   detached: bool = False, may_end: bool = True) -> None: ...
        def _finish(self, state: Any, reason: str) -> Any: ...

    def resync(self, reason: str, snapshot: Optional[Dict[int, ProcessInfo]] = None,
               how: str = "resync", end_emptied: bool = True) -> Dict[str, int]:
        """Bring the index back in line with the kernel after events were lost.

        1. Backends that keep children in the kernel (cgroups) are asked for
           each job's members: their answer is the truth.
        2. Members no longer alive (pid gone or start time differs) exited.
        3. Every live process not in a job whose ppid ancestry reaches a member
           joins that member's job (children born while events were lost).

        Jobs left without members then end (``job_end = "last-exit"``), unless
        *end_emptied* is false: the caller ends them.
        """
        self.counters.resyncs += 1
        truths: Dict[int, Optional[Set[int]]] = {
            state.jid: self.backend.members(state.snapshot(with_pids=False))
            for state in list(self.jobs.values())}
        if snapshot is not None:
            procs = snapshot
        elif self.backend.inherits_in_kernel:
            # Kernel truth: no ancestry walk (step 3), so only the processes
            # named by the index, the backend and left_alive are read, not
            # all of /proc (a resync follows every lost event under load).
            wanted = set(self.index).union(self.left_alive)
            for truth in truths.values():
                if truth:
                    wanted.update(truth)
            procs = self.procfs.snapshot_of(wanted)
        else:
            procs = self.procfs.snapshot()
        adopted = exited = 0
        # (2) members that are gone
        for pid, v in list(self.index.items()):
            jid, start = self._slot_jid[v >> SLOT_SHIFT], v & START_MASK
            info = procs.get(pid)
            if info is None or abs(info.start_ticks - start) > START_TOLERANCE_TICKS:
                self._leave(jid, ProcessId(pid, start), exit_code=None)
                exited += 1
            elif info.start_ticks != start:
                # Replace the event-derived estimate with the exact value.
                self.jobs[jid].members[pid] = info.start_ticks
        # (1) kernel truth
        for state in list(self.jobs.values()):
            truth = truths.get(state.jid)
            if truth is None:
                continue
            for pid in truth:
                info = procs.get(pid)
                if info is None or pid in state.members:
                    continue
                old = self._entry(pid)
                if old is not None and old[0] != state.jid:
                    self._leave(old[0], ProcessId(pid, old[1]), None, detached=True)
                self._join(state, info.ident, how)
                adopted += 1
        # (1b) with kernel truth, a live member the kernel no longer holds was moved
        # out behind our back: it left the job.
        if self.backend.inherits_in_kernel:
            for state in list(self.jobs.values()):
                truth = truths.get(state.jid)
                if truth is None:
                    continue
                for pid, start in list(state.members.items()):
                    if pid not in truth:
                        self._leave(state.jid, ProcessId(pid, start), None, detached=True,
                                    may_end=False)
                        exited += 1
        # (3) ancestry; not with kernel truth: a child of a member outside the job's
        # cgroup was detached or born before the attach, and stays out.
        memo: Dict[int, Optional[int]] = {}

        def job_by_ancestry(pid: int) -> Optional[int]:
            chain = []
            found: Optional[int] = None
            cur = pid
            for _ in range(4096):  # bounded: ppid loops cannot happen, but be safe
                if cur in memo:
                    found = memo[cur]
                    break
                info = procs.get(cur)
                if info is None or cur <= 1:
                    break
                if (cur, info.start_ticks) in self.detached:
                    break
                entry = self._entry(cur)
                if entry is not None:
                    found = entry[0]
                    break
                chain.append(cur)
                cur = info.ppid
            for c in chain:
                memo[c] = found
            return found

        # Parents before children, so a whole lost subtree joins in one pass.
        by_age = [] if self.backend.inherits_in_kernel else sorted(
            procs, key=lambda p: procs[p].start_ticks)
        for pid in by_age:
            if pid in self.index or pid <= 1:
                continue
            info = procs[pid]
            if (pid, info.start_ticks) in self.detached:
                continue
            jid = job_by_ancestry(pid)
            if jid is not None and jid in self.jobs:
                self._join(self.jobs[jid], info.ident, how)
                adopted += 1
        for pid, (_jid, start) in list(self.left_alive.items()):
            info = procs.get(pid)
            if info is None or abs(info.start_ticks - start) > START_TOLERANCE_TICKS:
                del self.left_alive[pid]  # exited unseen: the stored history has it
        self.counters.resync_adopted += adopted
        self.counters.resync_exited += exited
        log.info("resync done", reason=reason, adopted=adopted, exited=exited,
                 members=len(self.index))
        # Jobs that lost their last member while events were lost.
        if end_emptied:
            for state in self._emptied():
                self._finish(state, "last member exited (found by resync)")
        return {"adopted": adopted, "exited": exited}

    def recover(self) -> Dict[str, int]:
        """Load running jobs from the store after a (re)start and re-validate them.

        Jobs that ended while elsad was down (their last member exited, or their
        kernel object is gone) are kept running until :meth:`end_recovered`: the
        daemon starts its sources first, so that they flag the downtime for these
        jobs too and take their final readings (the cgroup's counters kept what
        the members used while elsad was down) before the backend removes them."""
        stored_members = self.store.live_members()
        jobs = self.store.running_jobs()
        procs = self.procfs.snapshot()
        for job, had in jobs:
            self.jobs[job.jid] = self._new_state(
                jid=job.jid, name=job.name, owner_uid=job.owner_uid, tags=job.tags,
                created=job.created, backend=job.backend, params=dict(job.params),
                had_members=had)
            if job.backend != self.backend.name:
                log.warning("job was created by another backend", jid=format_jid(job.jid),
                            job_backend=job.backend, backend=self.backend.name)
        left = self.store.left_alive(self.boot_id)
        self.detached = {(pid, start) for pid, start, _jid in left}
        for pid, start, jid in left:
            info = procs.get(pid)
            if info is not None and abs(info.start_ticks - start) <= START_TOLERANCE_TICKS:
                self.left_alive[pid] = (jid, start)
        revalidated = 0
        now = self.clock()
        for boot, jid, pid, start, _how in stored_members:
            state = self.jobs.get(jid)
            info = procs.get(pid) if boot == self.boot_id else None
            alive = info is not None and abs(info.start_ticks - start) <= START_TOLERANCE_TICKS
            if state is None or not alive or pid in self.index:
                # (a pid stored live in two jobs is stale data: the first wins)
                # Exited while we were down (or another boot): close the record.
                self.store.close_member(boot, jid, pid, start, now, None)
                if state is not None:
                    self.exited.add(pid, jid, start)
                continue
            state.members[pid] = info.start_ticks
            revalidated += 1
        # Kernel truth (cgroups) and ancestry adopt what was born while we were down.
        kernel = self.backend.recover([s.snapshot(with_pids=False) for s in self.jobs.values()])
        for jid, pids in kernel.items():
            state = self.jobs.get(jid)
            if state is None:
                continue
            for pid in pids:
                info = procs.get(pid)
                if info is not None and pid not in self.index:
                    self._join(state, info.ident, "recover")
        for jid in self.backend.gone_jobs():
            state = self.jobs.get(jid)
            if state is None:
                continue
            for pid, start in list(state.members.items()):
                self._leave(jid, ProcessId(pid, start), None, detached=True, may_end=False)
            self.ended_while_down[jid] = "kernel object vanished while elsad was down"
        result = self.resync("recover", snapshot=procs, how="recover", end_emptied=False)
        for state in self._emptied():
            self.ended_while_down.setdefault(state.jid, "last member exited while elsad was down")
        log.info("jobs recovered", jobs=len(self.jobs), revalidated=revalidated,
                 adopted=result["adopted"], exited=result["exited"],
                 ended_while_down=len(self.ended_while_down))
        return {"jobs": len(self.jobs), "revalidated": revalidated, **result,
                "ended_while_down": len(self.ended_while_down)}

    def _emptied(self) -> List[Any]:
        """The running jobs whose last member left and that end with it
        (``job_end = "last-exit"``)."""
        if self.job_end != "last-exit":
            return []
        return [s for s in self.jobs.values() if s.had_members and not s.members]

    def end_recovered(self) -> int:
        """End the jobs :meth:`recover` found ended while elsad was down (those still
        without members); how many ended."""
        ended = 0
        for jid, reason in self.ended_while_down.items():
            state = self.jobs.get(jid)
            if state is not None and not state.members:
                self._finish(state, reason)
                ended += 1
        self.ended_while_down.clear()
        return ended
