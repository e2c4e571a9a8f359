"""Starting `elsa web` where it cannot serve: a clear error, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys


def test_an_address_in_use_is_an_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "elsa.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n')
        r = subprocess.run([sys.executable, "-m", "elsa.report.cli", "web", "--config", str(cfg),
                            "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--listen" in r.stderr
