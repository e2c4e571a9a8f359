"""Generated files (default config, man pages, bash completion) match the code.

The committed files in packaging/ are what ``python3 -m elsa.tools.gendocs``
writes; these tests fail when a parser or a config option changed without
regenerating them (run ``packaging/gen-docs``), and check that the generators
leave nothing out and produce output the real tools (groff, bash) accept.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from elsa import config
from elsa.tools import cliinfo, completion, gendocs, manpage

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = [p for p in gendocs.PROGRAMS if gendocs._parser_of(p) is not None]


def _committed(rel: str) -> str:
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing; run packaging/gen-docs and commit it"
    return path.read_text()


def test_generated_files_are_up_to_date():
    problems = gendocs.check(ROOT)
    assert not problems, ("generated files drifted from the code; run packaging/gen-docs "
                          "and commit the result:\n" + "\n".join(problems))


def test_gendocs_check_detects_drift(tmp_path):
    # The check must be able to fail: regenerate into a scratch tree, then edit it.
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    assert gendocs.main(["--root", str(tmp_path)]) == 0
    assert gendocs.check(tmp_path) == []
    page = tmp_path / "packaging/man/elsad.8"
    page.write_text(page.read_text().replace("\\-\\-config", "\\-\\-konfig"))
    (tmp_path / "packaging/completion/old-tool").write_text("# stale\n")
    problems = gendocs.check(tmp_path)
    assert any("elsad.8" in p and "konfig" in p for p in problems)
    assert any("old-tool" in p and "no longer generated" in p for p in problems)


@pytest.mark.parametrize("prog", PROGRAMS, ids=lambda p: p.name)
def test_man_page_lists_every_command_and_option(prog):
    text = _committed(f"packaging/man/{prog.name}.{prog.section}")
    root = cliinfo.describe(gendocs._parser_of(prog), name=prog.name)
    assert f'.TH "{prog.name.upper()}" "{prog.section}"' in text
    for cmd in root.walk():
        if cmd is not root:
            assert f'.SS "{manpage.escape(cmd.name)}' in text, f"{cmd.name} has no section"
        for arg in cmd.options:
            for flag in arg.flags:
                assert manpage.escape(flag) in text, f"{cmd.name} {flag} missing"
        for arg in cmd.positionals:
            assert manpage.escape(arg.metavar) in text, f"{cmd.name} {arg.metavar} missing"


@pytest.mark.parametrize("prog", PROGRAMS, ids=lambda p: p.name)
def test_man_page_renders_without_warnings(prog):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    path = ROOT / f"packaging/man/{prog.name}.{prog.section}"
    res = subprocess.run([groff, "-man", "-ww", "-z", str(path)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    res = subprocess.run([groff, "-man", "-Tutf8", str(path)], capture_output=True,
                         timeout=30)
    plain = re.sub(rb".\x08", b"", res.stdout).decode()
    assert "SYNOPSIS" in plain and prog.name in plain


def _complete(script: Path, words: List[str]) -> List[str]:
    """Run the generated completion function in a real bash for *words* (last = current)."""
    func = "_" + re.sub(r"[^A-Za-z0-9]", "_", words[0]) + "_complete"
    driver = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); '
              f'{func}; printf "%s\\n" "${{COMPREPLY[@]}}"')
    res = subprocess.run(["bash", "-c", driver, "bash", str(script), *words],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [w for w in res.stdout.splitlines() if w]


@pytest.mark.parametrize("prog", PROGRAMS, ids=lambda p: p.name)
def test_completion_offers_every_command_and_option(prog):
    script = ROOT / f"packaging/completion/{prog.name}"
    _committed(f"packaging/completion/{prog.name}")
    root = cliinfo.describe(gendocs._parser_of(prog), name=prog.name)
    for cmd in root.walk():
        words = [prog.name, *cmd.path[1:]]
        longs = {f for a in cmd.options for f in a.flags if f.startswith("--")}
        assert longs <= set(_complete(script, words + ["--"])), cmd.name
        names = {s.path[-1] for s in cmd.subcommands}
        if names:
            assert names <= set(_complete(script, words + [""])), cmd.name
        for arg in cmd.options:
            if arg.choices and arg.takes_value:
                got = _complete(script, words + [arg.flags[-1], ""])
                assert set(got) == set(arg.choices), f"{cmd.name} {arg.flags[-1]}"


def test_completion_skips_option_values_and_completes_paths(tmp_path):
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("-s", "--socket", metavar="PATH")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    create = sub.add_parser("create", aliases=["new"], help="make one")
    create.add_argument("--backend", choices=["cnproc", "cgroup2"])
    report = sub.add_parser("report")
    nested = report.add_subparsers(dest="what")
    user = nested.add_parser("user")
    user.add_argument("--since")
    script = tmp_path / "demo"
    script.write_text(completion.render(parser, name="demo"))
    target = tmp_path / "some-file.toml"
    target.write_text("")
    assert set(_complete(script, ["demo", ""])) == {"create", "new", "report"}
    # "create" here is the socket's value, not the subcommand.
    assert "--backend" not in _complete(script, ["demo", "-s", "create", "--"])
    assert _complete(script, ["demo", "new", "--backend", "cg"]) == ["cgroup2"]
    assert _complete(script, ["demo", "create", "--backend", "=", "cn"]) == ["cnproc"]
    assert _complete(script, ["demo", "report", "user", "--s"]) == ["--since"]
    assert _complete(script, ["demo", "--socket", str(tmp_path / "some-")]) == [str(target)]
    assert _complete(script, ["demo", f"--socket={tmp_path}/some-"]) == [
        f"--socket={target}"]


def test_manpage_escapes_roff():
    parser = argparse.ArgumentParser(
        prog="demo", description=".starts with a dot\n\n'quote, back\\slash and \u2026")
    parser.add_argument("--x-y", help="50%% done, -1 means none")
    text = manpage.render(parser, name="demo", section=1, version="1")
    assert "\n\\&.starts with a dot" in text
    assert "\n\\&'quote, back\\eslash and \\[u2026]" in text
    assert "\\fB\\-\\-x\\-y\\fR" in text and "50% done, \\-1 means none" in text
    assert not re.search(r"^\.(?!TH|SH|SS|TP|PP|SY|YS|nf|fi|\\\")", text, re.M)


def _uncommented(text: str) -> str:
    """The example config with every ``#key = value`` line and ``#[table]`` enabled."""
    return re.sub(r"^#(\w+ = |\[)", r"\1", text, flags=re.M)


def test_default_config_parses_to_the_defaults():
    text = _committed("packaging/elsa.toml")
    assert config.load(None) == config.parse({}, "<defaults>")
    enabled = _uncommented(text)
    assert enabled != text
    data = config.tomllib.loads(enabled)
    full = config.parse(data, "x")
    base = config.parse({k: v for k, v in data.items() if k in ("backends", "sources")}, "x")
    # Feature sections are validated only when present: compare their values.
    assert dataclasses.replace(full, sections={}) == base
    for name in config.SECTIONS:
        assert full.section(name) == base.section(name), name
    # Every key shown is a real key with its real default.
    for key, opt in config.CORE_OPTIONS.items():
        assert data[key] == opt.default, key
    for key, opt in config.LIMIT_OPTIONS.items():
        assert data["limits"][key] == opt.default, key
    pm_host = _project_host()
    for kind, specs in (("backends", pm_host.backends()), ("sources", pm_host.sources())):
        for name, table in data.get(kind, {}).items():
            options = specs[name].options
            assert config.validate_table(table, options, where=f"{kind}.{name}",
                                         path="x") == table
            assert set(table) == set(options)


def _project_host():
    from elsa.plugins import PluginHost, build_plugin_manager

    return PluginHost(build_plugin_manager(
        autoload=False, modules=gendocs._project_plugin_modules(ROOT)))


def test_elsad_print_default_config_is_the_committed_file():
    from elsa.plugins import _entry_points

    foreign = [ep.value for ep in _entry_points()
               if not ep.value.startswith(("elsa.", "elsa_plugins."))]
    if foreign:
        pytest.skip(f"third-party elsa plugins installed here change the output: {foreign}")
    env = dict(os.environ)
    env.pop("ELSA_DISABLE_PLUGIN_AUTOLOAD", None)
    res = subprocess.run([sys.executable, "-m", "elsa.elsad", "--print-default-config"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout == _committed("packaging/elsa.toml")
