"""The control protocol's operations (CSA jobd's request set, derived from ELSA's).

Each handler validates its request's fields (:mod:`elsa.protocol`), asks the
:class:`~elsa.core.authorization.Authorizer` whether the caller may, and acts
through the job manager's public methods. Handlers run on the event thread; an
answer that has to wait (``wait``) is returned as :class:`WaitFor` and the
server replies later. The operations are documented in docs/protocol.md.
"""

from __future__ import annotations

import signal as signal_mod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional

from elsa import __version__
from elsa.core.authorization import Authorizer, Caller
from elsa.core.backend import signal_each
from elsa.core.model import JOB_RUNNING, Job, format_jid
from elsa.errors import BackendError, ElsaError, ProtocolError
from elsa.protocol import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    NotInJob,
    UnknownOperation,
    get_int,
    get_jid,
    get_pids,
    get_signal,
    get_str,
    get_str_map,
    kind,
)

if TYPE_CHECKING:
    from elsa.core.manager import JobManager

#: Operations whose reply promises a change that must survive a crash: the
#: server sends their reply once the store has committed it.
DURABLE_OPS = frozenset({"create", "attach", "detach", "end", "tag"})


@dataclass(frozen=True)
class AfterCommit:
    """A handler's answer "reply with compute() once the store committed every
    write submitted so far": a read that must see earlier writes, without
    waiting for the store writer on the event thread."""

    compute: Callable[[], Any]


@dataclass(frozen=True)
class PollUntil:
    """A handler's answer "reply with poll()'s result once it has one (None: not
    yet), or with timeout()'s error after *timeout* s": something the kernel
    finishes asynchronously (a cgroup emptying after cgroup.kill, freezing)."""

    poll: Callable[[], Optional[Dict[str, Any]]]
    timeout: float
    on_timeout: Callable[[], ElsaError]


@dataclass(frozen=True)
class WaitFor:
    """A handler's answer "reply when job *jid* ends, or after *timeout* s"."""

    jid: int
    timeout: Optional[float]


@dataclass(frozen=True)
class InThread:
    """A handler's answer "reply with *fn()*, run off the event thread" (a
    report over the store can take seconds)."""

    fn: Callable[[], Any]


def job_json(job: Job, with_pids: bool = True) -> Dict[str, Any]:
    """The protocol's job object (Job.to_json: ``jid`` is the hex string)."""
    return job.to_json(with_pids)


Request = Dict[str, Any]


class Operations:
    """Dispatches a parsed request to its handler."""

    def __init__(self, manager: JobManager, authz: Authorizer, *, backend_name: str,
                 limits: Mapping[str, Any], status: Callable[[], Dict[str, Any]],
                 store_path: str = "", private_data: bool = True,
                 billing: Any = None) -> None:
        self.manager = manager
        self.authz = authz
        self.backend_name = backend_name
        self.limits = limits  # the server's (a reload updates it in place)
        self.status_fn = status
        self.store_path = store_path  # reports read it with their own connection
        self.private_data = private_data
        self.billing = billing  # the site's rate table, for 'bill' reports
        #: Reads the accounting sources' descriptors now (set by the daemon once
        #: they started; elsa.core.accounting.start_sources).
        self.read_sources: Callable[[], None] = lambda: None

    def dispatch(self, caller: Caller, req: Request) -> Any:
        op = req.get("op")
        if not isinstance(op, str):
            raise ProtocolError(f"'op' is required and must be a string, got {kind(op)}")
        handler = HANDLERS.get(op)
        if handler is None:
            raise UnknownOperation(f"unknown op {op[:64]!r}; known: {', '.join(OP_NAMES)}")
        return handler(self, caller, req)

    def job(self, jid: int) -> Job:
        return self.manager.job(jid)

    def wait_result(self, job: Job, ended: bool) -> Dict[str, Any]:
        """The answer to a ``wait`` on *job*."""
        return {"ended": ended, "job": job_json(job)}

    # -- operations -------------------------------------------------------------------
    def op_hello(self, caller: Caller, req: Request) -> Dict[str, Any]:
        c = caller
        return {"protocol": PROTOCOL_VERSION, "versions": list(SUPPORTED_VERSIONS),
                "daemon": __version__, "backend": self.backend_name, "ops": list(OP_NAMES),
                "caller": {"pid": c.pid, "uid": c.uid, "gid": c.gid, "admin": c.admin},
                "limits": dict(self.limits)}

    def op_create(self, caller: Caller, req: Request) -> Dict[str, Any]:
        authz = self.authz
        owner = get_int(req, "owner_uid", required=False, maximum=2 ** 32 - 2)
        if owner is None:
            owner = caller.uid
        elif owner != caller.uid and not caller.admin:
            raise authz.deny("only root or the admin group may create jobs for another user")
        cap = int(self.limits.get("max_jobs_per_user", 0) or 0)
        if cap and not caller.admin and self.manager.running_count(owner) >= cap:
            raise authz.deny(f"uid {owner} already has {cap} running jobs "
                             "(limits.max_jobs_per_user); end some ('elsa-jobmng list') or "
                             "ask an administrator to raise the limit")
        name = get_str(req, "name")
        tags = get_str_map(req, "tags")
        params = get_str_map(req, "params", max_entries=16)
        pids = get_pids(req) if req.get("pids") is not None else []
        # Check every pid before the job exists: a refused create leaves nothing behind.
        infos = []
        for pid in pids:
            infos.append(authz.check_pid(caller, pid))
            authz.check_may_join(pid, infos[-1])
            authz.check_current_job(caller, pid)
        # A non-admin's process keeps the limits of its cgroup: the job is
        # created below that cgroup when the usual place would lift them.
        nest = (self.manager.backend.nest_parent(pids[0])
                if pids and not caller.admin else None)
        # Not durable here: the server holds the reply until the store commits
        # (DURABLE_OPS), without blocking the event loop.
        job = self.manager.create(name=name, owner_uid=owner, tags=tags, params=params,
                                  durable=False, nest_under=nest)
        try:
            for pid in pids:
                self._check_limits_kept(caller, job, pid)
            for pid, info in zip(pids, infos):
                self.manager.attach(job.jid, pid, durable=False, info=info)
        except ElsaError:
            # A pid exited between the check and the attach: do not leave an empty job.
            self.manager.end(job.jid, reason="create failed")
            raise
        if not pids:
            return job_json(job)  # as created: no second snapshot
        out = job_json(self.manager.job(job.jid, with_pids=False), with_pids=False)
        out["pids"] = self.manager.member_pids(job.jid, among=pids)
        return out

    def op_attach(self, caller: Caller, req: Request) -> Dict[str, Any]:
        authz = self.authz
        jid = get_jid(req)
        pids = get_pids(req)
        job = self.manager.job(jid, with_pids=False)
        authz.check_job(caller, job)
        if job.state != JOB_RUNNING:
            done = self._attached_before_end(caller, jid, pids)
            if done is not None:
                return done
            self.manager.member_pids(jid)  # raises bad-job-state with the usual message
        infos = []
        for pid in pids:
            infos.append(authz.check_pid(caller, pid))
            authz.check_may_join(pid, infos[-1])
            authz.check_current_job(caller, pid)
            self._check_limits_kept(caller, job, pid)
        attached = []
        for pid, info in zip(pids, infos):
            ident = self.manager.attach(jid, pid, durable=False, info=info)
            attached.append({"pid": ident.pid, "start_ticks": ident.start_ticks})
        return {"jid": format_jid(jid), "attached": attached}

    def _attached_before_end(self, caller: Caller, jid: int, pids: List[int]
                             ) -> Optional[Dict[str, Any]]:
        """The answer to an attach to ended job *jid* when each of *pids* has
        exited (a zombie its launcher has not reaped) and its accounting
        already resolves to *jid*, else None. A process born inside the job's
        cgroup (clone3 CLONE_INTO_CGROUP) joins before its attach when a resync
        reads the cgroup first; if it exits then, the job ends before the
        attach arrives, which asks for what already happened."""
        attached = []
        for pid in pids:
            try:
                info = self.authz.check_pid(caller, pid) or self.manager.procfs.info(pid)
            except ElsaError:
                return None
            if not info.exited or self.manager.resolve(pid, info.start_ticks) != jid:
                return None
            attached.append({"pid": pid, "start_ticks": info.start_ticks})
        return {"jid": format_jid(jid), "attached": attached}

    def _check_limits_kept(self, caller: Caller, job: Job, pid: int) -> None:
        """A non-admin may not move a process out of the limits that confine it
        (a Slurm step's memory.max, a systemd slice's TasksMax)."""
        if caller.admin:
            return
        left = self.manager.backend.limits_left(job, pid)
        if left:
            raise self.authz.deny(
                f"process {pid} would leave the limits that confine it ({'; '.join(left[:3])})"
                f" by joining job {format_jid(job.jid)}, whose cgroup is elsewhere; start the "
                "job from that process instead ('elsa-jobmng run' or 'create --pid' nests the "
                "job's cgroup below its own), or ask root or the admin group")

    def op_detach(self, caller: Caller, req: Request) -> Dict[str, Any]:
        pids = get_pids(req)
        plan = []
        for pid in pids:
            jid = self.manager.job_of(pid)
            if jid is None:
                raise NotInJob(f"pid {pid} is not in any job")
            self.authz.check_job(caller, self.manager.job(jid, with_pids=False))
            self.authz.check_pid(caller, pid)
            plan.append((pid, jid))
        for pid, _jid_of_pid in plan:
            self.manager.detach(pid)
        return {"detached": [{"pid": p, "jid": format_jid(j)} for p, j in plan]}

    def op_jobof(self, caller: Caller, req: Request) -> Dict[str, Any]:
        pid = get_int(req, "pid", minimum=1, maximum=2 ** 31 - 1)
        assert pid is not None
        jid = self.manager.job_of(pid)
        if jid is None:
            raise NotInJob(f"pid {pid} is not in any job")
        return {"pid": pid, "jid": format_jid(jid)}

    def op_list(self, caller: Caller, req: Request) -> Any:
        include_ended = req.get("all", False)
        if not isinstance(include_ended, bool):
            raise ProtocolError(f"'all' must be a boolean, got {kind(include_ended)}")
        owner = get_int(req, "owner_uid", required=False, maximum=2 ** 32 - 2)
        limit = get_int(req, "limit", required=False, minimum=1, maximum=10000) or 10000
        if include_ended:
            # The stored jobs once the store committed what is queued: the
            # event thread does not wait for the writer.
            return AfterCommit(lambda: self._list(include_ended, owner, limit))
        return self._list(include_ended, owner, limit)

    def _list(self, include_ended: bool, owner: Optional[int], limit: int
              ) -> List[Dict[str, Any]]:
        out = []
        for job, nprocs in self.manager.running_with_counts():
            item = job_json(job, with_pids=False)
            item["nprocs"] = nprocs
            out.append(item)
        if include_ended:
            running = {j["jid"] for j in out}
            for job in self.manager.stored_jobs(limit, committed=True):
                if format_jid(job.jid) not in running:
                    item = job_json(job, with_pids=False)
                    item["nprocs"] = 0
                    out.append(item)
        if owner is not None:
            out = [j for j in out if j["owner_uid"] == owner]
        out.sort(key=lambda j: j["jid"])
        return out[-limit:]

    def op_show(self, caller: Caller, req: Request) -> Any:
        jid = get_jid(req)
        if self.manager.is_running(jid):
            return job_json(self.manager.job(jid))
        return AfterCommit(lambda: job_json(self.manager.job(jid, committed=True)))

    def op_pids(self, caller: Caller, req: Request) -> Dict[str, Any]:
        jid = get_jid(req)
        job = self.manager.job(jid, with_pids=False)
        pids = self.manager.member_pids(jid) if job.state == JOB_RUNNING else []
        return {"jid": format_jid(jid), "state": job.state, "pids": pids}

    def op_wait(self, caller: Caller, req: Request) -> Any:
        jid = get_jid(req)
        timeout = req.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout <= 10 ** 7):
            raise ProtocolError("'timeout' must be a number of seconds (0 to 1e7) or null")
        job = self.manager.job(jid)
        if job.state != JOB_RUNNING:
            # The end may not be committed yet, nor the last members' records read
            # (queued before the end, read in batches): a script that waits, then
            # reports from the store, finds the job ended and whole
            # (ControlServer._answer_wait and the accounting's job_ending too).
            self.read_sources()
            return AfterCommit(lambda: self.wait_result(job, True))
        if timeout == 0:
            return self.wait_result(job, False)
        return WaitFor(jid, timeout)

    def op_kill(self, caller: Caller, req: Request) -> Any:
        jid = get_jid(req)
        sig = get_signal(req)
        job = self.manager.job(jid, with_pids=False)
        self.authz.check_job(caller, job)
        members = self.manager.member_pids(jid)
        allowed = [p for p in members if self.authz.may_signal(caller, p)]
        if len(allowed) == len(members):
            # The backend signals the whole job (cgroup2: freeze-signal-thaw or
            # cgroup.kill, which also reaches children forked meanwhile).
            sent = self.manager.signal(jid, sig)
        else:
            # Some members changed uid (su, sudo): a backend signals the whole
            # cgroup, so signal the allowed ones one by one instead.
            sent = signal_each(allowed, sig)
        result = {"jid": format_jid(jid), "signal": sig, "signalled": sent,
                  "skipped": len(members) - len(allowed)}
        if sig != signal_mod.SIGKILL or len(allowed) != len(members):
            return result
        # The reply says the job's processes are gone: the backend reports when
        # (cgroup2: cgroup.events "populated 0"), polled off the request path.
        limit = self.manager.settle_timeout()
        return PollUntil(
            poll=lambda: result if self.manager.settled(jid, "killed") else None,
            timeout=limit,
            on_timeout=lambda: BackendError(
                f"job {format_jid(jid)}: processes still in the job {limit:g} s after "
                "SIGKILL; they are probably in uninterruptible sleep (D state); retry the "
                "kill later"))

    def op_end(self, caller: Caller, req: Request) -> Dict[str, Any]:
        jid = get_jid(req)
        self.authz.check_job(caller, self.manager.job(jid, with_pids=False))
        return job_json(self.manager.end(jid))

    def op_freeze(self, caller: Caller, req: Request) -> Dict[str, Any]:
        return self._freeze(caller, req, True)

    def op_thaw(self, caller: Caller, req: Request) -> Dict[str, Any]:
        return self._freeze(caller, req, False)

    def _freeze(self, caller: Caller, req: Request, freeze: bool) -> Any:
        jid = get_jid(req)
        self.authz.check_job(caller, self.manager.job(jid, with_pids=False))
        # The rule of kill: a freezer stops every member, so every member must
        # be one the caller may signal (members of other users, e.g. root's
        # process attached by root, are not theirs to stop).
        others = [p for p in self.manager.member_pids(jid)
                  if not self.authz.may_signal(caller, p)]
        if others:
            raise self.authz.deny(
                f"job {format_jid(jid)} has members uid {caller.uid} may not signal "
                f"(pids {', '.join(map(str, others[:5]))}); only root or the admin group "
                f"may {'freeze' if freeze else 'thaw'} it")
        self.manager.set_frozen(jid, freeze)
        result = {"jid": format_jid(jid), "frozen": freeze}
        if not freeze:
            return result
        limit = self.manager.settle_timeout()
        return PollUntil(
            poll=lambda: result if self.manager.settled(jid, "frozen") else None,
            timeout=limit,
            on_timeout=lambda: BackendError(f"job {format_jid(jid)} did not report frozen "
                                            f"within {limit:g} s"))

    def op_tag(self, caller: Caller, req: Request) -> Dict[str, Any]:
        jid = get_jid(req)
        tags = get_str_map(req, "tags")
        if not tags:
            raise ProtocolError("'tags' must name at least one tag to set (or, with an "
                                "empty value, to remove)")
        self.authz.check_job(caller, self.manager.job(jid, with_pids=False))
        return job_json(self.manager.set_tags(jid, tags, durable=False))

    def op_ja(self, caller: Caller, req: Request) -> Dict[str, Any]:
        """The caller's own job, found from its pid (peer credentials): a process
        may always see the job it runs in, whoever owns it."""
        jid = self.manager.job_of(caller.pid)
        if jid is None:
            raise NotInJob(f"pid {caller.pid} (the caller) is not in any job")
        reply = {"pid": caller.pid, "job": job_json(self.manager.job(jid))}
        # 'ja' reads the finished processes from the store: the one that exited a
        # moment ago (the script's previous command) must be in. Its record is
        # queued already; read it now and reply once it is committed.
        self.read_sources()
        return AfterCommit(lambda: reply)

    def op_report(self, caller: Caller, req: Request) -> InThread:
        """``elsa`` reports for a user who cannot read the store file
        (elsa/report/remote.py applies the private_data policy)."""
        from elsa.report import remote

        report = get_str(req, "report")
        args = req.get("args") or {}
        if not isinstance(args, dict):
            raise ProtocolError("'args' must be an object")
        path, private, billing = self.store_path, self.private_data, self.billing
        return InThread(lambda: remote.serve(path, report, args, caller.uid, caller.admin,
                                             private, billing))

    def op_status(self, caller: Caller, req: Request) -> Dict[str, Any]:
        out = self.status_fn()
        out["version"] = __version__
        out["protocol"] = PROTOCOL_VERSION
        return out


HANDLERS: Dict[str, Callable[[Operations, Caller, Request], Any]] = {
    "hello": Operations.op_hello, "create": Operations.op_create,
    "attach": Operations.op_attach, "detach": Operations.op_detach,
    "jobof": Operations.op_jobof, "list": Operations.op_list, "show": Operations.op_show,
    "pids": Operations.op_pids, "wait": Operations.op_wait, "kill": Operations.op_kill,
    "end": Operations.op_end, "status": Operations.op_status,
    "freeze": Operations.op_freeze, "thaw": Operations.op_thaw,
    "tag": Operations.op_tag, "ja": Operations.op_ja,
    "report": Operations.op_report,
}
#: The operation names, sorted (``hello`` lists them; docs/protocol.md documents each).
OP_NAMES = tuple(sorted(HANDLERS))
