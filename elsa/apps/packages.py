"""Which package owns a binary: the dpkg or rpm database, read once and cached.

Never one subprocess per exec: the index is built once, on a thread of its
own, when elsad starts, and looked up by path (a dict access) afterwards.
Records made before it is ready carry no package.

* dpkg: ``/var/lib/dpkg/status`` gives each installed package's version;
  ``/var/lib/dpkg/info/<pkg>[:<arch>].list`` its files. Only files that are
  executable regular files are kept (a few thousand of the ~100k paths), which
  keeps elsad's memory small.
* rpm: the rpm database is a binary format (Berkeley DB, NDB or SQLite with
  header blobs) that only librpm reads reliably, so the one ``rpm -qa`` run at
  start lists every package's files.

On a merged-/usr system (``/bin -> usr/bin``) the kernel reports
``/usr/bin/dash`` while dpkg lists ``/bin/dash``: both spellings are indexed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from typing import Dict, Iterable, Optional, Tuple

from elsa.logsetup import structlog

log = structlog.get_logger("elsa.apps.packages")

Owner = Tuple[str, str]  # (package, version)


class PackageIndex:
    """Path -> (package, version), loaded in the background by :meth:`start`."""

    def __init__(self, kind: str = "auto", *, dpkg_dir: str = "/var/lib/dpkg",
                 root: str = "/") -> None:
        self.kind = kind
        self.dpkg_dir = dpkg_dir
        self.root = root
        self.owners: Dict[str, Owner] = {}
        self.ready = threading.Event()
        self.error: Optional[str] = None
        self.used = ""  # the database actually read

    def start(self) -> None:
        if self.kind == "off":
            self.ready.set()
            return
        threading.Thread(target=self._load, name="elsa-apps-packages", daemon=True).start()

    def lookup(self, path: Optional[str]) -> Optional[Owner]:
        if path is None:
            return None
        return self.owners.get(path)

    def status(self) -> Dict[str, object]:
        return {"database": self.used or self.kind, "ready": self.ready.is_set(),
                "binaries": len(self.owners), "error": self.error}

    # -- loading (own thread) ---------------------------------------------------------
    def _load(self) -> None:
        try:
            kind = self.kind
            if kind == "auto":
                kind = ("dpkg" if os.path.exists(os.path.join(self.dpkg_dir, "status"))
                        else "rpm" if shutil.which("rpm") else "")
            if kind == "dpkg":
                owners = dict(self._dpkg())
            elif kind == "rpm":
                owners = dict(self._rpm())
            else:
                owners = {}
            self.used = kind or "none"
            self.owners = _with_usr_aliases(owners, self.root)
            log.info("package index ready", database=self.used, binaries=len(self.owners))
        except Exception as exc:  # the index is optional: say why, record without it
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("package index failed; records carry no package",
                          database=self.kind, error=self.error)
        finally:
            self.ready.set()

    def _dpkg(self) -> Iterable[Tuple[str, Owner]]:
        versions = parse_dpkg_status(os.path.join(self.dpkg_dir, "status"))
        info = os.path.join(self.dpkg_dir, "info")
        for name in os.listdir(info):
            if not name.endswith(".list"):
                continue
            pkg = name[:-5].split(":", 1)[0]
            owner = (pkg, versions.get(pkg, ""))
            try:
                with open(os.path.join(info, name), "rb") as fh:
                    paths = fh.read().decode("utf-8", "replace").splitlines()
            except OSError:
                continue
            for path in paths:
                if _is_program(path):
                    yield path, owner

    def _rpm(self) -> Iterable[Tuple[str, Owner]]:
        out = subprocess.run(
            ["rpm", "-qa", "--queryformat", "[%{FILENAMES}\t%{NAME}\t%{VERSION}-%{RELEASE}\n]"],
            capture_output=True, text=True, timeout=300, check=False).stdout
        for line in out.splitlines():
            path, _, rest = line.partition("\t")
            pkg, _, version = rest.partition("\t")
            if pkg and _is_program(path):
                yield path, (pkg, version)


def parse_dpkg_status(path: str) -> Dict[str, str]:
    """Package -> version of every installed package in a dpkg status file."""
    versions: Dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    for stanza in text.split("\n\n"):
        pkg = version = status = ""
        for line in stanza.splitlines():
            if line.startswith("Package: "):
                pkg = line[9:].strip()
            elif line.startswith("Version: "):
                version = line[9:].strip()
            elif line.startswith("Status: "):
                status = line[8:].strip()
        if pkg and status.endswith(" installed"):
            versions[pkg] = version
    return versions


#: Trees that hold no binary the kernel runs (/proc/PID/exe is an ELF file or
#: a binfmt_misc interpreter; a script's exe is its interpreter): skipped
#: without a stat, which takes the load from ~1.7 s to a fraction.
_NOT_PROGRAMS = ("/usr/share/", "/usr/include/", "/etc/", "/usr/lib/python3/",
                 "/usr/src/", "/var/")
_NOT_PROGRAM_SUFFIXES = (".py", ".pyc", ".pm", ".pl", ".h", ".gz", ".txt", ".html", ".mo",
                         ".a", ".o")


def _is_program(path: str) -> bool:
    """An executable regular file (not a directory, not a symlink: /proc/PID/exe
    is always the resolved file)."""
    if path.startswith(_NOT_PROGRAMS) or path.endswith(_NOT_PROGRAM_SUFFIXES):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_mode & 0o170000) == 0o100000 and bool(st.st_mode & 0o111)


def _with_usr_aliases(owners: Dict[str, Owner], root: str) -> Dict[str, Owner]:
    merged = dict(owners)
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        link = os.path.join(root, top)
        if os.path.islink(link) and os.readlink(link).strip("/") == f"usr/{top}":
            prefix = f"/{top}/"
            for path, owner in owners.items():
                if path.startswith(prefix):
                    merged.setdefault("/usr" + path, owner)
    return merged
