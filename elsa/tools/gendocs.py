"""Regenerate (or check) every file generated from the code, in one go.

- ``packaging/elsa.toml``: the commented default config (``elsad --print-default-config``
  with only this project's own plugins, so a third-party plugin installed on the
  developer's machine never leaks into the shipped file);
- ``packaging/man/*.{1,8}``: man pages from the argument parsers;
- ``packaging/completion/*``: bash completion from the same parsers.

Usage: ``python3 -m elsa.tools.gendocs`` (write) or ``--check`` (exit 1 and show a
diff when a committed file differs from what the code generates). A program
whose module does not exist yet is skipped with a notice, so the tool works
while the CLIs are being written.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from elsa import __version__
from elsa.tools import completion, manpage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]

_SEE_ALSO = {
    "elsad": ".BR elsa\\-jobmng (1),\n.BR elsa (1),\n.BR systemd.service (5),\n"
             ".BR tmpfiles.d (5)",
    "elsa-jobmng": ".BR elsad (8),\n.BR elsa (1)",
    "elsa": ".BR elsad (8),\n.BR elsa\\-jobmng (1),\n.BR sa (8)",
}

_ELSAD_FILES = """.TP
.I /etc/elsa/elsa.toml
Configuration (TOML). Every key is optional; the installed file lists each key
with its default, commented out.
.TP
.I /run/elsa/elsad.sock
Control socket (the \\fBsocket\\fR key), created by elsad; clients are
authorized by their peer credentials.
.TP
.I /var/lib/elsa/
Persistent store (the \\fBstate_dir\\fR key): jobs and accounting survive a restart.
.TP
.I /lib/systemd/system/elsad.service
The systemd unit (Type=notify, Delegate=yes); \\fBsystemctl reload elsad\\fR
sends SIGHUP, which re\\-reads the configuration."""

_ELSAD_ENV = """.TP
.B ELSA_CONFIG
Config file to read when \\fB\\-\\-config\\fR is not given.
.TP
.B ELSA_DISABLE_PLUGIN_AUTOLOAD
When set (not 0), plugins registered through the \\fBelsa\\fR entry\\-point group
are not loaded.
.TP
.B NOTIFY_SOCKET
Set by systemd; elsad sends READY=1 there once it tracks processes."""


@dataclass(frozen=True)
class Program:
    name: str
    module: str
    section: int
    summary: str
    extra: Tuple[Tuple[str, str], ...] = ()


PROGRAMS: Tuple[Program, ...] = (
    Program("elsad", "elsa.elsad", 8, "ELSA job daemon (per-job process accounting)",
            (("FILES", _ELSAD_FILES), ("ENVIRONMENT", _ELSAD_ENV))),
    Program("elsa-jobmng", "elsa.jobmng", 1, "create, inspect and control ELSA jobs"),
    Program("elsa", "elsa.report.cli", 1, "ELSA accounting reports"),
)


def _parser_of(prog: Program) -> Optional[argparse.ArgumentParser]:
    try:
        module = importlib.import_module(prog.module)
    except ModuleNotFoundError as exc:
        if exc.name and prog.module.startswith(exc.name):
            return None  # not written yet
        raise
    build = getattr(module, "build_parser", None)
    return build() if build is not None else None


def _project_plugin_modules(root: Path) -> List[str]:
    """The modules of this project's own ``elsa`` entry points (pyproject.toml)."""
    pyproject = root / "pyproject.toml"
    if pyproject.exists():
        with open(pyproject, "rb") as fh:
            data = tomllib.load(fh)
        eps = data.get("project", {}).get("entry-points", {}).get("elsa", {})
        return [value.split(":")[0] for value in eps.values()]
    from elsa.plugins import _entry_points  # installed: our own modules only

    return [ep.value.split(":")[0] for ep in _entry_points()
            if ep.value.startswith(("elsa.", "elsa_plugins."))]


def default_config(root: Path = ROOT) -> str:
    """``elsad --print-default-config`` restricted to this project's plugins."""
    from elsa.elsad import _default_config
    from elsa.plugins import PluginHost, build_plugin_manager

    pm = build_plugin_manager(autoload=False, modules=_project_plugin_modules(root))
    return _default_config(PluginHost(pm))


def generate(root: Path = ROOT) -> Tuple[Dict[str, str], List[str]]:
    """``{relative path: content}`` of every generated file, and notices."""
    files: Dict[str, str] = {"packaging/elsa.toml": default_config(root)}
    notes: List[str] = []
    for prog in PROGRAMS:
        parser = _parser_of(prog)
        if parser is None:
            notes.append(f"{prog.name}: {prog.module}.build_parser() not found; skipped")
            continue
        extra = list(prog.extra) + [("SEE ALSO", _SEE_ALSO[prog.name])]
        files[f"packaging/man/{prog.name}.{prog.section}"] = manpage.render(
            parser, name=prog.name, section=prog.section, version=__version__,
            summary=prog.summary, extra=extra)
        files[f"packaging/completion/{prog.name}"] = completion.render(parser, name=prog.name)
    return files, notes


def _stale(root: Path, files: Dict[str, str]) -> List[str]:
    """Committed generated files that the code no longer produces."""
    out = []
    for sub in ("packaging/man", "packaging/completion"):
        d = root / sub
        if d.is_dir():
            out += [f"{sub}/{p.name}" for p in sorted(d.iterdir())
                    if f"{sub}/{p.name}" not in files]
    return out


def check(root: Path = ROOT) -> List[str]:
    """Differences between the committed files and the generated ones (empty: none)."""
    files, _ = generate(root)
    problems = []
    for rel, text in files.items():
        path = root / rel
        old = path.read_text() if path.exists() else ""
        if old != text:
            diff = difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                        f"a/{rel}", f"b/{rel}", n=1)
            problems.append("".join(diff) or f"{rel}: missing")
    for rel in _stale(root, files):
        problems.append(f"{rel}: no longer generated (remove it)")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m elsa.tools.gendocs",
        description="Regenerate the default config, man pages and bash completion "
                    "from the code (packaging/elsa.toml, packaging/man, packaging/completion).")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 and print a diff if a file is out of date")
    ap.add_argument("--root", type=Path, default=ROOT, metavar="DIR",
                    help="source tree to write into (default: %(default)s)")
    args = ap.parse_args(argv)
    # Generated text must not depend on the terminal (argparse reads $COLUMNS).
    os.environ["COLUMNS"] = "100"
    if args.check:
        problems = check(args.root)
        for p in problems:
            print(p)
        if problems:
            print("generated files are out of date; run: python3 -m elsa.tools.gendocs",
                  file=sys.stderr)
            return 1
        print("generated files are up to date")
        return 0
    files, notes = generate(args.root)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for rel, text in files.items():
        path = args.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {rel}")
    for rel in _stale(args.root, files):
        (args.root / rel).unlink()
        print(f"removed {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
