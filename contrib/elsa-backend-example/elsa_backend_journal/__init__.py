"""``journal``: an example third-party ELSA backend.

Grouping is in-memory, as with the built-in ``cnproc`` backend: the job
manager's index follows proc-connector fork events, so this backend places
nothing in the kernel. The twist: every placement decision (create, attach,
detach, signal, end, recover) is appended to a per-job audit journal,
``<directory>/<jid>.jsonl``, one JSON object per line, which an auditor can
read without asking the daemon. Jobs may carry a ``label`` parameter that is
written into every record.

It exists to show (and to test, with ``elsa.testing``) everything a backend
plugin touches: the ``elsa_backends`` hook, options validated from
``[backends.journal]``, job parameters, signalling, recovery, ``status``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional

from elsa import hookimpl
from elsa.config import Option
from elsa.core.backend import Backend, BackendContext, BackendSpec
from elsa.core.model import Job, ProcessId, ProcessInfo, format_jid
from elsa.errors import BackendError

__version__ = "0.1.0"


def _absolute_or_empty(value: str) -> Optional[str]:
    return None if value == "" or os.path.isabs(value) else "must be an absolute path"


OPTIONS: Dict[str, Option] = {
    "directory": Option(str, "", "Where the per-job journals go; empty: <state_dir>/journal.",
                        check=_absolute_or_empty),
    "fsync": Option(bool, False, "fsync each record (slower; survives power loss)."),
    "keep_ended": Option(bool, True, "Keep the journal of a job after it ended."),
}


class JournalBackend(Backend):
    name = "journal"
    # The kernel does not keep children in: the manager follows fork events and,
    # after event loss or a restart, /proc ancestry.
    inherits_in_kernel = False

    def __init__(self) -> None:
        self.directory = ""
        self.fsync = False
        self.keep_ended = True
        self.records = 0
        self.signalled = 0

    # -- lifecycle -----------------------------------------------------------------
    def start(self, ctx: BackendContext) -> None:
        super().start(ctx)
        opts = ctx.options
        self.directory = str(opts["directory"]) or os.path.join(ctx.state_dir, "journal")
        self.fsync = bool(opts["fsync"])
        self.keep_ended = bool(opts["keep_ended"])
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"[backends.journal] directory {self.directory}: "
                               f"{exc.strerror}; choose a writable directory") from None

    # -- the journal ---------------------------------------------------------------------
    def path(self, jid: int) -> str:
        return os.path.join(self.directory, f"{format_jid(jid)}.jsonl")

    def _write(self, job: Job, event: str, **fields: object) -> None:
        rec = {"t": round(time.time(), 6), "event": event, "jid": format_jid(job.jid)}
        label = job.params.get("label")
        if label:
            rec["label"] = label
        rec.update(fields)
        fd = os.open(self.path(job.jid), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.records += 1

    # -- the Backend interface ---------------------------------------------------------------
    def validate_params(self, params: Mapping[str, str]) -> Dict[str, str]:
        unknown = sorted(set(params) - {"label"})
        if unknown:
            raise BackendError(f"backend 'journal' takes only the job parameter 'label'; "
                               f"got {', '.join(unknown)}")
        label = params.get("label", "")
        if len(label) > 64 or not label.isprintable():
            raise BackendError("job parameter 'label' must be printable, at most 64 chars")
        return {"label": label} if label else {}

    def create_job(self, job: Job) -> Dict[str, str]:
        self._write(job, "create", name=job.name, owner_uid=job.owner_uid)
        return {"journal": self.path(job.jid)}

    def attach(self, job: Job, proc: ProcessInfo) -> None:
        self._write(job, "attach", pid=proc.pid, start_ticks=proc.start_ticks,
                    comm=proc.comm, uid=proc.uid)

    def detach(self, job: Job, proc: ProcessId) -> None:
        self._write(job, "detach", pid=proc.pid, start_ticks=proc.start_ticks)

    def signal(self, job: Job, sig: int, pids: Iterable[int]) -> int:
        sent = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                sent.append(pid)
            except ProcessLookupError:
                continue  # exited meanwhile; its exit event is on its way
        self.signalled += len(sent)
        self._write(job, "signal", signal=sig, pids=sent)
        return len(sent)

    def end_job(self, job: Job) -> None:
        self._write(job, "end", pids=list(job.pids))
        if not self.keep_ended:
            try:
                os.unlink(self.path(job.jid))
            except FileNotFoundError:
                pass

    def recover(self, jobs: Iterable[Job]) -> Dict[int, set]:
        for job in jobs:
            self._write(job, "recover")
        return {}  # no kernel view: the manager re-validates from the store and /proc

    def status(self) -> Dict[str, object]:
        return {"directory": self.directory, "records": self.records,
                "signalled": self.signalled, "fsync": self.fsync}


@hookimpl
def elsa_backends() -> List[BackendSpec]:
    return [BackendSpec(name="journal", factory=JournalBackend, options=OPTIONS,
                        description="in-memory grouping with a per-job audit journal "
                                    "(example plugin)")]
