"""The application record: one program image of one process, as one typed row.

A process that execs twice gives two records. The record is the same in the
node's SQLite store (table ``app_runs``), in a central PostgreSQL store and in
exports: :data:`COLUMNS` names every field with a portable SQL type, and
:data:`KEY` is the natural key, so a record shipped twice (after a crash or a
timeout) is recognised and replaced, never counted twice.

Natural key: ``host_id`` (the host part of this daemon's job ids: unique per
host and state dir), ``boot_id``, ``pid``, ``start_ticks`` (the process's
start time, /proc/PID/stat field 22) and ``exec_ns``, the kernel's timestamp of
the exec event in ns since boot: the exec sequence of the process, in exec
order, and the same after an elsad restart. ``start_ticks`` is -1 only when the
process was gone before elsad could read /proc (then pid and exec_ns still
identify the exec within the boot).

Units: times are epoch seconds (REAL), CPU µs, memory KiB, I/O bytes. NULL is
"no source measured this" and is never shown as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

TABLE = "app_runs"

#: (name, portable SQL type, meaning). The order is the row order.
COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("host_id", "BIGINT NOT NULL", "host part of the job ids of the recording daemon"),
    ("boot_id", "TEXT NOT NULL", "kernel boot id (/proc/sys/kernel/random/boot_id)"),
    ("pid", "INTEGER NOT NULL", "process id"),
    ("start_ticks", "BIGINT NOT NULL", "process start, clock ticks since boot; -1 unknown"),
    ("exec_ns", "BIGINT NOT NULL", "the exec event's kernel time, ns since boot"),
    ("hostname", "TEXT", "host name"),
    ("jid", "BIGINT", "job the process belonged to at the exec (NULL: none)"),
    ("ppid", "INTEGER", "parent pid at the exec"),
    ("exec_time", "DOUBLE PRECISION NOT NULL", "time of the exec, epoch seconds"),
    ("end_time", "DOUBLE PRECISION", "end of this image: next exec or exit; NULL while open"),
    ("end_reason", "TEXT NOT NULL",
     "exec (replaced by another exec), exit, open (still running when elsad stopped), "
     "lost (ended while elsad was not watching)"),
    ("exe_path", "TEXT", "resolved path of /proc/PID/exe at the exec (path_status inode: "
     "of an earlier run of the same file, or the file of its command name in root's "
     "PATH directories); NULL unknown"),
    ("exe_dev", "BIGINT", "device number of the binary"),
    ("exe_ino", "BIGINT", "inode number of the binary"),
    ("exe_deleted", "INTEGER",
     "1: the file had been unlinked when read (deleted, or replaced by unlink and a new file)"),
    ("path_status", "TEXT NOT NULL",
     "resolved; gone (process ended before elsad read it); inode (gone, but its exit "
     "record named the binary's device and inode, and an earlier run of that file, or "
     "the file of its command name in root's PATH directories, gave the path); replaced "
     "(the process exec'd again before elsad read it); denied (not readable)"),
    ("comm", "TEXT", "command name (task comm) of the image"),
    ("uid", "INTEGER", "real uid"),
    ("euid", "INTEGER", "effective uid"),
    ("gid", "INTEGER", "real gid"),
    ("egid", "INTEGER", "effective gid"),
    ("exit_code", "INTEGER", "exit code (end_reason exit)"),
    ("exit_signal", "INTEGER", "terminating signal, 0 none (end_reason exit)"),
    ("cpu_user_us", "BIGINT", "user CPU of this image, µs"),
    ("cpu_system_us", "BIGINT", "system CPU of this image, µs"),
    ("max_rss_kb", "BIGINT", "peak RSS of this image, KiB (last image only)"),
    ("read_bytes", "BIGINT", "bytes this image read from storage"),
    ("write_bytes", "BIGINT", "bytes this image wrote to storage"),
    ("figures_source", "TEXT",
     "where the CPU/RSS/I/O figures come from: procfs (read at the next exec), "
     "taskstats or bsdacct (the process's exit record)"),
    ("package", "TEXT", "owning package (dpkg/rpm), NULL: none or not looked up"),
    ("package_version", "TEXT", "version of the owning package"),
    ("argv", "TEXT", "command line as a JSON array (allow-listed binaries only)"),
)
NAMES: Tuple[str, ...] = tuple(c[0] for c in COLUMNS)
KEY: Tuple[str, ...] = ("host_id", "boot_id", "pid", "start_ticks", "exec_ns")
INDEX = {name: i for i, name in enumerate(NAMES)}

#: The store migration that creates the table (elsa/core/schema.py MIGRATIONS
#: appends it; frozen once shipped, as every migration). ``id`` is the local
#: insertion order (a spool position for shipping), not part of the record.
MIGRATION = f"""
    CREATE TABLE {TABLE} (
        id INTEGER PRIMARY KEY,
        {(','+chr(10)+'        ').join(f'{n} {t}' for n, t, _ in COLUMNS)},
        UNIQUE ({', '.join(KEY)})
    );
    CREATE INDEX app_runs_exec_time ON {TABLE}(exec_time);
    CREATE INDEX app_runs_jid ON {TABLE}(jid) WHERE jid IS NOT NULL;
    CREATE INDEX app_runs_open ON {TABLE}(end_reason) WHERE end_reason = 'open';
    CREATE INDEX proc_usage_pid_end ON proc_usage(pid, end_time);
"""


@dataclass(frozen=True)
class AppRecord:
    """One application record (the typed form of an ``app_runs`` row)."""

    host_id: int
    boot_id: str
    pid: int
    start_ticks: int
    exec_ns: int
    hostname: Optional[str]
    jid: Optional[int]
    ppid: Optional[int]
    exec_time: float
    end_time: Optional[float]
    end_reason: str
    exe_path: Optional[str]
    exe_dev: Optional[int]
    exe_ino: Optional[int]
    exe_deleted: Optional[int]
    path_status: str
    comm: Optional[str]
    uid: Optional[int]
    euid: Optional[int]
    gid: Optional[int]
    egid: Optional[int]
    exit_code: Optional[int]
    exit_signal: Optional[int]
    cpu_user_us: Optional[int]
    cpu_system_us: Optional[int]
    max_rss_kb: Optional[int]
    read_bytes: Optional[int]
    write_bytes: Optional[int]
    figures_source: Optional[str]
    package: Optional[str]
    package_version: Optional[str]
    argv: Optional[str]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> AppRecord:
        return cls(*row)

    def key(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, k) for k in KEY)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> AppRecord:
        """The record of :meth:`to_json`'s form (as a report from elsad carries it)."""
        from elsa.core.model import parse_jid

        kw = {f.name: data.get(f.name) for f in fields(cls)}
        kw["jid"] = None if data.get("jid") is None else parse_jid(data["jid"])
        return cls(**kw)

    def to_json(self) -> Dict[str, Any]:
        """The stable JSON form: every column by name; the job id as its hex string."""
        from elsa.core.model import format_jid

        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["jid"] = None if self.jid is None else format_jid(self.jid)
        out["wall_s"] = (None if self.end_time is None
                         else round(self.end_time - self.exec_time, 6))
        return out


assert tuple(f.name for f in fields(AppRecord)) == NAMES


def rows_after(db: Any, after_id: int, limit: int = 10000, finished_only: bool = True
               ) -> List[Tuple[Any, ...]]:
    """Records stored after local row *after_id*, oldest first, as ``(id, *NAMES)``
    rows: what a shipper sends next (it remembers the last id it shipped; a
    record replaced later, an ``open`` one completed, comes again with a new id
    and replaces the shipped one by its natural key). *finished_only* leaves
    out ``open`` records (images still running when elsad stopped)."""
    cond = " AND end_reason <> 'open'" if finished_only else ""
    sql = (f"SELECT id, {', '.join(NAMES)} FROM {TABLE} WHERE id > ?{cond} "
           "ORDER BY id LIMIT ?")
    return db.execute(sql, (after_id, limit)).fetchall()


def read_after(db: Any, after_id: int, limit: int = 10000, finished_only: bool = True
               ) -> List[Tuple[int, AppRecord]]:
    """:func:`rows_after` as (row id, record) pairs."""
    return [(r[0], AppRecord.from_row(r[1:]))
            for r in rows_after(db, after_id, limit, finished_only)]
