"""Read an ``argparse`` parser into plain data for the man-page and completion generators.

argparse keeps what we need in attributes that are not public API
(``_actions``, ``_SubParsersAction._choices_actions``) but have been stable
since Python 3.2; everything that touches them is in this one module, so a
change in a future Python breaks one place and the generated-docs tests.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

# An option whose metavar or destination says "path" completes file names.
_PATH_WORDS = ("PATH", "FILE", "DIR", "SOCKET", "CONFIG", "OUTPUT")


@dataclass(frozen=True)
class Argument:
    """One option (``flags`` non-empty) or positional argument."""

    flags: Tuple[str, ...]          # ("-c", "--config"); () for a positional
    dest: str
    metavar: str                    # formatted argument words, e.g. "PATH" or "[ARGS ...]"
    help: str
    takes_value: bool
    choices: Tuple[str, ...] = ()
    is_path: bool = False
    required: bool = False
    repeatable: bool = False

    @property
    def positional(self) -> bool:
        return not self.flags


@dataclass
class Command:
    """A parser: the program itself or one (possibly nested) subcommand."""

    path: Tuple[str, ...]           # ("elsa-jobmng", "create")
    description: str
    epilog: str
    help: str                       # the one-line help its parent shows for it
    raw_text: bool                  # description/epilog are preformatted
    options: List[Argument] = field(default_factory=list)
    positionals: List[Argument] = field(default_factory=list)
    subcommands: List[Command] = field(default_factory=list)
    aliases: Tuple[str, ...] = ()
    subcommand_required: bool = False
    subcommand_metavar: str = "COMMAND"

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def walk(self) -> List[Command]:
        """This command and every subcommand below it, depth first."""
        out = [self]
        for sub in self.subcommands:
            out.extend(sub.walk())
        return out


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    # A fixed width: the default follows $COLUMNS, and generated files must not.
    return parser.formatter_class(prog=parser.prog, width=100)


def _text(value: Optional[str]) -> str:
    return "" if value is None or value == argparse.SUPPRESS else str(value)


def _is_path(action: argparse.Action, metavar: str) -> bool:
    if action.choices:
        return False
    if isinstance(action.type, argparse.FileType):
        return True
    words = f"{metavar} {action.dest}".upper()
    return any(w in words for w in _PATH_WORDS)


def describe(parser: argparse.ArgumentParser, name: Optional[str] = None,
             path: Sequence[str] = (), help: str = "",
             aliases: Sequence[str] = ()) -> Command:
    """The :class:`Command` tree of *parser*; *name* overrides ``parser.prog``.

    Subcommand names come from the chain of names, not from the subparsers'
    ``prog`` (argparse derives those from ``sys.argv[0]`` when a parser does not
    set ``prog``, which would make generated files depend on how they were run).
    """
    path = tuple(path) or (name or parser.prog,)
    raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    cmd = Command(path=path, description=_text(parser.description),
                  epilog=_text(parser.epilog), help=help, raw_text=raw,
                  aliases=tuple(aliases))
    fmt = _formatter(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            cmd.subcommand_required = bool(action.required)
            if action.metavar:
                cmd.subcommand_metavar = str(action.metavar)
            helps = {a.dest: _text(a.help) for a in action._choices_actions}
            seen: dict = {}
            for sub_name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a command already listed
                    seen[id(sub)][1].append(sub_name)
                    continue
                seen[id(sub)] = (sub_name, [])
            for sub_name, sub_aliases in seen.values():
                sub = action.choices[sub_name]
                cmd.subcommands.append(describe(sub, path=path + (sub_name,),
                                                help=helps.get(sub_name, ""),
                                                aliases=sub_aliases))
            continue
        if action.help == argparse.SUPPRESS:
            continue
        takes_value = action.nargs != 0
        default_metavar = (action.dest.upper() if action.option_strings else action.dest)
        metavar = fmt._format_args(action, default_metavar) if takes_value else ""
        help_text = fmt._expand_help(action) if action.help else ""
        arg = Argument(
            flags=tuple(action.option_strings), dest=action.dest, metavar=metavar,
            help=" ".join(help_text.split()), takes_value=takes_value,
            choices=tuple(str(c) for c in action.choices) if action.choices else (),
            is_path=takes_value and _is_path(action, metavar),
            required=bool(action.required),
            repeatable=isinstance(action, (argparse._AppendAction, argparse._CountAction,
                                           argparse._AppendConstAction)))
        (cmd.positionals if arg.positional else cmd.options).append(arg)
    return cmd
