"""``elsa ja``: the report of the job the caller runs in, while it runs (CSA's ja).

elsad finds the job from the caller's own pid (its socket peer credentials,
op ``ja``) and lists the members. Running processes count with their live
figures: the job's cgroup counters where the job has a cgroup (the kernel's
totals for the whole job, finished processes included), else ``/proc`` per
member; finished processes count with their stored records, where the store is
readable by the caller. What cannot be known is said, not guessed.

    elsa ja [-s] [-c] [-f] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from elsa.errors import ElsaError
from elsa.kernel.cgroupstats import read_stats
from elsa.kernel.procfs import ProcFS


def live_process(pid: int, proc: str = "/proc") -> Optional[Dict[str, Any]]:
    """A running process's figures from /proc (None when it is gone)."""
    u = ProcFS(proc).live_usage(pid)
    if u is None:
        return None
    return {"pid": u.pid, "ppid": u.ppid, "comm": u.comm, "running": True,
            "cpu_user_us": u.cpu_user_us, "cpu_system_us": u.cpu_system_us,
            "max_rss_kb": u.max_rss_kb, "read_bytes": u.read_bytes,
            "write_bytes": u.write_bytes}


def cgroup_counters(path: str) -> Optional[Dict[str, Any]]:
    """The job cgroup's cumulative figures (cgroup v2 cpu.stat, memory.peak, io.stat);
    None when they cannot be read."""
    try:
        st = read_stats(path, ("cpu.stat", "memory.peak", "io.stat"))
    except ElsaError:
        return None
    if "cpu.stat" in st.missing:
        return None
    return {"cpu_user_us": st.cpu_user_us, "cpu_system_us": st.cpu_system_us,
            "max_rss_kb": None if st.memory_peak is None else st.memory_peak // 1024,
            "read_bytes": st.io_total("rbytes"), "write_bytes": st.io_total("wbytes")}


def _add(a: Optional[int], b: Optional[int]) -> Optional[int]:
    if a is None:
        return b
    return a if b is None else a + b


def _max(a: Optional[int], b: Optional[int]) -> Optional[int]:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _none_stored(why: Optional[str]) -> Dict[str, Any]:
    """_finished's answer when the store gave nothing, and *why* (None: no record yet)."""
    return {"processes": [], "folded": [], "usage": None, "incomplete": {}, "why": why}


def _finished(jid: int, db_path: Optional[str], processes: bool,
              socket_path: Optional[str] = None) -> Dict[str, Any]:
    """The job's stored totals (and records, when *processes*), or why there are none.

    A user who cannot read the store (it is private: docs/security.md) gets the
    job's report from elsad (the ``report`` operation, as ``elsa job``), when
    *socket_path* is given."""
    from elsa.core.model import format_jid
    from elsa.report import query, remote

    if db_path is None:
        return _none_stored("no store configured")

    def local(db: Any) -> Optional[Dict[str, Any]]:
        if not processes:  # the summary needs the totals only, whatever the job's size
            usage = query.job_usage(db, [jid]).get(jid)
            return {"processes": None, "folded": [], "usage": usage and dict(
                usage["usage"], incomplete=usage["incomplete"])}
        return query.job_detail(db, jid)

    try:
        detail = remote.run(db_path, socket_path, "job", {"jid": format_jid(jid)}, local)
    except ElsaError as exc:
        return _none_stored(exc.message)
    if detail is None:
        return _none_stored(None)
    return {"processes": detail["processes"], "folded": detail.get("folded") or [],
            "usage": detail["usage"], "why": None,
            # The sources that missed records of the job (a downtime, an overflow).
            "incomplete": (detail["usage"] or {}).get("incomplete") or {}}


def build(reply: Dict[str, Any], db_path: Optional[str], now: Optional[float] = None,
          billing: Any = None, processes: bool = True,
          socket_path: Optional[str] = None) -> Dict[str, Any]:
    """The report from elsad's ``ja`` answer, /proc, the cgroup and the store.

    Without *processes* (``ja -s``) the finished part is the store's job totals
    instead of each record: ``commands`` and ``flow`` then list running
    processes only."""
    now = time.time() if now is None else now
    job = reply["job"]
    jid = job["jid"] if isinstance(job["jid"], int) else int(job["jid"], 16)
    live = [p for p in (live_process(pid) for pid in job.get("pids", [])) if p is not None]
    live_pids = {p["pid"] for p in live}
    fin = _finished(jid, db_path, processes, socket_path)
    done = [dict(p, running=False) for p in fin["processes"] or () if p["pid"] not in live_pids]
    notes: List[str] = []
    if fin["why"]:
        notes.append(f"finished processes not included: {fin['why']}")
    for src, why in sorted(fin["incomplete"].items()):  # as `elsa job`'s INCOMPLETE lines
        notes.append(f"finished processes incomplete ({src}): {why}")
    cg_path = (job.get("params") or {}).get("cgroup_path")
    cg = cgroup_counters(cg_path) if cg_path else None
    summary: Dict[str, Any] = {"cpu_user_us": None, "cpu_system_us": None,
                               "max_rss_kb": None, "read_bytes": None, "write_bytes": None}
    # Finished: the stored totals (every record, folded ones too); running: /proc.
    parts = live + ([fin["usage"]] if fin["usage"] else [])
    for p in parts:
        for k in ("cpu_user_us", "cpu_system_us", "read_bytes", "write_bytes"):
            summary[k] = _add(summary[k], p.get(k))
        summary["max_rss_kb"] = _max(summary["max_rss_kb"], p.get("max_rss_kb"))
    if cg is not None:
        # The cgroup's figures where it has them; a controller not enabled for the
        # job cgroups (memory, io on a hybrid host) leaves the processes' figures.
        summary.update({k: v for k, v in cg.items() if v is not None})
        figures = "cgroup"
    else:
        figures = "processes"
    if cg is None or cg["read_bytes"] is None:
        # A total of the readable ones is not the job's: say so, as for the store.
        hidden = sum(1 for p in live if p["read_bytes"] is None)
        if hidden and summary["read_bytes"] is not None:
            notes.append(f"read and written leave out {hidden} running process(es) whose "
                         "/proc/PID/io the caller may not read (another user's)")
    usage = fin["usage"] or {}
    summary["coremem_mib_s"] = (None if usage.get("coremem_kb_us") is None
                                else usage["coremem_kb_us"] / 1024 / 1e6)
    summary["processes_running"] = len(live)
    summary["processes_finished"] = None if fin["why"] else (usage.get("processes") or 0)
    created = job.get("created")
    elapsed = None if created is None else (job.get("ended") or now) - created
    charge = None
    if billing is not None and elapsed is not None:
        # The bill's quantities of a job (elsa.billing.bill.job_items): the memory
        # integral and the I/O calls are the stored totals' (running processes
        # have none yet), in the units the bill reads.
        from elsa.billing.bill import io_calls_of

        charge, unpriced = _charge(billing, job, dict(
            summary, coremem_kb_us=usage.get("coremem_kb_us"), io_calls=io_calls_of(usage)),
            created, now)
        if unpriced:
            notes.append(f"the charge so far leaves out {', '.join(unpriced)}: a rate is "
                         "set but no source measured it for this job (yet)")
    commands: Dict[str, Dict[str, Any]] = {}
    # [thresholds] folded rows: many small finished records each, counted per command
    # (their pids are not kept, so the flow cannot place them).
    folded = [dict(f, running=False) for f in fin["folded"]]
    if folded:
        notes.append(f"{sum(f['processes'] for f in folded)} small finished processes "
                     "([thresholds]) are counted per command, not in the command flow")
    for p in live + done + folded:
        c = commands.setdefault(p["comm"], {"command": p["comm"], "count": 0, "running": 0,
                                            "cpu_user_us": None, "cpu_system_us": None,
                                            "max_rss_kb": None, "read_bytes": None,
                                            "write_bytes": None})
        c["count"] += p.get("processes", 1)
        c["running"] += 1 if p["running"] else 0
        for k in ("cpu_user_us", "cpu_system_us", "read_bytes", "write_bytes"):
            c[k] = _add(c[k], p.get(k))
        c["max_rss_kb"] = _max(c["max_rss_kb"], p.get("max_rss_kb"))
    return {
        "jid": job.get("jid_hex") or job["jid"], "name": job.get("name"),
        "owner_uid": job.get("owner_uid"), "tags": job.get("tags", {}),
        "state": job.get("state"), "start": created, "elapsed_s": elapsed,
        "figures_from": figures, "summary": summary, "charge": charge,
        "commands": sorted(commands.values(), key=lambda c: -((c["cpu_user_us"] or 0)
                                                              + (c["cpu_system_us"] or 0))),
        "flow": flow(live + done), "notes": notes,
    }


def _charge(billing: Any, job: Dict[str, Any], summary: Dict[str, Any], created: float,
            now: float) -> Tuple[str, List[str]]:
    """The charge so far (a decimal string) and the resources with a rate but no figure."""
    from decimal import Decimal

    from elsa.billing.bill import Biller, quantities
    from elsa.core.model import cores_allowed

    b = Biller(billing)
    end = job.get("ended") or now
    wall = max(0.0, end - created)
    p = (Decimal(billing.schedule.prime_seconds(created, end)) / Decimal(wall)) if wall else \
        Decimal(1 if billing.schedule.is_prime(created) else 0)
    q = quantities(summary, Decimal(wall), cores_allowed(job.get("params") or {}), True)
    parts, unpriced = b.price(q, p)
    tags = {str(k): str(v) for k, v in (job.get("tags") or {}).items()}
    return str(b.round(sum(parts.values(), Decimal(0)) * b.multiplier(tags))), unpriced


def flow(procs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The process tree (roots: processes whose parent is not in the job)."""
    nodes = {}
    for p in sorted(procs, key=lambda p: (p.get("start_time") or 0, p["pid"])):
        nodes[p["pid"]] = {"pid": p["pid"], "ppid": p.get("ppid"), "command": p["comm"],
                           "running": p["running"],
                           "cpu_us": _add(p.get("cpu_user_us"), p.get("cpu_system_us")),
                           "children": []}
    roots = []
    for n in nodes.values():
        parent = nodes.get(n["ppid"]) if n["ppid"] != n["pid"] else None
        (parent["children"] if parent is not None else roots).append(n)
    return roots


def _us(v: Optional[int]) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}s"


def _kb(v: Optional[int]) -> str:
    from elsa.report.sacct import fmt_size

    return "-" if v is None else fmt_size(v * 1024)


def _b(v: Optional[int]) -> str:
    from elsa.report.sacct import fmt_size

    return fmt_size(v)


def print_report(r: Dict[str, Any], show: str, out) -> None:
    from elsa.report.sacct import fmt_duration, fmt_time
    from elsa.report.text import fmt_tags, printable

    if "s" in show:
        s = r["summary"]
        tags = fmt_tags(r["tags"])
        out.write(f"Job ID        {r['jid']}\nName          {printable(r['name'] or '-')}\n"
                  + (f"Tags          {tags}\n" if tags else "")
                  + f"State         {r['state']}\nStart         {fmt_time(r['start'])}\n"
                  f"Elapsed       {fmt_duration(r['elapsed_s'])}\n"
                  f"User CPU      {_us(s['cpu_user_us'])}\n"
                  f"System CPU    {_us(s['cpu_system_us'])}\n"
                  f"Peak memory   {_kb(s['max_rss_kb'])}\n"
                  f"Memory integ. {'-' if s['coremem_mib_s'] is None else format(s['coremem_mib_s'], '.1f') + ' MiB-s'}\n"  # noqa: E501
                  f"Read          {_b(s['read_bytes'])}\nWritten       {_b(s['write_bytes'])}\n"
                  f"Processes     {s['processes_running']} running, "
                  f"{'-' if s['processes_finished'] is None else s['processes_finished']} "
                  f"finished\nCharge so far {r['charge'] if r['charge'] is not None else '-'}\n"
                  f"(figures from the job's {r['figures_from']})\n")
    if "c" in show:
        from elsa.report.text import table

        out.write("\n" if "s" in show else "")
        table([[c["command"], str(c["count"]), str(c["running"]), _us(c["cpu_user_us"]),
                 _us(c["cpu_system_us"]), _kb(c["max_rss_kb"]), _b(c["read_bytes"]),
                 _b(c["write_bytes"])] for c in r["commands"]],
               ["COMMAND", "COUNT", "RUNNING", "USER", "SYS", "MAXRSS", "READ", "WRITE"], out)
    if "f" in show:
        out.write("\n" if show != "f" else "")

        def walk(n: Dict[str, Any], depth: int) -> None:
            out.write(f"{'  ' * depth}{printable(n['command'])} [{n['pid']}] {_us(n['cpu_us'])}"
                      f"{' (running)' if n['running'] else ''}\n")
            for ch in n["children"]:
                walk(ch, depth + 1)

        for root in r["flow"]:
            walk(root, 0)
    for note in r["notes"]:
        out.write(f"note: {note}\n")


def cmd_ja(args: argparse.Namespace, out) -> int:
    from elsa import config
    from elsa.billing import rates
    from elsa.client import Client, RequestFailed, default_socket
    from elsa.report.cli import _socket_path

    if args.csv:
        raise ElsaError("elsa ja prints a table or --json, not --csv")
    cfg = config.load(config.resolve_path(args.config))
    sock = args.socket or default_socket(args.config)
    try:
        with Client(sock, timeout=10.0) as c:
            reply = c.call("ja")
    except RequestFailed as exc:
        if exc.code == "not-in-job":
            raise ElsaError("not inside an ELSA job: run 'elsa ja' from a process of the "
                            "job (e.g. within 'elsa-jobmng run -- CMD')") from None
        raise ElsaError(str(exc)) from None
    db_path = args.db or os.path.join(args.state_dir or cfg.state_dir, "elsa.db")
    detail = args.json or args.c or args.f
    report = build(reply, db_path, billing=rates.from_config(cfg), processes=bool(detail),
                   socket_path=_socket_path(args))
    if args.json:
        json.dump(report, out)
        out.write("\n")
        return 0
    show = "".join(k for k in "scf" if getattr(args, k)) or "s"
    print_report(report, show, out)
    return 0


def add_parser(sub: Any, parents: List[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("ja", parents=parents,
                       help="report the job this command runs in, while it runs (CSA ja)")
    s.add_argument("-s", action="store_true", help="summary (the default)")
    s.add_argument("-c", action="store_true", help="per-command report")
    s.add_argument("-f", action="store_true", help="command flow: the process tree")
    s.set_defaults(func=cmd_ja)
