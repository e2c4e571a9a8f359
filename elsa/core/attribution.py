"""The attribution rule: which job a usage record belongs to.

A usage record belongs to the job in which its process was a member: the same
boot, the same pid and the same start time, within the tolerance of what the
source knows of the start (:func:`identity`). Live aggregation looks this up in
memory (the manager's pid index and exit history), records read after the in-
memory history expired look it up in the stored membership history
(:data:`HISTORY_SQL`), and ``elsa import-acct`` applies the same match to whole
files (:data:`ATTRIBUTE_SQL`), converting a record's start time to clock ticks
of the boot it ran in through the boot times elsad records
(:func:`save_boot_epoch`).

A process that forked and exited while elsad was down is in no membership:
the proc connector's events of that time are gone. Its record still names
its parent (``ppid``), and a child is a member of the job its parent was a
member of when it forked (that is how membership spreads). So a record whose
own identity matches nothing, among records memory does not cover, follows
its ppid chain (:func:`attribute_by_parent`): first to a parent record among
the records read with it (the parent exits later, so its record follows the
child's in the file; recursively, for parents that also lived only in the
downtime), then to a membership of the parent pid that began before the
child started and had not ended (:data:`PARENT_SQL`, and the live members
in memory). Start times guard every step against pid reuse. A cgroup job's
counters need none of this: the kernel counted the downtime in the cgroup.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from elsa.core.model import CLOCK_TICKS
from elsa.core.usage import END, PID, PPID, SET_META, START_TICKS, START_TIME, Execute

#: taskstats gives the start as well as its exit time is known (start ticks from etime):
#: within half of btime's second plus the coarse clock's lag
#: (elsa.kernel.taskstats.exit_time_ns, BTIME_LAG_NS), rounded up.
TASKSTATS_TOLERANCE_TICKS = 52   # 0.52 s
#: pacct's ac_btime is whole seconds computed as exit time minus elapsed
#: (docs/kernel.md, "BSD accounting"): off by up to 1 s either way. A pid cannot come back
#: within 2 s without the kernel cycling through pid_max other pids first.
ACCT_TOLERANCE_S = 2.0
ACCT_TOLERANCE_TICKS = int(ACCT_TOLERANCE_S * CLOCK_TICKS)


def identity(row: Sequence[Any], boot_epoch: float) -> Tuple[Optional[int], int]:
    """(start ticks since boot, tolerance) of a row: its process's identity, as
    precisely as its source knows it. ``None``: the source cannot tell."""
    st = row[START_TICKS]
    if st is not None:
        return st, TASKSTATS_TOLERANCE_TICKS
    t = row[START_TIME]
    if t is not None:
        return int(round((t - boot_epoch) * CLOCK_TICKS)), ACCT_TOLERANCE_TICKS
    return None, 0


#: The stored membership history is the members table and, for the fork children
#: whose whole stay was short, their usage rows: a process that joined its job at its
#: fork and left it at its exit within CARRIED_STAY_S gets no member row once a usage
#: row with a start in ticks (taskstats') naming that job and process is committed: the
#: store's writer holds the closed stay for it and drops it in that row's transaction
#: (elsa.core.carrying). Most processes of a fork storm are such
#: children, and their member row was about an eighth of elsad's CPU per process
#: (docs/accounting.md, "Store writes"). The usage row says the same: the job the
#: process was in from its start to its exit. Rows of a start in seconds (pacct's)
#: carry nothing: their identity is too coarse, and they come late.
CARRIED_STAY_S = 1.0

#: The stored membership history, for one boot: (boot_id, pid, lo, hi, start). The
#: members' key (boot_id, start_ticks, pid, ...) gives the start window; the pid is
#: checked in the key's entries.
HISTORY_SQL = ("SELECT jid FROM members WHERE boot_id = ? AND pid = ? "
               "AND start_ticks BETWEEN ? AND ? ORDER BY abs(start_ticks - ?) LIMIT 1")
#: The same process in a carried row (when HISTORY_SQL finds no member): (end - 2 s,
#: end + 2 s, pid, lo, hi, start) with the start window widened by the carried row's
#: own tolerance. Both sources' end is btime + etime (btime whole seconds): within
#: 1 s of each other; the end window also keeps the match within the boot.
#: proc_usage_key (end_time, source, pid, ...) gives the window.
CARRIED_SQL = ("SELECT jid FROM proc_usage WHERE end_time BETWEEN ? AND ? "
               "AND pid = ? AND jid IS NOT NULL AND start_ticks BETWEEN ? AND ? "
               "ORDER BY abs(start_ticks - ?) LIMIT 1")


#: Every stay of job ?1 in the stored history, in the order they began: (pid, start ticks,
#: joined, left, exit code, how). A carried stay (no member row of that process and
#: job) is the process's life: from its start to its exit, by fork.
JOB_MEMBERS_SQL = (
    "SELECT pid, start_ticks, joined, left, exit_code, how FROM members WHERE jid = ?1 "
    "UNION ALL "
    "SELECT pid, start_ticks, start_time, end_time, exit_code, 'fork' FROM proc_usage AS c "
    "WHERE jid = ?1 AND start_ticks IS NOT NULL AND NOT EXISTS (SELECT 1 FROM members AS m "
    f"WHERE m.jid = ?1 AND m.pid = c.pid AND m.start_ticks BETWEEN "
    f"c.start_ticks - {TASKSTATS_TOLERANCE_TICKS} AND c.start_ticks + {TASKSTATS_TOLERANCE_TICKS}) "
    "ORDER BY 3")


def history_params(boot_id: str, pid: int, start: int, tol: int, end: float
                   ) -> Tuple[Tuple[Any, ...], Tuple[Any, ...]]:
    """The parameters of HISTORY_SQL and CARRIED_SQL for a record of process
    (*pid*, *start* ticks within *tol*) that ended at *end* (epoch s)."""
    wide = tol + TASKSTATS_TOLERANCE_TICKS
    return ((boot_id, pid, start - tol, start + tol, start),
            (end - ACCT_TOLERANCE_S, end + ACCT_TOLERANCE_S, pid, start - wide, start + wide,
             start))


#: A parent in the stored membership history of one boot: a member with pid ppid
#: that started no later than the child and was a member when the child started
#: (born into the job, or attached before the child's start by more than its
#: tolerance: a wrapper's children that ran before it exec'd `elsa-jobmng run` and
#: attached are not the job's; not yet left). Parameters: (boot_id,
#: ppid, child start ticks + tolerance, child start epoch - tolerance, child start
#: epoch + tolerance). A member closed when elsad found it gone after a restart
#: has ``left`` at that moment, after its real exit: the child's own start bounds
#: the match, and a parent record read with the child wins over the membership.
#: The members that have not left are found by pid (members_live), the others among
#: those that left after the child started (members_left): no index orders all the
#: members by pid (schema.py, migration 8). The unary + keeps SQLite from scanning the
#: key back from the child's start instead (through all the boot's earlier members).
#: A parent whose stay a carried row holds (no member row of that process: one exists
#: for every process that joined otherwise, was attached, or left alive) lived at most
#: CARRIED_STAY_S, so it ended within that of the child's start: proc_usage_key gives
#: the window (ends are btime + etime, up to 1 s early: ACCT_TOLERANCE_S of margin), and
#: its start in ticks plus its elapsed time says whether it outlived the child's start
#: (child start - tolerance = ?3 - (?5 - ?4) ticks).
_PARENT_WHERE = ("pid = ?2 AND +boot_id = ?1 AND +start_ticks <= ?3 "
                 "AND (how <> 'attach' OR joined <= ?4)")
PARENT_SQL = (f"SELECT jid, start_ticks FROM members WHERE left IS NULL AND {_PARENT_WHERE} "
              "UNION ALL "
              f"SELECT jid, start_ticks FROM members WHERE left >= ?4 AND {_PARENT_WHERE} "
              "UNION ALL "
              "SELECT jid, start_ticks FROM proc_usage AS c "
              f"WHERE end_time BETWEEN ?4 - {ACCT_TOLERANCE_S} "
              f"AND ?5 + {CARRIED_STAY_S + ACCT_TOLERANCE_S} AND pid = ?2 AND jid IS NOT NULL "
              f"AND start_ticks <= ?3 + {TASKSTATS_TOLERANCE_TICKS} "
              f"AND start_ticks + elapsed_us / {1_000_000 // CLOCK_TICKS} "
              f">= ?3 - (?5 - ?4) * {CLOCK_TICKS} - {TASKSTATS_TOLERANCE_TICKS} "
              "AND NOT EXISTS (SELECT 1 FROM members AS m WHERE m.boot_id = ?1 AND m.start_ticks "
              f"BETWEEN c.start_ticks - {TASKSTATS_TOLERANCE_TICKS} "
              f"AND c.start_ticks + {TASKSTATS_TOLERANCE_TICKS} AND m.pid = c.pid) "
              "ORDER BY start_ticks DESC LIMIT 1")

#: (ppid, child start ticks, tolerance ticks, child start epoch) -> jid: a
#: membership of the parent when the child started (memory or the store).
ParentLookup = Callable[[int, int, int, float], Optional[int]]


def attribute_by_parent(rows: Sequence[Sequence[Any]], jids: List[Optional[int]],
                        todo: Sequence[int], boot_epoch: float,
                        parent_member: ParentLookup) -> int:
    """The ppid rule: fill ``jids[i]`` for each index *i* in *todo* (rows whose
    own identity matched no membership, beyond what memory covers) through
    the record's parent. Returns how many got a job.

    *rows* is everything read together, *jids* their jobs so far (by
    identity; ``None`` for a row no job holds). The parent of row *i* is,
    first, a row *j* of the batch with ``pid == ppid`` that started no later
    than *i* and ended no earlier (both within the sources' start tolerance;
    the latest such start, should the pid have been reused): *i* gets *j*'s
    job, by identity or, when *j* is in *todo* too, through *j*'s own parent.
    A parent row in the batch that no job holds means *i* is in none either.
    Without a parent row, the parent was alive at the end of the batch or
    died before it: ``parent_member(ppid, start, tolerance, start_epoch)``
    gives its membership at the child's start. ppid 0 (the parent had exited
    before the kernel wrote a taskstats record) and 1 (orphans reparented to
    init) lead nowhere."""
    if not todo:
        return 0
    ident = [identity(r, boot_epoch) for r in rows]
    by_pid: Dict[int, List[int]] = {}
    for i, r in enumerate(rows):
        by_pid.setdefault(r[PID], []).append(i)
    pending = set(todo)
    memo: Dict[int, Optional[int]] = {}

    def parent_row(i: int, start: int, tol: int) -> Optional[int]:
        best_j, best_start = None, None
        for j in by_pid.get(rows[i][PPID], ()):
            s, t = ident[j]
            if s is None or j == i:
                continue
            slack = max(tol, t)
            end = (rows[j][END] - boot_epoch) * CLOCK_TICKS
            if s <= start + slack and end >= start - slack and (
                    best_start is None or s > best_start):
                best_j, best_start = j, s
        return best_j

    found = 0
    for i in todo:
        path: List[int] = []
        on_path = set()
        cur = i
        jid: Optional[int] = None
        while True:
            if cur in memo:
                jid = memo[cur]
                break
            if cur not in pending:
                jid = jids[cur]
                break
            if cur in on_path:  # a ppid loop cannot happen; stay bounded anyway
                break
            path.append(cur)
            on_path.add(cur)
            start, tol = ident[cur]
            ppid = rows[cur][PPID]
            if start is None or ppid is None or ppid <= 1:
                break
            j = parent_row(cur, start, tol)
            if j is None:
                jid = parent_member(ppid, start, tol, boot_epoch + start / CLOCK_TICKS)
                break
            cur = j
        for p in path:
            memo[p] = jid
    for i in todo:
        jid = memo.get(i)
        if jid is not None:
            jids[i] = jid
            found += 1
    return found


BOOT_PREFIX = "boot_epoch:"

#: The same match for imported rows with ids in (lo, hi]: start time converted to
#: ticks of each boot whose boot time elsad recorded.
ATTRIBUTE_SQL = f"""
    WITH boots AS (SELECT substr(key, {len(BOOT_PREFIX) + 1}) AS boot_id,
                          CAST(value AS REAL) AS epoch
                   FROM meta WHERE key LIKE '{BOOT_PREFIX}%')
    UPDATE proc_usage SET jid = COALESCE((
        -- the closest start wins (a bare column beside MIN() is taken from its row)
        SELECT jid FROM (
            SELECT m.jid AS jid,
                   MIN(abs(m.start_ticks - (proc_usage.start_time - b.epoch) * {CLOCK_TICKS}))
            FROM members AS m JOIN boots AS b ON b.boot_id = m.boot_id
            WHERE m.pid = proc_usage.pid
              AND m.start_ticks
                  BETWEEN (proc_usage.start_time - b.epoch) * {CLOCK_TICKS} - {ACCT_TOLERANCE_TICKS}
                  AND (proc_usage.start_time - b.epoch) * {CLOCK_TICKS} + {ACCT_TOLERANCE_TICKS})),
        -- else a carried row of the process (CARRIED_SQL; both starts are btime seconds)
        (SELECT jid FROM (
            SELECT c.jid AS jid, MIN(abs(c.start_time - proc_usage.start_time))
            FROM proc_usage AS c
            WHERE c.end_time BETWEEN proc_usage.end_time - {ACCT_TOLERANCE_S}
                                 AND proc_usage.end_time + {ACCT_TOLERANCE_S}
              AND c.pid = proc_usage.pid AND c.jid IS NOT NULL AND c.start_ticks IS NOT NULL
              AND abs(c.start_time - proc_usage.start_time) <= {ACCT_TOLERANCE_S})))
    WHERE proc_usage.id > ? AND proc_usage.id <= ? AND proc_usage.jid IS NULL
      AND proc_usage.start_time IS NOT NULL
"""


def save_boot_epoch(execute: Execute, boot_id: str, epoch: float) -> None:
    """Record when boot *boot_id* started (epoch s), for :data:`ATTRIBUTE_SQL`."""
    execute(SET_META, (BOOT_PREFIX + boot_id, repr(round(epoch, 3))))


#: Chains longer than this are not followed by :func:`attribute_imported_by_parent`.
MAX_CHAIN = 64


def attribute_imported_by_parent(db: sqlite3.Connection, lo: int, hi: int) -> int:
    """The ppid rule for imported rows (ids in (lo, hi]) that :data:`ATTRIBUTE_SQL`
    left without a job. Returns how many got one.

    Only rows that can lead to a job are read: those whose ppid is the pid of
    a member alive during the imported records' time or of a row just
    attributed, then (until nothing is added) those whose ppid is a pid of
    such a row; with the rows that can be their parents. Each row is matched
    in the boot it ran in (the last boot elsad recorded that began before
    it)."""
    boots = sorted((float(v), k[len(BOOT_PREFIX):]) for k, v in db.execute(
        "SELECT key, value FROM meta WHERE key LIKE ?", (BOOT_PREFIX + "%",)))
    if not boots:
        return 0
    span = db.execute("SELECT MIN(start_time), MAX(end_time) FROM proc_usage "
                      "WHERE id > ? AND id <= ? AND jid IS NULL", (lo, hi)).fetchone()
    if span[0] is None:
        return 0
    epochs = dict((b, e) for e, b in boots)
    leads = {pid for (pid,) in db.execute(
        "SELECT pid FROM members WHERE left IS NULL UNION "
        "SELECT pid FROM members WHERE left >= ?1 UNION "
        f"SELECT pid FROM proc_usage WHERE end_time BETWEEN ?1 - {ACCT_TOLERANCE_S} "
        f"AND ?2 + {CARRIED_STAY_S + ACCT_TOLERANCE_S} AND jid IS NOT NULL "
        "AND start_ticks IS NOT NULL", span)}
    leads.update(pid for (pid,) in db.execute(
        "SELECT DISTINCT pid FROM proc_usage WHERE id > ? AND id <= ? AND jid IS NOT NULL",
        (lo, hi)))
    cols = "id, source, jid, pid, start_ticks, start_time, end_time, ppid"
    todo: Dict[int, Tuple[Any, ...]] = {}
    for _ in range(MAX_CHAIN):
        new = [r for r in _rows_with_ppid(db, cols, lo, hi, leads, "jid IS NULL")
               if r[0] not in todo]
        if not new:
            break
        for r in new:
            todo[r[0]] = r
        leads = {r[3] for r in new}
    if not todo:
        return 0
    parents = {r[0]: r for r in _rows_with_pid(db, cols, lo, hi, {r[7] for r in todo.values()})}
    found = 0
    by_boot: Dict[str, List[Tuple[Any, ...]]] = {}
    for r in {**parents, **todo}.values():
        t = r[5]
        boot = None
        for epoch, boot_id in boots:
            if t is not None and epoch <= t + ACCT_TOLERANCE_S:
                boot = boot_id
        if boot is not None:
            by_boot.setdefault(boot, []).append(r)
    for boot_id, group in by_boot.items():
        epoch = epochs[boot_id]
        # attribute_by_parent reads rows in ROW_FIELDS order: source, jid, pid,
        # start_ticks, start_time, end, ppid.
        rows = [r[1:] for r in group]
        jids: List[Optional[int]] = [r[2] for r in group]
        idx = [i for i, r in enumerate(group) if r[0] in todo]

        def member(ppid: int, start: int, tol: int, start_epoch: float,
                   _boot: str = boot_id) -> Optional[int]:
            tol_s = tol / CLOCK_TICKS
            row = db.execute(PARENT_SQL, (_boot, ppid, start + tol, start_epoch - tol_s,
                                          start_epoch + tol_s)).fetchone()
            return row[0] if row else None
        found += attribute_by_parent(rows, jids, idx, epoch, member)
        db.executemany("UPDATE proc_usage SET jid = ? WHERE id = ?",
                       [(jids[i], group[i][0]) for i in idx if jids[i] is not None])
    return found


def _rows_with_ppid(db: sqlite3.Connection, cols: str, lo: int, hi: int, ppids: set,
                    where: str) -> List[Tuple[Any, ...]]:
    out: List[Tuple[Any, ...]] = []
    pids = sorted(ppids)
    for i in range(0, len(pids), 500):  # SQLite's bound-parameter limit
        chunk = pids[i:i + 500]
        out += db.execute(f"SELECT {cols} FROM proc_usage WHERE id > ? AND id <= ? AND {where} "
                          f"AND ppid IN ({', '.join('?' * len(chunk))})",
                          [lo, hi, *chunk]).fetchall()
    return out


def _rows_with_pid(db: sqlite3.Connection, cols: str, lo: int, hi: int, pids: set
                   ) -> List[Tuple[Any, ...]]:
    out: List[Tuple[Any, ...]] = []
    ordered = sorted(pids)
    for i in range(0, len(ordered), 500):
        chunk = ordered[i:i + 500]
        out += db.execute(f"SELECT {cols} FROM proc_usage WHERE id > ? AND id <= ? "
                          f"AND pid IN ({', '.join('?' * len(chunk))})",
                          [lo, hi, *chunk]).fetchall()
    return out
