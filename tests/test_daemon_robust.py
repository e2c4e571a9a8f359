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
        def __init__(self, cfg, host, **options):
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


def test_a_slow_kill_is_answered_later_and_does_not_stall_others(elsad, spawned):
    """The event thread does not wait for a kill to finish: another client is
    answered at once meanwhile, and the kill's reply comes when the backend says
    the job's processes are gone."""
    import subprocess
    import sys
    import time

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root (elsad)")
    from elsa.testing import wait_for

    d = elsad(backend="slowkill",
              extra='job_end = "explicit"\nplugins = ["tests.slowkill_backend"]\n')
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)
    spawned.append(p)
    with d.client() as c:
        jid = c.create(name="slow", pids=[p.pid])["jid"]
    killer = d.client()
    t0 = time.monotonic()
    import threading

    result = {}

    def kill():
        result["reply"] = killer.kill(jid, signal=9)
        result["at"] = time.monotonic() - t0

    th = threading.Thread(target=kill)
    th.start()
    wait_for(lambda: p.poll() is not None, 5, what="the member killed")
    with d.client() as other:
        t1 = time.monotonic()
        other.status()
        assert time.monotonic() - t1 < 1.0  # not behind the 1.5 s kill
    th.join(10)
    killer.close()
    assert result["reply"]["signalled"] == 1
    assert result["at"] >= 1.4  # answered when the backend settled, not before


def test_a_second_elsad_on_the_same_state_dir_is_refused_before_it_touches_it(
        elsad, tmp_path):
    """Another config with the same state_dir (and its own socket): the second elsad
    would recover the first one's jobs, end them, rewrite the backend's journals
    and switch kernel accounting under it. It is refused first, naming the one that
    holds the state dir."""
    import subprocess
    import sys

    first = elsad()
    jid = first.call("create", name="first")["jid"]
    other = tmp_path / "second"
    other.mkdir()
    cfg = other / "elsa.toml"
    cfg.write_text(f'backend = "cnproc"\nsocket = "{other}/elsad.sock"\n'
                   f'state_dir = "{first.state_dir}"\n')
    r = subprocess.run([sys.executable, "-m", "elsa.elsad", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert (f"elsad: another elsad (pid {first.proc.pid}) uses state_dir "
            f"{first.state_dir}") in r.stderr, r.stderr
    assert not os.path.exists(other / "elsad.sock")
    assert first.call("show", jid=jid)["state"] == "running"  # the first one carries on
