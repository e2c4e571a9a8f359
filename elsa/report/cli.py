"""``elsa``: per-job accounting reports from the store (and pacct import).

    elsa jobs [--state running|ended] [--since T] [--until T]
    elsa job JID [--source NAME]                    each process with its usage
    elsa summary --by job|user|command [--since T] [--until T] [--source NAME]
    elsa import-acct FILE...                        bring old pacct files in
    elsa export apel|ur|jsonl [--since T] [--until T]   finished jobs for APEL, OGF UR, pipelines
    elsa store-salvage                              rebuild a damaged store from what is readable

Every report prints a table, or ``--json`` / ``--csv`` (raw units: µs, KiB,
bytes). Times (``--since/--until``) accept ISO dates ("2026-11-21",
"2026-11-21T10:00"), epoch seconds, or an age ("90m", "12h", "7d").
The store is ``<state_dir>/elsa.db`` from the config (``--config``,
``$ELSA_CONFIG``, /etc/elsa/elsa.toml), or ``--state-dir`` / ``--db``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sqlite3
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from elsa import __version__
from elsa.errors import ElsaError
from elsa.report.text import (
    emit,
    fmt_bytes,
    fmt_kb,
    fmt_n,
    fmt_tags,
    fmt_time,
    fmt_us,
    printable,
    table,
)

NO_SOURCE = ("no accounting source measured this job (is a source enabled? see "
             "'elsa-jobmng status'; taskstats and cgroupstat are on by default)")

#: Problems of a pacct input printed one by one; the rest are counted.
MAX_PROBLEMS = 20

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: Optional[float] = None,
               tz: Optional[dt.tzinfo] = None) -> float:
    """An absolute time (epoch seconds) from ISO, epoch, or an age like "12h". An ISO
    time without an offset is in *tz* (None: the host's zone)."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _AGE.match(t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(t.replace(" ", "T", 1) if " " in t else t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use 2026-11-21, 2026-11-21T10:00, epoch seconds, or an "
            "age such as 90m, 12h, 7d)") from None
    if d.tzinfo is None and tz is not None:
        d = d.replace(tzinfo=tz)
    return d.timestamp()


def _db_path(args: argparse.Namespace) -> str:
    if args.db:
        return args.db
    if args.state_dir:
        return os.path.join(args.state_dir, "elsa.db")
    from elsa import config

    cfg = config.load(config.resolve_path(args.config))
    return os.path.join(cfg.state_dir, "elsa.db")


def _site_filters(args: argparse.Namespace, db: Any) -> Dict[str, Any]:
    """--host and --tag K=V (the host filter needs the central store)."""
    from elsa.report.connect import adapt

    hosts = getattr(args, "host", None)
    adb = adapt(db)
    if hosts and not adb.central:
        raise ElsaError("--host selects nodes of the central store: use it with "
                        "--db postgresql://...")
    if hosts:
        # A misspelt node gave an empty report, as --source's typo did: refused alike.
        known = adb.hosts()  # type: ignore[attr-defined]  # central: a PgDb
        unknown = [h for h in hosts if h not in known]
        if unknown:
            raise ElsaError(f"--host {', '.join(map(repr, unknown))}: no node of that name "
                            "shipped anything to this central store; the known hosts are "
                            + (", ".join(known) or "none yet"))
    tags = dict(getattr(args, "tag", None) or [])  # (key, value) pairs
    return {"hosts": hosts, "tags": tags}


def check_window(since: Optional[float], until: Optional[float]) -> None:
    """Refuse a window that holds no time (--until not after --since)."""
    if since is not None and until is not None and until <= since:
        raise ElsaError(f"the window is empty: --until ({fmt_time(until)}) must be after "
                        f"--since ({fmt_time(since)})")


def check_source(db: Any, source: Optional[str]) -> None:
    """Refuse a --source that names no source of the store nor of this host
    (a typo gave an empty report)."""
    if source is None:
        return
    from elsa.core.usage import load_priorities

    known = set(load_priorities(db))
    if source in known:
        return
    from elsa.plugins import PluginHost, build_plugin_manager

    known |= set(PluginHost(build_plugin_manager()).sources())
    if source not in known:
        raise ElsaError(f"--source {source!r}: no such source; the known sources are "
                        f"{', '.join(sorted(known))}")


def _report(args: argparse.Namespace, name: str, wire: Dict[str, Any], local) -> Any:
    """The report from the store when this user can read it, else from elsad
    (the ``report`` operation, under the private_data policy)."""
    from elsa.report import remote
    from elsa.report.connect import is_central, open_db

    if args.db and is_central(args.db):
        return local(open_db(args.db))
    return remote.run(_db_path(args), _socket_path(args), name, wire, local)


def _socket_path(args: argparse.Namespace) -> Optional[str]:
    if getattr(args, "socket", None):
        return args.socket
    if args.db or args.state_dir:
        return None  # a store named explicitly: read it, or say why not
    from elsa.client import default_socket

    return default_socket(args.config)


# -- commands -----------------------------------------------------------------------------------

def _warn_problems(command: str, where: str, problems: Sequence[str]) -> None:
    """The first problems of *where* (a file, or the input) on stderr, then how many more."""
    for p in problems[:MAX_PROBLEMS]:
        sys.stderr.write(f"elsa {command}: {p}\n")
    if len(problems) > MAX_PROBLEMS:
        sys.stderr.write(f"elsa {command}: {where}: {len(problems) - MAX_PROBLEMS} more "
                         "problems\n")


def cmd_summary(args: argparse.Namespace, out) -> int:
    check_window(args.since, args.until)
    problems: List[str] = []
    if args.acct_file:
        if args.by == "job":
            raise ElsaError("--acct-file summarizes by user or command; jobs need the store")
        for opt, value in (("--source", args.source), ("--tag", args.tag),
                           ("--host", args.host)):
            if value:
                raise ElsaError(f"{opt} selects records of the store; --acct-file reads the "
                                "pacct files given, which have one source (bsdacct), no jobs "
                                f"and one host: leave out {opt}, or summarize the store")
        from elsa.report.acctfile import summarize_files

        files = [f for group in args.acct_file for f in group]
        rows, per_file = summarize_files(files, args.by, args.since, args.until)
        # The first problems of each file, as import-acct lists them: the first
        # file's could otherwise hide every other file's.
        for f, found in per_file.items():
            _warn_problems("summary", f, found)
        problems = [p for found in per_file.values() for p in found]
        if problems:
            for r in rows:
                r["problems"] = problems
    else:
        from elsa.report import query

        def local(db: Any) -> Any:
            check_source(db, args.source)
            return query.summary(db, args.by, args.since, args.until, args.source,
                                 **_site_filters(args, db))

        rows = _report(args, "summary", {"by": args.by, "since": args.since,
                                         "until": args.until, "source": args.source}, local)

    def show() -> None:
        if args.by == "job":
            # WALL is the job's end − start; the sum of its processes' elapsed
            # times is in the JSON (elapsed_us), not a column called ELAPSED.
            header = ["JID", "NAME", "OWNER", "PROCS", "WALL", "USER", "SYS", "MAXRSS",
                      "READ", "WRITE"]
            body = [[r['jid'], r["name"], r["owner"], fmt_n(r["processes"]),
                     fmt_us(r["wall_us"]), fmt_us(r["cpu_user_us"]),
                     fmt_us(r["cpu_system_us"]), fmt_kb(r["max_rss_kb"]),
                     fmt_bytes(r["read_bytes"]), fmt_bytes(r["write_bytes"])
                     + (" (incomplete)" if r["incomplete"] else "")] for r in rows]
        else:
            label = "USER" if args.by == "user" else "COMMAND"
            # The central store's rows are per site user and account (a user in two
            # accounts has two rows): without the account they would look the same.
            accounts = any("account" in r for r in rows)
            header = [label] + (["ACCOUNT"] if accounts else []) + [
                "PROCS", "USER", "SYS", "ELAPSED", "MAXRSS", "AVGMEM", "READ", "WRITE"]
            body = [[str(r["user"] if args.by == "user" else r["command"])]
                    + ([r.get("account") or "-"] if accounts else [])
                    + [fmt_n(r["processes"]), fmt_us(r["cpu_user_us"]),
                       fmt_us(r["cpu_system_us"]), fmt_us(r["elapsed_us"]),
                       fmt_kb(r["max_rss_kb"]), fmt_kb(r["avg_mem_kb"]),
                       fmt_bytes(r.get("read_bytes")), fmt_bytes(r.get("write_bytes"))]
                    for r in rows]
        table(body, header, out)

    emit(args, rows, rows, show, out)
    return 1 if problems else 0


def cmd_jobs(args: argparse.Namespace, out) -> int:
    from elsa.report import query, sacct

    if args.format == "help":
        sacct.format_help(out)
        return 0
    root_exits = bool(args.format or args.parsable2 or args.noheader)
    check_window(args.since, args.until)

    def local(db):
        rows = query.jobs(db, args.since, args.until, args.state, **_site_filters(args, db))
        if root_exits:
            sacct.add_root_exits(db, rows)
        return rows

    rows = sacct.with_tags(_report(args, "jobs", {"since": args.since, "until": args.until,
                                                  "state": args.state,
                                                  "root_exits": root_exits}, local),
                           args.tag)
    if sacct.print_jobs(args, rows, out):
        return 0

    def show() -> None:
        header = ["JID", "NAME", "OWNER", "STATE", "CREATED", "ENDED", "WALL", "PROCS", "CPU",
                  "MAXRSS"]
        body = []
        for r in rows:
            u = r["usage"]
            cpu = None
            if u.get("cpu_user_us") is not None or u.get("cpu_system_us") is not None:
                cpu = (u.get("cpu_user_us") or 0) + (u.get("cpu_system_us") or 0)
            body.append([r['jid'], r["name"], r["owner"], r["state"],
                         fmt_time(r["created"]), fmt_time(r["ended"]), fmt_us(r["wall_us"]),
                         fmt_n(u.get("processes")),
                         fmt_us(cpu), fmt_kb(u.get("max_rss_kb"))])
        table(body, header, out)

    csv_rows = [{**{k: v for k, v in r.items() if k != "usage"},
                 **{k: v for k, v in r["usage"].items()
                    if k not in ("sources", "chosen", "incomplete", "fallback")}}
                for r in rows]
    emit(args, rows, csv_rows, show, out)
    return 0


def cmd_job(args: argparse.Namespace, out) -> int:
    from elsa.core.model import format_exit, format_jid, parse_jid
    from elsa.report import query

    try:
        jid = parse_jid(args.jid)
    except ValueError as exc:
        raise ElsaError(str(exc)) from None
    def local(db: Any) -> Any:
        check_source(db, args.source)
        return query.job_detail(db, jid, args.source)

    detail = _report(args, "job", {"jid": format_jid(jid), "source": args.source}, local)
    if detail is None:
        raise ElsaError(f"no job {format_jid(jid)} in the store; list jobs with 'elsa jobs'")

    def show() -> None:
        u = detail["usage"]
        out.write(f"job {format_jid(jid)}  {printable(detail.get('name') or '')}  "
                  f"owner {detail.get('owner', '?')}  "
                  f"{detail.get('state', '?')}  created {fmt_time(detail.get('created'))}  "
                  f"ended {fmt_time(detail.get('ended'))}\n")
        tags = fmt_tags(detail.get("tags"))
        if tags:
            out.write(f"tags {tags}\n")
        out.write(f"wall {fmt_us(detail.get('wall_us'))}\n")
        if not u.get("sources"):
            out.write(f"usage: unknown: {NO_SOURCE}\n")
        else:
            out.write(f"usage: processes {fmt_n(u.get('processes'))}  user "
                      f"{fmt_us(u.get('cpu_user_us'))}  sys {fmt_us(u.get('cpu_system_us'))}"
                      f"  maxrss {fmt_kb(u.get('max_rss_kb'))}  read "
                      f"{fmt_bytes(u.get('read_bytes'))}  write "
                      f"{fmt_bytes(u.get('write_bytes'))}\n")
        if u.get("chosen"):
            by_src: Dict[str, List[str]] = {}
            for m, s in u["chosen"].items():
                by_src.setdefault(s, []).append(m)
            out.write("figures from: " + "; ".join(
                f"{s}: {', '.join(ms)}" for s, ms in sorted(by_src.items())) + "\n")
        if u.get("note"):
            out.write(f"note: {u['note']}\n")
        by_why: Dict[str, List[str]] = {}
        for m, why in (u.get("fallback") or {}).items():
            by_why.setdefault(why, []).append(m)
        for why, ms in sorted(by_why.items()):
            out.write(f"fallback: {', '.join(ms)} {why}\n")
        for s, why in (u.get("incomplete") or {}).items():
            out.write(f"INCOMPLETE ({s}): {why}\n")
        out.write(f"\nprocesses (source {detail['process_source'] or '-'}):\n")
        header = ["PID", "PPID", "USER", "COMMAND", "START", "ELAPSED", "USER", "SYS",
                  "MAXRSS", "READ", "WRITE", "EXIT"]
        body = [[str(p["pid"]), str(p["ppid"] if p["ppid"] is not None else "-"), p["user"],
                 p["comm"], fmt_time(p["start_time"]), fmt_us(p["elapsed_us"]),
                 fmt_us(p["cpu_user_us"]), fmt_us(p["cpu_system_us"]),
                 fmt_kb(p["max_rss_kb"]), fmt_bytes(p["read_bytes"]),
                 fmt_bytes(p["write_bytes"]), format_exit(p["exit_code"], p["exit_signal"])]
                for p in detail["processes"]]
        table(body, header, out)
        for f in detail.get("folded", ()):
            out.write(f"folded ([thresholds]): {f['processes']} small {printable(f['comm'])} "
                      "records, "
                      f"user {fmt_us(f['cpu_user_us'])} sys {fmt_us(f['cpu_system_us'])}\n")

    emit(args, detail, detail["processes"], show, out)
    return 0


def cmd_import_acct(args: argparse.Namespace, out) -> int:
    from elsa.logsetup import configure, structlog
    from elsa.report.importer import import_files

    # The store's "store migrated" lines are not the report; main() may be called
    # in a process that has its own log setup, which is put back.
    saved = structlog.get_config()
    configure("warning", stream=sys.stderr)
    try:
        results = import_files(_db_path(args), args.files, attribute=not args.no_attribute)
    finally:
        structlog.configure(**saved)
    bad = 0
    for r in results:
        _warn_problems("import-acct", r["file"], r["problems"])
        if r["problems"]:
            bad += 1
    if args.json:
        json.dump(results, out)
        out.write("\n")
    else:
        for r in results:
            out.write(f"{r['file']}: {r['records']} records, {r['inserted']} new, "
                      f"{r['attributed']} attributed to jobs, {len(r['problems'])} problems\n")
    return 1 if bad else 0


def cmd_store_salvage(args: argparse.Namespace, out) -> int:
    from elsa.logsetup import configure
    from elsa.report.salvage import format_result, salvage

    configure("warning", stream=sys.stderr)  # the store's own log lines are not the report
    result = salvage(_db_path(args))
    if args.json:
        json.dump(result, out)
        out.write("\n")
    else:
        out.write("\n".join(format_result(result)) + "\n")
    return 0


def _add_jobs(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.report import sacct

    s = sub.add_parser("jobs", parents=[common, window, site],
                       help="list jobs with their usage")
    s.add_argument("--state", choices=("running", "ended"))
    sacct.add_jobs_options(s)
    s.set_defaults(func=cmd_jobs)


def _add_job(sub: Any, common: Any, window: Any, site: Any) -> None:
    s = sub.add_parser("job", parents=[common], help="one job: usage and every process")
    s.add_argument("jid", help="job id (0x... or decimal)")
    s.add_argument("--source", help="process records of this source (default: the best)")
    s.set_defaults(func=cmd_job)


def _add_summary(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.report import sacct

    s = sub.add_parser("summary", parents=[common, window, site],
                       help="totals by job, user or command")
    s.add_argument("--tag", action="append", type=sacct._tag_arg, metavar="KEY=VALUE",
                   help="only jobs with this tag (repeatable; with --by job)")
    s.add_argument("--by", choices=("job", "user", "command"), default="user")
    s.add_argument("--source", help="count only this source's process records")
    s.add_argument("--acct-file", action="append", nargs="+", metavar="PACCT",
                   help="summarize these pacct files directly, like GNU sa (gzip files "
                   "too; repeatable)")
    s.set_defaults(func=cmd_summary)


def _add_import_acct(sub: Any, common: Any, window: Any, site: Any) -> None:
    s = sub.add_parser("import-acct", parents=[common], help="import pacct files")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--no-attribute", action="store_true",
                   help="do not attribute records to jobs from the membership history")
    s.set_defaults(func=cmd_import_acct)


def _add_store_salvage(sub: Any, common: Any, window: Any, site: Any) -> None:
    s = sub.add_parser("store-salvage", parents=[common],
                       help="copy what is readable of a damaged store into a new one "
                       "(stop elsad first)")
    s.set_defaults(func=cmd_store_salvage)


def _add_bill(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.billing.cli import add_parser

    add_parser(sub, [common])  # bill reads --since/--until in the billing time zone


def _add_eff(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.report import sacct

    sacct.add_eff_parser(sub, [common])


def _add_ja(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.report import ja

    ja.add_parser(sub, [common])


def _add_apps(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.apps.report import add_parser

    add_parser(sub, [common, window, site])


def _add_web(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.web.serve import add_parser

    add_parser(sub, common)


def _add_export(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.export.cli import add_parser

    add_parser(sub, common, window)


def _add_central(sub: Any, common: Any, window: Any, site: Any) -> None:
    from elsa.central.cli import add_commands

    add_commands(sub)


#: Each command and what adds its parser, in ``elsa --help``'s order. An adder
#: imports its command's modules: only the command run needs them.
COMMANDS = {"jobs": _add_jobs, "job": _add_job, "summary": _add_summary,
            "import-acct": _add_import_acct, "store-salvage": _add_store_salvage,
            "bill": _add_bill, "eff": _add_eff, "ja": _add_ja, "apps": _add_apps,
            "web": _add_web, "export": _add_export, "central": _add_central}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``elsa`` parser; with *command*, holding that command alone.

    `elsa ja` runs inside jobs, often from their scripts: building every
    command's parser imported every report's modules (`ja -s` on a 2-core VM,
    median of 15: 0.174 s, 0.159 s with its own parser alone). Help and unknown
    commands get all of them.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $ELSA_CONFIG or "
                        "/etc/elsa/elsa.toml)")
    common.add_argument("--state-dir", help="elsad's state_dir (overrides the config)")
    common.add_argument("--db", help="the store file itself (overrides --state-dir), or the "
                        "central store's postgresql:// URL")
    common.add_argument("--socket", help="elsad's socket, asked for reports when the store "
                        "file is not readable (default: from the config)")
    fmt = common.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output (raw units)")
    fmt.add_argument("--csv", action="store_true", help="CSV output (raw units)")
    window = argparse.ArgumentParser(add_help=False)
    window.add_argument("--since", type=parse_time, help="from this time (ISO, epoch, or age)")
    window.add_argument("--until", type=parse_time, help="up to this time (exclusive)")
    site = argparse.ArgumentParser(add_help=False)
    site.add_argument("--host", action="append", metavar="HOST",
                      help="only these nodes of the central store (repeatable)")

    p = argparse.ArgumentParser(prog="elsa", description="Per-job accounting reports.")
    p.add_argument("--version", action="version", version=f"elsa {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, add in COMMANDS.items():
        if command is None or command == name:
            add(sub, common, window, site)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    out = sys.stdout
    try:
        return args.func(args, out)
    except ElsaError as exc:
        sys.stderr.write(f"elsa: {exc.message}\n")
        return 2
    except sqlite3.DatabaseError as exc:
        # Opening a store reads its header only: damage in a table's pages is met by
        # the report's query.
        from elsa.report.connect import read_error

        where = _db_path(args) if hasattr(args, "db") else "(unknown)"
        sys.stderr.write(f"elsa: {read_error(where, exc).message}\n")
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
