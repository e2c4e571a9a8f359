"""``elsa export apel|ur|jsonl``: the command-line side of the exports (docs/export.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable, Optional, TextIO

from elsa.errors import ConfigError, ElsaError


def add_parser(sub: Any, common: argparse.ArgumentParser,
               window: argparse.ArgumentParser) -> None:
    """Add ``export`` and its subcommands to the ``elsa`` parser."""
    p = sub.add_parser("export", help="export finished jobs: APEL, OGF UR, JSON lines")
    esub = p.add_subparsers(dest="export_format", required=True)
    s = esub.add_parser("apel", parents=[common, window],
                        help="APEL job messages for ssmsend (EGI accounting)")
    s.add_argument("--site", help="GOCDB site name (default: [export.apel] site)")
    s.add_argument("--summary", action="store_true",
                   help="summary messages (per UTC month, user and VO) instead of job records")
    s.add_argument("--month", type=_month, metavar="YYYY-MM",
                   help="the jobs that ended in this UTC month (instead of --since/--until; "
                   "what --summary should send)")
    s.add_argument("--again", action="store_true",
                   help="also write jobs exported before (default: each job once)")
    s.add_argument("--outgoing", metavar="DIR",
                   help="ssmsend's outgoing directory (default: [export.apel] outgoing)")
    s.add_argument("--path-type", choices=("dirq", "directory"),
                   help="dirq queue or plain directory (default: [export.apel] path_type)")
    s.add_argument("--ledger", metavar="FILE",
                   help="with --db postgresql://...: the file that remembers the jobs written "
                   "(default: [export.apel] ledger, else STATE_DIR/apel-central.db)")
    s.set_defaults(func=cmd_apel)
    for name, what in (("ur", "OGF Usage Record XML (GFD.98)"),
                       ("jsonl", "one JSON object per finished job")):
        s = esub.add_parser(name, parents=[common, window], help=what)
        s.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
        s.set_defaults(func=cmd_ur if name == "ur" else cmd_jsonl)


def _month(text: str) -> Any:
    """``YYYY-MM`` -> (year, month)."""
    try:
        year, month = (int(x) for x in text.strip().split("-"))
        if not 1 <= month <= 12 or not 1970 <= year <= 9999:
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a month: {text!r} (use YYYY-MM, e.g. "
                                         "2026-11)") from None
    return year, month


def _config(args: argparse.Namespace) -> Any:
    from elsa import config

    return config.load(config.resolve_path(args.config))


def _db_path(args: argparse.Namespace, cfg: Any) -> str:
    if args.db:
        return args.db
    return os.path.join(args.state_dir or cfg.state_dir, "elsa.db")


def _open(args: argparse.Namespace, cfg: Any, readonly: bool = True) -> Any:
    """The node's store (a sqlite3 connection), or the central store for a --db URL."""
    from elsa.report.connect import is_central, open_db, open_store

    where = _db_path(args, cfg)
    return open_db(where) if is_central(where) else open_store(where, readonly=readonly)


def _close(db: Any) -> None:
    getattr(db, "conn", db).close()  # a report adapter (central) or a sqlite3 connection


def _no_csv(args: argparse.Namespace) -> None:
    if getattr(args, "csv", False):
        raise ConfigError("elsa export apel: --csv does not apply here (--json gives the "
                          "outcome as JSON)")


def _no_format(args: argparse.Namespace) -> None:
    for flag in ("json", "csv"):
        if getattr(args, flag, False):
            what = "XML" if args.export_format == "ur" else "JSON lines"
            raise ConfigError(f"elsa export {args.export_format}: --{flag} does not apply "
                              f"here (the output is {what}); leave it out, or use 'elsa "
                              "jobs --json|--csv' for a report")


def _skipped(skipped: Any, err: TextIO) -> None:
    for s in skipped:
        err.write(f"elsa: {s.line()}\n")


def cmd_apel(args: argparse.Namespace, out: TextIO) -> int:
    from elsa.export import apel
    from elsa.export.records import host_name, jid_text
    from elsa.report.connect import is_central

    _no_csv(args)
    since, until = args.since, args.until
    if args.month is not None:
        if since is not None or until is not None:
            raise ConfigError("elsa export apel: give --month or --since/--until, not both")
        since, until = apel.month_bounds(*args.month)
    cfg = _config(args)
    opts = cfg.section("export.apel")
    ledger = None
    state = None
    if args.db and is_central(args.db) and not args.summary:
        # No role of the central store may write there: the jobs written from it are
        # remembered here, in a file of this machine (JIDs are unique across the site).
        from elsa.export.records import ExportState, open_ledger

        path = (args.ledger or opts["ledger"]
                or os.path.join(args.state_dir or cfg.state_dir, "apel-central.db"))
        ledger = open_ledger(path)
        state = ExportState(ledger, "apel", f"the export ledger {path}")
    elif args.ledger:
        raise ConfigError("elsa export apel: --ledger applies to job records from the "
                          "central store (--db postgresql://... without --summary); a "
                          "node's store keeps its own")
    try:
        db = _open(args, cfg, readonly=args.summary)
        try:
            res = apel.export(db, opts, site=args.site, since=since, until=until,
                              summary=args.summary, again=args.again,
                              outgoing=args.outgoing, path_type=args.path_type,
                              host=host_name(cfg), state=state)
        finally:
            _close(db)
    finally:
        if ledger is not None:
            ledger.close()
    if args.json:
        json.dump({"messages": res.messages, "records": res.records,
                   "skipped": [{"jid": jid_text(s.jid), "why": s.why}
                               for s in res.skipped],
                   "notes": res.notes},
                  out, indent=2)
        out.write("\n")
    else:
        _skipped(res.skipped, sys.stderr)
        for note in res.notes:
            sys.stderr.write(f"elsa: {note}\n")
        kind = "summary" if args.summary else "job"
        out.write(f"{res.records} {kind} records in {len(res.messages)} messages"
                  + (f" ({res.messages[0]} ...)" if res.messages else "") + "\n")
    return 0


def _finished(args: argparse.Namespace, charges: bool = False) -> Any:
    """(config, finished jobs of the window, their charges or None)."""
    from elsa.export.records import finished_jobs, host_name

    _no_format(args)
    cfg = _config(args)
    db = _open(args, cfg)
    try:
        jobs, skipped = finished_jobs(db, args.since, args.until, host=host_name(cfg))
        charge = billing_charge(cfg, db, args.since, args.until) if charges else None
    finally:
        _close(db)
    _skipped(skipped, sys.stderr)
    return cfg, jobs, charge


#: What a UR Charge of ELSA's billing is (its formula attribute).
CHARGE_FORMULA = ("ELSA billing (docs/billing.md): sum over resources of quantity x (prime share"
                  " x prime rate + non-prime share x non-prime rate) x tag multipliers")


def billing_charge(cfg: Any, db: Any, since: Optional[float], until: Optional[float]
                   ) -> Optional[Any]:
    """The UR Charge of each job from the billing module's bill of the same
    window, when ``[billing.rates]``/``[billing.nonprime]`` set a rate; None
    otherwise (the records then carry no Charge)."""
    from elsa.billing import bill, rates

    bcfg = rates.from_config(cfg)
    if not any(bcfg.prime.values()) and not any(bcfg.nonprime.values()):
        return None
    items = {it["jid"]: it for it in bill.job_items(
        db, bill.Biller(bcfg), since if since is not None else 0.0,
        until if until is not None else float(2 ** 62))}

    def charge(job: Any) -> Optional[Any]:
        it = items.get(job.jid)
        if it is None:
            return None
        return float(it["charge"]), bcfg.unit, CHARGE_FORMULA

    return charge


def cmd_ur(args: argparse.Namespace, out: TextIO) -> int:
    from elsa.export import ur

    cfg, jobs, charge = _finished(args, charges=True)
    opts = cfg.section("export.apel")  # the batch tags are named once, in [export.apel]
    data = ur.document(jobs, job_id_tag=opts["job_id_tag"], queue_tag=opts["queue_tag"],
                       project_tag=opts["vo_tag"],
                       global_user_names=opts["global_user_names"], charge=charge)
    _write(args.output, out, [data.decode("utf-8")])
    return 0


def cmd_jsonl(args: argparse.Namespace, out: TextIO) -> int:
    from elsa.export import jsonl

    _, jobs, _ = _finished(args)
    _write(args.output, out, jsonl.lines(jobs))
    return 0


def _write(path: Optional[str], out: TextIO, chunks: Iterable[str]) -> None:
    """Write *chunks* to the file *path*, else to *out*; a failure is an error saying
    where."""
    try:
        if path:
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(chunks)
        else:
            out.writelines(chunks)
            out.flush()
    except BrokenPipeError:
        raise  # a reader that stopped (| head): the reports' quiet exit
    except OSError as exc:
        where = path or "standard output"
        raise ElsaError(f"cannot write {where}: {exc.strerror or exc}; "
                        + ("give -o a writable file in an existing directory" if path
                           else "check the disk or file standard output goes to")) from exc
