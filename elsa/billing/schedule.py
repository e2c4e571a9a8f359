"""Prime and non-prime time: a weekly schedule plus CSA ``csa.holidays`` files.

A CSA site brings its holidays file unchanged (LinuxCSA reads the same lines)::

    * comment lines start with '*'
    HOLIDAYFILE_VERSION1
    YEAR 2026
    weekday   0730  1730      prime starts 07:30, non-prime starts 17:30
    saturday  none  all       'none': no prime time that day; 'all': all day prime
    sunday    none  all
    1    Jan 1    New Year's Day     day-of-year, month, day, name

Differences from CSA, on purpose: ``all`` means the whole day (CSA stops at
23:59:59), and a day-of-year that disagrees with its month and day is an
error instead of being silently ignored. Every day of a year that has a file
follows that file; other years follow the ``[billing.schedule]`` table.
Local clock times are those of the billing time zone (DST-aware).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from elsa.errors import ConfigError

#: A day's prime window in seconds after local midnight: [start, end); (0, 0) = none.
Window = Tuple[int, int]
DAY_KINDS = ("weekday", "saturday", "sunday")
ALL_DAY: Window = (0, 86400)
NO_PRIME: Window = (0, 0)
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_HHMM = re.compile(r"^(\d\d)(\d\d)$")


def parse_window(tokens: Sequence[str]) -> Window:
    """``0730 1730`` | ``all ...`` | ``none ...`` -> a prime window; ValueError says why."""
    expected = ("expected '<prime start> <non-prime start>' as HHMM HHMM (e.g. 0730 1730), "
                "or 'all' / 'none'")
    if not tokens or len(tokens) > 2:
        raise ValueError(expected)
    first = tokens[0].lower()
    if first in ("all", "none"):
        if len(tokens) == 2 and tokens[1].lower() not in ("all", "none") \
                and not _HHMM.match(tokens[1]):
            raise ValueError(expected)
        return ALL_DAY if first == "all" else NO_PRIME
    if len(tokens) != 2:
        raise ValueError(expected)
    secs = []
    for tok in tokens:
        if tok.lower() == "all" or tok.lower() == "none":
            # "0730 none": non-prime never starts, prime until midnight.
            secs.append(86400)
            continue
        m = _HHMM.match(tok)
        if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59 \
                or (int(m.group(1)) == 24 and int(m.group(2)) != 0):
            raise ValueError(f"{expected}; {tok!r} is not a time of day")
        secs.append(int(m.group(1)) * 3600 + int(m.group(2)) * 60)
    if secs[0] > secs[1]:
        raise ValueError(f"prime start {tokens[0]} is after non-prime start {tokens[1]}")
    return (secs[0], secs[1])


@dataclass(frozen=True)
class HolidayYear:
    """One CSA holidays file: the year, its weekly prime windows and its holidays."""

    path: str
    year: int
    windows: Mapping[str, Window]
    holidays: FrozenSet[dt.date]
    names: Mapping[dt.date, str] = field(default_factory=dict)


def parse_holidays(text: str, path: str, current_year: Optional[int] = None) -> HolidayYear:
    """Parse a ``csa.holidays`` file; any bad line raises ConfigError naming path:line."""
    version = False
    year: Optional[int] = None
    windows: Dict[str, Window] = {}
    pending: List[Tuple[int, int, int, int, str]] = []  # lineno, doy, month, day, name
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("*"):
            continue
        tokens = line.split()
        head = tokens[0]

        def bad(what: str, lineno: int = lineno, raw: str = raw) -> ConfigError:
            return ConfigError(f"{path}:{lineno}: {what}; got {raw.strip()!r}")

        if head == "HOLIDAYFILE_VERSION1":
            if len(tokens) != 1:
                raise bad("expected 'HOLIDAYFILE_VERSION1' alone on its line")
            version = True
        elif head == "YEAR":
            if len(tokens) != 2:
                raise bad("expected 'YEAR yyyy' (or 'YEAR *' for the current year)")
            if tokens[1] == "*":
                year = current_year or dt.date.today().year
            elif re.fullmatch(r"\d{4}", tokens[1]):
                year = int(tokens[1])
            else:
                raise bad("expected 'YEAR yyyy' (or 'YEAR *' for the current year)")
        elif head.lower() in DAY_KINDS:
            try:
                windows[head.lower()] = parse_window(tokens[1:])
            except ValueError as exc:
                raise bad(f"{head}: {exc}") from exc
        elif head.isdigit():
            if len(tokens) < 3 or tokens[1][:3].lower() not in _MONTHS \
                    or not tokens[2].isdigit():
                raise bad("expected a holiday line '<day-of-year> <Month> <day> [name]', "
                          "e.g. '359  Dec 25  Christmas'")
            pending.append((lineno, int(head), _MONTHS[tokens[1][:3].lower()], int(tokens[2]),
                            " ".join(tokens[3:])))
        else:
            raise ConfigError(
                f"{path}:{lineno}: unknown line; expected HOLIDAYFILE_VERSION1, 'YEAR yyyy', "
                f"'weekday|saturday|sunday <start> <end>' or a holiday line "
                f"'<day-of-year> <Month> <day> [name]'; got {raw.strip()!r}")
    if not version:
        raise ConfigError(f"{path}: not a CSA holidays file: the line HOLIDAYFILE_VERSION1 "
                          "is missing")
    if year is None:
        raise ConfigError(f"{path}: the 'YEAR yyyy' line is missing")
    missing = [k for k in DAY_KINDS if k not in windows]
    if missing:
        raise ConfigError(f"{path}: prime-time line(s) missing for {', '.join(missing)}; "
                          "expected e.g. 'weekday 0730 1730', 'saturday none all'")
    holidays = set()
    names = {}
    for lineno, doy, month, day, name in pending:
        try:
            date = dt.date(year, month, day)
        except ValueError:
            raise ConfigError(f"{path}:{lineno}: no such date {month}/{day} in {year}") from None
        if date.timetuple().tm_yday != doy:
            raise ConfigError(
                f"{path}:{lineno}: day-of-year {doy} is not {date:%b} {day} in {year} "
                f"(that is day {date.timetuple().tm_yday}); correct one of them")
        holidays.add(date)
        names[date] = name
    return HolidayYear(path, year, windows, frozenset(holidays), names)


def read_holidays(path: str) -> HolidayYear:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read holidays file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: holidays file is not UTF-8 text: {exc}") from exc
    return parse_holidays(text, path)


class Schedule:
    """Which seconds are prime time, in the billing time zone."""

    def __init__(self, windows: Mapping[str, Window], years: Sequence[HolidayYear] = (),
                 tz: Optional[dt.tzinfo] = None) -> None:
        self.windows = dict(windows)
        self.years = {y.year: y for y in years}
        self.tz = tz

    @property
    def all_prime(self) -> bool:
        return not self.years and all(w == ALL_DAY for w in self.windows.values())

    def _day_window(self, day: dt.date) -> Window:
        hy = self.years.get(day.year)
        windows = hy.windows if hy else self.windows
        if hy is not None and day in hy.holidays:
            return NO_PRIME
        wd = day.weekday()
        return windows["saturday" if wd == 5 else "sunday" if wd == 6 else "weekday"]

    def _local(self, day: dt.date, secs: int) -> float:
        base = dt.datetime(day.year, day.month, day.day, tzinfo=self.tz)
        if self.tz is None:
            base = base.astimezone()  # local zone, DST of that day
        return (base + dt.timedelta(seconds=secs)).timestamp()

    def _date_of(self, t: float) -> dt.date:
        if self.tz is None:
            return dt.datetime.fromtimestamp(t).date()
        return dt.datetime.fromtimestamp(t, self.tz).date()

    def periods(self, lo: float, hi: float) -> List[Tuple[float, float, bool]]:
        """[lo, hi) cut into maximal (start, end, prime) pieces."""
        if hi <= lo:
            return []
        if self.all_prime:
            return [(lo, hi, True)]
        out: List[Tuple[float, float, bool]] = []
        day = self._date_of(lo)
        while True:
            d0 = self._local(day, 0)
            if d0 >= hi:
                break
            nxt = day + dt.timedelta(days=1)
            d1 = self._local(nxt, 0)
            ps, pe = self._day_window(day)
            pieces = [(d0, self._local(day, ps), False), (self._local(day, ps),
                      self._local(day, pe), True), (self._local(day, pe), d1, False)]
            for a, b, prime in pieces:
                a, b = max(a, lo), min(b, hi)
                if b <= a:
                    continue
                if out and out[-1][2] == prime and out[-1][1] == a:
                    out[-1] = (out[-1][0], b, prime)
                else:
                    out.append((a, b, prime))
            day = nxt
        return out

    def prime_seconds(self, lo: float, hi: float) -> float:
        return sum(b - a for a, b, prime in self.periods(lo, hi) if prime)

    def is_prime(self, t: float) -> bool:
        p = self.periods(t, t + 1e-3)
        return bool(p and p[0][2])
