"""The usage model: one row type, its schema, metrics and source priority.

Everything that produces, stores or reports usage goes through this module:

* **One row type.** A per-process usage row is a plain tuple in
  :data:`ROW_FIELDS` order, exactly the columns of the store's ``proc_usage``
  table. Sources on the hot path (taskstats, bsdacct: one record per process on
  the machine) build rows straight from kernel bytes; others describe a process
  or a whole job with :class:`UsageRecord`, which is only a convenient way to
  write one row (:func:`record_row`, and back with :func:`row_record`).
* **Metrics.** :data:`METRICS` and how per-process values combine into a job's
  (:data:`SUM_METRICS`, :data:`MAX_METRICS`).
* **Source priority.** Where sources overlap, the figure of the source with the
  lowest ``priority`` wins, per metric (:func:`best`), unless it is flagged
  incomplete for the job (records lost, elsad down) and a complete source has
  the metric (:func:`fallbacks` says why); summaries count the
  per-process records of the best process-level source only, so nothing is
  counted twice, and in the hours where a source has a gap each process's record
  of its best source (:func:`best_records_sql`). The priority is a field of each source's spec
  (:class:`elsa.core.source.SourceSpec`): elsad saves the installed sources'
  priorities in the store (:func:`save_priorities`), and reports read them from
  there (:func:`load_priorities`), so no source name is written into the core
  or the reports. A source without one ranks :data:`DEFAULT_PRIORITY`.
* **Attribution**, which job a usage record belongs to, is
  :mod:`elsa.core.attribution`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# -- the row -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageRecord:
    """Usage of one process (or, with ``jid`` set and ``pid == 0``, one whole job)
    as one source saw it. Units are fixed: µs, KiB, bytes, counts. ``None``
    means the source does not measure that metric."""

    source: str
    pid: int
    start_ticks: Optional[int] = None  # identity; None when the source cannot tell
    jid: Optional[int] = None          # set by job-level sources (cgroupstat)
    ppid: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    comm: str = ""
    start_time: Optional[float] = None  # epoch seconds
    end_time: Optional[float] = None    # epoch seconds
    exit_code: Optional[int] = None     # raw wait status (code << 8 | signal)
    cpu_user_us: Optional[int] = None
    cpu_system_us: Optional[int] = None
    elapsed_us: Optional[int] = None
    max_rss_kb: Optional[int] = None
    max_vm_kb: Optional[int] = None
    read_bytes: Optional[int] = None
    write_bytes: Optional[int] = None
    read_chars: Optional[int] = None
    write_chars: Optional[int] = None
    minflt: Optional[int] = None
    majflt: Optional[int] = None
    nvcsw: Optional[int] = None
    nivcsw: Optional[int] = None
    coremem_kb_us: Optional[int] = None  # RSS integral, KiB·µs
    virtmem_kb_us: Optional[int] = None
    extra: Mapping[str, int] = field(default_factory=dict)
    final: bool = True  # False for interim job-level readings that later ones supersede


#: The per-process usage row: a plain tuple in this order, the columns of the
#: store's ``proc_usage`` table (``extra`` is compact JSON or None).
ROW_FIELDS = ("source", "jid", "pid", "start_ticks", "start_time", "end_time", "ppid", "uid",
              "gid", "comm", "exit_code", "cpu_user_us", "cpu_system_us", "elapsed_us",
              "max_rss_kb", "max_vm_kb", "read_bytes", "write_bytes", "read_chars",
              "write_chars", "minflt", "majflt", "nvcsw", "nivcsw", "coremem_kb_us",
              "virtmem_kb_us", "extra")
UsageRow = Tuple[Any, ...]

#: Row positions the aggregator reads.
SRC, JID, PID, START_TICKS, START_TIME, END, PPID = 0, 1, 2, 3, 4, 5, 6


#: Built once: json.dumps with options builds an encoder per call (2-3 µs per record
#: more on the AMD EPYC VM, issue 18).
_EXTRA_ENCODER = json.JSONEncoder(separators=(",", ":"))


def extra_json(extra: Mapping[str, Any]) -> Optional[str]:
    """A record's ``extra`` as the store keeps it: compact JSON, NULL when empty."""
    return _EXTRA_ENCODER.encode(dict(extra)) if extra else None


def record_row(rec: UsageRecord, jid: Optional[int]) -> UsageRow:
    """The usage row of a per-process record (end time now when unknown)."""
    end = rec.end_time
    if end is None:
        end = time.time()
    return (rec.source, jid, rec.pid, rec.start_ticks, rec.start_time, end, rec.ppid, rec.uid,
            rec.gid, rec.comm, rec.exit_code, rec.cpu_user_us, rec.cpu_system_us,
            rec.elapsed_us, rec.max_rss_kb, rec.max_vm_kb, rec.read_bytes, rec.write_bytes,
            rec.read_chars, rec.write_chars, rec.minflt, rec.majflt, rec.nvcsw, rec.nivcsw,
            rec.coremem_kb_us, rec.virtmem_kb_us, extra_json(rec.extra))


def row_record(row: Sequence[Any]) -> UsageRecord:
    """The :class:`UsageRecord` of a usage row (the inverse of :func:`record_row`)."""
    kw = dict(zip(ROW_FIELDS, row))
    extra = kw.pop("extra")
    return UsageRecord(**kw, extra=json.loads(extra) if extra else {})


# -- metrics and priority ------------------------------------------------------------------

SUM_METRICS = ("cpu_user_us", "cpu_system_us", "elapsed_us", "read_bytes", "write_bytes",
               "read_chars", "write_chars", "minflt", "majflt", "nvcsw", "nivcsw",
               "coremem_kb_us", "virtmem_kb_us")
MAX_METRICS = ("max_rss_kb", "max_vm_kb")
METRICS = ("processes",) + SUM_METRICS + MAX_METRICS

DEFAULT_PRIORITY = 50
PRIORITY_KEY = "usage.priority"

Priorities = Mapping[str, int]


def priorities_of(specs: Mapping[str, Any]) -> Dict[str, int]:
    """Source name -> priority, from source specs (``SourceSpec.priority``)."""
    return {name: int(getattr(spec, "priority", DEFAULT_PRIORITY))
            for name, spec in specs.items()}


SET_META = ("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
             "SET value = excluded.value")
Execute = Callable[[str, Sequence[Any]], Any]


def save_priorities(db: sqlite3.Connection, execute: Execute, prios: Priorities) -> None:
    """Record the installed sources' priorities in the store for the reports
    (read through *db*, written through *execute*: the daemon's store writer)."""
    old = load_priorities(db)
    merged = {**old, **prios}
    if merged != old:
        execute(SET_META, (PRIORITY_KEY, json.dumps(merged, sort_keys=True)))


def load_priorities(db: sqlite3.Connection) -> Dict[str, int]:
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (PRIORITY_KEY,)).fetchone()
    except sqlite3.Error:
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(row[0]).items()} if row else {}
    except (ValueError, TypeError, AttributeError):
        return {}


def priority(source: str, prios: Priorities) -> int:
    return prios.get(source, DEFAULT_PRIORITY)


def priority_sql(column: str, prios: Priorities) -> Tuple[str, list]:
    """A SQL expression ranking *column* (a source name) by *prios*, with its parameters."""
    if not prios:
        return str(DEFAULT_PRIORITY), []
    params: list = []
    parts = []
    for name, value in sorted(prios.items()):
        parts.append("WHEN ? THEN ?")
        params += [name, int(value)]
    return f"(CASE {column} {' '.join(parts)} ELSE {DEFAULT_PRIORITY} END)", params


def rank_sources(sources: Iterable[str], prios: Priorities,
                 incomplete: Optional[Mapping[str, str]] = None) -> List[str]:
    """Sources in the order :func:`best` tries them: complete before incomplete,
    then by priority, then by name."""
    bad = incomplete or {}
    return sorted(sources, key=lambda s: (s in bad, priority(s, prios), s))


def best(per_source: Mapping[str, Mapping[str, Any]], prios: Priorities,
         incomplete: Optional[Mapping[str, str]] = None
         ) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The best figure of each metric and the source it came from.

    *per_source* maps a source name to its job totals (metric -> value, ``None``
    when the source does not measure it); *incomplete* maps the sources flagged
    incomplete for the job to why. Per metric, the source with the lowest
    priority that has a value wins, among the complete ones when any has it."""
    values: Dict[str, Any] = {}
    chosen: Dict[str, str] = {}
    order = rank_sources(per_source, prios, incomplete)
    for metric in METRICS:
        for src in order:
            v = per_source[src].get(metric)
            if v is not None:
                values[metric] = v
                chosen[metric] = src
                break
        else:
            values[metric] = None
    return values, chosen


def fallbacks(chosen: Mapping[str, str], per_source: Mapping[str, Mapping[str, Any]],
              prios: Priorities, incomplete: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Metric -> why its figure is not from the source that ranks first for it:
    that source is flagged incomplete for the job (see :func:`best`)."""
    out: Dict[str, str] = {}
    if not incomplete:
        return out
    for metric, src in chosen.items():
        skipped = [s for s in rank_sources(per_source, prios)
                   if s in incomplete and s != src
                   and per_source[s].get(metric) is not None
                   and priority(s, prios) <= priority(src, prios)]
        if skipped:
            out[metric] = (f"from {src}: {', '.join(skipped)} incomplete for this job")
    return out


def not_below_records(values: Dict[str, Any], chosen: Dict[str, str],
                      per_source: Mapping[str, Mapping[str, Any]], prios: Priorities,
                      incomplete: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The CPU rule for a job: never below its own process records.

    A process counts whole in the job it ended in: its record holds the CPU it
    used before it joined (the root row of ``elsa-jobmng run`` is elsa-jobmng
    itself, whose start-up runs before it joins). A cgroup counts only from the
    join, so for a job of few, attached processes the cgroup can read below the
    records. Then the records' figures are the job's, and the returned note says
    why; otherwise None. (The cgroup reads above the records for jobs of many
    short processes: the records miss each exit's teardown.)"""
    cpu = ("cpu_user_us", "cpu_system_us")
    if any(values.get(m) is None for m in cpu):
        return None
    counted = [s for s, v in per_source.items() if v.get("processes")]
    if not counted:
        return None
    src = rank_sources(counted, prios, incomplete)[0]
    rec = per_source[src]
    if any(rec.get(m) is None for m in cpu):
        return None
    short = sum(rec[m] for m in cpu) - sum(values[m] for m in cpu)
    if short <= 0 or all(chosen.get(m) == src for m in cpu):
        return None
    for m in cpu:
        values[m] = rec[m]
        chosen[m] = src
    return (f"CPU from the {src} process records: {short} µs above the "
            f"{', '.join(sorted(set(per_source) - {src})) or 'job'} counter, used by "
            "members before they joined the job")


# -- where a source missed processes: its gaps --------------------------------------------
# A source may miss processes over an interval: taskstats while elsad was down (its records
# are not queued without a listener, SourceSpec.covers_downtime False) or when its socket
# overflowed (ENOBUFS), bsdacct while another program had taken kernel accounting over.
# Another source may have records of those processes (bsdacct, elsa import-acct). Summaries
# and bills count one source per hour, the best present, so in an hour where that source
# missed some processes the ones only the others saw would be dropped. elsad therefore
# records each such interval (meta key gap:<from>:<source>, value: to), and the reports read
# the hours a gap overlaps process by process (best_records_sql) where the gapped source has
# records and another source too. In an hour where it has none (inside a downtime) the best
# source present is a complete one: that hour is read from the rollup as any other.
# Nodes ship their gaps to the central store (elsa.central.shipper, table ``gaps``), so that
# the central reports read those hours as the node's do.

GAP_PREFIX = "gap:"
#: A node's gaps: the meta keys from GAP_PREFIX up to the next character after its ':'
#: (an index range, not LIKE, which SQLite cannot answer from the key's index: the
#: shipper reads the gaps every round).
GAPS_SQL = "SELECT key, value FROM meta WHERE key >= ? AND key < ?"
_GAPS_RANGE = (GAP_PREFIX, GAP_PREFIX[:-1] + chr(ord(GAP_PREFIX[-1]) + 1))
#: The central store's gaps, every node's (central migration 4).
CENTRAL_GAPS_SQL = "SELECT host, source, start_time, end_time FROM gaps"

Gap = Tuple[str, float, float]


def gap_stmt(source: str, start: float, end: float) -> Tuple[str, Tuple[str, str]]:
    """The statement recording that *source* missed records from *start* to *end*
    (start 0: before it first ran on this store). A later gap of the same source
    and start (the source still not running, a gap extended) replaces it."""
    return SET_META, (f"{GAP_PREFIX}{round(start, 3)!r}:{source}", repr(round(end, 3)))


def load_gaps(db: Any) -> List[Gap]:
    """(source, from, to) of every gap recorded in a node's store (a SQLite connection
    or its report adapter)."""
    try:
        rows = db.execute(GAPS_SQL, _GAPS_RANGE).fetchall()
    except sqlite3.Error:
        return []
    out: List[Gap] = []
    for key, value in rows:
        try:
            start, source = key[len(GAP_PREFIX):].split(":", 1)
            out.append((source, float(start), float(value)))
        except ValueError:
            continue
    return out


def gaps_by_host(db: Any) -> Dict[Optional[str], List[Gap]]:
    """The recorded gaps by host: a node's store's under None (one host), or, through
    the central store's report adapter (``db.central``), those every node shipped."""
    if not getattr(db, "central", False):
        gaps = load_gaps(db)
        return {None: gaps} if gaps else {}
    out: Dict[Optional[str], List[Gap]] = {}
    for host, src, start, end in db.execute(CENTRAL_GAPS_SQL).fetchall():
        out.setdefault(host, []).append((src, float(start), float(end)))
    return out


def gap_buckets(gaps: Iterable[Gap], bucket: int) -> List[Tuple[str, int, int]]:
    """The hour buckets the *gaps* overlap: (source, first, last) ranges, those of a
    source that overlap or touch merged into one (a store gathers a gap per restart
    and per overflow episode, and a report queries each range: 10,000 gaps within 8
    hours took 1.2 s a report when queried one by one). Each gap is widened by
    ACCT_TOLERANCE_S on both sides: a record's end time is off by up to 1 s (pacct's
    btime is whole seconds), so the record of a process the gapped source missed
    may fall just outside the gap. A gap from 0 (before the source first ran on
    the store, when it has no records) gives its last hour only."""
    from elsa.core.attribution import ACCT_TOLERANCE_S

    ranges = []
    for src, start, end in gaps:
        last = int((end + ACCT_TOLERANCE_S) // bucket)
        first = int((start - ACCT_TOLERANCE_S) // bucket) if start > 0 else last
        ranges.append((src, min(first, last), last))
    out: List[Tuple[str, int, int]] = []
    for src, first, last in sorted(ranges):
        if out and out[-1][0] == src and first <= out[-1][2] + 1:
            if last > out[-1][2]:
                out[-1] = (src, out[-1][1], last)
        else:
            out.append((src, first, last))
    return out


def best_records_sql(ranked: Sequence[str], columns: str, lo: float, hi: float,
                     host: str = "") -> Tuple[str, List[Any]]:
    """A subquery (with its parameters) of *columns* of the ``proc_usage`` rows ending in
    [lo, hi) that are their process's record from the first of the sources *ranked*
    (in :func:`rank_sources`' order) that has one: a row is left out when a
    better-ranked source has a record of the same process, i.e. of the same pid (and
    *host*, a column: the central store) ending within ACCT_TOLERANCE_S (pacct's end
    time is off by up to 1 s; a pid cannot come back that soon). Sources not in
    *ranked* rank last.

    One sort of the part's rows by pid and end time (a window function, 3-5 µs per
    row on the 2-core VM); looking up each row's twins through the end-time index
    took 33 µs per row."""
    from elsa.core.attribution import ACCT_TOLERANCE_S

    tol = ACCT_TOLERANCE_S
    order = (f"(CASE source {' '.join('WHEN ? THEN ?' for _ in ranked)} "
             f"ELSE {len(ranked)} END)" if ranked else "0")
    params: List[Any] = [v for i, src in enumerate(ranked) for v in (src, i)]
    twin_host = f", {host} AS twin_host" if host else ""
    part = "twin_host, twin_pid" if host else "twin_pid"
    sql = (f"(SELECT * FROM (SELECT *, MIN(src_rank) OVER (PARTITION BY {part} "
           f"ORDER BY twin_end RANGE BETWEEN {tol} PRECEDING AND {tol} FOLLOWING) "
           f"AS best_rank FROM (SELECT {columns}, pid AS twin_pid, end_time AS twin_end"
           f"{twin_host}, {order} AS src_rank FROM proc_usage "
           f"WHERE end_time >= ? AND end_time < ?) AS c) AS r "
           f"WHERE src_rank = best_rank AND twin_end >= ? AND twin_end < ?)")
    return sql, params + [lo - tol, hi + tol, lo, hi]


# -- accumulating into the per-hour and per-job tables -------------------------------------
# The one ON CONFLICT clause of each table: every writer (aggregator.add_to_sums for usage
# rows, the folded records' triggers) adds a row's figures to what the table holds the same
# way. Sums skip unknowns as SQL's SUM() does: a figure stays NULL while no record added to
# it measured it (a bsdacct record has no I/O bytes; a job's row may exist with no figures
# yet: a source flagged incomplete before its first record, e.g. right after a restart),
# and otherwise is the sum of the records that did.

def plus(a: Optional[int], b: Optional[int]) -> Optional[int]:
    """Two figures summed as SQL's SUM() and the ON CONFLICT clauses below sum them: an
    unknown (None) is skipped, and the sum is None only when both are."""
    if a is None:
        return b
    return a if b is None else a + b


def folded_mem_kb_sum(row: str = "") -> str:
    """A row of ``proc_folded`` (records [thresholds] folded, elsa.core.thresholds): its
    memory sum as the rollup counts it (*row*: ``NEW.`` in a trigger):
    NULL when no record of it measured memory, as SUM(COALESCE(max_rss_kb, max_vm_kb))
    over the records would be. The row's mem_kb_sum is then 0 (the column is NOT NULL),
    and its maxima say whether any record did."""
    return (f"CASE WHEN {row}max_rss_kb IS NULL AND {row}max_vm_kb IS NULL THEN NULL "
            f"ELSE {row}mem_kb_sum END")


#: usage_rollup's summed figures (store migration 13 made them nullable).
#: ``mem_kb_sum``: each record's peak RSS, else its peak VM, summed for averages.
ROLLUP_SUMS = ("cpu_user_us", "cpu_system_us", "elapsed_us", "mem_kb_sum", "read_bytes",
               "write_bytes", "minflt", "majflt")


def _accumulate(sums: Sequence[str], maxes: Sequence[str]) -> str:
    return ("".join(f"        {c} = COALESCE({c} + excluded.{c}, {c}, excluded.{c}),\n"
                    for c in sums)
            + "".join(f"        {c} = MAX(COALESCE({c}, excluded.{c}), "
                      f"COALESCE(excluded.{c}, {c})),\n" for c in maxes))


ROLLUP_ACCUMULATE = (
    "\n    ON CONFLICT DO UPDATE SET\n"
    "        processes = processes + excluded.processes,\n"
    + _accumulate(ROLLUP_SUMS, ("max_rss_kb",)).rstrip(",\n"))

JOB_USAGE_ACCUMULATE = (
    "\n    ON CONFLICT DO UPDATE SET\n"
    + _accumulate(("processes",) + SUM_METRICS, MAX_METRICS)
    + "        updated = MAX(COALESCE(updated, 0), excluded.updated)")
