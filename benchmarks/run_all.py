#!/usr/bin/env python3
"""Run every ELSA benchmark and print one table (issue 6, part 1).

Imports each ``benchmarks/bench_*.py`` that exists, calls its ``main()`` and
collects the rows it returns: metric, ELSA figure, peer figure (measured in the
same run, by a real program from Debian: forkstat, GNU sa, stress-ng, or the
same workload without elsad), ratio, target, pass/fail and how to reproduce
the row alone. A benchmark that cannot run (missing tool, not root, crash) is
reported as a failed row with its reason; the others still run.

    sudo python3 benchmarks/run_all.py                 # everything, one table
    sudo python3 benchmarks/run_all.py --only memory   # one benchmark (repeatable)
    sudo python3 benchmarks/run_all.py --json          # rows as JSON on stdout
    sudo python3 benchmarks/run_all.py --markdown      # the table as Markdown (README)

The row contract: each ``benchmarks/bench_<name>.py`` runs standalone and has
``main() -> list[dict]`` (callable without arguments: its default run) whose
rows carry ``metric``, ``elsa``, ``peer`` (None without a peer), ``ratio``
(None without a peer), ``target``, ``passed`` (bool), ``reproduce`` (the
command for this row alone) and ``unit``; optional: ``peer_name`` (shown
before the peer figure) and ``detail`` (kept in --json output). A row that
lacks a key gets a note; one that lacks ``passed`` counts as failed.

Exit status: 0 when every row passed, 1 otherwise. The whole run is meant to
take under BUDGET_S (20 minutes) on the 2-core benchmark machine; each
benchmark has a time limit (TIMEOUTS, else DEFAULT_TIMEOUT_S; ``--timeout``
sets one for all), its time is shown, and the total is checked against the
budget.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
import textwrap
import time
import traceback
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

#: The whole default run on a quiet 2-core machine, with margin: each
#: benchmark's default size is chosen to take well under its own limit, and
#: the limits catch one that hangs or runs on a busy machine.
BUDGET_S = 1200.0
DEFAULT_TIMEOUT_S = 240.0
#: Limits of benchmarks whose default run needs more than DEFAULT_TIMEOUT_S
#: (the two overhead benchmarks run paired rounds; the 10M-record rows
#: generate their cached input file on a first run).
TIMEOUTS: Dict[str, float] = {"sustained": 840.0, "pacct_summary": 300.0, "bill": 300.0,
                              "central": 300.0}
FIELDS = ("metric", "elsa", "peer", "ratio", "target", "passed", "reproduce", "unit")


def discover() -> List[str]:
    """Names (without ``bench_``) of the benchmark modules present, sorted."""
    return sorted(f[len("bench_"):-len(".py")] for f in os.listdir(HERE)
                  if f.startswith("bench_") and f.endswith(".py"))


def _load(name: str) -> ModuleType:
    path = os.path.join(HERE, f"bench_{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call_main(module: ModuleType) -> Any:
    """Call ``main()`` with no arguments: every benchmark's defaults.

    (Some take ``argv``, some take keyword parameters such as ``records``; all
    default to the documented run.) A main() that parses ``sys.argv`` must not
    see run_all's own options, so argv is the module alone meanwhile.
    """
    saved = sys.argv
    sys.argv = [module.__file__ or module.__name__]
    try:
        return module.main()
    finally:
        sys.argv = saved


class BenchmarkTimeout(BaseException):
    """Raised in a benchmark that overran its time; a BaseException so that the
    benchmark's own ``except Exception`` does not swallow it, while its
    ``finally`` blocks still stop the daemons it started."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise BenchmarkTimeout()


def _failed_row(name: str, reason: str) -> Dict[str, Any]:
    return {"metric": f"{name}: did not run", "elsa": None, "peer": None, "ratio": None,
            "target": "-", "passed": False, "unit": "", "error": reason,
            "reproduce": f"sudo python3 benchmarks/bench_{name}.py"}


def run_one(name: str, timeout: float = 0) -> List[Dict[str, Any]]:
    """The rows of one benchmark, normalised; its own printing goes to stderr.

    *timeout* (seconds, 0: none) is enforced with SIGALRM in this thread.
    """
    t0 = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm) if timeout else None
    try:
        module = _load(name)
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        with contextlib.redirect_stdout(sys.stderr):
            rows = _call_main(module)
    except BenchmarkTimeout:
        rows = [_failed_row(name, f"timed out after {timeout:g} s")]
    except SystemExit as exc:
        rows = [_failed_row(name, str(exc.code) if exc.code not in (None, 0) else "exited")]
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        rows = [_failed_row(name, f"{type(exc).__name__}: {exc}")]
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
    if not isinstance(rows, list) or not rows:
        rows = [_failed_row(name, f"main() returned {rows!r}, expected a list of rows")]
    seconds = round(time.monotonic() - t0, 1)
    out = []
    for row in rows:
        row = dict(row)
        missing = [f for f in FIELDS if f not in row]
        if missing:
            # Shown as a note; only a row that does not say whether it passed fails.
            row.setdefault("error", f"row lacks {', '.join(missing)} (the row contract is "
                                    "in benchmarks/run_all.py's docstring)")
            for f in missing:
                row.setdefault(f, False if f == "passed" else None)
        row["benchmark"] = name
        row["seconds"] = seconds
        out.append(row)
    return out


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _cells(row: Dict[str, Any]) -> List[str]:
    unit = f" {row['unit']}" if row.get("unit") and row.get("elsa") is not None else ""
    peer = _num(row.get("peer"))
    if row.get("peer") is not None:
        peer += unit
        if row.get("peer_name"):
            peer = f"{row['peer_name']}: {peer}"
    status = "PASS" if row.get("passed") else "FAIL"
    if row.get("note"):
        status += f" [{row['note']}]"
    return [str(row.get("metric")), _num(row.get("elsa")) + unit, peer, _num(row.get("ratio")),
            _num(row.get("target")), status, str(row.get("reproduce"))]


HEADER = ["metric", "ELSA", "peer", "ratio", "target", "result", "reproduce"]


def _number_notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Give each row with an error a note number; the notes' text, in order."""
    notes = []
    for r in rows:
        if r.get("error"):
            notes.append(f"[{len(notes) + 1}] {r['benchmark']}: {r['error']}")
            r["note"] = len(notes)
    return notes


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    notes = _number_notes(rows)
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    # The metric column wraps at 60 characters so the table stays readable.
    widths[0] = min(widths[0], 60)
    lines = []
    for n, line in enumerate(table):
        chunks = textwrap.wrap(line[0], widths[0]) or [""]
        for k, chunk in enumerate(chunks):
            cells = [chunk] + (line[1:] if k == 0 else [""] * (len(line) - 1))
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def format_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    notes = _number_notes(rows)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = _cells(r)
        cells[-1] = f"`{cells[-1]}`"
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    if notes:
        lines += [""] + [f"{n}  " for n in notes]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    available = discover()
    ap = argparse.ArgumentParser(description="Run every ELSA benchmark; print one table.")
    ap.add_argument("--only", action="append", metavar="NAME", default=[],
                    help=f"run only this benchmark (repeatable); one of: {', '.join(available)}")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="stop a benchmark that runs longer than this and report it as "
                         f"failed (default {DEFAULT_TIMEOUT_S:g} s, more for the benchmarks "
                         "in TIMEOUTS; 0: no limit)")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(available))
        return 0
    names = available
    if args.only:
        wanted = [n[len("bench_"):] if n.startswith("bench_") else n for n in args.only]
        wanted = [w[:-3] if w.endswith(".py") else w for w in wanted]
        unknown = [w for w in wanted if w not in available]
        if unknown:
            ap.error(f"no benchmark named {', '.join(unknown)}; available: "
                     f"{', '.join(available)}")
        names = wanted
    t0 = time.monotonic()
    rows: List[Dict[str, Any]] = []
    for name in names:
        print(f"run_all: running {name} ...", file=sys.stderr, flush=True)
        got = run_one(name, TIMEOUTS.get(name, DEFAULT_TIMEOUT_S)
                      if args.timeout is None else args.timeout)
        print(f"run_all: {name} took {got[0]['seconds']} s", file=sys.stderr, flush=True)
        rows.extend(got)
    total = time.monotonic() - t0
    if args.json:
        print(json.dumps({"rows": rows, "seconds": round(total, 1), "budget_s": BUDGET_S},
                         indent=2, default=str))
    elif args.markdown:
        print(format_markdown(rows))
    else:
        print(format_table(rows))
        passed = sum(1 for r in rows if r.get("passed"))
        print(f"\n{passed} of {len(rows)} rows passed; {len(names)} benchmarks in {total:.0f} s"
              + ("" if total <= BUDGET_S or args.only
                 else f" (over the {BUDGET_S:.0f} s budget)"))
    return 0 if rows and all(r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
