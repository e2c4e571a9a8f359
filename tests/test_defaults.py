"""Embedded defaults account: backend 'auto', taskstats and cgroupstat on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from elsa import config
from elsa.core.defaults import choose_backend, enabled_sources
from elsa.errors import BackendError


def _specs():
    from elsa.plugins import PluginHost, build_plugin_manager

    return PluginHost(build_plugin_manager()).sources()


def test_taskstats_and_cgroupstat_on_by_default_bsdacct_opt_in():
    specs = _specs()
    cfg = config.parse({}, "<defaults>")
    assert enabled_sources(cfg.sources, cfg.disabled_sources, specs) == ["cgroupstat",
                                                                         "taskstats"]
    cfg = config.parse({"sources": {"taskstats": {"enabled": False}, "bsdacct": {}}}, "t")
    assert enabled_sources(cfg.sources, cfg.disabled_sources, specs) == ["bsdacct",
                                                                         "cgroupstat"]
    # Priority is the spec's: cgroup counters over taskstats over acct.
    assert specs["cgroupstat"].priority < specs["taskstats"].priority < specs["bsdacct"].priority


def test_auto_prefers_cgroup2_and_says_why_it_fell_back():
    started = []

    def start(name):
        if name == "cgroup2":
            raise BackendError("no cgroup2 filesystem in /proc/self/mountinfo")
        started.append(name)
        return SimpleNamespace(name=name)

    backend, why = choose_backend("auto", ["cgroup2", "cnproc"], start)
    assert backend.name == "cnproc" and "no cgroup2 filesystem" in why
    backend, why = choose_backend("auto", ["cgroup2", "cnproc"],
                                  lambda n: SimpleNamespace(name=n, mount="/sys/fs/cgroup"))
    assert backend.name == "cgroup2" and why == "auto: writable cgroup v2 hierarchy at " \
                                                "/sys/fs/cgroup"
    assert choose_backend("cnproc", ["cgroup2", "cnproc"], start)[1] == "configured"


@pytest.mark.root
def test_status_names_the_backend_reason_and_default_sources(tmp_path):
    from elsa.testing import DaemonProc

    d = DaemonProc(tmp_path, backend="auto")
    d.start()
    try:
        st = d.call("status")
        assert st["backend"] in ("cgroup2", "cnproc")
        assert st["backend_reason"].startswith("auto: ")
        assert {"taskstats", "cgroupstat"} <= set(st["sources"])
        assert any('"backend chosen"' in line for line in d.log().splitlines())
    finally:
        d.stop()
