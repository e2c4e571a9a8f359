"""The ``[billing]`` configuration: rate table, prime-time schedule, tag multipliers.

Validated completely when the config is loaded (elsad and ``elsa`` refuse to
start on any error), so no report is ever computed from a half-read table.
Rates are kept as :class:`decimal.Decimal` built from the TOML text of the
number, so ``0.1`` is exactly one tenth. docs/billing.md has the formula.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, Mapping, Optional, Tuple

from elsa.billing.schedule import (
    ALL_DAY,
    DAY_KINDS,
    Schedule,
    parse_window,
    read_holidays,
)
from elsa.config import Option
from elsa.errors import ConfigError

#: Billable resources: name -> (base unit, description). Every rate defaults to 0.
RESOURCES: Dict[str, Tuple[str, str]] = {
    "cpu_user": ("CPU second", "user CPU time"),
    "cpu_system": ("CPU second", "system CPU time"),
    "mem_peak": ("MiB-hour", "peak resident memory (MiB) x wall time (hours)"),
    "mem_integral": ("MiB-hour", "memory integral where a source measures it (taskstats)"),
    "read": ("GiB", "bytes read from storage"),
    "write": ("GiB", "bytes written to storage"),
    "io_calls": ("call", "read and write system calls, where a source counts them"),
    "core_hours": ("core-hour", "wall time x cores allowed (cpuset / cgroup cpu.max)"),
    "job": ("job", "basic charge per job"),
}



def _decimal_problem(value: Any) -> Optional[str]:
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        return "must be a decimal number"
    if not d.is_finite():
        return "must be a finite number"
    if d < 0:
        return "must be 0 or more (a rate or multiplier cannot be negative)"
    return None


def _decimal(value: Any) -> Decimal:
    return Decimal(str(value))


def _rate_options(when: str) -> Dict[str, Option]:
    return {r: Option((int, float, str), 0, f"{when} rate per {unit}: {doc}.",
                      check=_decimal_problem) for r, (unit, doc) in RESOURCES.items()}


def _window_problem(value: Any) -> Optional[str]:
    try:
        parse_window(str(value).split())
    except ValueError as exc:
        return f"is not a prime-time window: {exc}"
    return None


def _holidays_problem(value: Any) -> Optional[str]:
    files = [value] if isinstance(value, str) else value
    if not all(isinstance(f, str) for f in files):
        return "must be a path or a list of paths of CSA holidays files"
    years: Dict[int, str] = {}
    for f in files:
        try:
            hy = read_holidays(f)
        except ConfigError as exc:
            return f"names a file ELSA cannot use: {exc.message}"
        if hy.year in years:
            return f"has two files for {hy.year} ({years[hy.year]}, {f}): keep one per year"
        years[hy.year] = f
    return None


def _multipliers_problem(value: Any) -> Optional[str]:
    # A table: the problem names the entry and quotes its value alone (the
    # loader quotes no table, which may be long).
    for tag, vals in value.items():
        if not isinstance(vals, dict):
            return (f"must be tables of tag value = multiplier (e.g. "
                    f"[billing.multipliers.queue] debug = 0.5); '{tag}' is {vals!r}")
        for v, m in vals.items():
            if isinstance(m, bool) or not isinstance(m, (int, float, str)):
                return f"entry '{tag}.{v}' must be a number; got {m!r}"
            problem = _decimal_problem(m)
            if problem:
                return f"entry '{tag}.{v}' {problem}; got {m!r}"
    return None


def _tz_problem(value: Any) -> Optional[str]:
    try:
        _zone(value)
    except Exception:  # ZoneInfoNotFoundError, ValueError on odd names
        return "is not a known time zone; use an IANA name such as 'Europe/Paris' or 'local'"
    return None


def _zone(name: str) -> Optional[dt.tzinfo]:
    if name == "local":
        return None
    import zoneinfo

    return zoneinfo.ZoneInfo(name)


#: [billing] (docs/billing.md). Sub-tables: [billing.rates], [billing.nonprime],
#: [billing.schedule], [billing.multipliers.<tag>].
OPTIONS: Dict[str, Option] = {
    "unit": Option(str, "units", "Name of the billing unit (e.g. 'SBU', 'EUR')."),
    "decimals": Option(int, 2, "Decimal places each item's charge is rounded to (half-even);"
                       " totals are sums of rounded item charges.",
                       check=lambda v: None if 0 <= v <= 12 else "must be 0..12"),
    "timezone": Option(str, "local", "Time zone of the prime-time schedule and of --period"
                       " ('local' or an IANA name).", check=_tz_problem),
    "holidays": Option((str, list), [], "CSA csa.holidays files (one per year), read as is;"
                       " a year with a file takes its prime-time lines and holidays from it.",
                       check=_holidays_problem),
    "multipliers": Option(dict, {}, "Charge multipliers by job tag, CSA's queue/machine"
                          " weights: per tag key, tag value to multiplier (docs/billing.md).",
                          check=_multipliers_problem),
}
RATE_OPTIONS = _rate_options("Prime-time (and, without a schedule, every)")
NONPRIME_OPTIONS = _rate_options("Non-prime")
SCHEDULE_OPTIONS: Dict[str, Option] = {
    kind: Option(str, "all", f"Prime time on {kind}s (years without a holidays file):"
                 " '<prime start> <non-prime start>' as HHMM HHMM (e.g. '0730 1730'),"
                 " 'all' or 'none'.", check=_window_problem)
    for kind in DAY_KINDS
}


@dataclass(frozen=True)
class BillingConfig:
    """The validated ``[billing]`` table."""

    prime: Mapping[str, Decimal] = field(default_factory=lambda: {r: Decimal(0)
                                                                  for r in RESOURCES})
    nonprime: Mapping[str, Decimal] = field(default_factory=lambda: {r: Decimal(0)
                                                                     for r in RESOURCES})
    schedule: Schedule = field(default_factory=lambda: Schedule({k: ALL_DAY
                                                                 for k in DAY_KINDS}))
    multipliers: Mapping[str, Mapping[str, Decimal]] = field(default_factory=dict)
    decimals: int = 2
    unit: str = "units"
    timezone: str = "local"
    holiday_files: Tuple[str, ...] = ()
    weekly: Mapping[str, str] = field(default_factory=lambda: {k: "all" for k in DAY_KINDS})

    def rate_table(self) -> Dict[str, Any]:
        """The table a bill states it used (JSON-ready: decimals as strings)."""
        return {
            "unit": self.unit, "decimals": self.decimals, "timezone": self.timezone,
            "resources": {r: {"base_unit": u, "prime": str(self.prime[r]),
                              "nonprime": str(self.nonprime[r])}
                          for r, (u, _) in RESOURCES.items()},
            "schedule": dict(self.weekly),
            "holiday_files": [{"path": y.path, "year": y.year,
                               "schedule": {k: _window_text(w) for k, w in y.windows.items()},
                               "holidays": sorted(d.isoformat() for d in y.holidays)}
                              for y in sorted(self.schedule.years.values(),
                                              key=lambda y: y.year)],
            "multipliers": {k: {v: str(m) for v, m in vals.items()}
                            for k, vals in self.multipliers.items()},
        }


def _window_text(w: Tuple[int, int]) -> str:
    if w == ALL_DAY:
        return "all"
    if w[0] == w[1]:
        return "none"
    return f"{w[0] // 3600:02d}{w[0] % 3600 // 60:02d} {w[1] // 3600:02d}{w[1] % 3600 // 60:02d}"


def from_config(cfg: Any) -> BillingConfig:
    """The BillingConfig of a loaded :class:`elsa.config.Config` (validated at load)."""
    top = cfg.section("billing")
    prime = {r: _decimal(v) for r, v in cfg.section("billing.rates").items()}
    nonprime = {r: _decimal(v) for r, v in cfg.section("billing.nonprime").items()}
    weekly = dict(cfg.section("billing.schedule"))
    windows = {k: parse_window(v.split()) for k, v in weekly.items()}
    files = top["holidays"]
    files = [files] if isinstance(files, str) else list(files)
    years = [read_holidays(f) for f in files]
    multipliers = {str(tag): {str(v): _decimal(m) for v, m in vals.items()}
                   for tag, vals in top["multipliers"].items()}
    return BillingConfig(prime=prime, nonprime=nonprime,
                         schedule=Schedule(windows, years, _zone(top["timezone"])),
                         multipliers=multipliers, decimals=top["decimals"], unit=top["unit"],
                         timezone=top["timezone"], holiday_files=tuple(files), weekly=weekly)
