"""Plugin system: documented hook specs, isolation, autoload switch, blocklist."""

import inspect
import re
import textwrap

import pytest

from elsa import hookimpl, hookspecs
from elsa.errors import PluginError
from elsa.plugins import PluginHost, build_plugin_manager
from tests.conftest import python_out

SPECS = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
         if name.startswith("elsa_")]


def test_there_are_hookspecs():
    assert {f.__name__ for f in SPECS} >= {"elsa_backends", "elsa_sources", "elsa_job_created",
                                           "elsa_job_ended", "elsa_process_joined"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda f: f.__name__)
def test_every_hookspec_documents_every_argument(spec):
    doc = inspect.getdoc(spec)
    assert doc, f"{spec.__name__} has no docstring"
    assert ":return:" in doc, f"{spec.__name__} does not document its result"
    for arg in inspect.signature(spec).parameters:
        assert re.search(rf":param {arg}:", doc), f"{spec.__name__} does not document {arg!r}"
    assert "called" in doc.lower() or "declare" in doc.lower(), \
        f"{spec.__name__} does not say when it is called"


def test_builtin_backend_registers_through_entry_point():
    host = PluginHost(build_plugin_manager(autoload=True))
    assert "cnproc" in host.backends()
    assert "cnproc" in host.plugin_names()


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("ELSA_DISABLE_PLUGIN_AUTOLOAD", "1")
    host = PluginHost(build_plugin_manager())
    assert host.backends() == {}


def test_blocklist():
    host = PluginHost(build_plugin_manager(autoload=True, blocked=["cnproc"]))
    assert "cnproc" not in host.backends()


class Raising:
    @hookimpl
    def elsa_job_created(self, job):
        raise RuntimeError("boom")


class Recording:
    def __init__(self):
        self.seen = []

    @hookimpl
    def elsa_job_created(self, job):
        self.seen.append(job)


def test_raising_plugin_is_isolated_and_named(capsys):
    rec = Recording()
    pm = build_plugin_manager(autoload=False, extra=[Raising(), rec])
    host = PluginHost(pm)
    host.job_created("job-1")  # must not raise
    assert rec.seen == ["job-1"]
    name = pm.get_name(next(p for p in pm.get_plugins() if isinstance(p, Raising)))
    assert host.failures == {name: 1}


def test_typo_in_hook_name_is_refused():
    class Typo:
        @hookimpl
        def elsa_job_craeted(self, job):
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        build_plugin_manager(autoload=False, extra=[Typo()])


def test_plugin_module_by_path_and_failing_import(tmp_path, monkeypatch):
    (tmp_path / "good_plugin.py").write_text(textwrap.dedent("""
        from elsa import hookimpl
        from elsa.backends.cnproc import CnprocBackend
        from elsa.core.backend import BackendSpec

        @hookimpl
        def elsa_backends():
            return [BackendSpec(name="mine", factory=CnprocBackend)]
    """))
    (tmp_path / "bad_plugin.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost(build_plugin_manager(autoload=False,
                                           modules=["bad_plugin", "good_plugin"]))
    assert set(host.backends()) == {"mine"}


def test_duplicate_backend_name_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "dup_plugin.py").write_text(textwrap.dedent("""
        from elsa import hookimpl
        from elsa.backends.cnproc import CnprocBackend
        from elsa.core.backend import BackendSpec

        @hookimpl
        def elsa_backends():
            return [BackendSpec(name="cnproc", factory=CnprocBackend)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost(build_plugin_manager(autoload=True, modules=["dup_plugin"]))
    with pytest.raises(PluginError, match="two plugins declare the backend 'cnproc'"):
        host.backends()


def test_no_plugin_loading_at_import_time():
    code = ("import sys, elsa, elsa.plugins, elsa.core.daemon, elsa.elsad; "
            "print('elsa.backends.cnproc' in sys.modules)")
    assert python_out(code).strip() == "False"
