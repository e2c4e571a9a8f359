"""Defects of the daemon's edges: stop() runs whatever ends the run, and a
backend's reader callbacks are isolated like a source's."""

from __future__ import annotations

import os

from elsa import config, elsad
from elsa.core import daemon as daemon_mod
from elsa.core.guard import MAX_CONSECUTIVE_ERRORS, Guard


def test_an_unexpected_exception_still_stops_the_daemon(monkeypatch, tmp_path, capsys):
    stopped = []

    class Exploding:
        def __init__(self, cfg, host):
            pass

        def install_signal_handlers(self):
            pass

        def start(self):
            pass

        def run(self):
            raise RuntimeError("boom in the loop")

        def stop(self, reason):
            stopped.append(reason)

    monkeypatch.setattr(daemon_mod, "Daemon", Exploding)
    monkeypatch.setattr(daemon_mod, "check_privileges", lambda: None)
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(f'backend = "cnproc"\nsocket = "{tmp_path}/s.sock"\n'
                   f'state_dir = "{tmp_path}/st"\n')
    assert elsad.main(["--config", str(cfg)]) == elsad.EXIT_FAILURE
    assert stopped == ["error: internal"]
    assert "boom in the loop" in capsys.readouterr().err


def test_backend_reader_callbacks_are_guarded(tmp_path):
    import sys

    from elsa import logsetup
    from elsa.plugins import PluginHost, build_plugin_manager

    logsetup.configure("error", stream=sys.stderr)  # not a closed capture of another test

    cfg = config.parse({"socket": f"{tmp_path}/s.sock", "state_dir": f"{tmp_path}/st"}, "t")
    d = daemon_mod.Daemon(cfg, PluginHost(build_plugin_manager()))
    calls = []

    def broken():
        calls.append(1)
        raise OSError("backend reader broke")

    r, w = os.pipe()
    try:
        d._guarded_reader("somebackend")(r, broken)
        guard = d.loop._readers[r]
        assert isinstance(guard, Guard)
        for _ in range(MAX_CONSECUTIVE_ERRORS):
            guard()  # logged and counted, never raised into the loop
        assert len(calls) == MAX_CONSECUTIVE_ERRORS and guard.errors == MAX_CONSECUTIVE_ERRORS
        assert r not in d.loop._readers  # a descriptor that keeps failing is given up
    finally:
        os.close(r)
        os.close(w)


def test_process_gone_only_for_process_reads_and_chained(tmp_path):
    import pytest

    from elsa.errors import CgroupGone, KernelInterfaceError, ProcessGone
    from elsa.kernel.cgroupstats import read_stats
    from elsa.kernel.procfs import ProcFS

    fs = ProcFS(str(tmp_path))  # an empty /proc: no boot_id file, no processes
    with pytest.raises(KernelInterfaceError) as boot:
        fs.boot_id()
    assert not isinstance(boot.value, ProcessGone)
    assert isinstance(boot.value.__cause__, FileNotFoundError)  # chained: the cause survives
    with pytest.raises(ProcessGone) as gone:
        fs.info(4242)
    assert isinstance(gone.value.__cause__, FileNotFoundError)
    with pytest.raises(CgroupGone):
        read_stats(str(tmp_path / "no-such-cgroup"))
