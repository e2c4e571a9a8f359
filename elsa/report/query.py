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
  counted twice; pick one explicitly with ``source``.
* Per-job figures come from ``job_usage`` (one row per job and source) with
  the best figure per metric, by the same priorities.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from elsa.core.model import format_jid, split_exit
from elsa.core.usage import (
    METRICS,
    best,
    load_priorities,
    not_below_records,
    priority,
    priority_sql,
)
from elsa.errors import StoreError

USAGE_SCHEMA = 2
BUCKET = 3600

SUMMARY_KEYS = ("processes", "cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb",
                "avg_mem_kb", "read_bytes", "write_bytes", "minflt", "majflt")
PROCESS_KEYS = ("pid", "ppid", "uid", "comm", "start_time", "end_time", "exit_code",
                "cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb", "max_vm_kb",
                "read_bytes", "write_bytes", "read_chars", "write_chars", "minflt", "majflt",
                "nvcsw", "nivcsw", "source")


def open_store(path: str, readonly: bool = True) -> sqlite3.Connection:
    """Open the store at *path* (a file) for reading."""
    if not os.path.exists(path):
        raise StoreError(f"no store at {path}; is elsad's state_dir right (--state-dir or the "
                         "config's state_dir), or import pacct files with 'elsa import-acct'?")
    try:
        if readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        else:
            db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        (version,) = db.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read store {path}: {exc}") from None
    if version < USAGE_SCHEMA:
        raise StoreError(f"store {path} has schema {version}, without usage tables; start "
                         "elsad (it migrates the store) or run 'elsa import-acct'")
    return db


def _bucket_range(since: Optional[float], until: Optional[float]
                  ) -> Tuple[Optional[int], Optional[int]]:
    """Whole hour buckets inside [since, until): [lo, hi), None = unbounded."""
    lo = None if since is None else math.ceil(since / BUCKET)
    hi = None if until is None else math.floor(until / BUCKET)
    return lo, hi


def _range_sql(col: str, lo: Optional[float], hi: Optional[float],
               params: List[Any]) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{col} >= ?")
        params.append(lo)
    if hi is not None:
        parts.append(f"{col} < ?")
        params.append(hi)
    return " AND ".join(parts) or "1"


def summary(db: sqlite3.Connection, by: str, since: Optional[float] = None,
            until: Optional[float] = None, source: Optional[str] = None) -> List[Dict[str, Any]]:
    """Per-user or per-command totals of process records ending in [since, until)."""
    if by == "job":
        return job_summary(db, since, until)
    key = {"user": "uid", "command": "comm"}[by]
    blo, bhi = _bucket_range(since, until)
    if blo is not None and bhi is not None and bhi < blo:
        blo = bhi = None  # the window is inside one hour: only raw rows
        edges = [(since, until)]
        full = False
    else:
        full = True
        edges = []
        if since is not None and blo is not None and since < blo * BUCKET:
            edges.append((since, blo * BUCKET))
        if until is not None and bhi is not None and bhi * BUCKET < until:
            edges.append((bhi * BUCKET, until))
    src_sql = " AND source = ?" if source else ""
    rank, rank_params = priority_sql("source", load_priorities(db))
    totals: Dict[Any, Dict[str, Any]] = {}

    def merge(rows: Sequence[Sequence[Any]]) -> None:
        for k, n, cu, cs, el, rss, mem, rb, wb, mi, ma in rows:
            t = totals.get(k)
            if t is None:
                totals[k] = {"processes": n, "cpu_user_us": cu, "cpu_system_us": cs,
                             "elapsed_us": el, "max_rss_kb": rss, "mem_kb_sum": mem,
                             "read_bytes": rb, "write_bytes": wb, "minflt": mi,
                             "majflt": ma}
                continue
            t["processes"] += n
            for name, v in (("cpu_user_us", cu), ("cpu_system_us", cs), ("elapsed_us", el),
                            ("mem_kb_sum", mem), ("read_bytes", rb), ("write_bytes", wb),
                            ("minflt", mi), ("majflt", ma)):
                t[name] += v
            if rss is not None and (t["max_rss_kb"] is None or rss > t["max_rss_kb"]):
                t["max_rss_kb"] = rss

    if full:
        params: List[Any] = []
        where = _range_sql("bucket", blo, bhi, params)
        pick_params = list(params)
        if source:
            pick_params.append(source)
            params.append(source)
        sql = (f"WITH pick AS (SELECT bucket AS b, MIN({rank}) AS p FROM usage_rollup "
               f"WHERE {where}{src_sql} GROUP BY bucket) "
               f"SELECT {key}, SUM(processes), SUM(cpu_user_us), SUM(cpu_system_us), "
               f"SUM(elapsed_us), MAX(max_rss_kb), SUM(mem_kb_sum), SUM(read_bytes), "
               f"SUM(write_bytes), SUM(minflt), SUM(majflt) "
               f"FROM usage_rollup JOIN pick ON bucket = pick.b AND {rank} = pick.p "
               f"WHERE {where}{src_sql} GROUP BY {key}")
        merge(db.execute(sql, rank_params + pick_params + rank_params + params).fetchall())
    for lo, hi in edges:
        params = []
        where = _range_sql("end_time", lo, hi, params)
        pick_params = list(params)
        if source:
            params.append(source)
            pick_params.append(source)
        ukey = "COALESCE(uid, -1)" if key == "uid" else "comm"
        sql = (f"WITH pick AS (SELECT CAST(end_time / {BUCKET} AS INTEGER) AS b, "
               f"MIN({rank}) AS p FROM proc_usage WHERE {where}{src_sql} GROUP BY b) "
               f"SELECT {ukey}, COUNT(*), SUM(COALESCE(cpu_user_us, 0)), "
               f"SUM(COALESCE(cpu_system_us, 0)), SUM(COALESCE(elapsed_us, 0)), "
               f"MAX(max_rss_kb), SUM(COALESCE(max_rss_kb, max_vm_kb, 0)), "
               f"SUM(COALESCE(read_bytes, 0)), SUM(COALESCE(write_bytes, 0)), "
               f"SUM(COALESCE(minflt, 0)), SUM(COALESCE(majflt, 0)) "
               f"FROM proc_usage JOIN pick ON CAST(end_time / {BUCKET} AS INTEGER) = pick.b "
               f"AND {rank} = pick.p WHERE {where}{src_sql} GROUP BY 1")
        merge(db.execute(sql, rank_params + pick_params + rank_params + params).fetchall())
    residual: Dict[Any, Tuple[int, int]] = {}
    if by == "user" and not source:
        residual = job_residuals(db, since, until)
        for uid, (ru, rs) in residual.items():
            t = totals.setdefault(uid, {"processes": 0, "cpu_user_us": 0, "cpu_system_us": 0,
                                        "elapsed_us": 0, "max_rss_kb": None,
                                        "mem_kb_sum": 0, "read_bytes": 0, "write_bytes": 0,
                                        "minflt": 0, "majflt": 0})
            t["cpu_user_us"] += ru
            t["cpu_system_us"] += rs
    out = []
    for k, t in totals.items():
        row: Dict[str, Any] = {by: k}
        if by == "user":
            row["uid"] = k
            row["user"] = user_name(k)
            ru, rs = residual.get(k, (0, 0))
            row["job_residual_cpu_us"] = ru + rs
        n = t["processes"]
        row.update({m: t[m] for m in SUMMARY_KEYS if m != "avg_mem_kb"})
        row["avg_mem_kb"] = round(t["mem_kb_sum"] / n) if n else 0
        out.append(row)
    out.sort(key=lambda r: -(r["cpu_user_us"] + r["cpu_system_us"]))
    return out


def job_residuals(db: sqlite3.Connection, since: Optional[float] = None,
                  until: Optional[float] = None) -> Dict[int, Tuple[int, int]]:
    """Per job owner: (user, system) CPU µs that jobs ended in [since, until) used
    beyond their counted process records.

    The kernel's per-process records (taskstats, pacct) are taken at exit, before
    the exiting process tears down its memory and files, and a short process's
    last slice of run time may not be added yet; a job's cgroup counts all of it.
    With many short processes (a fork-heavy job) the records fall well short of
    the cgroup (docs/accounting.md, "Per-source differences"). Summaries by user
    charge that difference to the job's owner, so that they agree with the sum
    of the jobs' best figures."""
    params: List[Any] = []
    where = ["ended IS NOT NULL"]
    if since is not None:
        where.append("ended >= ?")
        params.append(since)
    if until is not None:
        where.append("ended < ?")
        params.append(until)
    owners = dict(db.execute(f"SELECT jid, owner_uid FROM jobs WHERE {' AND '.join(where)}",
                             params).fetchall())
    if not owners:
        return {}
    prios = load_priorities(db)
    out: Dict[int, Tuple[int, int]] = {}
    usage = job_usage(db, list(owners)) if len(owners) <= 900 else job_usage(db)
    for jid, u in usage.items():
        if jid not in owners:
            continue
        srcs = u["sources"]
        counted = [src for src, v in srcs.items() if v.get("processes")]
        if not counted:
            continue
        proc_src = min(counted, key=lambda x: (priority(x, prios), x))
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


_USERS: Dict[int, str] = {}


def user_name(uid: Optional[int]) -> str:
    if uid is None or uid < 0:
        return "?"
    name = _USERS.get(uid)
    if name is None:
        import pwd

        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _USERS[uid] = name
    return name


# -- jobs ------------------------------------------------------------------------------------

_JOB_COLS = ("processes", "cpu_user_us", "cpu_system_us", "elapsed_us", "max_rss_kb",
             "max_vm_kb", "read_bytes", "write_bytes", "read_chars", "write_chars", "minflt",
             "majflt", "nvcsw", "nivcsw", "coremem_kb_us", "virtmem_kb_us")


def job_usage(db: sqlite3.Connection, jids: Optional[Sequence[int]] = None
              ) -> Dict[int, Dict[str, Any]]:
    """Per job: {"usage": best figures, "chosen": metric->source, "sources": per source}."""
    sql = f"SELECT jid, source, {', '.join(_JOB_COLS)}, incomplete, extra FROM job_usage"
    params: List[Any] = []
    if jids is not None:
        if not jids:
            return {}
        sql += f" WHERE jid IN ({', '.join('?' * len(jids))})"
        params = list(jids)
    per: Dict[int, Dict[str, Dict[str, Any]]] = {}
    incomplete: Dict[int, Dict[str, str]] = {}
    for row in db.execute(sql, params):
        jid, src = row[0], row[1]
        vals = dict(zip(_JOB_COLS, row[2:2 + len(_JOB_COLS)]))
        if row[-1]:
            try:
                vals["extra"] = json.loads(row[-1])
            except ValueError:
                pass
        per.setdefault(jid, {})[src] = vals
        if row[-2]:
            incomplete.setdefault(jid, {})[src] = row[-2]
    out: Dict[int, Dict[str, Any]] = {}
    prios = load_priorities(db)
    for jid, sources in per.items():
        values, chosen = best(sources, prios)
        note = not_below_records(values, chosen, sources, prios)
        out[jid] = {"usage": values, "chosen": chosen, "sources": sources,
                    "incomplete": incomplete.get(jid, {}), "note": note}
    return out


def jobs(db: sqlite3.Connection, since: Optional[float] = None, until: Optional[float] = None,
         state: Optional[str] = None, limit: int = 100000) -> List[Dict[str, Any]]:
    """Jobs that overlap [since, until) (created before until, ended after since)."""
    params: List[Any] = []
    where = ["1"]
    if since is not None:
        where.append("(ended IS NULL OR ended >= ?)")
        params.append(since)
    if until is not None:
        where.append("created < ?")
        params.append(until)
    if state:
        where.append("state = ?")
        params.append(state)
    rows = db.execute(
        "SELECT jid, name, owner_uid, tags, created, ended, state, backend, params FROM jobs "
        f"WHERE {' AND '.join(where)} ORDER BY created DESC LIMIT ?",
        params + [limit]).fetchall()
    usage = job_usage(db, [r[0] for r in rows]) if len(rows) <= 900 else job_usage(db)
    out = []
    for r in rows:
        u = usage.get(r[0], {})
        out.append({"jid": format_jid(r[0]), "name": r[1], "owner_uid": r[2],
                    "owner": user_name(r[2]),
                    "tags": json.loads(r[3]), "created": r[4], "ended": r[5], "state": r[6],
                    "backend": r[7], "params": json.loads(r[8]),
                    "wall_us": wall_us(r[4], r[5]), "usage": _usage_json(u)})
    return out


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
    out["note"] = u.get("note")
    return out


def job_summary(db: sqlite3.Connection, since: Optional[float] = None,
                until: Optional[float] = None) -> List[Dict[str, Any]]:
    out = []
    for j in jobs(db, since, until):
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
    out.sort(key=lambda r: -((r["cpu_user_us"] or 0) + (r["cpu_system_us"] or 0)))
    return out


def job_detail(db: sqlite3.Connection, jid: int, source: Optional[str] = None
               ) -> Optional[Dict[str, Any]]:
    """One job with its usage and each process (like ELSA's ``elsa -d``)."""
    row = db.execute("SELECT jid, name, owner_uid, tags, created, ended, state, backend, params "
                     "FROM jobs WHERE jid = ?", (jid,)).fetchone()
    usage = job_usage(db, [jid]).get(jid, {})
    srcs = [r[0] for r in db.execute(
        "SELECT DISTINCT source FROM proc_usage WHERE jid = ?", (jid,))]
    if row is None and not srcs and not usage:
        return None
    prios = load_priorities(db)
    pick = source or (min(srcs, key=lambda s: (priority(s, prios), s)) if srcs else None)
    procs = []
    if pick:
        for r in db.execute(f"SELECT {', '.join(PROCESS_KEYS)} FROM proc_usage "
                            "WHERE jid = ? AND source = ? ORDER BY start_time, pid",
                            (jid, pick)):
            p = dict(zip(PROCESS_KEYS, r))
            # The store keeps the raw wait status; reports show code and signal apart.
            p["exit_code"], p["exit_signal"] = split_exit(p["exit_code"])
            p["user"] = user_name(p["uid"])
            procs.append(p)
    out: Dict[str, Any] = {"jid": format_jid(jid)}
    if row is not None:
        out.update({"name": row[1], "owner_uid": row[2], "owner": user_name(row[2]),
                    "tags": json.loads(row[3]), "created": row[4], "ended": row[5],
                    "state": row[6], "backend": row[7], "params": json.loads(row[8]),
                    "wall_us": wall_us(row[4], row[5])})
    out["usage"] = _usage_json(usage)
    # Why the figures are null, when they are: reports say it instead of printing 0.
    out["usage_note"] = (None if out["usage"]["sources"] else
                         "no accounting source measured this job")
    out["process_source"] = pick
    out["processes"] = procs
    from elsa.core.thresholds import folded_of_job

    out["folded"] = folded_of_job(db, jid, pick)  # [thresholds]: small records, per command
    return out
