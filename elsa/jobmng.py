"""``elsa-jobmng``: create, inspect and manage ELSA jobs through elsad's control socket.

Documented in docs/jobmng.md (commands, ``--json`` keys, exit codes); the
parser comes from :func:`build_parser` so man pages and shell completion are
generated from the same source.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from elsa import __version__
from elsa.client import Client, RequestFailed, default_socket
from elsa.core.model import CPU_LIMIT, MEMORY_LIMIT, format_jid, parse_jid
from elsa.errors import DaemonUnavailable, ElsaError
from elsa.protocol import parse_signal
from elsa.users import passwd_name

PROG = "elsa-jobmng"

# Exit codes (docs/jobmng.md). `run` exits with CMD's status once CMD runs.
EXIT_OK = 0
EXIT_ERROR = 1  # the daemon refused the request (bad request, backend refused, ...)
EXIT_USAGE = 2  # bad command line or unreadable config
EXIT_UNAVAILABLE = 3  # elsad is not running / cannot be reached
EXIT_DENIED = 4  # permission denied
EXIT_TIMEOUT = 5  # wait: the job was still running when --timeout passed
EXIT_NOT_FOUND = 6  # no such job / process, or the pid is in no job
# `run` before CMD starts, as env(1), nice(1) and timeout(1) do:
EXIT_RUN_FAILED = 125  # elsa-jobmng itself failed (daemon down, refused, ...)
EXIT_CANNOT_EXEC = 126  # CMD found but not executable
EXIT_NOT_EXEC_FOUND = 127  # CMD not found

EXIT_CODES_DOC = (
    "exit codes: 0 success; 1 request refused or failed; 2 usage or config error; "
    "3 elsad not running or unreachable; 4 permission denied; 5 wait timed out; "
    "6 no such job or process (or pid in no job). 'run' exits with CMD's status, or "
    "125 if it could not join the job, 126 if CMD is not executable, 127 if not found.")

_CODE_TO_EXIT = {
    "permission-denied": EXIT_DENIED,
    "no-such-job": EXIT_NOT_FOUND,
    "not-in-job": EXIT_NOT_FOUND,
    "no-such-process": EXIT_NOT_FOUND,
}


class UsageError(Exception):
    pass


# -- argument types ------------------------------------------------------------------------

def _jid_arg(text: str) -> int:
    try:
        return parse_jid(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pid_arg(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pid: {text!r}") from None
    if not 0 < pid < 2 ** 31:
        raise argparse.ArgumentTypeError(f"pid out of range: {text!r}")
    return pid


def _tag_arg(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"tag must be KEY=VALUE, got {text!r}")
    return key, value


def _cores_arg(text: str) -> str:
    """--cpu-limit: cores as a number (``2``, ``0.5``), sent as written."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of cores more than 0: {text!r} "
                                         "(e.g. 2 or 0.5)")
    return text.strip()


#: --mem-limit suffixes, 1024-based as sacct's sizes.
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size_arg(text: str) -> int:
    """--mem-limit: bytes, or a whole number with a K/M/G/T suffix (1024-based)."""
    t = text.strip().upper()
    t = t[:-2] if t.endswith("IB") else t[:-1] if t.endswith("B") else t  # 4GiB, 4GB, 512B
    unit = t[-1:] if t[-1:].isalpha() else ""
    number = t[:len(t) - len(unit)]
    if unit not in _SIZE_UNITS or not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or a number with "
                                         "K, M, G or T: 512M, 4G)")
    return int(number) * _SIZE_UNITS[unit]


def _timeout_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 1e7:
        raise argparse.ArgumentTypeError(f"timeout out of range (0 to 1e7 s): {text!r}")
    return value


def _io_timeout_arg(text: str) -> float:
    """The global --timeout: 0 would make the socket non-blocking, not patient."""
    value = _timeout_arg(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 s (wait --timeout 0 answers "
                                         "at once)")
    return value


def _signal_arg(text: str) -> int:
    try:
        return parse_signal(text)
    except ElsaError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


# -- parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full command line (also used to generate the man page and completion)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Create, inspect and manage ELSA jobs through elsad's control socket. "
                    "Job ids are shown in hex (0x…) and accepted in hex or decimal.",
        epilog=EXIT_CODES_DOC + " See docs/jobmng.md.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--socket", metavar="PATH",
                   help="elsad's control socket (default: 'socket' from the config, else "
                        "/run/elsa/elsad.sock)")
    p.add_argument("-c", "--config", metavar="PATH",
                   help="config file to take the socket from (default: $ELSA_CONFIG, else "
                        "/etc/elsa/elsa.toml if present)")
    p.add_argument("--timeout", type=_io_timeout_arg, default=30.0, metavar="S",
                   help="seconds to wait for elsad's answer (default 30; 'wait' has its own)")
    p.add_argument("--json", action="store_true", help="print data as JSON (stable keys)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name: str, help_text: str, json_out: bool = True,
            jid: bool = False) -> argparse.ArgumentParser:
        """A subcommand; *jid*: it takes a job id as its first positional."""
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if json_out:
            sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print the result as JSON")
        if jid:
            sp.add_argument("jid", type=_jid_arg, metavar="JID")
        return sp

    def job_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--name", default="", help="job name (up to 256 characters)")
        sp.add_argument("--tag", action="append", type=_tag_arg, default=[],
                        metavar="K=V", help="add a tag (repeatable)")
        sp.add_argument("--cpus", metavar="LIST",
                        help="CPUs for the job, e.g. 0-3,8 (cpuset backends; others refuse)")
        sp.add_argument("--mems", metavar="LIST",
                        help="memory nodes for the job, e.g. 0 (cpuset backends)")
        sp.add_argument("--cpu-limit", type=_cores_arg, metavar="CORES",
                        help="CPU time the job may use, in cores, e.g. 2 or 0.5 (cgroup2 "
                             "backend: cpu.max; others refuse)")
        sp.add_argument("--mem-limit", type=_size_arg, metavar="SIZE",
                        help="memory the job may use, e.g. 512M or 4G (cgroup2 backend: "
                             "memory.max; others refuse)")
        sp.add_argument("--wlm", default="none", metavar="auto|slurm|pbs|lsf|htcondor|none",
                        help="record the batch system's job id, array, user, account, queue "
                             "and job name (from the environment) as tags (default none)")

    sp = cmd("create", "create a job and print its id")
    job_options(sp)
    sp.add_argument("--owner", type=int, metavar="UID",
                    help="owner uid (root or the admin group only; default: you)")

    sp = cmd("run", "join a job, then exec CMD inside it (every descendant is born inside); "
                    "exits with CMD's status", json_out=False)
    job_options(sp)
    sp.add_argument("--job", type=_jid_arg, metavar="JID",
                    help="join this existing job instead of creating one")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                    help="the command to run")

    sp = cmd("attach", "attach running processes (and their future children) to a job", jid=True)
    sp.add_argument("pids", type=_pid_arg, nargs="+", metavar="PID")

    sp = cmd("detach", "take processes out of their job")
    sp.add_argument("pids", type=_pid_arg, nargs="+", metavar="PID")

    sp = cmd("jobof", "print the job of a process")
    sp.add_argument("pid", type=_pid_arg, metavar="PID")

    sp = cmd("list", "list running jobs")
    sp.add_argument("--all", action="store_true", help="include ended jobs")
    sp.add_argument("--user", metavar="USER", help="only jobs of this user (name or uid)")

    cmd("show", "show one job with its member pids", jid=True)

    cmd("pids", "print a job's member pids, one per line", jid=True)

    sp = cmd("wait", "wait until a job ends (exit 5 when --timeout passes first)", jid=True)
    sp.add_argument("--timeout", dest="wait_timeout", type=_timeout_arg, metavar="S",
                    help="give up after S seconds (default: wait forever)")

    sp = cmd("kill", "send a signal to every member of a job", jid=True)
    sp.add_argument("-s", "--signal", type=_signal_arg, default=15, metavar="SIG",
                    help="signal name or number (default TERM)")

    cmd("end", "end a job (members are detached, not killed)", jid=True)

    cmd("freeze", "freeze every member of a job (cgroup2 backend)", jid=True)
    cmd("thaw", "thaw a frozen job (cgroup2 backend)", jid=True)

    sp = cmd("tag", "set tags of a job, also after it ended (K= removes a tag); root/admin: any "
                    "job, others: their own", jid=True)
    sp.add_argument("tags", type=_tag_arg, nargs="+", metavar="K=V")

    cmd("status", "show elsad's version, backend and counters")
    return p


# -- output helpers --------------------------------------------------------------------------

def _jid_text(value: Union[str, int]) -> str:
    """A job id from a reply in the one spelling (docs/jobid.md)."""
    return format_jid(parse_jid(value))


def job_out(job: Dict[str, Any], with_pids: bool = True) -> Dict[str, Any]:
    """The CLI's JSON job object (docs/jobmng.md): ``jid`` is the hex string, because
    64-bit ids lose precision in tools that read JSON numbers as doubles (jq < 1.7)."""
    out: Dict[str, Any] = {
        "jid": _jid_text(job["jid"]), "name": job.get("name", ""),
        "owner_uid": job.get("owner_uid"), "owner": _user_name(job.get("owner_uid")),
        "state": job.get("state"), "created": job.get("created"), "ended": job.get("ended"),
        "tags": job.get("tags", {}), "backend": job.get("backend"),
        "params": job.get("params", {}),
    }
    if with_pids:
        out["pids"] = list(job.get("pids", []))
    elif "nprocs" in job:
        out["nprocs"] = job["nprocs"]
    return out


def _user_name(uid: Optional[int]) -> Optional[str]:
    return None if uid is None else passwd_name(uid)


def _uid_of(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"no such user: {user!r}") from None


def _when(ts: Optional[float]) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _clean(text: str) -> str:
    """Terminal-safe text (the daemon refuses control characters; be safe anyway)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _tags(tags: Dict[str, str]) -> str:
    return ",".join(f"{_clean(k)}={_clean(v)}" for k, v in sorted(tags.items())) or "-"


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# -- commands ----------------------------------------------------------------------------------

def _params(args: argparse.Namespace) -> Optional[Dict[str, str]]:
    params = {}
    if args.cpus is not None:
        params["cpus"] = args.cpus
    if args.mems is not None:
        params["mems"] = args.mems
    if args.cpu_limit is not None:
        params[CPU_LIMIT] = args.cpu_limit
    if args.mem_limit is not None:
        params[MEMORY_LIMIT] = str(args.mem_limit)
    return params or None


def _job_tags(args: argparse.Namespace) -> Tuple[str, Dict[str, str]]:
    """The job's name and tags: --tag over the batch system's (--wlm)."""
    from elsa import wlm

    tags = {**wlm.detect(os.environ, args.wlm), **dict(args.tag)}
    return args.name or tags.get("wlm_job_name", ""), tags


def do_create(c: Client, args: argparse.Namespace) -> int:
    name, tags = _job_tags(args)
    job = c.create(name=name, tags=tags, params=_params(args), owner_uid=args.owner)
    if args.json:
        _print_json(job_out(job))
    else:
        print(_jid_text(job["jid"]))
    return EXIT_OK


def do_attach(c: Client, args: argparse.Namespace) -> int:
    res = c.attach(args.jid, args.pids)
    if args.json:
        _print_json({"jid": _jid_text(res["jid"]), "attached": res["attached"]})
    else:
        for a in res["attached"]:
            print(f"attached {a['pid']} to {_jid_text(res['jid'])}")
    return EXIT_OK


def do_detach(c: Client, args: argparse.Namespace) -> int:
    res = c.detach(args.pids)
    items = [{"pid": d["pid"], "jid": _jid_text(d["jid"])} for d in res["detached"]]
    if args.json:
        _print_json({"detached": items})
    else:
        for d in items:
            print(f"detached {d['pid']} from {d['jid']}")
    return EXIT_OK


def do_jobof(c: Client, args: argparse.Namespace) -> int:
    jid = c.jobof(args.pid)
    if args.json:
        _print_json({"pid": args.pid, "jid": _jid_text(jid)})
    else:
        print(_jid_text(jid))
    return EXIT_OK


def do_list(c: Client, args: argparse.Namespace) -> int:
    owner = _uid_of(args.user) if args.user else None
    jobs = [job_out(j, with_pids=False) for j in c.list(all=args.all, owner_uid=owner)]
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    rows = [("JID", "STATE", "OWNER", "PROCS", "CREATED", "NAME", "TAGS")]
    for j in jobs:
        owner_txt = j["owner"] or str(j["owner_uid"])
        rows.append((j["jid"], j["state"], owner_txt, str(j.get("nprocs", "-")),
                     _when(j["created"]), _clean(j["name"]) or "-", _tags(j["tags"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)) + "  " + r[-1])
    return EXIT_OK


def _show_lines(job: Dict[str, Any]) -> List[str]:
    owner = job["owner"] or "?"
    params = ",".join(f"{k}={_clean(str(v))}" for k, v in sorted(job["params"].items()))
    return [
        f"job      {job['jid']}",
        f"name     {_clean(job['name']) or '-'}",
        f"state    {job['state']}",
        f"owner    {owner} ({job['owner_uid']})",
        f"created  {_when(job['created'])}",
        f"ended    {_when(job['ended'])}",
        f"backend  {job['backend']}",
        f"tags     {_tags(job['tags'])}",
        f"params   {params or '-'}",
        f"pids     {' '.join(map(str, job['pids'])) or '-'}",
    ]


def do_show(c: Client, args: argparse.Namespace) -> int:
    job = job_out(c.show(args.jid))
    if args.json:
        _print_json(job)
    else:
        print("\n".join(_show_lines(job)))
    return EXIT_OK


def do_pids(c: Client, args: argparse.Namespace) -> int:
    pids = c.pids(args.jid)
    if args.json:
        _print_json(pids)
    else:
        for pid in pids:
            print(pid)
    return EXIT_OK


def do_wait(c: Client, args: argparse.Namespace) -> int:
    res = c.wait(args.jid, timeout=args.wait_timeout)
    if args.json:
        _print_json({"ended": res["ended"], "job": job_out(res["job"])})
    elif res["ended"]:
        print(f"job {_jid_text(args.jid)} ended")
    else:
        print(f"job {_jid_text(args.jid)} still running after {args.wait_timeout:g} s",
              file=sys.stderr)
    return EXIT_OK if res["ended"] else EXIT_TIMEOUT


def do_kill(c: Client, args: argparse.Namespace) -> int:
    res = c.kill(args.jid, args.signal)
    if args.json:
        _print_json({"jid": _jid_text(res["jid"]), "signal": res["signal"],
                     "signalled": res["signalled"], "skipped": res.get("skipped", 0)})
    else:
        line = f"signal {res['signal']} sent to {res['signalled']} process(es) of " \
               f"{_jid_text(res['jid'])}"
        if res.get("skipped"):
            line += f"; {res['skipped']} member(s) of other users skipped"
        print(line)
    return EXIT_OK


def do_end(c: Client, args: argparse.Namespace) -> int:
    job = job_out(c.end(args.jid))
    if args.json:
        _print_json(job)
    else:
        print(f"job {job['jid']} ended")
    return EXIT_OK


def do_tag(c: Client, args: argparse.Namespace) -> int:
    job = job_out(c.tag(args.jid, dict(args.tags)))
    if args.json:
        _print_json(job)
    else:
        print(f"job {job['jid']} tags {_tags(job['tags'])}")
    return EXIT_OK


def do_freeze(c: Client, args: argparse.Namespace) -> int:
    res = c.freeze(args.jid) if args.command == "freeze" else c.thaw(args.jid)
    if args.json:
        _print_json({"jid": _jid_text(res["jid"]), "frozen": res["frozen"]})
    else:
        print(f"job {_jid_text(res['jid'])} {'frozen' if res['frozen'] else 'thawed'}")
    return EXIT_OK


def _or_dash(v: object) -> str:
    return "-" if v is None else str(v)


def do_status(c: Client, args: argparse.Namespace) -> int:
    st = c.status()
    if args.json:
        _print_json(st)
        return EXIT_OK
    lost = st.get("lost_events", {})
    control = st.get("control", {})
    lines = [
        f"elsad      {st.get('version')} (protocol {st.get('protocol')}), pid {st.get('pid')}, "
        f"up {st.get('uptime', 0):.0f} s",
        f"backend    {st.get('backend')}"
        + (f" ({st['backend_reason']})" if st.get("backend_reason") else ""),
        f"jobs       {st.get('jobs_running')} running, {st.get('members')} member processes",
        f"events     {st.get('events')} received, lost: "
        + ", ".join(f"{k} {v}" for k, v in sorted(lost.items())),
        f"resyncs    {st.get('resyncs')}",
    ]
    hold = st.get("hold") or {}
    if hold.get("max_hold"):
        lines.append(f"hold       {'on' if hold.get('active') else 'off'}, "
                     f"{hold.get('holds', 0)} bursts held {hold.get('held_seconds', 0)} s "
                     f"(at most {hold.get('max_hold')} s each)")
    if control:
        lines.append(f"control    {control.get('connections')} connections, "
                     f"{control.get('requests')} requests, {control.get('errors')} errors, "
                     f"{control.get('denied')} denied")
    srcs = {k: v for k, v in (st.get("sources") or {}).items()
            if k not in ("aggregator", "gaps")}
    lines.append("sources    " + (", ".join(
        f"{k} (failed: {v['error']})" if isinstance(v, dict) and v.get("error") else k
        for k, v in sorted(srcs.items())) or "none: no accounting source runs, jobs get no usage"))
    for gap in (st.get("sources") or {}).get("gaps", []):
        line = f"gap        {gap['why']}"
        # A source's loss while elsad runs lists no jobs (it flags them itself, `elsa job`).
        jobs = gap.get("jobs") or []
        if jobs:
            line += (f"; jobs flagged incomplete: {', '.join(jobs[:5])}"
                     + (f" (+{len(jobs) - 5} more)" if len(jobs) > 5 else ""))
        lines.append(line)
    # What needs the admin: a store that does not write (new jobs are refused) and
    # config keys a reload could not apply.
    store = st.get("store") or {}
    if store.get("ok") is False:
        lines.append(f"store      FAILING since {_when(store.get('failing_since'))}: "
                     f"{store.get('error')}; {store.get('pending_writes')} writes waiting, "
                     f"{store.get('dropped_records')} records dropped")
    restart = (st.get("config") or {}).get("restart_needed") or []
    if restart:
        lines.append(f"config     not applied until elsad restarts: {', '.join(restart)}")
    cost = st.get("cost") or {}
    if cost.get("seconds"):
        per = cost.get("cpu_us_per_process")
        lines.append(f"cost       {cost['cpu_user_s'] + cost['cpu_system_s']:.3f} s CPU in "
                     f"{cost['seconds']:.0f} s since ready ({cost['cpu_percent']:.2f} % of one "
                     "CPU)" + ("" if per is None else
                              f"; {per:.1f} µs per process started on this machine "
                              f"({cost['processes_started']:,})"))
    agg = (st.get("sources") or {}).get("aggregator") or {}
    if agg.get("folded"):  # [thresholds]: small records stored folded
        lines.append(f"folded     {agg['folded']} small process records ([thresholds])")
    central = st.get("central") or {}
    if central.get("enabled"):
        age = central.get("oldest_age_s")
        lines.append(f"central    {central.get('url')} as {central.get('host')}: "
                     f"{'FAILING' if central.get('failing') else 'ok'}, backlog "
                     f"{_or_dash(central.get('backlog_records'))} records, "
                     f"{_or_dash(central.get('backlog_jobs'))} jobs, "
                     f"{_or_dash(central.get('backlog_apps'))} application records, oldest "
                     f"{'-' if age is None else f'{age:.0f} s'}")
        if central.get("last_error"):
            # Kept after the shipper recovers: say so and when, or an old error reads as
            # the state of an "ok" line.
            lines.append("           last error"
                         + ("" if central.get("failing") else " (recovered)")
                         + f" at {_when(central.get('last_error_at'))}: "
                         + _clean(central["last_error"]))
    print("\n".join(lines))
    return EXIT_OK


def do_run(args: argparse.Namespace, socket_path: str) -> int:
    """Join the job first, then exec: every descendant of CMD is born inside the job."""
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("run needs a command: elsa-jobmng run [options] -- CMD [ARGS...]")
    if args.job is not None and _params(args):
        raise UsageError("run --job joins an existing job: --cpus, --mems, --cpu-limit and "
                         "--mem-limit apply only to a new job")
    me = os.getpid()
    try:
        with Client(socket_path, timeout=args.timeout) as c:
            if args.job is not None:
                c.attach(args.job, [me])
                jid = args.job
            else:
                name, tags = _job_tags(args)
                jid = c.create(name=name, tags=tags, params=_params(args),
                               pids=[me])["jid"]
    except (ElsaError, OSError) as exc:
        _error(f"run: could not join a job, {argv[0]} not started: {_message(exc)}")
        return EXIT_RUN_FAILED
    # The connection is closed (and close-on-exec anyway): CMD inherits nothing of ours.
    os.environ["ELSA_JID"] = _jid_text(jid)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        _error(f"run: {argv[0]}: command not found")
        return EXIT_NOT_EXEC_FOUND
    except OSError as exc:
        _error(f"run: cannot execute {argv[0]}: {exc.strerror or exc}")
        return EXIT_CANNOT_EXEC
    return EXIT_RUN_FAILED  # pragma: no cover - execvp does not return


COMMANDS: Dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "create": do_create, "attach": do_attach, "detach": do_detach, "jobof": do_jobof,
    "list": do_list, "show": do_show, "pids": do_pids, "wait": do_wait, "kill": do_kill,
    "end": do_end, "freeze": do_freeze, "thaw": do_freeze, "status": do_status,
    "tag": do_tag,
}


def _message(exc: BaseException) -> str:
    if isinstance(exc, RequestFailed):
        return str(exc)
    if isinstance(exc, ElsaError):
        return exc.message
    return str(exc)


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    try:
        socket_path = args.socket or default_socket(args.config)
    except ElsaError as exc:
        _error(exc.message)
        return EXIT_USAGE
    try:
        if args.command == "run":
            return do_run(args, socket_path)
        with Client(socket_path, timeout=args.timeout) as c:
            return COMMANDS[args.command](c, args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except DaemonUnavailable as exc:
        _error(exc.message)
        return EXIT_UNAVAILABLE
    except RequestFailed as exc:
        _error(str(exc))
        return _CODE_TO_EXIT.get(exc.code, EXIT_ERROR)
    except ElsaError as exc:
        _error(exc.message)
        return EXIT_ERROR
    except BrokenPipeError:  # `elsa-jobmng list | head`
        try:
            sys.stdout = open(os.devnull, "w")  # silence the final flush at exit
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
