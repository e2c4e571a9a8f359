"""The project stands alone: no comment or doc points to a file outside the
repository. Kernel facts the code relies on are stated in docs/kernel.md, and
comments cite that instead of kernel source or documentation files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Paths into a kernel source tree (kernel/acct.c, include/uapi/linux/acct.h,
# Documentation/admin-guide/cgroup-v2.rst, ...) and into the development
# machine's shared folder.
OUTSIDE = re.compile(
    r"\b(?:kernel|drivers|include|fs|mm|net|arch|Documentation)/[\w/.-]+\.(?:c|h|rst|txt)\b"
    r"|\b[\w-]+\.rst\b"
    r"|/work/shared|\.\./shared/|\bGUIDE(?:\.md| §)")

TEXT = (".py", ".md", ".c", ".h", ".toml", ".service", ".sh", ".txt", ".spec", ".cfg", ".in")


SKIP_DIRS = {".git", ".hypothesis", ".ruff_cache", "__pycache__", "build", "dist", ".venv"}


def _tracked() -> list:
    """The repository's text files: git's list in a clone, else a walk of the tree."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
               if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
               and not any(part.endswith(".egg-info") for part in p.parts)]
    return [p for p in out if p.endswith(TEXT) or p.startswith(("scripts/", "packaging/"))]


def test_no_comment_or_doc_points_outside_the_repository():
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()
    hits = []
    for rel in _tracked():
        if rel == me:
            continue
        path = ROOT / rel
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            m = OUTSIDE.search(line)
            if m:
                hits.append(f"{rel}:{n}: {m.group(0)}")
    assert not hits, ("state the fact in docs/kernel.md (or the relevant doc) and cite "
                      "that instead:\n" + "\n".join(hits))
