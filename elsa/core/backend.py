"""The grouping-backend interface every backend (built-in or third party) implements.

The job manager keeps the authoritative *index* of members (pid -> job) for
every backend, fed by fork/exit events, attach/detach requests and resyncs.
The backend decides *placement*: the in-memory ``cnproc`` backend places
nothing (the index is the grouping), cgroup backends move the process into the
job's cgroup so the kernel keeps every child in. A backend whose
``inherits_in_kernel`` is true is asked for its members after event loss and
on recovery: its answer is the truth, events are hints (Slurm, systemd).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set

from elsa.config import Option
from elsa.core.model import Job, ProcessId, ProcessInfo
from elsa.errors import BackendError
from elsa.kernel.procfs import ProcFS


@dataclass
class BackendContext:
    """What the daemon hands a backend when it starts."""

    options: Mapping[str, object]  # the validated [backends.<name>] table
    procfs: ProcFS
    state_dir: str
    # Called (on the event thread) when the backend learns a job has no
    # process left, e.g. from cgroup.events "populated 0".
    job_emptied: Callable[[int], None] = lambda jid: None
    # Register a file descriptor to watch on the event loop: fd, callback().
    add_reader: Callable[[int, Callable[[], None]], None] = lambda fd, cb: None
    remove_reader: Callable[[int], None] = lambda fd: None
    extra: Dict[str, object] = field(default_factory=dict)


class Backend(abc.ABC):
    """A way of grouping processes into jobs."""

    #: The name used by ``backend = "<name>"`` in the config.
    name: str = ""
    #: True when the kernel keeps a member's children in the job by itself.
    inherits_in_kernel: bool = False

    def start(self, ctx: BackendContext) -> None:
        """Prepare the backend (create directories, check privileges)."""
        self.ctx = ctx

    def stop(self) -> None:
        """Release resources; jobs and their kernel objects stay for the next start."""

    def validate_params(self, params: Mapping[str, str]) -> Dict[str, str]:
        """Check per-job creation parameters (e.g. cpuset ``cpus``/``mems``).

        Returns the parameters to keep with the job. The default accepts none.
        """
        if params:
            raise BackendError(f"backend {self.name!r} takes no job parameters; "
                               f"got {', '.join(sorted(params))}")
        return {}

    def limits_left(self, job: Job, pid: int) -> List[str]:
        """The resource limits confining *pid* that it would no longer be under
        as a member of *job* (``"<cgroup>: pids.max=50"``). A non-admin caller may
        not move a process out of its limits (docs/security.md). Backends that
        move nothing leave none."""
        return []

    def nest_parent(self, pid: int) -> Optional[str]:
        """Where a new job for *pid* should be created so that *pid* keeps its
        limits (the kernel object of *pid*'s group), or None when a job in the
        usual place keeps them. Asked for the first process of a job a non-admin
        creates; the answer reaches :meth:`create_job` as ``params["nest_under"]``."""
        return None

    @abc.abstractmethod
    def create_job(self, job: Job) -> Dict[str, str]:
        """Create the kernel-side object for a new job.

        Returns parameters to persist with the job (e.g. its cgroup path).
        """

    @abc.abstractmethod
    def attach(self, job: Job, proc: ProcessInfo) -> Optional[bool]:
        """Place a live process into *job* (its future children follow).

        Return True when the kernel had already placed it there, so nothing
        moved: a launcher started it inside the job (clone3 with
        CLONE_INTO_CGROUP). The manager then also takes the job's other
        kernel-side members and accepts a process that has already exited.
        None (or False) otherwise.
        """

    def holds(self, job: Job, proc: ProcessInfo) -> bool:
        """True when the kernel already places *proc* in *job* (it was born
        inside). Asked only for a process that has exited but is not reaped
        yet, which can no longer be moved; backends without kernel-side
        placement say False."""
        return False

    @abc.abstractmethod
    def detach(self, job: Job, proc: ProcessId) -> None:
        """Take a process out of *job* (back where it came from, where possible)."""

    def members(self, job: Job) -> Optional[Set[int]]:
        """The kernel's view of the job's member pids, or ``None`` when the
        backend has no such view (then the manager's index is the truth)."""
        return None

    @abc.abstractmethod
    def signal(self, job: Job, sig: int, pids: Iterable[int]) -> int:
        """Send *sig* to the processes *pids* of *job*; return how many were signalled.

        *pids* are exactly the processes to signal. When they include every
        member, a backend may signal the whole job atomically (cgroup.kill,
        freeze-signal-thaw) so that children forked meanwhile are not missed;
        when they are a subset (a non-admin caller may signal only processes
        kill(2) lets it signal), it must signal just those."""

    def freeze(self, job: Job) -> None:
        raise BackendError(f"backend {self.name!r} cannot freeze jobs; use cgroup2")

    def thaw(self, job: Job) -> None:
        raise BackendError(f"backend {self.name!r} cannot thaw jobs; use cgroup2")

    def settled(self, job: Job, what: str) -> bool:
        """Whether the kernel finished what :meth:`signal` (SIGKILL: *what* is
        "killed") or :meth:`freeze` ("frozen") started. Called from the event
        loop's timer until True or the backend's ``kill_timeout``: never wait here.
        A backend that finishes within the call returns True."""
        return True

    @abc.abstractmethod
    def end_job(self, job: Job) -> Optional[Dict[str, Optional[str]]]:
        """Remove the job's kernel-side object (sources took final readings already).

        May return parameters to update with the job, read from the object before
        it goes (the limits in force at its end: :class:`~elsa.core.model.JobLimits`);
        a value None removes that parameter. None: nothing to update. Called on
        the event thread: a few small reads, never a wait."""

    def recover(self, jobs: Iterable[Job]) -> Dict[int, Set[int]]:
        """After a daemon restart: the member pids of each running job, as the
        kernel knows them. Backends without a kernel view return ``{}`` and the
        manager re-validates from the store and /proc ancestry."""
        return {}

    def gone_jobs(self) -> Set[int]:
        """After :meth:`recover`: running jobs whose kernel-side object vanished
        while the daemon was down (e.g. someone removed the job cgroup). The
        manager ends them. Backends without kernel objects return none."""
        return set()

    def status(self) -> Dict[str, object]:
        """Backend-specific facts for the ``status`` request."""
        return {}


def signal_each(pids: Iterable[int], sig: int) -> int:
    """Send *sig* to each pid; return how many were signalled. A process that
    exited meanwhile is skipped: its exit event is on its way."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:
            continue
    return sent


@dataclass(frozen=True)
class BackendSpec:
    """A backend as a plugin declares it in ``elsa_backends``."""

    name: str
    factory: Callable[[], Backend]
    options: Mapping[str, Option] = field(default_factory=dict)
    description: str = ""
