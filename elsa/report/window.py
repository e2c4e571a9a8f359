"""How a report's time window is read in parts (whole hours, edge hours, gap hours).

Summaries, bills and the per-day usage read the process records ending in a
window through the same parts (:func:`window_parts`): whole hours from the hourly
rollup, the partial hours at the window's edges from the records, and the hours
in which a source missed processes (its gaps, :func:`per_process_hours`) process
by process, each from its best source's record (:func:`best_records`). One copy
serves a node's SQLite store and the central PostgreSQL store
(elsa.report.connect.Db).
"""

from __future__ import annotations

import math
from typing import AbstractSet, Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from elsa.core.usage import (
    best_records_sql,
    folded_mem_kb_sum,
    gap_buckets,
    gaps_by_host,
    rank_sources,
)
from elsa.report.connect import BUCKET, Db, adapt


def _bucket_range(since: Optional[float], until: Optional[float]
                  ) -> Tuple[Optional[int], Optional[int]]:
    """Whole hour buckets inside [since, until): [lo, hi), None = unbounded."""
    lo = None if since is None else math.ceil(since / BUCKET)
    hi = None if until is None else math.floor(until / BUCKET)
    return lo, hi


def range_sql(col: str, lo: Optional[float], hi: Optional[float],
              params: List[Any]) -> str:
    """"col >= ? AND col < ?" for the bounds given ("TRUE" for none)."""
    parts = []
    if lo is not None:
        parts.append(f"{col} >= ?")
        params.append(lo)
    if hi is not None:
        parts.append(f"{col} < ?")
        params.append(hi)
    return " AND ".join(parts) or "TRUE"


def host_sql(db: Db, hosts: Optional[Sequence[str]], params: List[Any], op: str = "IN",
             alias: str = "") -> str:
    """" AND host IN (...)" (*op* NOT IN: but them) for *hosts*; empty for none.
    *alias*: the host column's table, with its dot ("p.")."""
    if not hosts:
        return ""
    params.extend(hosts)
    return f" AND {db.host(alias)} {op} ({', '.join('?' * len(hosts))})"


class Part(NamedTuple):
    """A part of a report's window (:func:`window_parts`): how and where it is read."""

    kind: str  # "hours", "records" or "processes"
    lo: Optional[float]  # bounds: hour buckets for "hours", else epoch seconds
    hi: Optional[float]
    #: Central store: read only these hosts' records (None: every host's) ...
    only: Optional[AbstractSet[str]] = None
    #: ... or every host's but these (the hosts a "processes" part of the hour reads).
    but: AbstractSet[str] = frozenset()

    def host_sql(self, db: Db, params: List[Any], alias: str = "") -> str:
        """The part's host condition (" AND ..."; empty when it reads every host)."""
        if self.only is not None:
            return host_sql(db, sorted(self.only), params, alias=alias)
        return host_sql(db, sorted(self.but), params, "NOT IN", alias)


def window_parts(since: Optional[float], until: Optional[float],
                 per_process_hours: Optional[Mapping[int, Optional[AbstractSet[str]]]] = None
                 ) -> List[Part]:
    """How the reports read the process records ending in [since, until), in parts:

    * ``hours`` [lo, hi): whole hour buckets (None: unbounded), from the
      hourly rollup, the best source present per hour;
    * ``records`` [lo, hi): a partial hour at the window's edge, from the records,
      the best source present in it;
    * ``processes`` [lo, hi): (part of) an hour of *per_process_hours* (a source
      missed processes there: :func:`per_process_hours`), from the records, each process
      once (its best source's record: :func:`best_records`). On the central store only
      the hosts whose gap it is are read so (``only``); the others' records of that hour
      are an ``hours`` or ``records`` part of their own (``but``), read as any other.

    Summaries and bills (elsa.billing.bill) read a window through the same parts."""
    blo, bhi = _bucket_range(since, until)
    if blo is not None and bhi is not None and bhi < blo:
        edges = [(since, until)]  # the window is inside one hour: only records
        hours: List[Tuple[Optional[int], Optional[int]]] = []
    else:
        edges = []
        if since is not None and blo is not None and since < blo * BUCKET:
            edges.append((since, blo * BUCKET))
        if until is not None and bhi is not None and bhi * BUCKET < until:
            edges.append((bhi * BUCKET, until))
        hours = [(blo, bhi)] if blo is None or bhi is None or blo < bhi else []
    per_process_hours = per_process_hours or {}
    special = sorted(per_process_hours)
    parts: List[Part] = []

    def per_process(kind: str, h: int, lo: float, hi: float) -> None:
        hosts = per_process_hours[h]
        parts.append(Part("processes", lo, hi, only=hosts))
        if hosts is not None:  # the other hosts of the hour
            parts.append(Part(kind, h if kind == "hours" else lo,
                              h + 1 if kind == "hours" else hi, but=hosts))

    for lo, hi in edges:
        h = math.floor(lo / BUCKET)
        if h in per_process_hours:
            per_process("records", h, lo, hi)
        else:
            parts.append(Part("records", lo, hi))
    for lo, hi in hours:
        for h in special:
            if (lo is None or h >= lo) and (hi is None or h < hi):
                if lo is None or h > lo:
                    parts.append(Part("hours", lo, h))
                per_process("hours", h, h * BUCKET, (h + 1) * BUCKET)
                lo = h + 1
        if lo is None or hi is None or lo < hi:
            parts.append(Part("hours", lo, hi))
    return parts


#: The hours in [?, ?] in which source ? has records and another source too (of one host
#: on the central store: {host}): a gap's hours that are read process by process
#: (elsa.core.usage, "its gaps").
GAP_HOURS_SQL = ("SELECT bucket FROM usage_rollup WHERE bucket >= ? AND bucket <= ?{host} "
                 "GROUP BY bucket HAVING COUNT(DISTINCT source) > 1 "
                 "AND MAX(CASE WHEN source = ? THEN 1 ELSE 0 END) = 1")


def per_process_hours(db: Any) -> Dict[int, Optional[AbstractSet[str]]]:
    """The hours a report reads process by process: those a source's gap overlaps
    (elsa.core.usage.gap_buckets) in which that source has records, so it missed part
    of the hour's processes, and another source has records too (with one, there is
    nothing to choose between). In an hour where the gapped source has none, the best
    source present is a complete one. Each hour maps to the hosts whose gaps it is
    (the central store: only their records are read so) or None (a node's store)."""
    db = adapt(db)
    hours: Dict[int, Optional[AbstractSet[str]]] = {}
    for host, gaps in gaps_by_host(db).items():
        params: List[Any] = []
        where = "" if host is None else host_sql(db, [host], params)
        for src, first, last in gap_buckets(gaps, BUCKET):
            for (h,) in db.execute(GAP_HOURS_SQL.format(host=where), [first, last] + params
                                   + [src]):
                got = hours.get(int(h))
                hours[int(h)] = None if host is None else (got or frozenset()) | {host}
    return hours


def best_records(db: Any, prios: Dict[str, int], columns: str, lo: float, hi: float
                 ) -> Tuple[str, List[Any]]:
    """*columns* of the records ending in [lo, hi), one per process: its best source's
    (elsa.core.usage.best_records_sql), as a subquery with its parameters."""
    db = adapt(db)
    near = db.execute("SELECT DISTINCT source FROM usage_rollup WHERE bucket >= ? AND "
                      "bucket <= ?", (math.floor(lo / BUCKET) - 1,
                                      math.floor(hi / BUCKET) + 1)).fetchall()
    ranked = rank_sources({r[0] for r in near} | set(prios), prios)
    host = db.host() if db.central else ""
    return best_records_sql(ranked, columns + (f", {host}" if host else ""), lo, hi, host)


#: The record columns an edge part reads differently from the two tables of records:
#: (proc_usage's expression, proc_folded's). ``n``: the processes a row counts; ``mem``:
#: its memory for averages (what the rollup's mem_kb_sum adds); ``peak_kb_ms``: its peak
#: RSS times its elapsed ms (billing's memory), unknown for a folded row, whose peak is
#: the largest of its records'.
_EDGE_AS = {"n": ("1", "folded"),
            "mem": ("COALESCE(max_rss_kb, max_vm_kb)", folded_mem_kb_sum()),
            "peak_kb_ms": ("max_rss_kb * (elapsed_us / 1000)", "NULL")}


def record_exprs(columns: Sequence[str], folded: int = 0) -> str:
    """*columns* as a SELECT list of proc_usage's rows (or, *folded* 1, of proc_folded's),
    with the columns of :data:`_EDGE_AS` read as each table gives them."""
    return ", ".join(f"{_EDGE_AS[c][folded]} AS {c}" if c in _EDGE_AS else c for c in columns)


def edge_records(db: Any, columns: Sequence[str], where: str, params: Sequence[Any]
                 ) -> Tuple[str, List[Any]]:
    """The records of a ``records`` part (a window's edge) matching *where* (with
    *params*), as a subquery of *columns* (and the host, on the central store), with
    its parameters: proc_usage's rows, a process each, and the rows ``[thresholds]``
    folded (elsa.core.thresholds), ``folded`` processes each, as the hourly rollup
    counts both, so an edge hour counts what a whole hour counts. A folded row's
    records ended within one of elsad's batches (seconds apart): it is at the edge
    where the last of them ended (its end_time)."""
    db = adapt(db)
    cols = list(columns) + ([db.host()] if db.central else [])

    def select(table: str, i: int) -> str:
        return f"SELECT {record_exprs(cols, i)} FROM {table} WHERE {where}"

    if not db.has_folded():
        return f"({select('proc_usage', 0)})", list(params)
    return (f"({select('proc_usage', 0)} UNION ALL {select('proc_folded', 1)})",
            list(params) * 2)
