"""Finished jobs as the exports see them, and which ones were exported already.

Every export reads jobs through the report query layer (:mod:`elsa.report.query`),
so the figures are the same ones ``elsa jobs`` prints: per metric the best
source (cgroup > taskstats > acct). This module adds what the formats need
on top: the job's wall time, its user's name, the host, and a reason when a
job cannot be exported (no end yet, CPU unknown, user without a name).

Export state: the ``exported`` table of the store (created here on first use,
``CREATE TABLE IF NOT EXISTS``) records, per export target (``apel``, ...), the
jobs already written, so a rerun over an overlapping period or after a restart
does not write them again. The central store, which no exporting role may
write, has its ``exported`` table in a ledger file of the machine that exports
from it (:func:`open_ledger`); JIDs are unique across the site.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from elsa.core.model import format_jid, parse_jid
from elsa.errors import StoreError
from elsa.report import query
from elsa.users import passwd_name

CREATE_EXPORTED = ("CREATE TABLE IF NOT EXISTS exported (target TEXT NOT NULL, "
                   "jid INTEGER NOT NULL, exported REAL NOT NULL, PRIMARY KEY (target, jid))")
SELECT_EXPORTED = "SELECT jid FROM exported WHERE target = ?"
MARK_EXPORTED = ("INSERT INTO exported(target, jid, exported) VALUES (?, ?, ?) "
                 "ON CONFLICT (target, jid) DO UPDATE SET exported = excluded.exported")


@dataclass
class FinishedJob:
    """One ended job with everything an export writes (None: unknown)."""

    jid: int
    name: str
    owner_uid: int
    user: Optional[str]          # None: the uid has no passwd entry
    tags: Dict[str, str]
    created: float
    ended: float
    backend: str
    params: Dict[str, str]
    usage: Dict[str, Any]        # best figures, as query.jobs gives them
    host: str
    sources: Dict[str, Any] = field(default_factory=dict)
    chosen: Dict[str, str] = field(default_factory=dict)
    incomplete: Dict[str, str] = field(default_factory=dict)
    note: Optional[str] = None   # why the best CPU differs from the process records

    @property
    def jid_text(self) -> str:
        return jid_text(self.jid)

    @property
    def wall_seconds(self) -> float:
        return max(0.0, self.ended - self.created)

    @property
    def cpu_us(self) -> Optional[int]:
        u, s = self.usage.get("cpu_user_us"), self.usage.get("cpu_system_us")
        if u is None and s is None:
            return None
        return (u or 0) + (s or 0)

    @property
    def processors(self) -> Optional[int]:
        """CPUs the job was given (cpuset jobs' ``cpus`` list), else unknown. A CPU
        limit (a quota of time) gives no count: its processes may run on any CPU."""
        from elsa.kernel.cgroupstats import parse_cpulist

        try:
            return len(parse_cpulist(str(self.params.get("cpus") or ""))) or None
        except ValueError:
            return None


@dataclass
class Skipped:
    jid: int
    why: str

    def line(self) -> str:
        return f"job {jid_text(self.jid)} not exported: {self.why}"


def jid_text(jid: Any) -> str:
    """The JID's one spelling (the zero-padded hex string)."""
    return jid if isinstance(jid, str) else format_jid(jid)


user_of = passwd_name


def host_name(config: Any = None) -> str:
    """This node's name, as the central store knows it (elsa.central.node_name)."""
    from elsa.central import node_name

    return node_name(config.section("central") if config is not None else {"host": ""})


def finished_jobs(db: Any, since: Optional[float] = None,
                  until: Optional[float] = None, host: Optional[str] = None,
                  ) -> Tuple[List[FinishedJob], List[Skipped]]:
    """Jobs that ended in [since, until), oldest end first; and jobs of the
    window that cannot be exported yet (still running), with the reason. *host*
    names a node store's jobs (default :func:`host_name`); the central store's
    jobs carry their node's."""
    host = host or host_name()
    out: List[FinishedJob] = []
    skipped: List[Skipped] = []
    # Every job of the window: an export must not stop at the report's default limit.
    for j in query.jobs(db, since=since, until=until, limit=2 ** 62):
        jid = parse_jid(j["jid"])
        if j["ended"] is None:
            skipped.append(Skipped(jid, "it has not ended yet (state "
                                   f"{j['state']}); it is exported once it ends"))
            continue
        if (since is not None and j["ended"] < since) or (until is not None
                                                          and j["ended"] >= until):
            continue
        usage = dict(j["usage"])
        if "host" in j:  # the central store: the site user (map-user), else user@host
            user = j["owner"] if j["owner"] != "?" else None
        else:
            user = user_of(j["owner_uid"])
        out.append(FinishedJob(
            jid=jid, name=j["name"], owner_uid=j["owner_uid"],
            user=user, tags=dict(j["tags"]), created=j["created"],
            ended=j["ended"], backend=j["backend"], params=dict(j["params"]),
            usage={k: v for k, v in usage.items()
                   if k not in ("sources", "chosen", "incomplete", "note", "fallback")},
            host=j.get("host") or host, sources=usage.get("sources", {}),
            chosen=usage.get("chosen", {}), incomplete=usage.get("incomplete", {}),
            note=usage.get("note")))
    out.sort(key=lambda f: (f.ended, f.jid))
    return out, skipped


def open_ledger(path: str) -> sqlite3.Connection:
    """The ledger file *path* of the jobs exported from the central store (created
    with its directory on first use)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return sqlite3.connect(path, isolation_level=None, timeout=30.0)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open the export ledger {path}: {exc}; give a writable "
                         "file with --ledger or [export.apel] ledger") from exc


class ExportState:
    """Which jobs a target has exported (the ``exported`` table of the store, or of a
    ledger file: *where* names it in errors)."""

    def __init__(self, db: sqlite3.Connection, target: str, where: str = "the store") -> None:
        self.db = db
        self.target = target
        self.where = where
        try:
            db.execute(CREATE_EXPORTED)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create the export state table in {where}: {exc}; "
                             f"run 'elsa export' as a user who may write {where}") from exc

    def done(self) -> Set[int]:
        return {r[0] for r in self.db.execute(SELECT_EXPORTED, (self.target,))}

    def mark(self, jids: Iterable[int]) -> None:
        now = time.time()
        rows: Sequence[Tuple[str, int, float]] = [(self.target, j, now) for j in jids]
        if not rows:
            return
        try:
            self.db.execute("BEGIN")
            self.db.executemany(MARK_EXPORTED, rows)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StoreError(f"cannot record the exported jobs in {self.where}: {exc}; the "
                             "messages were written, a rerun would write these jobs "
                             "again (APEL replaces duplicates)") from exc
