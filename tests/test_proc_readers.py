"""Capabilities, a peer's groups and the nice value, read through the procfs adapter:
on the real kernel where it can show them, on a written procfs root otherwise."""

from __future__ import annotations

import os
import socket

import pytest

from elsa.core.authorization import peer_groups
from elsa.core.daemon import check_privileges
from elsa.errors import PrivilegeError
from elsa.kernel import caps
from elsa.kernel.procfs import ProcFS
from tests.conftest import python_out


def _status(root, pid: int, text: str) -> None:
    (root / str(pid)).mkdir(exist_ok=True)
    (root / str(pid) / "status").write_text(text)


@pytest.mark.skipif(os.geteuid() != 0, reason="root holds CAP_NET_ADMIN")
def test_root_holds_cap_net_admin():
    assert caps.effective() & (1 << caps.CAPS["CAP_NET_ADMIN"])
    check_privileges()  # does not raise


def test_check_privileges_reads_the_effective_set(tmp_path):
    _status(tmp_path, os.getpid(), "Name:\telsad\nCapEff:\t0000000000000400\n")
    with pytest.raises(PrivilegeError, match="CAP_NET_ADMIN"):
        check_privileges(str(tmp_path))
    _status(tmp_path, os.getpid(), "Name:\telsad\nCapEff:\t0000000000001000\n")
    check_privileges(str(tmp_path))
    assert caps.effective(ProcFS(str(tmp_path))) == 0x1000
    assert caps.effective(ProcFS(str(tmp_path / "none"))) == 0  # unreadable: none held


def test_peer_groups_fall_back_to_the_status_file(tmp_path):
    # SO_PEERGROUPS has no data on a UDP socket (ENODATA): the fallback is /proc.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _status(tmp_path, 77, "Name:\tx\nGroups:\t4 24 27 \nNgid:\t0\n")
        assert peer_groups(s, 77, ProcFS(str(tmp_path))) == [4, 24, 27]
        _status(tmp_path, 78, "Name:\tx\nGroups:\t\n")
        assert peer_groups(s, 78, ProcFS(str(tmp_path))) == []
        assert peer_groups(s, 79, ProcFS(str(tmp_path))) == []  # gone


def test_priority_renices_every_thread():
    """In a child process: this test run's own nice value stays as it is."""
    code = (
        "import os, threading\n"
        "from elsa.core.priority import Priority\n"
        "stop = threading.Event()\n"
        "t = threading.Thread(target=stop.wait); t.start()\n"
        "Priority(0).set(7)\n"
        "tids = [int(x) for x in os.listdir('/proc/self/task')]\n"
        "print(sorted(os.getpriority(os.PRIO_PROCESS, tid) for tid in tids))\n"
        "stop.set(); t.join()\n")
    assert python_out(code).strip() == "[7, 7]"
