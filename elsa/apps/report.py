"""``elsa apps``: application usage from the ``app_runs`` table.

Every statement here is portable SQL (SQLite and PostgreSQL alike: standard
aggregates, CASE, COALESCE, LIKE ... ESCAPE, ``?`` placeholders that a
PostgreSQL adapter rewrites), one place per statement, so a central store runs
the same report code.

    elsa apps --by binary|package|user|job [--since T] [--until T] [filters]
    elsa apps --job JID                   a job's programs in exec order

Filters: ``--path GLOB`` (resolved path; ``*`` matches across ``/``, ``?`` one
character, case counts: LIKE, case-sensitive on both stores),
``--package GLOB``, ``--comm NAME``, ``--user NAME|UID``; on the central store
``--host NAME`` (repeatable) selects nodes. The period selects
images by their exec time. Wall time counts ended images (end - exec); CPU
sums the images whose figures a source measured (``cpu_runs`` says how many).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

from elsa.apps import record
from elsa.errors import ElsaError

GROUPS: Dict[str, Tuple[str, ...]] = {
    # Unknown paths are grouped by comm, so a record that kept only comm still counts.
    "binary": ("exe_path", "CASE WHEN exe_path IS NULL THEN comm END"),
    "package": ("package", "package_version"),
    "user": ("uid",),
    "job": ("jid",),
}
GROUP_KEYS: Dict[str, Tuple[str, ...]] = {
    "binary": ("exe_path", "comm"), "package": ("package", "package_version"),
    "user": ("uid",), "job": ("jid",),
}
TOTAL_KEYS = ("runs", "users", "unresolved", "wall_us", "cpu_user_us", "cpu_system_us",
              "cpu_runs", "max_rss_kb", "read_bytes", "write_bytes", "first_exec", "last_exec")

_TOTALS = (
    "COUNT(*), COUNT(DISTINCT uid), "
    "SUM(CASE WHEN exe_path IS NULL THEN 1 ELSE 0 END), "
    "SUM(CASE WHEN end_time IS NULL THEN NULL ELSE end_time - exec_time END), "
    "SUM(cpu_user_us), SUM(cpu_system_us), "
    "SUM(CASE WHEN cpu_user_us IS NULL THEN 0 ELSE 1 END), "
    "MAX(max_rss_kb), SUM(read_bytes), SUM(write_bytes), MIN(exec_time), MAX(exec_time)")


def glob_like(pattern: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for a shell glob: ``*`` -> ``%``, ``?`` -> ``_``."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _where(since: Optional[float], until: Optional[float], path: Optional[str],
           package: Optional[str], comm: Optional[str], uid: Optional[int],
           jid: Optional[int], hosts: Optional[Sequence[str]] = None,
           host_col: str = "host") -> Tuple[str, List[Any]]:
    conds: List[str] = []
    params: List[Any] = []
    for cond, value in (("exec_time >= ?", since), ("exec_time < ?", until),
                        ("exe_path LIKE ? ESCAPE '\\'", None if path is None else glob_like(path)),
                        ("package LIKE ? ESCAPE '\\'",
                         None if package is None else glob_like(package)),
                        ("comm = ?", comm), ("uid = ?", uid), ("jid = ?", jid)):
        if value is not None:
            conds.append(cond)
            params.append(value)
    if hosts:
        conds.append(f"{host_col} IN ({', '.join('?' * len(hosts))})")
        params.extend(hosts)
    return (" WHERE " + " AND ".join(conds)) if conds else "", params


def usage(db: Any, by: str, *, since: Optional[float] = None, until: Optional[float] = None,
          path: Optional[str] = None, package: Optional[str] = None, comm: Optional[str] = None,
          uid: Optional[int] = None, jid: Optional[int] = None,
          hosts: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Totals per binary, package, user or job; most runs first. *db*: a DB-API
    connection whose cursor takes ``?`` placeholders, or a :class:`elsa.report.connect.Db`
    (*hosts*: only these nodes of the central store)."""
    from elsa.report.connect import adapt

    if by not in GROUPS:
        raise ElsaError(f"apps --by {by!r}: choose one of {', '.join(GROUPS)}")
    adb = adapt(db)
    # On the central store a user is the site user the user mapping names (uid@host
    # or user@host), applied at report time: group per host and uid, then fold.
    site_users = adb.central and by == "user"
    exprs = (adb.host(), "uid") if site_users else GROUPS[by]
    where, params = _where(since, until, path, package, comm, uid, jid, hosts, adb.host())
    keys = ", ".join(exprs)
    sql = (f"SELECT {keys}, {_TOTALS} FROM {record.TABLE}{where} GROUP BY {keys} "
           f"ORDER BY COUNT(*) DESC, {', '.join(f'{i + 1}' for i in range(len(exprs)))}")
    out = []
    for row in db.execute(sql, params).fetchall():
        n = len(exprs)
        item: Dict[str, Any] = dict(zip(GROUP_KEYS[by], row[n - 1:n] if site_users else row[:n]))
        totals = dict(zip(TOTAL_KEYS, row[n:]))
        wall = totals.pop("wall_us")
        totals["wall_us"] = None if wall is None else int(round(wall * 1e6))
        item.update(totals)
        if site_users:
            item["user"], item["account"] = adb.user_label(row[0], row[1])
        out.append(item)
    return _fold_site_users(out) if site_users else out


_FOLD_MIN = ("first_exec",)
_FOLD_MAX = ("max_rss_kb", "last_exec")


def _fold_site_users(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per site user and account from rows per host and uid: sums add, peaks
    and the last exec take the greatest, the first exec the least; ``uid`` only
    where one."""
    folded: Dict[Tuple[str, Optional[str]], Dict[str, Any]] = {}
    for r in rows:
        key = (r["user"], r["account"])
        got = folded.get(key)
        if got is None:
            folded[key] = dict(r)
            continue
        if got["uid"] != r["uid"]:
            got["uid"] = None
        for k in TOTAL_KEYS:
            a, b = got[k], r[k]
            if a is None or b is None:
                got[k] = b if a is None else a
            elif k in _FOLD_MIN:
                got[k] = min(a, b)
            elif k in _FOLD_MAX:
                got[k] = max(a, b)
            else:
                got[k] = a + b
    # Most runs first, then by uid as on a node, site users of several uids last.
    return sorted(folded.values(), key=lambda r: (-r["runs"], r["uid"] is None,
                                                  r["uid"] or 0, r["user"], r["account"] or ""))


def job_programs(db: Any, jid: int) -> List[record.AppRecord]:
    """Every application record of job *jid*, in exec order."""
    sql = (f"SELECT {', '.join(record.NAMES)} FROM {record.TABLE} WHERE jid = ? "
           "ORDER BY exec_ns, pid")
    return [record.AppRecord.from_row(r) for r in db.execute(sql, (jid,)).fetchall()]


def open_db(path: str) -> Any:
    from elsa.report.connect import open_store

    db = open_store(path)
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (record.TABLE,)).fetchone() is None:
        raise ElsaError(f"store {path} has no application records table; start this version "
                        "of elsad once (it migrates the store) with [apps] enabled = true")
    return db


# -- the command -----------------------------------------------------------------------------

def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("apps", parents=list(parents),
                       help="application usage: programs run, by binary, package, user or job",
                       description="Application usage from one record per exec "
                       "(docs/applications.md).")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--by", choices=tuple(GROUPS), default="binary",
                      help="group by (default: binary)")
    mode.add_argument("--job", metavar="JID", help="list this job's programs in exec order")
    s.add_argument("--path", metavar="GLOB", help="only binaries whose path matches "
                   "(e.g. '/home/*', '*/python3*')")
    s.add_argument("--package", metavar="GLOB", help="only binaries of matching packages")
    s.add_argument("--comm", metavar="NAME", help="only images with this command name")
    s.add_argument("--user", metavar="USER", help="only this user (name or uid)")
    s.set_defaults(func=cmd_apps)


def _uid(user: Optional[str]) -> Optional[int]:
    if user is None:
        return None
    if user.isdigit():
        return int(user)
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ElsaError(f"--user {user!r}: no such user; give a name or a uid") from None


def cmd_apps(args: argparse.Namespace, out: Any) -> int:
    from elsa.core.model import format_jid, parse_jid
    from elsa.report import cli, text
    from elsa.users import user_name

    if args.job:
        # The list is every program of the job: a filter would silently not apply.
        given = [f"--{name}" for name in ("path", "package", "comm", "user", "since",
                                          "until", "host") if getattr(args, name, None)]
        if given:
            one = len(given) == 1
            raise ElsaError(f"apps: {', '.join(given)} {'does' if one else 'do'} not apply to "
                            "--job, which lists every program of the job; leave "
                            f"{'it' if one else 'them'} out, or select records with --by "
                            "(e.g. --by binary)")
        try:
            jid = parse_jid(args.job)
        except ValueError as exc:
            raise ElsaError(str(exc)) from None
        # From the store, or from elsad when this user cannot read it (private_data).
        data = cli._report(args, "apps", {"job": format_jid(jid)},
                           lambda db: [r.to_json() for r in job_programs(db, jid)])
        recs = [record.AppRecord.from_json(j) for j in data]

        def table() -> None:
            header = ["EXEC", "PID", "USER", "COMMAND", "PATH", "WALL", "USER", "SYS",
                      "MAXRSS", "EXIT", "END"]
            body = []
            for r, j in zip(recs, data):
                exit_s = ("-" if r.exit_code is None
                          else f"{r.exit_code}:{r.exit_signal or 0}")
                body.append([text.fmt_time(r.exec_time), str(r.pid),
                             "-" if r.uid is None else user_name(r.uid),
                             r.comm or "-", _path_text(r.exe_path, r.path_status, r.exe_deleted),
                             text.fmt_us(None if j["wall_s"] is None
                                         else int(j["wall_s"] * 1e6)),
                             text.fmt_us(r.cpu_user_us), text.fmt_us(r.cpu_system_us),
                             text.fmt_kb(r.max_rss_kb), exit_s, r.end_reason])
            if not body:
                out.write(f"no application records for job {format_jid(jid)}\n")
                return
            text.table(body, header, out)

        text.emit(args, data, data, table, out)
        return 0

    cli.check_window(args.since, args.until)
    wire = {"by": args.by, "since": args.since, "until": args.until, "path": args.path,
            "package": args.package, "comm": args.comm, "uid": _uid(args.user)}
    rows = cli._report(args, "apps", wire, lambda db: usage(
        db, args.by, since=args.since, until=args.until, path=args.path,
        package=args.package, comm=args.comm, uid=_uid(args.user),
        hosts=cli._site_filters(args, db)["hosts"]))
    for r in rows:
        if "uid" in r and "user" not in r:  # the central store names site users itself
            r["user"] = None if r["uid"] is None else user_name(r["uid"])
        if "jid" in r:
            r["jid"] = None if r["jid"] is None else format_jid(r["jid"])

    def table_by() -> None:
        # The central store's rows are per site user and account (a user in two accounts
        # has two rows), as elsa summary --by user's: the account tells them apart.
        accounts = args.by == "user" and any("account" in r for r in rows)
        label = {"binary": ["BINARY"], "package": ["PACKAGE", "VERSION"],
                 "user": ["USER"] + (["ACCOUNT"] if accounts else []), "job": ["JID"]}[args.by]
        header = label + ["RUNS", "USERS", "WALL", "CPU", "MAXRSS", "READ", "WRITE",
                          "UNRESOLVED"]
        body = []
        for r in rows:
            if args.by == "binary":
                keys = [r["exe_path"] or f"(path unknown) {r['comm'] or '-'}"]
            elif args.by == "package":
                keys = [r["package"] or "(none)", r["package_version"] or "-"]
            elif args.by == "user":
                keys = [r["user"] or "-"] + ([r.get("account") or "-"] if accounts else [])
            else:
                keys = [r["jid"] or "(no job)"]
            cpu = None
            if r["cpu_user_us"] is not None or r["cpu_system_us"] is not None:
                cpu = (r["cpu_user_us"] or 0) + (r["cpu_system_us"] or 0)
            body.append(keys + [str(r["runs"]), str(r["users"]), text.fmt_us(r["wall_us"]),
                                text.fmt_us(cpu), text.fmt_kb(r["max_rss_kb"]),
                                text.fmt_bytes(r["read_bytes"]), text.fmt_bytes(r["write_bytes"]),
                                str(r["unresolved"])])
        text.table(body, header, out)

    text.emit(args, rows, rows, table_by, out)
    return 0


def _path_text(path: Optional[str], status: str, deleted: Optional[int]) -> str:
    if path is None:
        return f"({status})"
    return path + (" (deleted)" if deleted else "")
