"""ELSA's Debian package on a pure cgroup v2 host under systemd, in a qemu guest.

One guest boot per test session (tests/vm/guest.py); each in-guest check of
tests/vm/guest_checks.py is one test here, failing with the check's own log
and the end of the guest console. The image is built (and cached) by
scripts/setup-tests through tests/vm/build-image; when it is missing the first
test builds it. Hosts without qemu or debootstrap skip with what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from . import guest
from .guest_checks import CHECKS

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[guest.GuestRun]:
    missing = guest.missing_tools()
    if missing:
        pytest.skip("the qemu guest needs: " + ", ".join(missing))
    if os.geteuid() != 0:
        pytest.skip("building the guest image needs root (debootstrap, chroot)")
    image = guest.build_image()
    workdir: Path = tmp_path_factory.mktemp("vm")
    run = guest.run_guest(image, workdir)
    print(f"\nvm: {run.accel}, checks started {run.boot_seconds} s after qemu started, "
          f"guest done in {run.total_seconds:.0f} s")
    yield run


@pytest.mark.parametrize("name", [fn.__name__ for fn in CHECKS])
def test_in_guest(guest_run: guest.GuestRun, name: str) -> None:
    res = guest_run.results.get(name)
    if res is None:
        pytest.fail(f"no result from the guest for {name} ({guest_run.error or 'not run'});"
                    f" accel {guest_run.accel}\n--- guest console (end) ---\n"
                    + guest_run.console_tail())
    print(res["output"])  # shown with -rP: rates of the peer check, figures
    if res["outcome"] != "pass":
        pytest.fail(f"in-guest check {name} failed ({res['seconds']} s):\n{res['output']}"
                    "\n--- guest console (end) ---\n" + guest_run.console_tail(30),
                    pytrace=False)


def test_guest_finished_and_powered_off(guest_run: guest.GuestRun) -> None:
    """Every check reported, and the guest powered itself off (qemu was not killed)."""
    assert guest_run.done and not guest_run.error, (
        f"{guest_run.error or 'the guest did not report all checks'}\n"
        "--- guest console (end) ---\n" + guest_run.console_tail())
