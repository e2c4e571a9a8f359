"""The ``cgroupstat`` source: job-level counters of cgroup-backed jobs.

For every running job whose backend recorded its cgroup directory in the
job's params (key ``cgroup_path``: absolute, or relative to the cgroup2
mount), reads ``cpu.stat`` and, where the controllers are enabled,
``memory.peak``, ``memory.stat``, ``memory.events``, ``io.stat`` and
``pids.peak`` every ``interval`` seconds, and once more in ``job_ending``,
before the backend removes the cgroup (the kernel frees the counters with the
cgroup: docs/kernel.md, "cgroup v2").
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Set

from elsa import hookimpl
from elsa.config import Option, positive
from elsa.core.model import Job
from elsa.core.source import Source, SourceContext, SourceSpec
from elsa.errors import CgroupGone, ElsaError
from elsa.kernel import cgroupstats
from elsa.kernel.cgroupfs import CgroupFS
from elsa.logsetup import structlog

log = structlog.get_logger("elsa.source.cgroupstat")

NAME = "cgroupstat"
PARAM = "cgroup_path"



OPTIONS: Dict[str, Option] = {
    "interval": Option(float, 10.0, "Seconds between readings of running jobs' cgroups.",
                       check=positive),
    "mount": Option(str, "", "cgroup2 mount for relative cgroup paths (empty: found in"
                    " /proc/self/mountinfo)."),
}


class CgroupStatSource(Source):
    name = NAME

    def __init__(self) -> None:
        self.readings = 0
        self.errors = 0
        self.missing: Set[str] = set()
        self.last_error = ""
        self.mount: Optional[str] = None

    def start(self, ctx: SourceContext) -> None:
        super().start(ctx)
        self.interval = float(ctx.options["interval"])  # type: ignore[arg-type]
        self.mount = str(ctx.options["mount"]) or CgroupFS().cgroup2_mount()

    def _dir(self, job: Job) -> Optional[str]:
        path = job.params.get(PARAM)
        if not path:
            return None
        if os.path.isabs(path):
            return path
        return os.path.join(self.mount, path) if self.mount else None

    def _read(self, job: Job, final: bool) -> None:
        d = self._dir(job)
        if d is None:
            return
        try:
            st = cgroupstats.read_stats(d)
        except CgroupGone:
            return  # removed already: the last reading stands
        except ElsaError as exc:
            self.errors += 1
            self.last_error = exc.message
            return
        self.readings += 1
        self.missing.update(st.missing)
        self.ctx.emit([st.to_usage(job.jid, NAME, final=final)])

    def poll(self) -> None:
        for job in self.ctx.jobs():
            self._read(job, final=False)

    def job_ending(self, job: Job) -> None:
        self._read(job, final=True)

    def status(self) -> Dict[str, object]:
        return {"readings": self.readings, "errors": self.errors, "last_error": self.last_error,
                "missing_files": sorted(self.missing), "mount": self.mount}


@hookimpl
def elsa_sources() -> List[SourceSpec]:
    return [SourceSpec(name=NAME, factory=CgroupStatSource, options=OPTIONS,
                       description="Job-level cgroup v2 counters (cpu.stat, memory.peak,"
                                   " io.stat, ...) of cgroup-backed jobs.",
                       priority=10, default_enabled=True,
                       covers_downtime=True)]
