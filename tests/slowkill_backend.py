"""A test-only backend: cnproc grouping whose SIGKILL and freeze take 1.5 s to
"finish" (as a cgroup with a process in uninterruptible sleep would). A mock:
this machine cannot put a process in D state on demand. Loaded through the
config's ``plugins`` key by tests/test_daemon_robust.py."""

from __future__ import annotations

import time
from typing import Dict, List

from elsa import hookimpl
from elsa.backends.cnproc import CnprocBackend
from elsa.core.backend import BackendSpec
from elsa.core.model import Job

DELAY_S = 1.5


class SlowKillBackend(CnprocBackend):
    name = "slowkill"

    def __init__(self) -> None:
        super().__init__()
        self.started: Dict[int, float] = {}
        self.kill_timeout = 10.0

    def signal(self, job: Job, sig: int, pids) -> int:
        self.started[job.jid] = time.monotonic()
        return super().signal(job, sig, pids)

    def settled(self, job: Job, what: str) -> bool:
        return time.monotonic() - self.started.get(job.jid, 0.0) >= DELAY_S


@hookimpl
def elsa_backends() -> List[BackendSpec]:
    return [BackendSpec(name="slowkill", factory=SlowKillBackend,
                        description="test: a kill that takes 1.5 s to finish")]
