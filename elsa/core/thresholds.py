"""CSA's accounting thresholds: small process records folded, totals kept.

A per-process record whose CPU time is under ``[thresholds] min_cpu_ms`` or
whose peak RSS is under ``min_rss_kb`` (either, as CSA's ``TIME_START`` /
``MEMT_START``) is not stored one by one: the small records of one batch are
folded into one row per job, source, user, command and hour in
``proc_folded``, whose triggers add them to the hourly rollup and the job
totals like any record. So ``elsa summary`` over whole hours, ``elsa jobs``,
``elsa job`` totals and bills are unchanged; what is lost is the per-process
detail (pid, exact start and end) of records nobody bills one by one. The
number folded is in ``elsa-jobmng status`` (aggregator ``folded``).
docs/accounting.md ("Thresholds") has the measured store size saved.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from elsa.config import Option, non_negative
from elsa.core.source import ROW_FIELDS
from elsa.core.usage import JOB_USAGE_ACCUMULATE, ROLLUP_ACCUMULATE, folded_mem_kb_sum, plus

OPTIONS: Dict[str, Option] = {
    "min_cpu_ms": Option(int, 0, "Process records with less CPU time (user + system, ms) are"
                         " folded into one row per job and command (totals unchanged). 0: off.",
                         check=non_negative),
    "min_rss_kb": Option(int, 0, "Process records with a smaller peak RSS (KiB) are folded"
                         " likewise. 0: off.", check=non_negative),
}

_SUMS = ("cpu_user_us", "cpu_system_us", "elapsed_us", "read_bytes", "write_bytes",
         "read_chars", "write_chars", "minflt", "majflt", "nvcsw", "nivcsw", "coremem_kb_us",
         "virtmem_kb_us")
_MAXES = ("max_rss_kb", "max_vm_kb")
FOLDED_COLUMNS = ("source", "jid", "uid", "gid", "comm", "start_time", "end_time",
                  "folded", "mem_kb_sum") + _SUMS + _MAXES
INSERT_FOLDED = (f"INSERT INTO proc_folded({', '.join(FOLDED_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(FOLDED_COLUMNS))})")

_I = {name: i for i, name in enumerate(ROW_FIELDS)}
_CPU_U, _CPU_S, _RSS = _I["cpu_user_us"], _I["cpu_system_us"], _I["max_rss_kb"]


#: A job's totals per source follow each folded row as it is inserted.
FOLDED_JOB_TRIGGER = """
    CREATE TRIGGER proc_folded_job AFTER INSERT ON proc_folded WHEN NEW.jid IS NOT NULL
    BEGIN
        INSERT INTO job_usage VALUES (
            NEW.jid, NEW.source, NEW.folded, NEW.cpu_user_us, NEW.cpu_system_us,
            NEW.elapsed_us, NEW.max_rss_kb, NEW.max_vm_kb, NEW.read_bytes, NEW.write_bytes,
            NEW.read_chars, NEW.write_chars, NEW.minflt, NEW.majflt, NEW.nvcsw, NEW.nivcsw,
            NEW.coremem_kb_us, NEW.virtmem_kb_us, NULL, NEW.end_time, NULL)
        """ + JOB_USAGE_ACCUMULATE + """;
    END;
"""

#: The hourly rollup follows each folded row as it is inserted (store migration 13; the
#: trigger of migration 3 counted unknown figures as 0).
FOLDED_ROLLUP_TRIGGER = """
    CREATE TRIGGER proc_folded_rollup AFTER INSERT ON proc_folded
    BEGIN
        INSERT INTO usage_rollup VALUES (
            CAST(NEW.end_time / 3600 AS INTEGER), 0, NEW.source, COALESCE(NEW.uid, -1),
            NEW.comm, NEW.folded, NEW.cpu_user_us, NEW.cpu_system_us, NEW.elapsed_us,
            NEW.max_rss_kb, """ + folded_mem_kb_sum("NEW.") + """,
            NEW.read_bytes, NEW.write_bytes, NEW.minflt, NEW.majflt)
        """ + ROLLUP_ACCUMULATE + """;
    END;
"""

#: Store migration 3: the folded rows and their triggers (same sums as proc_usage's).
#: Its rollup trigger is as it was then: migration 13 replaces it (FOLDED_ROLLUP_TRIGGER).
MIGRATION = """
    CREATE TABLE proc_folded (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        jid INTEGER,
        uid INTEGER,
        gid INTEGER,
        comm TEXT NOT NULL DEFAULT '',
        start_time REAL,
        end_time REAL NOT NULL,
        folded INTEGER NOT NULL,         -- process records in this row
        mem_kb_sum INTEGER NOT NULL,     -- their peak RSS (else VM) summed, for averages
        cpu_user_us INTEGER, cpu_system_us INTEGER, elapsed_us INTEGER,
        read_bytes INTEGER, write_bytes INTEGER, read_chars INTEGER, write_chars INTEGER,
        minflt INTEGER, majflt INTEGER, nvcsw INTEGER, nivcsw INTEGER,
        coremem_kb_us INTEGER, virtmem_kb_us INTEGER,
        max_rss_kb INTEGER, max_vm_kb INTEGER
    );
    CREATE INDEX proc_folded_jid ON proc_folded(jid) WHERE jid IS NOT NULL;
    CREATE INDEX proc_folded_end ON proc_folded(end_time);
    CREATE TRIGGER proc_folded_rollup AFTER INSERT ON proc_folded
    BEGIN
        INSERT INTO usage_rollup VALUES (
            CAST(NEW.end_time / 3600 AS INTEGER),
            CASE NEW.source WHEN 'taskstats' THEN 1 WHEN 'bsdacct' THEN 2 ELSE 9 END,
            NEW.source, COALESCE(NEW.uid, -1), NEW.comm, NEW.folded,
            COALESCE(NEW.cpu_user_us, 0), COALESCE(NEW.cpu_system_us, 0),
            COALESCE(NEW.elapsed_us, 0), NEW.max_rss_kb, NEW.mem_kb_sum,
            COALESCE(NEW.read_bytes, 0), COALESCE(NEW.write_bytes, 0),
            COALESCE(NEW.minflt, 0), COALESCE(NEW.majflt, 0))
        """ + ROLLUP_ACCUMULATE + """;
    END;
""" + FOLDED_JOB_TRIGGER


class Folder:
    """Splits a batch of usage rows into rows to store and folded rows."""

    def __init__(self, min_cpu_ms: int = 0, min_rss_kb: int = 0) -> None:
        self.min_cpu_us = min_cpu_ms * 1000
        self.min_rss_kb = min_rss_kb
        self.folded = 0

    @classmethod
    def from_section(cls, section: Any) -> Optional[Folder]:
        if not section["min_cpu_ms"] and not section["min_rss_kb"]:
            return None
        return cls(section["min_cpu_ms"], section["min_rss_kb"])

    def small(self, row: Sequence[Any]) -> bool:
        if self.min_cpu_us:
            cpu = (row[_CPU_U] or 0) + (row[_CPU_S] or 0)
            if (row[_CPU_U] is not None or row[_CPU_S] is not None) and cpu < self.min_cpu_us:
                return True
        rss = row[_RSS]
        return bool(self.min_rss_kb) and rss is not None and rss < self.min_rss_kb

    def split(self, rows: List[Tuple[Any, ...]]
              ) -> Tuple[List[Tuple[Any, ...]], List[Tuple[Any, ...]]]:
        """(rows kept one by one, folded rows in INSERT_FOLDED order)."""
        keep: List[Tuple[Any, ...]] = []
        groups: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
        for row in rows:
            if not self.small(row):
                keep.append(row)
                continue
            r = dict(zip(ROW_FIELDS, row))
            key = (r["source"], r["jid"], r["uid"], r["comm"], int(r["end_time"] // 3600))
            g = groups.get(key)
            if g is None:
                groups[key] = g = {k: r[k] for k in ("source", "jid", "uid", "gid", "comm",
                                                      "start_time", "end_time")}
                g["folded"] = g["mem_kb_sum"] = 0
                for k in _SUMS + _MAXES:
                    g[k] = None
            g["folded"] += 1
            # As the rollup sums records (COALESCE(max_rss_kb, max_vm_kb)): a peak RSS
            # of 0 is a figure, not a missing one.
            mem = r["max_rss_kb"] if r["max_rss_kb"] is not None else r["max_vm_kb"]
            g["mem_kb_sum"] += mem or 0
            if r["start_time"] is not None and (g["start_time"] is None
                                                or r["start_time"] < g["start_time"]):
                g["start_time"] = r["start_time"]
            g["end_time"] = max(g["end_time"], r["end_time"])
            for k in _SUMS:
                g[k] = plus(g[k], r[k])
            for k in _MAXES:
                if r[k] is not None and (g[k] is None or r[k] > g[k]):
                    g[k] = r[k]
        self.folded += len(rows) - len(keep)
        return keep, [tuple(g[c] for c in FOLDED_COLUMNS) for g in groups.values()]


FOLDED_OF_JOB_SQL = ("SELECT comm, uid, SUM(folded), SUM(cpu_user_us), SUM(cpu_system_us), "
                     "MAX(max_rss_kb), SUM(read_bytes), SUM(write_bytes), MIN(start_time), "
                     "MAX(end_time) FROM proc_folded "
                     "WHERE jid = ? AND source = ? GROUP BY comm, uid ORDER BY comm, uid")
FOLDED_KEYS = ("comm", "uid", "processes", "cpu_user_us", "cpu_system_us", "max_rss_kb",
               "read_bytes", "write_bytes", "first_start", "last_end")


def folded_of_job(db: Any, jid: int, source: Optional[str]) -> List[Dict[str, Any]]:
    """The job's folded records of *source*, per command and user (``elsa job``,
    ``elsa ja -c``)."""
    import sqlite3

    if source is None:
        return []
    try:
        rows = db.execute(FOLDED_OF_JOB_SQL, (jid, source)).fetchall()
    except sqlite3.OperationalError:  # a store elsad has not migrated yet
        return []
    return [dict(zip(FOLDED_KEYS, r)) for r in rows]
