"""Read-side queries of the usage tables (store migration 2).

Kept free of heavy imports: ``elsa summary`` must answer fast, so this module
needs only sqlite3 and the aggregator's "best" rule.

* Summaries by user or command read the hourly pre-aggregated
  ``usage_rollup`` table for whole hours inside ``--since/--until`` and the
  per-process rows (indexed by end time) only for the partial hours at the
  edges: exact, and independent of how many process records the store holds.
* A process may be reported by more than one source (taskstats and bsdacct
  both enabled). Per hour, only the best process-level source present is
  counted (the source specs' priorities, elsa.core.usage), so nothing is
  counted twice; pick one explicitly with ``source``. In an hour in which a
  source missed processes (a gap: elsad was down, records lost to ENOBUFS,
  accounting taken over), each process is counted from its best source's record
  instead (elsa.report.window).
* Per-job figures come from ``job_usage`` (one row per job and source) with
  the best figure per metric, by the same priorities.
* One copy of each query serves a node's SQLite store and the site's central
  PostgreSQL (docs/central.md): queries are written with ``?`` placeholders and
  run through a :class:`elsa.report.connect.Db` adapter, which also supplies the few
  expressions the dialects spell differently (hour buckets, tag lookup, the host
  column).
  Rows are keyed by (host, ...) where a key may repeat across nodes; on a node
  the host is ''.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from elsa.core.model import format_jid, split_exit
from elsa.core.usage import (
    METRICS,
    best,
    fallbacks,
    load_priorities,
    not_below_records,
    plus,
    priority_sql,
    rank_sources,
)
from elsa.errors import StoreError
from elsa.report.connect import BUCKET, Db, adapt
from elsa.report.window import (
    best_records,
    edge_records,
    host_sql,
    per_process_hours,
    range_sql,
    record_exprs,
    window_parts,
)

SUMMARY_KEYS = ("processes", "cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb",
                "avg_mem_kb", "read_bytes", "write_bytes", "minflt", "majflt")
PROCESS_KEYS = ("pid", "ppid", "uid", "comm", "start_time", "end_time", "exit_code",
                "cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb", "max_vm_kb",
                "read_bytes", "write_bytes", "read_chars", "write_chars", "minflt", "majflt",
                "nvcsw", "nivcsw", "source")


#: A part's sums, the columns :func:`summary` merges, from the rollup and from records.
_ROLLUP_SUMS = ("SUM(processes), SUM(cpu_user_us), SUM(cpu_system_us), SUM(elapsed_us), "
                "MAX(max_rss_kb), SUM(mem_kb_sum), SUM(read_bytes), SUM(write_bytes), "
                "SUM(minflt), SUM(majflt)")
#: What a part read from the records takes of them (elsa.report.window.record_exprs:
#: ``n`` processes a row counts, ``mem`` its memory for averages), and their sums, as the
#: rollup sums records (elsa.core.aggregator): NULL where no record has the figure.
_RECORD_COLS = ("source", "uid", "comm", "end_time", "n", "cpu_user_us", "cpu_system_us",
                "elapsed_us", "max_rss_kb", "mem", "read_bytes", "write_bytes", "minflt",
                "majflt")
_RECORD_SUMS = ("SUM(n), SUM(cpu_user_us), SUM(cpu_system_us), SUM(elapsed_us), "
                "MAX(max_rss_kb), SUM(mem), SUM(read_bytes), SUM(write_bytes), SUM(minflt), "
                "SUM(majflt)")
#: A record's user as the rollup files it (a record without one under -1).
_RECORD_UID = "COALESCE(uid, -1)"


def _hours_sums(db: Db, group: str, where: str, params: List[Any], prios: Dict[str, int]
                ) -> List[Sequence[Any]]:
    """(host, *group*, sums...) of the rollup's rows matching *where* (with *params*),
    per host and hour only those of the best process-level source present."""
    rank, rank_params = priority_sql("source", prios)
    host = db.host()
    sql = (f"WITH pick AS (SELECT {host} AS h, bucket AS b, MIN({rank}) AS p "
           f"FROM usage_rollup WHERE {where} GROUP BY {host}, bucket) "
           f"SELECT {host}, {group}, {_ROLLUP_SUMS} "
           f"FROM usage_rollup JOIN pick ON {host} = pick.h AND bucket = pick.b "
           f"AND {rank} = pick.p WHERE {where} GROUP BY {host}, {group}")
    return db.execute(sql, rank_params + params + rank_params + params).fetchall()


def _processes_sums(db: Db, group: str, where: str, params: List[Any],
                    prios: Dict[str, int], lo: float, hi: float) -> List[Sequence[Any]]:
    """(host, *group*, sums...) of the records ending in [lo, hi) matching *where*, each
    process once, from its best source's record (elsa.report.window.best_records): an hour of
    elsa.report.window.per_process_hours."""
    table, table_params = best_records(db, prios, record_exprs(_RECORD_COLS), lo, hi)
    host = db.host()
    sql = (f"SELECT {host}, {group}, {_RECORD_SUMS} FROM {table} AS p "
           f"WHERE {where} GROUP BY {host}, {group}")
    return db.execute(sql, table_params + params).fetchall()


def summary(db: Any, by: str, since: Optional[float] = None,
            until: Optional[float] = None, source: Optional[str] = None,
            hosts: Optional[Sequence[str]] = None,
            tags: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """Per-user or per-command totals of process records ending in [since, until)."""
    db = adapt(db)
    if by == "job":
        return job_summary(db, since, until, hosts=hosts, tags=tags)
    if tags:
        raise StoreError("tag filters select jobs: use them with 'summary --by job' or 'jobs'")
    key = {"user": "uid", "command": "comm"}[by]
    prios = load_priorities(db)
    # With one source picked there is nothing to choose between: no per-process parts.
    parts = window_parts(since, until, None if source else per_process_hours(db))
    src_sql = " AND source = ?" if source else ""
    rank, rank_params = priority_sql("source", prios)
    host = db.host()
    # Keyed by (host, uid|comm): the central store maps uid@host to site users below.
    totals: Dict[Any, Dict[str, Any]] = {}

    def merge(rows: Sequence[Sequence[Any]]) -> None:
        for h, k, n, cu, cs, el, rss, mem, rb, wb, mi, ma in rows:
            t = totals.get((h, k))
            if t is None:
                totals[(h, k)] = {"processes": n, "cpu_user_us": cu, "cpu_system_us": cs,
                                  "elapsed_us": el, "max_rss_kb": rss, "mem_kb_sum": mem,
                                  "read_bytes": rb, "write_bytes": wb, "minflt": mi,
                                  "majflt": ma}
                continue
            _add(t, n, cu, cs, el, rss, mem, rb, wb, mi, ma)

    ukey = _RECORD_UID if key == "uid" else "comm"
    for part in parts:
        kind, lo, hi = part[:3]
        params: List[Any] = []
        if kind == "hours":
            where = (range_sql("bucket", lo, hi, params) + host_sql(db, hosts, params)
                     + part.host_sql(db, params))
            if source:
                params.append(source)
            merge(_hours_sums(db, key, where + src_sql, params, prios))
            continue
        if kind == "processes":  # never with one source picked (parts above)
            assert lo is not None and hi is not None  # (part of) one hour
            where = "TRUE" + host_sql(db, hosts, params) + part.host_sql(db, params)
            merge(_processes_sums(db, ukey, where, params, prios, lo, hi))
            continue
        where = (range_sql("end_time", lo, hi, params) + host_sql(db, hosts, params)
                 + part.host_sql(db, params))
        if source:
            params.append(source)
        hour = db.hour("end_time")
        table, params = edge_records(db, _RECORD_COLS, where + src_sql, params)
        sql = (f"WITH r AS {table}, pick AS (SELECT {host} AS h, {hour} AS b, "
               f"MIN({rank}) AS p FROM r GROUP BY {host}, {hour}) "
               f"SELECT {host}, {ukey}, {_RECORD_SUMS} "
               f"FROM r JOIN pick ON {host} = pick.h AND {hour} = pick.b "
               f"AND {rank} = pick.p GROUP BY {host}, {ukey}")
        merge(db.execute(sql, params + rank_params + rank_params).fetchall())
    residual: Dict[Any, Tuple[int, int]] = {}
    if by == "user" and not source:
        residual = job_residuals(db, since, until, hosts)
        for hk, (ru, rs) in residual.items():
            t = totals.setdefault(hk, {"processes": 0, "cpu_user_us": None,
                                       "cpu_system_us": None, "elapsed_us": None,
                                       "max_rss_kb": None, "mem_kb_sum": None,
                                       "read_bytes": None, "write_bytes": None,
                                       "minflt": None, "majflt": None})
            t["cpu_user_us"] = plus(t["cpu_user_us"], ru)
            t["cpu_system_us"] = plus(t["cpu_system_us"], rs)
    rows: Dict[Any, Dict[str, Any]] = {}
    for (h, k), t in totals.items():
        if by == "user":
            user, account = db.user_label(h, k)
            label: Any = user if db.central else k
        else:
            label, account = k, None
        # A site user charged to several accounts (user mapping) has a row per account.
        key = (label, account)
        got = rows.get(key)
        if got is None:
            row: Dict[str, Any] = {by: label}
            if by == "user":
                # A site user spans several uids on several hosts: uid only where one.
                row["uid"] = k
                row["user"] = user
                if db.central:
                    row["account"] = account
                row["job_residual_cpu_us"] = 0
            row.update(t)
            rows[key] = row
        else:
            if by == "user" and got["uid"] != k:
                got["uid"] = None
            _add(got, t["processes"], t["cpu_user_us"], t["cpu_system_us"], t["elapsed_us"],
                 t["max_rss_kb"], t["mem_kb_sum"], t["read_bytes"], t["write_bytes"],
                 t["minflt"], t["majflt"])
        if by == "user":
            ru, rs = residual.get((h, k), (0, 0))
            rows[key]["job_residual_cpu_us"] += ru + rs
    out = []
    for row in rows.values():
        n = row["processes"]
        mem = row.pop("mem_kb_sum")
        if by == "user":
            # The key order of the node's report: job_residual_cpu_us before the figures.
            resid = row.pop("job_residual_cpu_us")
            figures = {m: row.pop(m) for m in SUMMARY_KEYS if m != "avg_mem_kb"}
            row["job_residual_cpu_us"] = resid
            row.update(figures)
        # Over the processes counted; unknown (None) where none of them measured memory.
        row["avg_mem_kb"] = round(mem / n) if n and mem is not None else None
        out.append(row)
    out.sort(key=lambda r: -((r["cpu_user_us"] or 0) + (r["cpu_system_us"] or 0)))
    return out


def _add(t: Dict[str, Any], n: int, cu: Optional[int], cs: Optional[int], el: Optional[int],
         rss: Optional[int], mem: Optional[int], rb: Optional[int], wb: Optional[int],
         mi: Optional[int], ma: Optional[int]) -> None:
    t["processes"] += n
    for name, v in (("cpu_user_us", cu), ("cpu_system_us", cs), ("elapsed_us", el),
                    ("mem_kb_sum", mem), ("read_bytes", rb), ("write_bytes", wb),
                    ("minflt", mi), ("majflt", ma)):
        t[name] = plus(t[name], v)
    if rss is not None and (t["max_rss_kb"] is None or rss > t["max_rss_kb"]):
        t["max_rss_kb"] = rss


def job_residuals(db: Any, since: Optional[float] = None, until: Optional[float] = None,
                  hosts: Optional[Sequence[str]] = None
                  ) -> Dict[Tuple[str, int], Tuple[int, int]]:
    """Per job owner (host, uid): (user, system) CPU µs that jobs ended in [since, until) used
    beyond their counted process records.

    The kernel's per-process records (taskstats, pacct) are taken at exit, before
    the exiting process tears down its memory and files, and a short process's
    last slice of run time may not be added yet; a job's cgroup counts all of it.
    With many short processes (a fork-heavy job) the records fall well short of
    the cgroup (docs/accounting.md, "Per-source differences"). Summaries by user
    charge that difference to the job's owner, so that they agree with the sum
    of the jobs' best figures."""
    db = adapt(db)
    params: List[Any] = []
    where = ["ended IS NOT NULL"]
    if since is not None:
        where.append("ended >= ?")
        params.append(since)
    if until is not None:
        where.append("ended < ?")
        params.append(until)
    _job_filters(db, hosts, None, where, params)
    owners = {(h, j): (h, u) for h, j, u in db.execute(
        f"SELECT {db.host()}, jid, owner_uid FROM jobs WHERE {' AND '.join(where)}",
        params).fetchall()}
    if not owners:
        return {}
    prios = load_priorities(db)
    out: Dict[Tuple[str, int], Tuple[int, int]] = {}
    jids = list({j for _h, j in owners})
    usage = host_job_usage(db, jids) if len(jids) <= 900 else host_job_usage(db)
    for jid, u in usage.items():
        if jid not in owners:
            continue
        srcs = u["sources"]
        counted = [src for src, v in srcs.items() if v.get("processes")]
        if not counted:
            continue
        proc_src = rank_sources(counted, prios)[0]
        bu, bs = (u["usage"].get(m) for m in ("cpu_user_us", "cpu_system_us"))
        cu, cs = (srcs[proc_src].get(m) for m in ("cpu_user_us", "cpu_system_us"))
        if None in (bu, bs, cu, cs):
            continue
        total = (bu + bs) - (cu + cs)
        if total <= 0:
            continue  # never take away from the process records
        # The sources split user and system time differently: keep the total exact.
        user = min(max(0, bu - cu), total)
        ru, rs = out.get(owners[jid], (0, 0))
        out[owners[jid]] = (ru + user, rs + total - user)
    return out


# -- jobs ------------------------------------------------------------------------------------

_JOB_COLS = ("processes", "cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb",
             "max_vm_kb", "read_bytes", "write_bytes", "read_chars", "write_chars", "minflt",
             "majflt", "nvcsw", "nivcsw", "coremem_kb_us", "virtmem_kb_us")


def job_usage(db: Any, jids: Optional[Sequence[int]] = None
              ) -> Dict[int, Dict[str, Any]]:
    """Per job: {"usage": best figures, "chosen": metric->source, "sources": per source}."""
    return {jid: u for (_h, jid), u in host_job_usage(db, jids).items()}


def host_job_usage(db: Any, jids: Optional[Sequence[int]] = None
                   ) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """:func:`job_usage` keyed by (host, jid): the central store holds every node's."""
    db = adapt(db)
    sql = (f"SELECT {db.host()}, jid, source, {', '.join(_JOB_COLS)}, incomplete, extra "
           "FROM job_usage")
    params: List[Any] = []
    if jids is not None:
        if not jids:
            return {}
        sql += f" WHERE jid IN ({', '.join('?' * len(jids))})"
        params = list(jids)
    per: Dict[Tuple[str, int], Dict[str, Dict[str, Any]]] = {}
    incomplete: Dict[Tuple[str, int], Dict[str, str]] = {}
    for row in db.execute(sql, params):
        jid, src = (row[0], row[1]), row[2]
        vals = dict(zip(_JOB_COLS, row[3:3 + len(_JOB_COLS)]))
        if row[-1]:
            try:
                vals["extra"] = json.loads(row[-1])
            except ValueError:
                pass
        per.setdefault(jid, {})[src] = vals
        if row[-2]:
            incomplete.setdefault(jid, {})[src] = row[-2]
    out: Dict[Tuple[str, int], Dict[str, Any]] = {}
    prios = load_priorities(db)
    for jid, sources in per.items():
        flagged = incomplete.get(jid, {})
        values, chosen = best(sources, prios, flagged)
        note = not_below_records(values, chosen, sources, prios, flagged)
        out[jid] = {"usage": values, "chosen": chosen, "sources": sources,
                    "incomplete": flagged, "note": note,
                    "fallback": fallbacks(chosen, sources, prios, flagged)}
    return out


def _job_filters(db: Db, hosts: Optional[Sequence[str]], tags: Optional[Dict[str, str]],
                 where: List[str], params: List[Any]) -> None:
    if hosts:
        where.append(f"{db.host()} IN ({', '.join('?' * len(hosts))})")
        params.extend(hosts)
    for k, v in sorted((tags or {}).items()):
        where.append(f"{db.tag()} = ?")
        params.extend((k, v))


def _jobs_where(db: Db, since: Optional[float], until: Optional[float], state: Optional[str],
                hosts: Optional[Sequence[str]], tags: Optional[Dict[str, str]],
                owner_uid: Optional[int] = None, name: Optional[str] = None,
                ) -> Tuple[str, List[Any]]:
    """The WHERE clause of a jobs query: jobs overlapping [since, until) and the filters."""
    params: List[Any] = []
    where = ["TRUE"]
    if since is not None:
        where.append("(ended IS NULL OR ended >= ?)")
        params.append(since)
    if until is not None:
        where.append("created < ?")
        params.append(until)
    if state:
        where.append("state = ?")
        params.append(state)
    if owner_uid is not None:
        where.append("owner_uid = ?")
        params.append(owner_uid)
    if name:
        where.append("name LIKE ? ESCAPE '\\'")
        params.append(name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                      + "%")
    _job_filters(db, hosts, tags, where, params)
    return " AND ".join(where), params


_JOB_COLUMNS = "jid, name, owner_uid, tags, created, ended, state, backend, params"


def _job_rows(db: Db, rows: Sequence[Sequence[Any]]) -> List[Dict[str, Any]]:
    """Job dicts (the keys of ``elsa jobs --json``) of rows of _JOB_COLUMNS + host."""
    usage = (host_job_usage(db, [r[0] for r in rows]) if len(rows) <= 900
             else host_job_usage(db))
    out = []
    for r in rows:
        u = usage.get((r[9], r[0]), {})
        j = {"jid": format_jid(r[0]), "name": r[1], "owner_uid": r[2],
             "owner": db.user_label(r[9], r[2])[0],
             "tags": json.loads(r[3]), "created": r[4], "ended": r[5], "state": r[6],
             "backend": r[7], "params": json.loads(r[8]),
             "wall_us": wall_us(r[4], r[5]), "usage": _usage_json(u)}
        if db.central:
            j["host"] = r[9]
        out.append(j)
    return out


def jobs(db: Any, since: Optional[float] = None, until: Optional[float] = None,
         state: Optional[str] = None, limit: int = 100000,
         hosts: Optional[Sequence[str]] = None,
         tags: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """Jobs that overlap [since, until) (created before until, ended after since)."""
    db = adapt(db)
    where, params = _jobs_where(db, since, until, state, hosts, tags)
    rows = db.execute(
        f"SELECT {_JOB_COLUMNS}, {db.host()} FROM jobs WHERE {where} ORDER BY created DESC "
        "LIMIT ?", params + [limit]).fetchall()
    return _job_rows(db, rows)


def wall_us(created: Optional[float], ended: Optional[float],
            now: Optional[float] = None) -> Optional[int]:
    """A job's wall time (end − start, µs; so far, for a running job)."""
    if created is None:
        return None
    end = ended if ended is not None else (time.time() if now is None else now)
    return max(0, round((end - created) * 1e6))


def _usage_json(u: Dict[str, Any]) -> Dict[str, Any]:
    values = u.get("usage") or {m: None for m in METRICS}
    out = dict(values)
    out["sources"] = u.get("sources", {})
    out["chosen"] = u.get("chosen", {})
    out["incomplete"] = u.get("incomplete", {})
    out["fallback"] = u.get("fallback", {})
    out["note"] = u.get("note")
    return out


def job_summary(db: Any, since: Optional[float] = None,
                until: Optional[float] = None, hosts: Optional[Sequence[str]] = None,
                tags: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    db = adapt(db)
    out = []
    for j in jobs(db, since, until, hosts=hosts, tags=tags):
        u = j["usage"]
        # Unknown stays None (null in JSON, "-" in tables), never 0.
        out.append({"jid": j["jid"], "name": j["name"], "owner": j["owner"],
                    "state": j["state"], "wall_us": j["wall_us"],
                    "processes": u.get("processes"),
                    "cpu_user_us": u.get("cpu_user_us"),
                    "cpu_system_us": u.get("cpu_system_us"),
                    "elapsed_us": u.get("elapsed_us"),
                    "max_rss_kb": u.get("max_rss_kb"),
                    "read_bytes": u.get("read_bytes"), "write_bytes": u.get("write_bytes"),
                    "sources": sorted(u.get("sources", {})),
                    "incomplete": bool(u.get("incomplete"))})
        if db.central:
            out[-1]["host"] = j["host"]
    out.sort(key=lambda r: -((r["cpu_user_us"] or 0) + (r["cpu_system_us"] or 0)))
    return out


def job_detail(db: Any, jid: int, source: Optional[str] = None
               ) -> Optional[Dict[str, Any]]:
    """One job with its usage and each process (like ELSA's ``elsa -d``)."""
    db = adapt(db)
    row = db.execute("SELECT jid, name, owner_uid, tags, created, ended, state, backend, params, "
                     f"{db.host()} FROM jobs WHERE jid = ?", (jid,)).fetchone()
    usage = host_job_usage(db, [jid]).get((row[9] if row else "", jid), {})
    srcs = [r[0] for r in db.execute(
        "SELECT DISTINCT source FROM proc_usage WHERE jid = ?", (jid,))]
    if row is None and not srcs and not usage:
        return None
    prios = load_priorities(db)
    # The process list of the source the job's process count comes from (best()).
    counted = usage.get("chosen", {}).get("processes")
    # No record stored one by one ([thresholds] folded them all): the folded rows
    # of the counted source are still listed.
    pick = source or (counted if counted in srcs or not srcs else
                      rank_sources(srcs, prios)[0])
    procs = []
    if pick:
        for r in db.execute(f"SELECT {', '.join(PROCESS_KEYS)}, {db.host()} FROM proc_usage "
                            "WHERE jid = ? AND source = ? ORDER BY start_time, pid",
                            (jid, pick)):
            p = dict(zip(PROCESS_KEYS, r))
            # The store keeps the raw wait status; reports show code and signal apart.
            p["exit_code"], p["exit_signal"] = split_exit(p["exit_code"])
            p["user"] = db.user_label(r[-1], p["uid"])[0]
            procs.append(p)
    out: Dict[str, Any] = {"jid": format_jid(jid)}
    if row is not None:
        out.update({"name": row[1], "owner_uid": row[2],
                    "owner": db.user_label(row[9], row[2])[0],
                    "tags": json.loads(row[3]), "created": row[4], "ended": row[5],
                    "state": row[6], "backend": row[7], "params": json.loads(row[8]),
                    "wall_us": wall_us(row[4], row[5])})
        if db.central:
            out["host"] = row[9]
    out["usage"] = _usage_json(usage)
    # Why the figures are null, when they are: reports say it instead of printing 0.
    out["usage_note"] = (None if out["usage"]["sources"] else
                         "no accounting source measured this job")
    out["process_source"] = pick
    out["processes"] = procs
    from elsa.core.thresholds import folded_of_job

    out["folded"] = folded_of_job(db, jid, pick)  # [thresholds]: small records, per command
    return out


# -- one page of jobs (elsa web) -----------------------------------------------------------------

#: Sort keys of :func:`jobs_page` (usage columns sort by the figure of the best source that
#: measured the job, the rule of :func:`best`).
JOB_SORTS = ("jid", "name", "owner", "state", "created", "ended", "wall", "cpu", "maxrss",
             "processes")


def _best_sql(col: str, db: Db) -> Tuple[str, List[Any]]:
    """The job's figure *col* (a column, or an expression over them) from the best
    source that has it, with its parameters: best()'s order, complete sources first,
    then by priority and name.

    One point look-up of (jid, source) per source in that order, the first figure
    found winning; a sort of each job's rows (ORDER BY ... LIMIT 1) cost 0.18 s
    against 0.07 s for 100,000 jobs of two sources (bench_web.py's store, 2-core VM).
    """
    sources = rank_sources([r[0] for r in db.execute("SELECT DISTINCT source FROM job_usage")],
                           load_priorities(db))
    if not sources:
        return "NULL", []
    same_host = " AND u.host = jobs.host" if db.central else ""
    looks = [f"(SELECT {col} FROM job_usage u WHERE u.jid = jobs.jid{same_host} "
             f"AND u.source = ? AND u.incomplete {missing})"
             for missing in ("IS NULL", "IS NOT NULL") for _ in sources]
    return f"COALESCE({', '.join(looks)})", sources + sources


def _sort_sql(key: str, db: Db, now: float) -> Tuple[str, List[Any]]:
    if key == "wall":
        return "(COALESCE(ended, ?) - created)", [now]
    if key == "cpu":
        # The two figures together: every source gives user and system time alike.
        return _best_sql("cpu_user_us + cpu_system_us", db)
    if key in ("maxrss", "processes"):
        return _best_sql({"maxrss": "max_rss_kb"}.get(key, key), db)
    return {"owner": "owner_uid"}.get(key, key), []


def jobs_page(db: Any, *, owner_uid: Optional[int] = None, name: Optional[str] = None,
              tags: Optional[Dict[str, str]] = None, hosts: Optional[Sequence[str]] = None,
              state: Optional[str] = None, since: Optional[float] = None,
              until: Optional[float] = None, sort: str = "created", descending: bool = True,
              offset: int = 0, limit: int = 50, now: Optional[float] = None,
              ) -> Tuple[int, List[Dict[str, Any]]]:
    """(matching count, one page of jobs as :func:`jobs` gives them), filtered, sorted and
    cut in SQL (the web's jobs page). *name* matches a prefix."""
    db = adapt(db)
    if sort not in JOB_SORTS:
        raise StoreError(f"cannot sort jobs by {sort!r}; one of {', '.join(JOB_SORTS)}")
    where, params = _jobs_where(db, since, until, state, hosts, tags, owner_uid, name)
    (total,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()
    order, sort_params = _sort_sql(sort, db, now if now is not None else time.time())
    direction = "DESC" if descending else "ASC"
    rows = db.execute(
        f"SELECT {_JOB_COLUMNS}, {db.host()} FROM jobs WHERE {where} "
        f"ORDER BY {order} {direction}, jid {direction} LIMIT ? OFFSET ?",
        params + sort_params + [limit, offset]).fetchall()
    return total, _job_rows(db, rows)


def usage_per_day(db: Any, since: Optional[float] = None, until: Optional[float] = None,
                  uid: Optional[int] = None) -> List[Dict[str, Any]]:
    """CPU µs and processes per UTC day and user, in the whole hours overlapping the
    window, counted as :func:`summary` counts them: per host and hour the best
    process-level source from the hourly rollup, and in the hours in which a source
    missed processes each process once (elsa.report.window)."""
    db = adapt(db)
    prios = load_priorities(db)
    lo = None if since is None else math.floor(since / BUCKET) * BUCKET
    hi = None if until is None else math.ceil(until / BUCKET) * BUCKET
    totals: Dict[Tuple[int, str, int], List[Any]] = {}
    for part in window_parts(lo, hi, per_process_hours(db)):
        kind, plo, phi = part[:3]
        params: List[Any] = []
        if kind == "hours":
            where = range_sql("bucket", plo, phi, params) + part.host_sql(db, params)
            if uid is not None:
                where += " AND uid = ?"
                params.append(uid)
            rows = [(h, int(day), u, *sums) for h, day, u, *sums in
                    _hours_sums(db, f"bucket / {86400 // BUCKET}, uid", where, params, prios)]
        else:  # an hour read process by process (whole hours: no partial edges)
            assert kind == "processes" and plo is not None and phi is not None
            where = "TRUE" + part.host_sql(db, params)
            if uid is not None:
                where += f" AND {_RECORD_UID} = ?"
                params.append(uid)
            day = math.floor(plo / 86400)
            rows = [(h, day, u, *sums) for h, u, *sums in
                    _processes_sums(db, _RECORD_UID, where, params, prios, plo, phi)]
        for h, day, u, n, cu, cs, *_ in rows:
            t = totals.setdefault((day, h, u), [0, None])
            t[0] += int(n)
            t[1] = plus(t[1], plus(cu, cs))  # None: no record measured CPU time
    # One row per day and user: the central store maps the uids of several hosts (or
    # several uids) to one site user; ``uid`` only where one.
    out: Dict[Tuple[int, str], Dict[str, Any]] = {}
    for (day, h, u), (n, cpu) in sorted(totals.items()):
        user = db.user_label(h, u)[0]
        got = out.get((day, user))
        if got is None:
            out[(day, user)] = {"day": day * 86400, "uid": u, "user": user, "processes": n,
                                "cpu_us": None if cpu is None else int(cpu)}
            continue
        got["processes"] += n
        got["cpu_us"] = plus(got["cpu_us"], None if cpu is None else int(cpu))
        if got["uid"] != u:
            got["uid"] = None
    return list(out.values())


def usage_by_tag(db: Any, key: str, since: Optional[float] = None,
                 until: Optional[float] = None, owner_uid: Optional[int] = None,
                 ) -> List[Dict[str, Any]]:
    """Per value of job tag *key* (e.g. ``account``): jobs and the sum of their best figures."""
    totals: Dict[str, Dict[str, Any]] = {}
    for j in jobs(db, since, until):
        if owner_uid is not None and j["owner_uid"] != owner_uid:
            continue
        val = (j["tags"] or {}).get(key)
        if val is None:
            continue
        t = totals.setdefault(val, {key: val, "jobs": 0, "processes": None,
                                    "cpu_user_us": None, "cpu_system_us": None,
                                    "max_rss_kb": None, "read_bytes": None,
                                    "write_bytes": None})
        t["jobs"] += 1
        for m in ("processes", "cpu_user_us", "cpu_system_us", "read_bytes", "write_bytes"):
            v = j["usage"].get(m)
            if v is not None:
                t[m] = (t[m] or 0) + v
        rss = j["usage"].get("max_rss_kb")
        if rss is not None and (t["max_rss_kb"] is None or rss > t["max_rss_kb"]):
            t["max_rss_kb"] = rss
    return sorted(totals.values(), key=lambda r: -((r["cpu_user_us"] or 0)
                                                   + (r["cpu_system_us"] or 0)))
