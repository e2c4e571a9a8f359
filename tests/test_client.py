"""elsa.client against a real elsad: errors, socket resolution, busy, idle, backlog."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from elsa.client import Client, RequestFailed, default_socket
from elsa.errors import DaemonUnavailable, ProtocolError
from elsa.protocol import parse_signal
from tests.conftest import wait_for


def test_unavailable_daemon_says_so_and_how_to_start_it(tmp_path):
    with pytest.raises(DaemonUnavailable) as exc:
        Client(str(tmp_path / "nothing.sock"))
    assert "elsad is not running" in exc.value.message
    assert "systemctl start elsad" in exc.value.message
    # A socket file nobody listens on (a daemon killed with -9) reads the same.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(DaemonUnavailable, match="not running"):
        Client(str(stale))


def test_default_socket_resolution(tmp_path, monkeypatch):
    cfg = tmp_path / "elsa.toml"
    cfg.write_text('socket = "/tmp/somewhere/elsad.sock"\n')
    monkeypatch.delenv("ELSA_CONFIG", raising=False)
    if not os.path.exists("/etc/elsa/elsa.toml"):
        assert default_socket() == "/run/elsa/elsad.sock"
    assert default_socket(str(cfg)) == "/tmp/somewhere/elsad.sock"
    monkeypatch.setenv("ELSA_CONFIG", str(cfg))
    assert default_socket() == "/tmp/somewhere/elsad.sock"


def test_parse_signal():
    assert parse_signal("TERM") == signal.SIGTERM
    assert parse_signal("sigkill") == signal.SIGKILL
    assert parse_signal(" 9 ") == 9
    assert parse_signal("RTMIN") == signal.SIGRTMIN
    for bad in ("NOPE", "0", "65", "-1", ""):
        with pytest.raises(ProtocolError):
            parse_signal(bad)


@pytest.mark.root
def test_request_failed_carries_the_code_and_the_connection_survives(elsad):
    d = elsad()
    with d.client() as c:
        with pytest.raises(RequestFailed) as exc:
            c.show(1)
        assert exc.value.code == "no-such-job" and "[no-such-job]" in str(exc.value)
        with pytest.raises(RequestFailed) as exc:
            c.call("frobnicate")
        assert exc.value.code == "unknown-op"
        hello = c.hello()
        assert hello["protocol"] == 1 and 1 in hello["versions"]
        assert hello["caller"] == {"pid": os.getpid(), "uid": 0, "gid": os.getgid(),
                                   "admin": True}
        assert "wait" in hello["ops"] and hello["limits"]["max_connections"] == 256
        job = c.create(name="c")
        t0 = time.monotonic()
        assert c.wait(job["jid"], timeout=0.2)["ended"] is False
        assert time.monotonic() - t0 >= 0.19
        assert c.end(job["jid"])["state"] == "ended"


@pytest.mark.root
def test_busy_daemon_refuses_with_a_code(elsad):
    d = elsad(extra="[limits]\nmax_connections = 1\n")
    # Root (an admin) gets max_connections + 8 slots, then 'busy'.
    held = [d.client() for _ in range(9)]
    try:
        for c in held:
            c.status()
        with pytest.raises(RequestFailed) as exc:
            with d.client() as extra:
                extra.status()
        assert exc.value.code == "busy"
    finally:
        for c in held:
            c.close()

    def status():
        try:
            return d.call("status")
        except RequestFailed:  # the daemon may not have seen our closes yet
            return None
    assert wait_for(status, what="a free slot")["control"]["refused_connections"] >= 1


@pytest.mark.root
def test_idle_connection_closed_by_daemon_is_reported(elsad):
    d = elsad(extra="[limits]\nidle_timeout = 0.3\n")
    with d.client() as c:
        c.status()
        time.sleep(0.8)  # deliberately idle longer than idle_timeout
        with pytest.raises(DaemonUnavailable, match="idle"):
            c.status()


@pytest.mark.root
def test_client_waits_out_a_full_listen_backlog(elsad):
    """Connections queue in the kernel while the daemon is stopped; when the backlog
    is full, connect() fails with EAGAIN and the client retries until its timeout."""
    # (The queued connections are all accepted first: allow them.)
    d = elsad(extra="[limits]\nmax_connections = 4096\n")
    queued = []
    os.kill(d.proc.pid, signal.SIGSTOP)
    resumed = threading.Timer(0.5, lambda: os.kill(d.proc.pid, signal.SIGCONT))
    try:
        while True:  # fill the backlog (1024, or net.core.somaxconn if lower)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(d.socket)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
            assert len(queued) < 5000
        resumed.start()
        t0 = time.monotonic()
        with Client(d.socket, timeout=10) as c:
            assert c.status()["backend"] == "cnproc"
        assert time.monotonic() - t0 >= 0.4
    finally:
        resumed.cancel()
        os.kill(d.proc.pid, signal.SIGCONT)
        for s in queued:
            s.close()
