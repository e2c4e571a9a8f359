"""Where each process a cgroup backend attached came from (its cgroup before the
attach), journaled in the state dir: a detach returns the process there, also
after a restart. Used by the cgroup2 backend and its cpuset subclass.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Set, Tuple

from elsa.core.model import ProcessId


class Origins:
    """Where each attached process came from, journaled so a restart keeps it.

    An append-only JSON-lines file, compacted at start; losing it only means a
    detached process goes to the ``released`` leaf instead of its origin.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.by_proc: Dict[Tuple[int, int], Tuple[int, Dict[str, str]]] = {}
        self.by_job: Dict[int, Set[Tuple[int, int]]] = {}
        # A member born inside the job (a fork) was never anywhere else: on detach
        # it goes where the job's first attached process came from.
        self.first: Dict[int, Dict[str, str]] = {}
        self._fd = -1

    def load(self, alive) -> None:
        try:
            with open(self.path) as fh:
                lines = fh.readlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                rec = json.loads(line)
                if rec.get("d"):
                    self._forget_job(int(rec["j"]))
                else:
                    self._set(int(rec["j"]), int(rec["p"]), int(rec["s"]), dict(rec["o"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
        for key in [k for k in self.by_proc if not alive(k)]:
            jid = self.by_proc.pop(key)[0]
            self.by_job.get(jid, set()).discard(key)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            for (pid, start), (jid, origin) in self.by_proc.items():
                fh.write(json.dumps({"j": jid, "p": pid, "s": start, "o": origin}) + "\n")
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _set(self, jid: int, pid: int, start: int, origin: Dict[str, str]) -> None:
        key = (pid, start)
        old = self.by_proc.get(key)
        if old is not None:
            self.by_job.get(old[0], set()).discard(key)
        self.by_proc[key] = (jid, origin)
        self.by_job.setdefault(jid, set()).add(key)
        if origin and jid not in self.first:
            self.first[jid] = origin

    def _forget_job(self, jid: int) -> None:
        self.first.pop(jid, None)
        for key in self.by_job.pop(jid, ()):
            if self.by_proc.get(key, (None,))[0] == jid:
                del self.by_proc[key]

    def _append(self, rec: dict) -> None:
        if self._fd >= 0:
            os.write(self._fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def record(self, jid: int, proc: ProcessId, origin: Dict[str, str]) -> None:
        if not origin and (proc.pid, proc.start_ticks) not in self.by_proc:
            # Born inside a job: no origin of its own, and detach falls back on
            # the job's default origin either way (two journal writes per job saved).
            return
        self._set(jid, proc.pid, proc.start_ticks, origin)
        self._append({"j": jid, "p": proc.pid, "s": proc.start_ticks, "o": origin})

    def get(self, proc: ProcessId) -> Optional[Dict[str, str]]:
        entry = self.by_proc.get((proc.pid, proc.start_ticks))
        return entry[1] if entry else None

    def get_pid(self, pid: int) -> Optional[Dict[str, str]]:
        for (p, _s), (_j, origin) in self.by_proc.items():
            if p == pid:
                return origin
        return None

    def job_default(self, jid: int) -> Optional[Dict[str, str]]:
        return self.first.get(jid)

    def job_ended(self, jid: int) -> None:
        self.first.pop(jid, None)
        if jid in self.by_job:
            self._forget_job(jid)
            self._append({"j": jid, "d": 1})

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
