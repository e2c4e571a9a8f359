"""A private PostgreSQL server for tests and benchmarks (Debian's binaries).

``initdb`` and ``pg_ctl`` run as an unprivileged user (``nobody`` when we are
root: PostgreSQL refuses to run as root) in a temporary directory, listening
on a socket directory and a loopback port; :meth:`PgServer.destroy` stops it
and removes everything. The system's own cluster is never used. A benchmark may
keep a cluster it filled for its next run (``root``; :meth:`PgServer.stop` only).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import List, Optional

from elsa.errors import ElsaError


def pg_bindir() -> Optional[str]:
    """Newest /usr/lib/postgresql/N/bin holding initdb (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One throw-away cluster. ``admin_url`` connects as the superuser ``elsa_admin``."""

    SUPERUSER = "elsa_admin"

    def __init__(self, base: Optional[str] = None, root: Optional[str] = None) -> None:
        """A cluster in a new temporary directory under *base*, or in *root* (made
        if missing), where a cluster made by an earlier :meth:`init` is used again."""
        bindir = pg_bindir()
        if bindir is None:
            raise ElsaError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin; "
                            "install Debian's 'postgresql' package (scripts/setup-tests does)")
        self.bindir = bindir
        if root is None:
            self.root = tempfile.mkdtemp(prefix="elsa-pg-", dir=base)
        else:
            self.root = root
            os.makedirs(root, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.sockdir = os.path.join(self.root, "sock")
        self.log = os.path.join(self.root, "server.log")
        self.port = _free_port()
        self.user: Optional[pwd.struct_passwd] = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("nobody")
        for d in (self.sockdir, self.data):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o700)
            self._chown(d)
        self._chown(self.root)

    def _chown(self, path: str) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _run(self, args: List[str], check: bool = True) -> subprocess.CompletedProcess:
        def demote() -> None:
            if self.user is not None:
                os.setgroups([])
                os.setgid(self.user.pw_gid)
                os.setuid(self.user.pw_uid)

        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        r = subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]], env=env,
                           cwd=self.root, preexec_fn=demote, capture_output=True, text=True,
                           timeout=120)
        if check and r.returncode != 0:
            raise ElsaError(f"{args[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}"
                            f"; server log: {self.log}")
        return r

    def init(self) -> PgServer:
        self._run(["initdb", "-D", self.data, "-U", self.SUPERUSER, "--auth-local=trust",
                   "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as fh:
            fh.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                     f"unix_socket_directories = '{self.sockdir}'\n"
                     # Small, no fsync wait on this shared machine (a process crash
                     # loses nothing). synchronous_commit = off as a site may set it:
                     # the shipper's own commits must not depend on it.
                     "shared_buffers = 64MB\nfsync = off\nsynchronous_commit = off\n"
                     "full_page_writes = off\nmax_connections = 50\n")
        return self

    def start(self) -> PgServer:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.stop("immediate")  # a kept cluster whose last user was killed
        # The port on the command line: a kept cluster's configured one may be taken.
        self._run(["pg_ctl", "-D", self.data, "-l", self.log, "-o", f"-p {self.port}", "-w",
                   "-t", "60", "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(["pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"], check=False)

    def running(self) -> bool:
        return self._run(["pg_ctl", "-D", self.data, "status"], check=False).returncode == 0

    def destroy(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.SUPERUSER}@/postgres?host={self.sockdir}&port={self.port}"

    def tcp_url(self, user: str, password: str, dbname: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"
