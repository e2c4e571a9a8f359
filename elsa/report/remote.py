"""Reports through elsad, under the ``private_data`` policy.

The store is private (0600, docs/security.md): a user who cannot read it
gets the same reports from elsad, which runs the same queries
(elsa/report/query.py) on its behalf with the ``report`` operation and
returns the same JSON the local report prints with ``--json``. What the
caller may see is decided here, from the caller's uid as the kernel reports
it (SO_PEERCRED):

- ``private_data = true`` (the default, like Slurm's ``PrivateData=jobs,usage``):
  a user sees their own jobs and their own usage; root and the admin group see
  everything.
- ``private_data = false``: every user sees everything (a site that wants it
  open also makes the store file readable: ``elsa`` then reads it directly).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Dict, Mapping, Optional

from elsa.config import Option
from elsa.core.model import format_jid, parse_jid
from elsa.errors import ElsaError, PermissionDenied, ProtocolError

#: The [reports] section of elsa.toml.
OPTIONS: Dict[str, Option] = {
    "private_data": Option(bool, True, "Users read only their own jobs and usage through "
                           "elsad (root and the admin group read all); false opens every "
                           "user's data to everyone."),
}

REPORTS = ("jobs", "job", "summary", "eff", "apps", "bill")


def _opt_float(args: Mapping[str, Any], key: str) -> Optional[float]:
    v = args.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"report argument {key!r} must be a number or null")
    return float(v)


def _opt_str(args: Mapping[str, Any], key: str, choices: Optional[tuple] = None
             ) -> Optional[str]:
    v = args.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > 64 or (choices and v not in choices):
        raise ProtocolError(f"report argument {key!r} must be "
                            + (f"one of {', '.join(choices)}" if choices else "a short string"))
    return v


def serve(db_path: str, report: str, args: Mapping[str, Any], uid: int, admin: bool,
          private: bool, billing: Any = None) -> Any:
    """Run *report* for a caller (worker thread: opens its own connection)."""
    from elsa.report import query
    from elsa.report.cli import check_source
    from elsa.report.connect import open_store

    if report not in REPORTS:
        raise ProtocolError(f"unknown report {str(report)[:32]!r}; known: {', '.join(REPORTS)}")
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be an object")
    restrict = private and not admin
    db = open_store(db_path)
    try:
        if report == "jobs":
            rows = query.jobs(db, _opt_float(args, "since"), _opt_float(args, "until"),
                              _opt_str(args, "state", ("running", "ended")))
            if restrict:
                rows = [r for r in rows if r["owner_uid"] == uid]
            if args.get("root_exits") is True:
                from elsa.report import sacct

                sacct.add_root_exits(db, rows)
            return rows
        if report in ("job", "eff") or (report == "apps" and args.get("job") is not None):
            try:
                jid = parse_jid(args.get("job" if report == "apps" else "jid"))
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"report argument 'jid': {exc}") from None
            # A job id in no job is answered as such below ("no job"), not as
            # another user's: job ids and owners are not secret (``list --all``).
            if restrict and _owner(db, jid) not in (None, uid):
                raise PermissionDenied(f"job {format_jid(jid)} is not yours; with private_data "
                                       "only root and the admin group read other users' jobs")
            if report == "apps":
                from elsa.apps import report as apps

                return [r.to_json() for r in apps.job_programs(db, jid)]
            check_source(db, _opt_str(args, "source"))
            detail = query.job_detail(db, jid, _opt_str(args, "source"))
            if report == "eff" and detail is not None:
                from elsa.report import sacct

                sacct.add_root_exits(db, [detail])
            return detail
        if report == "bill":
            return _bill(db, args, billing, uid if restrict else None)
        if report == "apps":
            from elsa.apps import report as apps

            who = args.get("uid")
            if restrict:
                who = uid  # a user's own programs only
            return apps.usage(db, _opt_str(args, "by", tuple(apps.GROUPS)) or "binary",
                              since=_opt_float(args, "since"), until=_opt_float(args, "until"),
                              path=_opt_str(args, "path"), package=_opt_str(args, "package"),
                              comm=_opt_str(args, "comm"),
                              uid=who if isinstance(who, int) else None)
        by = _opt_str(args, "by", ("job", "user", "command")) or "user"
        if restrict and by == "command":
            raise PermissionDenied("summary --by command totals every user's processes; with "
                                   "private_data only root and the admin group may read it "
                                   "(use --by user or --by job for your own)")
        check_source(db, _opt_str(args, "source"))
        rows = query.summary(db, by, _opt_float(args, "since"), _opt_float(args, "until"),
                             _opt_str(args, "source"))
        if not restrict:
            return rows
        if by == "user":
            return [r for r in rows if r.get("uid") == uid]
        own = _own_jobs(db, uid)
        return [r for r in rows if parse_jid(r["jid"]) in own]
    except sqlite3.DatabaseError as exc:
        raise ElsaError(f"report failed on the store: {exc}") from exc
    finally:
        db.close()


def _bill(db: Any, args: Mapping[str, Any], billing: Any, uid: Optional[int]) -> Any:
    """``elsa bill`` with elsad's rate table; a normal caller's own items only."""
    from elsa.billing import bill
    from elsa.billing.cli import to_json

    since, until = _opt_float(args, "since"), _opt_float(args, "until")
    if since is None or until is None or billing is None:
        raise ProtocolError("report 'bill' needs 'since' and 'until' (epoch seconds)")
    by = _opt_str(args, "by") or "user"
    if by not in ("user", "account", "job") and not by.startswith("tag:"):
        raise ProtocolError(f"report 'bill': cannot group by {by!r}")
    tags = args.get("tags") or []
    if not isinstance(tags, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
            for t in tags):
        raise ProtocolError("report 'bill': 'tags' must be a list of [key, value] pairs")
    return to_json(bill.compute(db, billing, since, until, by, [tuple(t) for t in tags],
                                uid=uid), _opt_str(args, "period"))


def _owner(db: sqlite3.Connection, jid: int) -> Optional[int]:
    row = db.execute("SELECT owner_uid FROM jobs WHERE jid = ?", (jid,)).fetchone()
    return row[0] if row else None


def _own_jobs(db: sqlite3.Connection, uid: int) -> set:
    return {r[0] for r in db.execute("SELECT jid FROM jobs WHERE owner_uid = ?", (uid,))}


def fetch(socket_path: str, report: str, args: Dict[str, Any]) -> Any:
    """Ask elsad for *report* (the client side of :func:`serve`)."""
    from elsa.client import Client

    with Client(socket_path, timeout=600.0) as c:
        return c.call("report", report=report, args=args)


def run(path: str, socket_path: Optional[str], report: str, args: Dict[str, Any],
        local) -> Any:
    """*local(db)* when the store file is readable here, else the report from elsad."""
    import os

    from elsa.report.connect import open_store

    if socket_path and os.path.exists(path) and not os.access(path, os.R_OK):
        return fetch(socket_path, report, args)
    if socket_path and not os.path.exists(path) and os.path.isdir(os.path.dirname(path)) \
            and not os.access(os.path.dirname(path), os.X_OK):
        return fetch(socket_path, report, args)
    return local(open_store(path))

