"""How the reports write values: durations, sizes, times, tags, escapes, tables,
and the ``--json`` / ``--csv`` / table choice (one format for every report)."""

from __future__ import annotations

import argparse
import csv
import json
import time
from typing import Any, Dict, List, Optional


def fmt_us(us: Optional[int]) -> str:
    if us is None:
        return "-"
    s = us / 1e6
    if s < 60:
        return f"{s:.2f}s"
    if s < 3600:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.2f}h"


def fmt_n(n: Optional[int]) -> str:
    return "-" if n is None else str(n)


def fmt_kb(kb: Optional[int]) -> str:
    if kb is None:
        return "-"
    if kb < 1024:
        return f"{kb}K"
    if kb < 1024 * 1024:
        return f"{kb / 1024:.1f}M"
    return f"{kb / 1024 / 1024:.2f}G"


def fmt_bytes(b: Optional[int]) -> str:
    return "-" if b is None else fmt_kb(b // 1024) if b >= 1024 else f"{b}B"


def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def fmt_tags(tags: Optional[Dict[str, Any]]) -> str:
    """A job's tags (the batch system's job id, account, queue among them) as
    ``key=value`` words, sorted, printable ('' when it has none)."""
    return " ".join(f"{printable(str(k))}={printable(str(v))}"
                    for k, v in sorted((tags or {}).items()))


def printable(text: str) -> str:
    """*text* with its control and other non-printable characters written as
    escapes (\\n, \\x1b, \\u202e): a command name or path is any user's choice,
    and raw ones could forge table rows or drive the terminal of whoever reads
    the report."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _ESCAPES.get(ch) or _escape(ord(ch))
                   for ch in text)


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else (
        f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def table(rows: List[List[str]], header: List[str], out) -> None:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip() + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def emit(args: argparse.Namespace, data: Any, csv_rows: Optional[List[Dict[str, Any]]],
          table, out) -> None:
    if args.json:
        json.dump(data, out, indent=1 if out.isatty() else None, sort_keys=False)
        out.write("\n")
    elif args.csv:
        rows = csv_rows if csv_rows is not None else []
        if rows:
            cols = list(rows[0].keys())
            w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                            for k, v in r.items()})
    else:
        table()
