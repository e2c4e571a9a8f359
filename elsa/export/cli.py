"""``elsa export apel|ur|jsonl``: the command-line side of the exports (docs/export.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, TextIO

from elsa.errors import ConfigError


def add_parser(sub: Any, common: argparse.ArgumentParser,
               window: argparse.ArgumentParser) -> None:
    """Add ``export`` and its subcommands to the ``elsa`` parser."""
    p = sub.add_parser("export", help="export finished jobs: APEL, OGF UR, JSON lines")
    esub = p.add_subparsers(dest="export_format", required=True)
    s = esub.add_parser("apel", parents=[common, window],
                        help="APEL job messages for ssmsend (EGI accounting)")
    s.add_argument("--site", help="GOCDB site name (default: [export.apel] site)")
    s.add_argument("--summary", action="store_true",
                   help="summary messages (per month, user and VO) instead of job records")
    s.add_argument("--again", action="store_true",
                   help="also write jobs exported before (default: each job once)")
    s.add_argument("--outgoing", metavar="DIR",
                   help="ssmsend's outgoing directory (default: [export.apel] outgoing)")
    s.add_argument("--path-type", choices=("dirq", "directory"),
                   help="dirq queue or plain directory (default: [export.apel] path_type)")
    s.set_defaults(func=cmd_apel)
    for name, what in (("ur", "OGF Usage Record XML (GFD.98)"),
                       ("jsonl", "one JSON object per finished job")):
        s = esub.add_parser(name, parents=[common, window], help=what)
        s.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
        s.set_defaults(func=cmd_ur if name == "ur" else cmd_jsonl)


def _config(args: argparse.Namespace) -> Any:
    from elsa import config

    return config.load(config.resolve_path(args.config))


def _db_path(args: argparse.Namespace, cfg: Any) -> str:
    if args.db:
        return args.db
    return os.path.join(args.state_dir or cfg.state_dir, "elsa.db")


def _no_csv(args: argparse.Namespace) -> None:
    if getattr(args, "csv", False):
        raise ConfigError("elsa export: --csv does not apply here (use --json, or "
                          "'elsa export jsonl')")


def _skipped(skipped: Any, err: TextIO) -> None:
    for s in skipped:
        err.write(f"elsa: {s.line()}\n")


def cmd_apel(args: argparse.Namespace, out: TextIO) -> int:
    from elsa.export import apel
    from elsa.export.records import jid_text
    from elsa.report.connect import open_store

    _no_csv(args)
    cfg = _config(args)
    db = open_store(_db_path(args, cfg), readonly=args.summary)
    try:
        res = apel.export(db, cfg.section("export.apel"), site=args.site, since=args.since,
                          until=args.until, summary=args.summary, again=args.again,
                          outgoing=args.outgoing, path_type=args.path_type)
    finally:
        db.close()
    if args.json:
        json.dump({"messages": res.messages, "records": res.records,
                   "skipped": [{"jid": jid_text(s.jid), "why": s.why}
                               for s in res.skipped]},
                  out, indent=2)
        out.write("\n")
    else:
        _skipped(res.skipped, sys.stderr)
        kind = "summary" if args.summary else "job"
        out.write(f"{res.records} {kind} records in {len(res.messages)} messages"
                  + (f" ({res.messages[0]} ...)" if res.messages else "") + "\n")
    return 0


def _finished(args: argparse.Namespace, charges: bool = False) -> Any:
    """(config, finished jobs of the window, their charges or None)."""
    from elsa.export.records import finished_jobs
    from elsa.report.connect import open_store

    _no_csv(args)
    cfg = _config(args)
    db = open_store(_db_path(args, cfg))
    try:
        jobs, skipped = finished_jobs(db, args.since, args.until)
        charge = billing_charge(cfg, db, args.since, args.until) if charges else None
    finally:
        db.close()
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
    if args.output:
        with open(args.output, "wb") as fh:
            fh.write(data)
    else:
        out.write(data.decode("utf-8"))
    return 0


def cmd_jsonl(args: argparse.Namespace, out: TextIO) -> int:
    from elsa.export import jsonl

    _, jobs, _ = _finished(args)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.writelines(jsonl.lines(jobs))
    else:
        out.writelines(jsonl.lines(jobs))
    return 0
