"""SIGHUP reload: every configuration key is applied or reported as needing a
restart (admin_group used to be kept silently)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys

import pytest

from elsa.config import Config
from elsa.core import reloading
from tests.conftest import wait_for
from tests.test_control_auth import (  # noqa: F401  (fixtures)
    accounts,
    as_user,
    attempt,
    shared_dir,
    user_proc,
)


def test_every_config_key_is_classified_once():
    keys = {f.name for f in dataclasses.fields(Config)}
    sets = (reloading.APPLIED, reloading.NEEDS_RESTART, reloading.IGNORED)
    assert set().union(*sets) == keys
    assert sum(len(s) for s in sets) == len(keys)


def test_plan_keeps_running_values_of_restart_keys():
    running = dataclasses.replace(Config(), backend="cnproc")
    new = dataclasses.replace(running, backend="cgroup2", admin_group="wheel", nice=5)
    cfg, restart = reloading.plan(running, new)
    assert restart == ["backend"]
    assert (cfg.backend, cfg.admin_group, cfg.nice) == ("cnproc", "wheel", 5)


@pytest.mark.root
def test_sighup_applies_admin_group_and_reports_restart_keys(shared_dir, elsad,  # noqa: F811
                                                             spawned, accounts):  # noqa: F811
    a, b, admin_gid, admin_group = accounts
    d = elsad(workdir=shared_dir)
    pb = user_proc(spawned, b)
    job_b = as_user(b, attempt(d.socket, "create", pids=[pb.pid]))["ok"]["jid"]
    assert as_user(a, attempt(d.socket, "end", jid=job_b),
                   groups=(admin_gid,))["code"] == "permission-denied"
    text = d.config_path.read_text()
    d.config_path.write_text(text.replace('backend = "cnproc"', 'backend = "cgroup2"')
                             + f'admin_group = "{admin_group}"\n')
    d.proc.send_signal(signal.SIGHUP)
    with d.client() as c:
        wait_for(lambda: c.status()["config"]["restart_needed"] == ["backend"], 10,
                 what="the reload")
        assert c.status()["backend"] == "cnproc"
    assert as_user(a, attempt(d.socket, "end", jid=job_b), groups=(admin_gid,))["ok"]
    assert "config changes that need a restart" in d.log_path.read_text()
    # The admin's `elsa-jobmng status` says so too, not only its --json.
    text = subprocess.run([sys.executable, "-m", "elsa.jobmng", "--socket", d.socket, "status"],
                          capture_output=True, text=True, check=True).stdout
    assert "config     not applied until elsad restarts: backend" in text.splitlines(), text


@pytest.mark.root
def test_sighup_refuses_a_file_that_a_start_would_refuse(elsad):
    """A plugin table with an unknown key (checked by `elsad --check-config`, not by
    the core's keys) is refused at reload too; the running config is kept."""
    d = elsad()
    text = d.config_path.read_text()
    d.config_path.write_text(text + "[sources.taskstats]\nbogus = 1\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in d.log_path.read_text(), 10, what="the refusal")
    assert "sources.taskstats.bogus" in d.log_path.read_text()
    with d.client() as c:
        assert c.status()["config"]["restart_needed"] == []
    d.config_path.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in d.log_path.read_text(), 10, what="a valid reload")
