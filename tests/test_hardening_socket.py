"""The control socket's directory and mode: a directory another user can
write is refused (they could replace the socket), and the socket's mode is
set without following a symlink planted in its place."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

from elsa.core.server import ControlServer, check_socket_directory
from elsa.errors import ElsaError


@pytest.fixture
def base():
    d = tempfile.mkdtemp(prefix="elsa-sockdir-")
    os.chmod(d, 0o755)
    yield d
    for root, dirs, files in os.walk(d, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for x in dirs:
            os.rmdir(os.path.join(root, x))
    os.rmdir(d)


@pytest.mark.root
def test_directory_owned_by_another_user_is_refused(base):
    sub = os.path.join(base, "user-owned")
    os.mkdir(sub, 0o755)
    os.chown(sub, 65534, 65534)
    with pytest.raises(ElsaError, match="owned by uid 65534"):
        ControlServer._listen(os.path.join(sub, "elsad.sock"))
    assert not os.path.exists(os.path.join(sub, "elsad.sock"))


def test_world_writable_directory_is_refused_unless_sticky(base):
    sub = os.path.join(base, "open")
    os.mkdir(sub)
    os.chmod(sub, 0o777)
    with pytest.raises(ElsaError, match="writable by group or others"):
        check_socket_directory(sub)
    os.chmod(sub, 0o1777)
    check_socket_directory(sub)  # like /tmp


def test_socket_mode_is_not_set_through_a_planted_symlink(base, monkeypatch):
    victim = os.path.join(base, "victim")
    with open(victim, "w") as fh:
        fh.write("secret")
    os.chmod(victim, 0o600)
    path = os.path.join(base, "elsad.sock")
    real_bind = socket.socket.bind

    def bind_then_swap(self, addr):
        # The attacker wins the race: right after bind the path is a symlink.
        real_bind(self, addr)
        assert os.stat(addr).st_mode & 0o777 == 0o666
        os.unlink(addr)
        os.symlink(victim, addr)

    monkeypatch.setattr(socket.socket, "bind", bind_then_swap)
    sock = ControlServer._listen(path)
    sock.close()
    assert os.stat(victim).st_mode & 0o777 == 0o600
