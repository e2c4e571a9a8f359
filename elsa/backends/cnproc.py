"""The ``cnproc`` backend: in-memory grouping driven by proc-connector fork events.

Nothing is placed in the kernel: the job manager's index *is* the grouping,
fed by fork events (a child of a member joins its job), and rebuilt from /proc
ppid ancestry after event loss or a restart. This works on any kernel with
CONFIG_PROC_EVENTS and needs no cgroup, but a process that double-forks while
events are being lost is re-parented to init before we can see its ancestry;
``cgroup2`` has no such gap (the kernel keeps children in) and is recommended
where cgroup v2 is available.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

from elsa import hookimpl
from elsa.core.backend import Backend, BackendSpec, signal_each
from elsa.core.model import Job, ProcessId, ProcessInfo


class CnprocBackend(Backend):
    name = "cnproc"
    inherits_in_kernel = False

    def __init__(self) -> None:
        self.signalled = 0

    def create_job(self, job: Job) -> Dict[str, str]:
        return {}

    def attach(self, job: Job, proc: ProcessInfo) -> None:
        # Membership is recorded by the manager; fork events carry it to children.
        return None

    def detach(self, job: Job, proc: ProcessId) -> None:
        return None

    def signal(self, job: Job, sig: int, pids: Iterable[int]) -> int:
        sent = signal_each(pids, sig)
        self.signalled += sent
        return sent

    def end_job(self, job: Job) -> None:
        return None

    def status(self) -> Dict[str, object]:
        return {"placement": "in-memory (fork events + /proc ancestry)",
                "signalled": self.signalled}


@hookimpl
def elsa_backends() -> List[BackendSpec]:
    return [BackendSpec(name="cnproc", factory=CnprocBackend,
                        description="in-memory grouping from proc-connector fork events")]
