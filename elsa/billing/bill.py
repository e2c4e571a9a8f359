"""Bills computed at report time from the stored raw usage (docs/billing.md).

What is billed in a window [since, until):

* every job that ended in the window, as one item: its best figures
  (``job_usage``), its wall time split into prime and non-prime seconds;
* process records outside any job that ended in the window, per user: each
  process's usage split by its own seconds (CSA's per-process ``p_ratio``).

Each item's charge is computed in :class:`decimal.Decimal` and rounded once,
half-even, to ``[billing] decimals`` places; every total is the sum of the
rounded item charges, so per-job charges add up to per-user totals exactly.

SQL here is portable (SQLite and PostgreSQL): no SQLite-only functions, time
classification by a generated CASE tree instead of date functions, integer
arithmetic only where both engines truncate alike.
"""

from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from elsa.billing.rates import RESOURCES, BillingConfig
from elsa.core.model import cores_allowed
from elsa.core.usage import load_priorities, plus, rank_sources
from elsa.report.connect import BUCKET as _BUCKET
from elsa.report.connect import Db, adapt

if TYPE_CHECKING:
    from elsa.report.window import Part

_US = Decimal(1_000_000)
_HOUR = Decimal(3600)
_MIB = Decimal(1024)
_GIB = Decimal(1024 ** 3)
ZERO = Decimal(0)

#: Ended jobs in a window (the bill's items). One statement, used by every store
#: ({host}: Db.host()).
JOBS_SQL = ("SELECT {host}, jid, name, owner_uid, tags, created, ended, params FROM jobs "
            "WHERE ended IS NOT NULL AND ended >= ? AND ended < ? ORDER BY ended, jid")
_PROC_SUMS = ("SUM(n), SUM(cpu_user_us), SUM(cpu_system_us), SUM(peak_kb_ms), "
              "SUM(coremem_kb_us), SUM(read_bytes), SUM(write_bytes), SUM(elapsed_us)")
#: What a bill reads of the records of a partial hour (elsa.report.window.record_exprs:
#: ``n`` processes, ``peak_kb_ms`` the peak RSS times the elapsed ms).
_RAW_COLS = ("uid", "source", "jid", "start_time", "end_time", "n", "cpu_user_us",
             "cpu_system_us", "peak_kb_ms", "elapsed_us", "coremem_kb_us", "read_bytes",
             "write_bytes")
_PROC_COLS = ", ".join(_RAW_COLS[5:])


def _dec(v: Any) -> Optional[Decimal]:
    return None if v is None else Decimal(v)


def quantities(usage: Dict[str, Any], wall_s: Decimal, cores: Optional[Decimal],
               is_job: bool) -> Dict[str, Optional[Decimal]]:
    """Billable quantities in each resource's base unit; None = not measured, absent =
    does not apply."""
    cu, cs = _dec(usage.get("cpu_user_us")), _dec(usage.get("cpu_system_us"))
    rss = _dec(usage.get("max_rss_kb"))
    mem_peak = _dec(usage.get("mem_peak_kb_ms"))
    if mem_peak is not None:
        mem_peak = mem_peak / _MIB / 1000 / _HOUR
    elif rss is not None:
        mem_peak = rss / _MIB * wall_s / _HOUR
    integ = _dec(usage.get("coremem_kb_us"))
    rd, wr = _dec(usage.get("read_bytes")), _dec(usage.get("write_bytes"))
    calls = _dec(usage.get("io_calls"))
    q = {
        "cpu_user": None if cu is None else cu / _US,
        "cpu_system": None if cs is None else cs / _US,
        "mem_peak": mem_peak,
        "mem_integral": None if integ is None else integ / _MIB / _US / _HOUR,
        "read": None if rd is None else rd / _GIB,
        "write": None if wr is None else wr / _GIB,
        "io_calls": calls,
        "core_hours": None if cores is None else cores * wall_s / _HOUR,
        "job": Decimal(1),
    }
    if not is_job:  # per-job resources do not apply to processes outside jobs
        del q["core_hours"], q["job"]
    return q


def io_calls_of(usage: Dict[str, Any]) -> Optional[int]:
    """A job's read + write calls, from its usage's ``extra`` where a source counted
    them (None: not measured)."""
    extra = usage.get("extra") or {}
    if isinstance(extra, dict) and "read_syscalls" in extra and "write_syscalls" in extra:
        return extra["read_syscalls"] + extra["write_syscalls"]
    return None


class Biller:
    """Prices items with one validated rate table."""

    def __init__(self, cfg: BillingConfig) -> None:
        self.cfg = cfg
        self.quantum = Decimal(1).scaleb(-cfg.decimals)

    def round(self, d: Decimal) -> Decimal:
        return d.quantize(self.quantum, rounding=ROUND_HALF_EVEN)

    def multiplier(self, tags: Dict[str, str]) -> Decimal:
        m = Decimal(1)
        for key, values in self.cfg.multipliers.items():
            v = tags.get(key)
            if v is not None and v in values:
                m *= values[v]
        return m

    def price(self, q: Dict[str, Optional[Decimal]], p_ratio: Decimal
              ) -> Tuple[Dict[str, Decimal], List[str]]:
        """Exact charge per resource, and the resources with a rate but no figure."""
        out: Dict[str, Decimal] = {}
        unpriced = []
        np_ratio = 1 - p_ratio
        for r in RESOURCES:
            pr, npr = self.cfg.prime[r], self.cfg.nonprime[r]
            if (pr == 0 and npr == 0) or r not in q:
                continue
            v = q.get(r)
            if v is None:
                unpriced.append(r)
                continue
            out[r] = v * (p_ratio * pr + np_ratio * npr)
        return out, unpriced


def _lit(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else repr(float(b))


def _tree(col: str, bounds: Sequence[float], lo: int, hi: int) -> str:
    """A CASE expression: (number of bounds <= col) - 1, by binary search."""
    if lo == hi:
        return str(lo - 1)
    mid = (lo + hi) // 2
    return (f"CASE WHEN {col} < {_lit(bounds[mid])} THEN {_tree(col, bounds, lo, mid)} "
            f"ELSE {_tree(col, bounds, mid + 1, hi)} END")


def _ratio(prime_s: float, wall_s: float) -> Decimal:
    return Decimal(prime_s) / Decimal(wall_s) if wall_s > 0 else Decimal(0)


def _json_loads(text: Optional[str]) -> Dict[str, Any]:
    try:
        v = json.loads(text) if text else {}
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def job_items(db: Any, biller: Biller, since: float, until: float) -> List[Dict[str, Any]]:
    """One priced item per job that ended in [since, until). Its user is the owner's
    name (on the central store the site user of the user mapping, Db.user_label); its
    account the job's ``account`` tag, else the user mapping's."""
    from elsa.report.query import job_usage

    db = adapt(db)
    rows = db.execute(JOBS_SQL.format(host=db.host()), (since, until)).fetchall()
    usage: Dict[int, Dict[str, Any]] = {}
    for i in range(0, len(rows), 500):
        usage.update(job_usage(db, [r[1] for r in rows[i:i + 500]]))
    sched = biller.cfg.schedule
    out = []
    for host, jid, name, owner_uid, tags_text, created, ended, params_text in rows:
        tags = {str(k): str(v) for k, v in _json_loads(tags_text).items()}
        params = _json_loads(params_text)
        u = dict((usage.get(jid) or {}).get("usage") or {})
        u["io_calls"] = io_calls_of(u)
        wall = max(0.0, ended - created)
        if wall > 0:
            prime_s = sched.prime_seconds(created, ended)
            p_ratio = _ratio(prime_s, wall)
        else:  # an instant: wholly in the class of its moment
            prime_s = 0.0
            p_ratio = Decimal(1 if sched.is_prime(created) else 0)
        wall_d = Decimal(wall)
        q = quantities(u, wall_d, cores_allowed(params), is_job=True)
        parts, unpriced = biller.price(q, p_ratio)
        mult = biller.multiplier(tags)
        exact = sum(parts.values(), ZERO) * mult
        user, account = db.user_label(host, owner_uid)
        out.append({
            "jid": jid, "name": name, "uid": owner_uid, "user": user,
            "account": tags.get("account", account), "tags": tags, "start": created,
            "end": ended,
            "wall_s": wall, "prime_s": prime_s, "nonprime_s": wall - prime_s,
            "processes": u.get("processes"), "multiplier": mult,
            "quantities": q, "parts": {r: v * mult for r, v in parts.items()},
            "unpriced": unpriced, "exact": exact, "charge": biller.round(exact),
        })
    return out


class _OutsideJobs:
    """Per-user items of process records outside any job: per uid on a node, per site
    user and account on the central store (Db.user_label; ``uid`` None where several)."""

    def __init__(self, biller: Biller, db: Db) -> None:
        self.biller = biller
        self.db = db
        self.per_user: Dict[Any, Dict[str, Any]] = {}

    def add(self, host: str, uid: Any, usage: Dict[str, Any], n: int, p_ratio: Decimal,
            wall_s: Decimal) -> None:
        q = quantities(usage, wall_s, None, is_job=False)
        parts, unpriced = self.biller.price(q, p_ratio)
        user, account = self.db.user_label(host, uid)
        key = (user, account) if self.db.central else uid
        item = self.per_user.get(key)
        if item is None:
            item = self.per_user[key] = {
                "jid": None, "name": "(no job)", "uid": uid, "user": user,
                "account": account, "tags": {}, "start": None, "end": None,
                "wall_s": ZERO, "prime_s": ZERO, "nonprime_s": ZERO, "processes": 0,
                "multiplier": Decimal(1), "quantities": {}, "parts": {}, "unpriced": [],
                "exact": ZERO}
        elif item["uid"] != uid:
            item["uid"] = None
        item["processes"] += n
        item["prime_s"] += wall_s * p_ratio
        item["nonprime_s"] += wall_s * (1 - p_ratio)
        item["wall_s"] += wall_s
        for r, v in q.items():
            if v is not None:
                item["quantities"][r] = item["quantities"].get(r, ZERO) + v
        for r, v in parts.items():
            item["parts"][r] = item["parts"].get(r, ZERO) + v
            item["exact"] += v
        for r in unpriced:
            if r not in item["unpriced"]:
                item["unpriced"].append(r)

    def items(self) -> List[Dict[str, Any]]:
        out = []
        for item in self.per_user.values():
            item["charge"] = self.biller.round(item["exact"])
            out.append(item)
        return out


def _best_sources(keyed: Iterable[Tuple[Any, str]], prios: Dict[str, int]) -> Dict[Any, str]:
    """Per key, the best of the sources (key, source) pairs name (usage.rank_sources)."""
    present: Dict[Any, Set[str]] = {}
    for key, src in keyed:
        present.setdefault(key, set()).add(src)
    return {key: rank_sources(srcs, prios)[0] for key, srcs in present.items()}


def _raw_into(acc: _OutsideJobs, db: Db, part: Part) -> None:
    """Exact: each record split by its own seconds (CSA's per-process p_ratio).

    *part* (elsa.report.window.window_parts) lies in one hour: per host, its records
    of the best source present in it, with those [thresholds] folded (edge_records),
    or in a ``processes`` part each process's record of its best source (an hour in
    which a source has a gap)."""
    from elsa.report.window import best_records, edge_records, record_exprs

    since, until = part.lo, part.hi
    assert since is not None and until is not None  # a bill's window is bounded
    periods = acc.biller.cfg.schedule.periods(since, until)
    bounds = [a for a, _, _ in periods]
    start = "COALESCE(start_time, end_time)"
    si = _tree(start, bounds, 0, len(bounds)) if len(bounds) > 1 else \
        f"CASE WHEN {start} < {_lit(bounds[0])} THEN -1 ELSE 0 END"
    ei = _tree("end_time", bounds, 0, len(bounds)) if len(bounds) > 1 else "0"
    prios = load_priorities(db)
    hosts: List[Any] = []
    where = "jid IS NULL AND end_time >= ? AND end_time < ?" + part.host_sql(db, hosts)
    per_process = part.kind == "processes"
    if per_process:
        table, params = best_records(db, prios, record_exprs(_RAW_COLS), since, until)
    else:
        table, params = edge_records(db, _RAW_COLS, where, [since, until] + hosts)
    params += [since, until] + hosts  # *where* again, on the relation
    host = db.host()
    grouped = db.execute(
        f"SELECT h, uid, source, si, ei, {_PROC_SUMS} FROM (SELECT {host} AS h, uid, source, "
        f"{si} AS si, {ei} AS ei, {_PROC_COLS} FROM {table} AS p WHERE {where}) AS t "
        f"GROUP BY h, uid, source, si, ei", params).fetchall()
    crossing: List[Tuple[Any, ...]] = []
    if any(r[3] != r[4] for r in grouped):
        crossing = db.execute(
            f"SELECT {host}, uid, source, start_time, end_time, {_PROC_COLS} FROM {table} AS p "
            f"WHERE {where} AND ({si}) <> ({ei})", params).fetchall()
    # Otherwise one source per host, the best present (as `elsa summary` counts), so a
    # process reported by two sources is billed once.
    best = {} if per_process else _best_sources(((h, src) for h, _uid, src, *_ in grouped),
                                                prios)
    for h, uid, src, s_idx, e_idx, n, cu, cs, memk, integ, rd, wr, el in grouped:
        if s_idx != e_idx or best.get(h, src) != src:
            continue
        usage = {"cpu_user_us": cu, "cpu_system_us": cs, "mem_peak_kb_ms": memk,
                 "coremem_kb_us": integ, "read_bytes": rd, "write_bytes": wr}
        acc.add(h, uid, usage, n, Decimal(1 if periods[e_idx][2] else 0),
                Decimal(el or 0) / _US)
    for h, uid, src, st, en, n, cu, cs, peak, el, integ, rd, wr in crossing:
        if best.get(h, src) != src:
            continue
        st = en if st is None else st
        span = max(en - st, 1.0)  # CSA: elapsed at least 1 s
        prime_s = acc.biller.cfg.schedule.prime_seconds(en - span, en)
        usage = {"cpu_user_us": cu, "cpu_system_us": cs, "mem_peak_kb_ms": peak,
                 "coremem_kb_us": integ, "read_bytes": rd, "write_bytes": wr}
        # A folded row (n records, from the first's start to the last's end): its
        # records' elapsed time, at the prime share of that span.
        wall = Decimal(span) if n == 1 else Decimal(el or 0) / _US
        acc.add(h, uid, usage, n, _ratio(prime_s, span), wall)


def _rollup_sql(db: Db, cond: str) -> str:
    """Whole hours from the store's hourly rollup (all process records, per host, hour,
    source and uid) matching the host condition *cond*."""
    host = db.host()
    return (f"SELECT {host}, bucket, source, uid, SUM(processes), SUM(cpu_user_us), "
            f"SUM(cpu_system_us), SUM(read_bytes), SUM(write_bytes), SUM(elapsed_us) "
            f"FROM usage_rollup WHERE bucket >= ? AND bucket < ?{cond} "
            f"GROUP BY {host}, bucket, source, uid")


def _jobbed_sql(db: Db, table: str, count: str, cond: str, lo: float, hi: float,
                hosts: List[Any]) -> Tuple[str, List[Any]]:
    """The records in *table* of the jobs alive in [lo, hi) (what :func:`_rollup_sql`
    reads of them: jobs are billed as jobs), per host, hour, source and uid, the hour
    as the rollup files them (Db.hour), matching the host condition *cond* (on p.)
    with its *hosts*: the statement and its parameters."""
    if db.central:
        # A job's row reaches the central store when the job ends; the records of
        # one still running on its node are there already, and are the job's all
        # the same (billed with it when it ends, as the node bills them). The jobs
        # alive in a window hold all its records with a jid anyway: no index to gain.
        src, jobs, params = f"{table} AS p", "p.jid IS NOT NULL", [lo, hi]
    else:
        # From the jobs alive in the window through the jid index, not a scan of
        # every record (CROSS JOIN: SQLite keeps this join order; standard SQL).
        src = f"jobs AS j CROSS JOIN {table} AS p"
        jobs = "p.jid = j.jid AND j.created < ? AND (j.ended IS NULL OR j.ended >= ?)"
        params = [hi, lo, lo, hi]
    return (f"SELECT {db.host('p.')}, {db.hour('p.end_time')} AS b, p.source AS s, "
            f"COALESCE(p.uid, -1) AS u, {count}, SUM(p.cpu_user_us), SUM(p.cpu_system_us), "
            f"SUM(p.read_bytes), SUM(p.write_bytes), SUM(p.elapsed_us) "
            f"FROM {src} WHERE {jobs} "
            f"AND p.end_time >= ? AND p.end_time < ?{cond} GROUP BY 1, 2, 3, 4",
            params + hosts)


def _rollup_into(acc: _OutsideJobs, db: Db, part: Part) -> None:
    """A part of whole hours: each hour's usage split by that hour's prime seconds."""
    assert part.lo is not None and part.hi is not None  # a bill's window is bounded
    blo, bhi = int(part.lo), int(part.hi)
    hosts: List[Any] = []
    roll = db.execute(_rollup_sql(db, part.host_sql(db, hosts)), [blo, bhi] + hosts
                      ).fetchall()
    jobbed: Dict[Tuple[Any, int, str, int], List[int]] = {}
    lo, hi = blo * _BUCKET, bhi * _BUCKET
    hosts = []
    cond = part.host_sql(db, hosts, "p.")
    got = db.execute(*_jobbed_sql(db, "proc_usage", "COUNT(*)", cond, lo, hi, hosts)
                     ).fetchall()
    if db.has_folded():
        got += db.execute(*_jobbed_sql(db, "proc_folded", "SUM(p.folded)", cond, lo, hi,
                                       hosts)).fetchall()
    # Figures no record measured are None (NULL) in the rollup and in the jobs' sums
    # alike, and stay unknown, never 0 (docs/billing.md): they add up as SQL's SUM().
    for h, b, src, uid, *vals in got:
        have = jobbed.setdefault((h, b, src, uid), [None] * len(vals))
        for i, v in enumerate(vals):
            have[i] = plus(have[i], v)
    # The best source present in each hour of each host, as `elsa summary` counts it.
    best = _best_sources((((h, b), src) for h, b, src, *_ in roll), load_priorities(db))
    sched = acc.biller.cfg.schedule
    ratio: Dict[int, Decimal] = {}
    # Sum integers per (host, user, prime fraction) first: one Decimal pricing per one.
    sums: Dict[Tuple[Any, int, Decimal], List[int]] = {}
    for h, b, src, uid, *vals in roll:
        if best[(h, b)] != src:
            continue
        minus = jobbed.get((h, b, src, uid))
        if minus is not None:
            # The jobs' records are among the hour's: an unknown of the hour is theirs too.
            vals = [v if v is None or m is None else v - m for v, m in zip(vals, minus)]
        if vals[0] <= 0:
            continue
        p = ratio.get(b)
        if p is None:
            p = ratio[b] = _ratio(sched.prime_seconds(b * _BUCKET, (b + 1) * _BUCKET),
                                  _BUCKET)
        acc_vals = sums.setdefault((h, uid, p), [None] * len(vals))
        for i, v in enumerate(vals):
            acc_vals[i] = plus(acc_vals[i], v)
    for (h, uid, p), (n, cu, cs, rd, wr, el) in sorted(sums.items()):
        usage = {"cpu_user_us": cu, "cpu_system_us": cs, "read_bytes": rd, "write_bytes": wr}
        acc.add(h, uid, usage, n, p, Decimal(el or 0) / _US)


def process_items(db: Any, biller: Biller, since: float, until: float
                  ) -> List[Dict[str, Any]]:
    """Process records outside any job that ended in [since, until): one item per user.

    Read in the parts `elsa summary` reads (elsa.report.window.window_parts): whole
    hours from the hourly rollup (fast at any store size), the partial hours at the
    window's edges and the hours in which a source has a gap from the records
    themselves (exact). On the central store each node's best source is picked per
    hour, and a gap's hour is read process by process for that node's records only.
    """
    from elsa.report.window import per_process_hours, window_parts

    db = adapt(db)
    acc = _OutsideJobs(biller, db)
    for part in window_parts(since, until, per_process_hours(db)):
        if part.kind == "hours":
            _rollup_into(acc, db, part)
        else:
            _raw_into(acc, db, part)
    return acc.items()


def group_key(item: Dict[str, Any], by: str) -> Any:
    if by == "user":
        return item["user"]
    if by == "account":
        return item["account"]
    if by == "job":
        return item["jid"]
    if by.startswith("tag:"):
        return item["tags"].get(by[4:])
    raise ValueError(by)


def compute(db: Any, cfg: BillingConfig, since: float, until: float, by: str,
            tag_filter: Iterable[Tuple[str, str]] = (), uid: Optional[int] = None
            ) -> Dict[str, Any]:
    """The bill of [since, until) grouped *by* user|account|job|tag:KEY; with *uid*, only
    that user's items (a user's own bill under private_data)."""
    biller = Biller(cfg)
    filters = list(tag_filter)
    items = job_items(db, biller, since, until)
    if not filters:
        items += process_items(db, biller, since, until)
    else:
        items = [i for i in items if all(i["tags"].get(k) == v for k, v in filters)]
    if uid is not None:
        items = [i for i in items if i["uid"] == uid]
    rows: Dict[Any, Dict[str, Any]] = {}
    for it in items:
        key = group_key(it, by)
        if by == "job" and key is None:
            # One row per outside-job item: on the central store an item is a site user
            # and account, and one uid on two hosts is two users.
            key = ("no-job", it["uid"], it["user"], it["account"])
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"key": key, "items": [], "charge": ZERO, "parts": {},
                               "prime_s": ZERO, "nonprime_s": ZERO, "processes": 0,
                               "jobs": 0, "unpriced": []}
        row["items"].append(it)
        row["charge"] += it["charge"]
        row["jobs"] += 1 if it["jid"] is not None else 0
        row["processes"] += it["processes"] or 0
        row["prime_s"] += Decimal(it["prime_s"])
        row["nonprime_s"] += Decimal(it["nonprime_s"])
        for r, v in it["parts"].items():
            row["parts"][r] = row["parts"].get(r, ZERO) + v
        for r in it["unpriced"]:
            if r not in row["unpriced"]:
                row["unpriced"].append(r)
    ordered = sorted(rows.values(), key=lambda r: (-r["charge"], str(r["key"])))
    total = sum((r["charge"] for r in ordered), ZERO)
    return {"by": by, "since": since, "until": until, "rows": ordered, "total": total,
            "biller": biller}
