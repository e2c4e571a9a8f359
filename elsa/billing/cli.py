"""``elsa bill``: charge-back by user, account, job or tag (docs/billing.md)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
from decimal import Decimal
from typing import Any, Dict, List, Optional, Tuple

from elsa.billing.rates import RESOURCES, BillingConfig
from elsa.errors import ElsaError

_PERIOD = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?$")


def period_window(text: str, cfg: BillingConfig) -> Tuple[float, float]:
    """``2026-11`` (a month) or ``2026-11-25`` (a day) in the billing time zone."""
    m = _PERIOD.match(text.strip())
    if not m:
        raise ElsaError(f"--period {text!r}: expected a month YYYY-MM or a day YYYY-MM-DD")
    y, mo = int(m.group(1)), int(m.group(2))
    try:
        if m.group(3):
            a = dt.datetime(y, mo, int(m.group(3)))
            b = a + dt.timedelta(days=1)
        else:
            a = dt.datetime(y, mo, 1)
            b = dt.datetime(y + (mo == 12), mo % 12 + 1, 1)
    except ValueError:
        raise ElsaError(f"--period {text!r}: no such date") from None
    tz = cfg.schedule.tz
    if tz is not None:
        a, b = a.replace(tzinfo=tz), b.replace(tzinfo=tz)
    return a.timestamp(), b.timestamp()


def _s(d: Optional[Decimal]) -> Optional[str]:
    return None if d is None else str(d)


def _num(d: Any) -> Any:
    """Seconds as a JSON number (float), exact enough for display."""
    return None if d is None else float(d)


def to_json(bill: Dict[str, Any], period: Optional[str]) -> Dict[str, Any]:
    from elsa.core.model import format_jid

    biller = bill["biller"]
    by = bill["by"]
    rows = []
    for r in bill["rows"]:
        key = r["key"]
        if by == "job":
            key = None if isinstance(key, tuple) else format_jid(key)
        row: Dict[str, Any] = {"key": key}
        if by == "job":
            it = r["items"][0]
            row.update({"jid": key, "name": it["name"], "user": it["user"], "uid": it["uid"],
                        "account": it["account"], "tags": it["tags"], "start": it["start"],
                        "end": it["end"], "multiplier": str(it["multiplier"]),
                        "quantities": {q: _s(v) for q, v in it["quantities"].items()}})
        row.update({
            "jobs": r["jobs"], "processes": r["processes"],
            "prime_s": _num(r["prime_s"]), "nonprime_s": _num(r["nonprime_s"]),
            "charges": {k: str(biller.round(v)) for k, v in r["parts"].items()},
            "charge": str(r["charge"]), "unpriced": sorted(r["unpriced"]),
        })
        rows.append(row)
    return {"by": by, "period": period, "since": bill["since"], "until": bill["until"],
            "unit": biller.cfg.unit, "total": str(bill["total"]),
            "rate_table": biller.cfg.rate_table(), "rows": rows}


def _fmt_secs(s: Optional[float]) -> str:
    if s is None:
        return "-"
    h = s / 3600
    return f"{h:.2f}h"


def _when(t: float, zone: str) -> str:
    """*t* in the billing time zone *zone* (the rate table's), with its UTC offset."""
    from elsa.billing.rates import _zone

    d = dt.datetime.fromtimestamp(t, _zone(zone)) if zone != "local" else \
        dt.datetime.fromtimestamp(t).astimezone()
    off = d.strftime("%z")
    # Seconds where the window has them (--since/--until), or it reads as another window.
    clock = "%H:%M:%S" if d.second or d.microsecond else "%H:%M"
    frac = f"{d.microsecond / 1e6:.6f}"[1:].rstrip("0") if d.microsecond else ""
    return d.strftime(f"%Y-%m-%d {clock}") + f"{frac} {off[:3]}:{off[3:]}"


def print_table(data: Dict[str, Any], out) -> None:
    from elsa.report.text import table

    by = data["by"]
    zone = data["rate_table"]["timezone"]
    out.write(f"bill {_when(data['since'], zone)} .. {_when(data['until'], zone)} by {by}, "
              f"in {data['unit']}\n")
    label = {"user": "USER", "account": "ACCOUNT", "job": "JID"}.get(by, by[4:].upper())
    priced = [r for r in RESOURCES if data["rate_table"]["resources"][r]["prime"] != "0"
              or data["rate_table"]["resources"][r]["nonprime"] != "0"]
    header = [label] + (["USER", "NAME"] if by == "job" else ["JOBS"]) + \
        ["PROCS", "PRIME", "NONPRIME"] + [r.upper() for r in priced] + ["CHARGE"]
    body = []
    for r in data["rows"]:
        key = r["key"]
        line = ["-" if key is None else str(key)]
        line += ([r["user"], r["name"]] if by == "job" else [str(r["jobs"])])
        line += [str(r["processes"]), _fmt_secs(r["prime_s"]), _fmt_secs(r["nonprime_s"])]
        line += [r["charges"].get(p, "-") for p in priced]
        line.append(r["charge"] + (" *" if r["unpriced"] else ""))
        body.append(line)
    table(body, header, out)
    out.write(f"TOTAL {data['total']} {data['unit']}\n")
    if any(r["unpriced"] for r in data["rows"]):
        out.write("* a resource has a rate but no figure for some item (not charged): "
                  + ", ".join(sorted({u for r in data["rows"] for u in r["unpriced"]})) + "\n")
    rt = data["rate_table"]
    out.write(f"\nrate table ({rt['unit']} per base unit; rounding half-even to "
              f"{rt['decimals']} places per item; time zone {rt['timezone']}):\n")
    table([[r, v["base_unit"], v["prime"], v["nonprime"]]
            for r, v in rt["resources"].items()],
           ["RESOURCE", "BASE UNIT", "PRIME", "NONPRIME"], out)
    sched = ", ".join(f"{k} {v}" for k, v in rt["schedule"].items())
    out.write(f"prime time: {sched}\n")
    for hf in rt["holiday_files"]:
        out.write(f"holidays {hf['year']} ({hf['path']}): {len(hf['holidays'])} days, "
                  + ", ".join(f"{k} {v}" for k, v in hf["schedule"].items()) + "\n")
    for tag, vals in rt["multipliers"].items():
        out.write(f"multipliers by tag {tag}: "
                  + ", ".join(f"{v}={m}" for v, m in vals.items()) + "\n")


def print_csv(data: Dict[str, Any], out) -> None:
    rt = data["rate_table"]
    out.write(f"# rate table ({rt['unit']}): " + json.dumps(rt, sort_keys=True) + "\n")
    # By job, the user, account and name as the table's USER and NAME: the rows outside
    # jobs (one per user, no key) are told apart by them alone.
    per_job = ["user", "account", "name"] if data["by"] == "job" else []
    cols = ["key"] + per_job + ["jobs", "processes", "prime_s", "nonprime_s"] + \
        [f"charge_{r}" for r in RESOURCES] + ["charge", "unpriced"]
    w = csv.writer(out)
    w.writerow(cols)
    for r in data["rows"]:
        w.writerow([r["key"]] + [r[k] for k in per_job]
                   + [r["jobs"], r["processes"], r["prime_s"], r["nonprime_s"]]
                   + [r["charges"].get(res, "") for res in RESOURCES]
                   + [r["charge"], " ".join(r["unpriced"])])


def _time_arg(option: str, text: str, cfg: BillingConfig) -> float:
    """--since/--until: a time without an offset is in the billing time zone, as
    --period is."""
    from elsa.report.cli import parse_time

    try:
        return parse_time(text, tz=cfg.schedule.tz)
    except argparse.ArgumentTypeError as exc:
        raise ElsaError(f"{option}: {exc}") from None


def _by_arg(text: str) -> str:
    if text in ("user", "account", "job") or (text.startswith("tag:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"--by {text!r}: expected user, account, job or tag:KEY")


def cmd_bill(args: argparse.Namespace, out) -> int:
    from elsa import config
    from elsa.billing import bill as engine
    from elsa.billing import rates

    cfg = config.load(config.resolve_path(args.config))
    bcfg = rates.from_config(cfg)
    if args.period:
        if args.since is not None or args.until is not None:
            raise ElsaError("give --period or --since/--until, not both")
        since, until = period_window(args.period, bcfg)
    else:
        if args.since is None or args.until is None:
            raise ElsaError("give --period YYYY-MM, or both --since and --until")
        since, until = (_time_arg(opt, text, bcfg)
                        for opt, text in (("--since", args.since), ("--until", args.until)))
    from elsa.report.cli import _report, check_window

    check_window(since, until)

    # From the store, or from elsad (its rate table) when this user cannot read it.
    wire = {"by": args.by, "since": since, "until": until, "period": args.period,
            "tags": [list(t) for t in (args.tag or ())]}
    data = _report(args, "bill", wire, lambda db: to_json(
        engine.compute(db, bcfg, since, until, args.by, args.tag or ()), args.period))
    if args.json:
        json.dump(data, out)
        out.write("\n")
    elif args.csv:
        print_csv(data, out)
    else:
        print_table(data, out)
    return 0


def add_parser(sub: Any, parents: List[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("bill", parents=parents,
                       help="charge-back by user, account, job or tag ([billing] rates)")
    s.add_argument("--by", type=_by_arg, default="user", metavar="user|account|job|tag:KEY",
                   help="group charges by this (default: user)")
    s.add_argument("--period", metavar="YYYY-MM[-DD]",
                   help="bill this month (or day), in the billing time zone")
    s.add_argument("--since", help="from this time (ISO, epoch, or age; ISO without an "
                   "offset is in the billing time zone)")
    s.add_argument("--until", help="up to this time (exclusive; as --since)")
    from elsa.report.sacct import _tag_arg

    s.add_argument("--tag", action="append", type=_tag_arg, metavar="KEY=VALUE",
                   help="only jobs with this tag (repeatable; processes outside jobs are "
                        "then left out)")
    s.set_defaults(func=cmd_bill)

