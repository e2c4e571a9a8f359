"""sacct- and seff-style views: ``elsa jobs --format ...`` and ``elsa eff JID``.

Columns and time formats follow Slurm's sacct so that its users read them
without surprise: durations ``[D-]HH:MM:SS`` (CPU times ``MM:SS.mmm`` under an
hour), times ``YYYY-MM-DDTHH:MM:SS`` (local), sizes with a K/M/G suffix
(1024-based), exit as ``code:signal``. Unknown is ``-`` in text, null in JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from elsa.errors import ElsaError


def fmt_duration(seconds: Optional[float], millis: bool = False) -> str:
    """sacct's ``[DD-[HH:]]MM:SS``: ``00:05:12``, ``1-02:03:04``; CPU: ``01:02.345``."""
    if seconds is None:
        return "-"
    if seconds < 0:
        seconds = 0
    # Whole milliseconds, truncated as sacct does (rounding made 59.9996 s
    # '00:60.000'); from microseconds first: 1.156 s is 1155.99... ms in binary.
    ms = round(seconds * 1e6) // 1000
    if millis and ms < 3_600_000:
        m, ms = divmod(ms, 60_000)
        return f"{m:02d}:{ms // 1000:02d}.{ms % 1000:03d}"
    total = int(seconds)
    d, rest = divmod(total, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    hms = f"{h:02d}:{m:02d}:{s:02d}"
    return f"{d}-{hms}" if d else hms


def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "Unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def fmt_size(n: Optional[float]) -> str:
    """Bytes as sacct prints sizes: ``512``, ``1.50K``, ``12.25M``."""
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{int(n)}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def exit_text(code: Optional[int], signal: Optional[int]) -> str:
    from elsa.core.model import format_exit

    return format_exit(code, signal)


#: The exit status of each job's first member (the batch script, the command of
#: `elsa-jobmng run`): what sacct shows as the job's ExitCode.
ROOT_EXIT_SQL = ("SELECT m.jid, m.exit_code FROM members AS m WHERE m.jid = ? AND m.joined = "
                 "(SELECT MIN(f.joined) FROM members AS f WHERE f.jid = m.jid)")


def add_root_exits(db: Any, rows: List[Dict[str, Any]]) -> None:
    """Set ``exit_code``/``exit_signal`` of ended jobs from their first member's exit.
    The central store has no membership history (nodes do not ship it): unknown there."""
    from elsa.core.model import parse_jid, split_exit

    central = getattr(db, "central", False)
    for r in rows:
        if r.get("state") == "running" or "exit_code" in r:
            continue
        if central:
            r["exit_code"], r["exit_signal"] = None, None
            continue
        got = db.execute(ROOT_EXIT_SQL, (parse_jid(r["jid"]),)).fetchone()
        r["exit_code"], r["exit_signal"] = split_exit(got[1] if got else None)


def job_exit(job: Dict[str, Any]) -> Tuple[Optional[int], Optional[int]]:
    """(exit code, signal) of a job row (:func:`add_root_exits`); unknown: (None, None)."""
    return job.get("exit_code"), job.get("exit_signal")


def job_state(job: Dict[str, Any]) -> str:
    if job.get("state") == "running":
        return "RUNNING"
    code, sig = job_exit(job)
    if code is None and sig is None:
        return "ENDED"
    if sig:
        return "CANCELLED" if sig in (2, 15) else "FAILED"
    return "COMPLETED" if code == 0 else "FAILED"


def _cpu_s(u: Dict[str, Any]) -> Optional[float]:
    if u.get("cpu_user_us") is None and u.get("cpu_system_us") is None:
        return None
    return ((u.get("cpu_user_us") or 0) + (u.get("cpu_system_us") or 0)) / 1e6


def _in_job_cpu_s(u: Dict[str, Any]) -> Optional[float]:
    """The CPU the job used in its own time, from its creation: what efficiency divides
    by the wall time. The job's CPU figure is its process records' when they read above
    the job's counter (``usage.note``: a record holds the CPU a member used before it
    joined, elsa-jobmng's start-up for the root); then it is the counter's (a
    job-level source: no process count), complete for the job."""
    if not u.get("note"):
        return _cpu_s(u)
    bad = u.get("incomplete") or {}
    counters = [_cpu_s(v) for s, v in (u.get("sources") or {}).items()
                if not v.get("processes") and s not in bad]
    counters = [c for c in counters if c is not None]
    return max(counters) if counters else _cpu_s(u)


def _wall(job: Dict[str, Any], now: float) -> Optional[float]:
    if job.get("created") is None:
        return None
    end = job.get("ended") if job.get("ended") is not None else now
    return max(0.0, end - job["created"])


def _us(key: str) -> Callable[[Dict[str, Any], float], Any]:
    return lambda j, now: (None if j["usage"].get(key) is None
                           else j["usage"][key] / 1e6)


def _jid(j: Dict[str, Any]) -> str:
    from elsa.core.model import format_jid

    return j["jid"] if isinstance(j["jid"], str) else format_jid(j["jid"])


def _cores(j: Dict[str, Any]) -> Optional[float]:
    from elsa.core.model import cores_allowed

    c = cores_allowed(j.get("params") or {})
    return None if c is None else float(c)


# name -> (description, raw value getter, text formatter)
Field = Tuple[str, Callable[[Dict[str, Any], float], Any], Callable[[Any], str]]
FIELDS: Dict[str, Field] = {
    "jid": ("job id (hex)", lambda j, now: _jid(j), str),
    "name": ("job name", lambda j, now: j.get("name"), lambda v: v or "-"),
    "user": ("owner", lambda j, now: j.get("owner"), lambda v: v or "-"),
    "uid": ("owner uid", lambda j, now: j.get("owner_uid"), lambda v: "-" if v is None else str(v)),
    "account": ("the job's 'account' tag", lambda j, now: (j.get("tags") or {}).get("account"),
                lambda v: v or "-"),
    "partition": ("the job's 'partition' (or 'queue') tag",
                  lambda j, now: (j.get("tags") or {}).get("partition")
                  or (j.get("tags") or {}).get("queue"), lambda v: v or "-"),
    "wlm_job_id": ("batch system job id tag", lambda j, now: (j.get("tags") or {}).get(
        "wlm_job_id"), lambda v: v or "-"),
    "start": ("start time", lambda j, now: j.get("created"), fmt_time),
    "end": ("end time (Unknown while running)", lambda j, now: j.get("ended"), fmt_time),
    "elapsed": ("wall time, end - start (so far while running)", _wall, fmt_duration),
    "cpu": ("total CPU time, user + system (sacct TotalCPU)",
            lambda j, now: _cpu_s(j["usage"]), lambda v: fmt_duration(v, True)),
    "usercpu": ("user CPU time", _us("cpu_user_us"), lambda v: fmt_duration(v, True)),
    "systemcpu": ("system CPU time", _us("cpu_system_us"), lambda v: fmt_duration(v, True)),
    "ncpus": ("cores allowed (cpuset / cpu.max)", lambda j, now: _cores(j),
              lambda v: "-" if v is None else f"{v:g}"),
    "maxrss": ("peak resident memory (bytes)", lambda j, now: None if j["usage"].get(
        "max_rss_kb") is None else j["usage"]["max_rss_kb"] * 1024, fmt_size),
    "read": ("bytes read from storage", lambda j, now: j["usage"].get("read_bytes"), fmt_size),
    "write": ("bytes written to storage", lambda j, now: j["usage"].get("write_bytes"),
              fmt_size),
    "procs": ("processes", lambda j, now: j["usage"].get("processes"),
              lambda v: "-" if v is None else str(v)),
    "state": ("RUNNING, COMPLETED, FAILED, CANCELLED, or ENDED (exit unknown)",
              lambda j, now: job_state(j), str),
    "exit": ("exit as code:signal", lambda j, now: exit_text(*job_exit(j)), str),
    "backend": ("grouping backend", lambda j, now: j.get("backend"), lambda v: v or "-"),
}
DEFAULT_FORMAT = "jid,name,user,account,start,end,elapsed,cpu,maxrss,read,write,state,exit"


def parse_format(text: str) -> List[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in FIELDS]
    if bad or not names:
        raise ElsaError(f"--format: unknown field(s) {', '.join(bad) or '(none)'}; "
                        f"'elsa jobs --format help' lists them: {', '.join(FIELDS)}")
    return names


def format_help(out) -> None:
    width = max(map(len, FIELDS))
    for name, (doc, _, _) in FIELDS.items():
        out.write(f"{name.ljust(width)}  {doc}\n")
    out.write(f"\ndefault: {DEFAULT_FORMAT}\n")


def print_jobs(args: argparse.Namespace, rows: List[Dict[str, Any]], out) -> bool:
    """``elsa jobs`` with --format/--parsable2/--noheader; False when none was given."""
    if not (args.format or args.parsable2 or args.noheader):
        return False
    names = parse_format(args.format or DEFAULT_FORMAT)
    now = time.time()
    raw = [[FIELDS[n][1](r, now) for n in names] for r in rows]
    if args.json:
        json.dump([dict(zip(names, v)) for v in raw], out)
        out.write("\n")
        return True
    if args.csv:
        w = csv.writer(out)
        if not args.noheader:
            w.writerow(names)
        w.writerows([["" if v is None else v for v in r] for r in raw])
        return True
    from elsa.report.text import printable

    text = [[printable(FIELDS[n][2](v)) for n, v in zip(names, r)] for r in raw]
    header = [n.upper() for n in names]
    if args.parsable2:
        if not args.noheader:
            out.write("|".join(header) + "\n")
        for r in text:
            out.write("|".join(r) + "\n")
        return True
    if args.noheader:
        widths = [max((len(r[i]) for r in text), default=0) for i in range(len(names))]
        for r in text:
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
        return True
    from elsa.report.text import table

    table(text, header, out)
    return True


def with_tags(rows: List[Dict[str, Any]], tags: Optional[List[Tuple[str, str]]]
              ) -> List[Dict[str, Any]]:
    """The jobs having every tag K=V given (``--tag``)."""
    if not tags:
        return rows
    return [r for r in rows if all((r.get("tags") or {}).get(k) == v for k, v in tags)]


def _tag_arg(text: str) -> Tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"--tag {text!r}: expected KEY=VALUE")
    return k, v


def add_jobs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tag", action="append", type=_tag_arg, metavar="KEY=VALUE",
                   help="only jobs with this tag, e.g. account=chem or wlm_job_id=4242 "
                        "(repeatable)")
    p.add_argument("--format", metavar="FIELD,...",
                   help="columns, in order (sacct-style); 'help' lists them")
    p.add_argument("--parsable2", "-P", action="store_true",
                   help="'|'-separated lines, no trailing '|' (like sacct -P)")
    p.add_argument("--noheader", "-n", action="store_true", help="no header line")


# -- eff -------------------------------------------------------------------------------------

def efficiency(job: Dict[str, Any], now: Optional[float] = None) -> Dict[str, Any]:
    """seff's figures for one job (a row of :func:`elsa.report.query.jobs`)."""
    from elsa.core.model import JobLimits

    now = time.time() if now is None else now
    u = job["usage"]
    wall = _wall(job, now)
    cpu = _cpu_s(u)
    cores = _cores(job)
    limit = JobLimits.from_params(job.get("params") or {}).memory
    out: Dict[str, Any] = {
        "jid": _jid(job), "name": job.get("name"), "user": job.get("owner"),
        "state": job_state(job), "exit": exit_text(*job_exit(job)),
        "start": job.get("created"), "end": job.get("ended"), "wall_s": wall,
        "cpu_s": cpu, "cpu_user_s": _us("cpu_user_us")(job, now),
        "cpu_system_s": _us("cpu_system_us")(job, now), "cores": cores,
        "cpu_efficiency": None, "cpu_efficiency_why": None,
        "max_rss_kb": u.get("max_rss_kb"),
        "memory_limit_kb": None if limit is None else limit // 1024,
        "memory_efficiency": None, "memory_efficiency_why": None,
    }
    if cpu is None:
        out["cpu_efficiency_why"] = "no accounting source measured this job's CPU time"
    elif cores is None:
        out["cpu_efficiency_why"] = ("the job has no core limit (no cpuset, no cpu.max): "
                                     "the cores it was allowed are not known")
    elif not wall:
        out["cpu_efficiency_why"] = "the job's wall time is 0"
    else:
        out["cpu_efficiency"] = _in_job_cpu_s(u) / (wall * cores)
    if u.get("max_rss_kb") is None:
        out["memory_efficiency_why"] = "no accounting source measured this job's peak memory"
    elif limit is None:
        out["memory_efficiency_why"] = "the job has no memory limit"
    else:
        out["memory_efficiency"] = u["max_rss_kb"] * 1024 / limit
    return out


def print_eff(e: Dict[str, Any], out) -> None:
    def pct(v: Optional[float]) -> str:
        return f"{v * 100:.2f}%"

    from elsa.report.text import printable

    out.write(f"Job ID: {e['jid']}\nName: {printable(e['name'] or '-')}\nUser: {e['user'] or '-'}\n"
              f"State: {e['state']} (exit code {e['exit']})\n")
    out.write(f"Cores: {'-' if e['cores'] is None else format(e['cores'], 'g')}\n")
    out.write(f"CPU Utilized: {fmt_duration(e['cpu_s'])}\n")
    if e["cpu_efficiency"] is not None:
        out.write(f"CPU Efficiency: {pct(e['cpu_efficiency'])} of "
                  f"{fmt_duration(e['wall_s'] * e['cores'])} core-walltime\n")
    else:
        out.write(f"CPU Efficiency: unknown ({e['cpu_efficiency_why']})\n")
    out.write(f"Job Wall-clock time: {fmt_duration(e['wall_s'])}"
              + (" (running)" if e["state"] == "RUNNING" else "") + "\n")
    rss = e["max_rss_kb"]
    out.write(f"Memory Utilized: {'-' if rss is None else fmt_size(rss * 1024)} (peak RSS)\n")
    if e["memory_efficiency"] is not None:
        out.write(f"Memory Efficiency: {pct(e['memory_efficiency'])} of "
                  f"{fmt_size(e['memory_limit_kb'] * 1024)}\n")
    else:
        out.write(f"Memory Efficiency: unknown ({e['memory_efficiency_why']})\n")


def cmd_eff(args: argparse.Namespace, out) -> int:
    from elsa.core.model import format_jid, parse_jid
    from elsa.report import query

    if args.csv:
        raise ElsaError("elsa eff prints a text report or --json, not --csv")

    try:
        jid = parse_jid(args.jid)
    except ValueError as exc:
        raise ElsaError(str(exc)) from None
    from elsa.report.cli import _report

    def local(db: Any) -> Any:
        detail = query.job_detail(db, jid)
        if detail is not None:
            add_root_exits(db, [detail])
        return detail

    detail = _report(args, "eff", {"jid": format_jid(jid)}, local)
    if detail is None or "created" not in detail:
        raise ElsaError(f"no job {format_jid(jid)} in the store; list jobs with 'elsa jobs'")
    e = efficiency(detail)
    if args.json:
        json.dump(e, out)
        out.write("\n")
    else:
        print_eff(e, out)
    return 0


def add_eff_parser(sub: Any, parents: List[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("eff", parents=parents,
                       help="CPU and memory efficiency of one job (like Slurm's seff)")
    s.add_argument("jid", help="job id (0x... or decimal)")
    s.set_defaults(func=cmd_eff)
