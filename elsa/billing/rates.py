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
from typing import Any, Dict, List, Mapping, Optional, Tuple

from elsa.billing.schedule import (
    ALL_DAY,
    DAY_KINDS,
    HolidayYear,
    Schedule,
    parse_window,
    read_holidays,
)
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

_KEYS = ("rates", "nonprime", "schedule", "holidays", "multipliers", "timezone", "decimals",
         "unit")


def _decimal(value: Any, *, name: str, path: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{path}: key '{name}' must be a number, got {value!r}")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{path}: key '{name}' must be a decimal number, got "
                          f"{value!r}") from None
    if not d.is_finite():
        raise ConfigError(f"{path}: key '{name}' must be a finite number, got {value!r}")
    if d < 0:
        raise ConfigError(f"{path}: key '{name}' must be 0 or more (a rate or multiplier "
                          f"cannot be negative); got {value!r}")
    return d


def _rates(table: Any, *, where: str, path: str) -> Dict[str, Decimal]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key '{where}' must be a table of rates, got {table!r}")
    out = {}
    for key, value in table.items():
        if key not in RESOURCES:
            raise ConfigError(f"{path}: unknown resource '{where}.{key}'; known resources: "
                              f"{', '.join(RESOURCES)}")
        out[key] = _decimal(value, name=f"{where}.{key}", path=path)
    return out


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


def parse(table: Any, path: str) -> BillingConfig:
    """Validate the raw ``[billing]`` table (``{}``: bill nothing, all time prime)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'billing' must be a table, got {table!r}")
    for key in table:
        if key not in _KEYS:
            raise ConfigError(f"{path}: unknown key 'billing.{key}'; known keys here: "
                              f"{', '.join(sorted(_KEYS))}")
    prime = {r: Decimal(0) for r in RESOURCES}
    prime.update(_rates(table.get("rates", {}), where="billing.rates", path=path))
    nonprime = dict(prime)
    nonprime.update(_rates(table.get("nonprime", {}), where="billing.nonprime", path=path))
    decimals = table.get("decimals", 2)
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 12:
        raise ConfigError(f"{path}: key 'billing.decimals' must be an integer 0..12, got "
                          f"{decimals!r}")
    unit = table.get("unit", "units")
    if not isinstance(unit, str) or not unit:
        raise ConfigError(f"{path}: key 'billing.unit' must be a non-empty string, got {unit!r}")
    tzname = table.get("timezone", "local")
    tz: Optional[dt.tzinfo] = None
    if not isinstance(tzname, str):
        raise ConfigError(f"{path}: key 'billing.timezone' must be a string, got {tzname!r}")
    if tzname != "local":
        try:
            import zoneinfo

            tz = zoneinfo.ZoneInfo(tzname)
        except Exception as exc:  # ZoneInfoNotFoundError, ValueError on odd names
            raise ConfigError(f"{path}: key 'billing.timezone': unknown time zone "
                              f"{tzname!r}; use an IANA name such as 'Europe/Paris' or "
                              "'local'") from exc
    sched_raw = table.get("schedule", {})
    if not isinstance(sched_raw, dict):
        raise ConfigError(f"{path}: key 'billing.schedule' must be a table, got {sched_raw!r}")
    weekly: Dict[str, str] = {k: "all" for k in DAY_KINDS}
    windows = {k: ALL_DAY for k in DAY_KINDS}
    for key, value in sched_raw.items():
        if key not in DAY_KINDS:
            raise ConfigError(f"{path}: unknown key 'billing.schedule.{key}'; known keys here: "
                              f"{', '.join(DAY_KINDS)}")
        if not isinstance(value, str):
            raise ConfigError(f"{path}: key 'billing.schedule.{key}' must be a string such as "
                              f"\"0730 1730\", \"all\" or \"none\"; got {value!r}")
        try:
            windows[key] = parse_window(value.split())
        except ValueError as exc:
            raise ConfigError(f"{path}: key 'billing.schedule.{key}': {exc}") from exc
        weekly[key] = value
    files = table.get("holidays", [])
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ConfigError(f"{path}: key 'billing.holidays' must be a path or a list of paths "
                          f"of CSA holidays files, got {files!r}")
    years: List[HolidayYear] = []
    for f in files:
        try:
            hy = read_holidays(f)
        except ConfigError as exc:
            raise ConfigError(f"{path}: key 'billing.holidays': {exc.message}") from exc
        for other in years:
            if other.year == hy.year:
                raise ConfigError(f"{path}: key 'billing.holidays': {f} and {other.path} "
                                  f"both describe {hy.year}; keep one file per year")
        years.append(hy)
    mult_raw = table.get("multipliers", {})
    if not isinstance(mult_raw, dict):
        raise ConfigError(f"{path}: key 'billing.multipliers' must be a table of tag tables "
                          f"(e.g. [billing.multipliers.queue] debug = 0.5), got {mult_raw!r}")
    multipliers: Dict[str, Dict[str, Decimal]] = {}
    for tag, vals in mult_raw.items():
        if not isinstance(vals, dict):
            raise ConfigError(f"{path}: key 'billing.multipliers.{tag}' must be a table of "
                              f"tag value = multiplier, got {vals!r}")
        multipliers[tag] = {str(v): _decimal(m, name=f"billing.multipliers.{tag}.{v}",
                                             path=path) for v, m in vals.items()}
    return BillingConfig(prime=prime, nonprime=nonprime,
                         schedule=Schedule(windows, years, tz), multipliers=multipliers,
                         decimals=decimals, unit=unit, timezone=tzname,
                         holiday_files=tuple(files), weekly=weekly)
