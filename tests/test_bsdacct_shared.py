"""The kernel's accounting file is shared state (managed bsdacct): another
`accton FILE` is noticed and left alone, and the file active before elsad took
over is restored on stop even after a kill -9. Switches acct(2): the suite runs
under `flock /tmp/elsa-kacct.lock` on shared machines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from elsa.testing import wait_for

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("accton") is None, reason="needs GNU acct")]

EXTRA = '[sources.bsdacct]\ninterval = 0.1\nownership_check = 0.5\nprobe_files = ["{p}"]\n'


def _grows(path) -> bool:
    before = os.stat(path).st_size
    subprocess.run(["true"])
    return os.stat(path).st_size > before


@pytest.fixture
def other_file(tmp_path):
    """An accounting file "another tool" owns; accounting is switched off after."""
    path = tmp_path / "other.pacct"
    path.touch()
    yield path
    subprocess.run(["accton", "off"], capture_output=True)


def test_displacement_is_noticed_and_left_alone(elsad, tmp_path, other_file):
    prev = tmp_path / "prev.pacct"
    prev.touch()
    d = elsad(extra=EXTRA.format(p=prev))
    with d.client() as c:
        jid = c.create(name="acct", pids=[os.getpid()])["jid"]
        st = c.status()["sources"]["bsdacct"]
        assert st["switched_on"] and st["displaced"] is None
        subprocess.run(["accton", str(other_file)], check=True, capture_output=True)
        st = wait_for(lambda: c.status()["sources"]["bsdacct"]["displaced"], 15,
                      interval=0.2, what="the displacement noticed")
        c.end(jid)
    assert _grows(other_file)
    d.stop()
    assert _grows(other_file)  # elsad did not switch off accounting it no longer owns
    out = subprocess.run(["elsa", "job", jid, "--json", "--state-dir", d.state_dir],
                         capture_output=True, text=True, check=True).stdout
    assert "taken over by another program" in json.loads(out)["usage"]["incomplete"]["bsdacct"]


def test_previous_file_is_restored_after_a_crash(elsad, tmp_path, other_file):
    # other_file plays psacct's file: active before elsad starts.
    subprocess.run(["accton", str(other_file)], check=True, capture_output=True)
    d = elsad(extra=EXTRA.format(p=other_file))
    with d.client() as c:
        assert c.status()["sources"]["bsdacct"]["previous"] == str(other_file)
    assert not _grows(other_file)  # elsad's file now
    d.kill9()
    d.start()  # probing now would find elsad's own file; the saved one counts
    with d.client() as c:
        assert c.status()["sources"]["bsdacct"]["previous"] == str(other_file)
    d.stop()
    assert _grows(other_file)  # restored
