"""The ``[apps]`` config section (registered in elsa.config.SECTIONS)."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Dict, Optional, Sequence

from elsa.config import Option, non_negative, positive


def _uids(v: Any) -> Optional[str]:
    return None if all(x >= 0 for x in v) else "must list uids (0 or more)"


OPTIONS: Dict[str, Option] = {
    "enabled": Option(bool, False, "Record one application record per exec of every process"
                      " (docs/applications.md)."),
    "uids": Option(list, [], "Record only processes of these real uids (empty: every uid).",
                   item_type=int, check=_uids),
    "min_uid": Option(int, 0, "Skip processes whose real uid is below this (e.g. 1000 skips"
                      " system users).", check=non_negative),
    "include": Option(list, [], "Record only binaries whose path matches one of these glob"
                      " patterns (empty: all). A record whose path is unknown is kept.",
                      item_type=str),
    "exclude": Option(list, [], "Skip binaries whose path matches one of these glob patterns.",
                      item_type=str),
    "argv": Option(list, [], "Keep the command line of binaries whose path matches one of these"
                   " glob patterns (empty: never; command lines carry secrets).", item_type=str),
    "packages": Option(str, "auto", "Owning package of each binary from the package database,"
                       " read once at start: 'auto' (dpkg, else rpm), 'dpkg', 'rpm' or 'off'.",
                       choices=("auto", "dpkg", "rpm", "off")),
    "prompt": Option(bool, True, "Read /proc at each exec as soon as its event arrives: during a"
                     " burst (config burst_hold) elsad then holds only the accounting"
                     " sources, not the exec events, so short-lived programs keep their"
                     " path, at the cost of competing with the burst for CPU. false: bursts"
                     " are held whole, and programs that ended during one keep what their"
                     " exit record says (comm, uid, figures)."),
    "exit_wait": Option(float, 5.0, "Seconds a program's last image waits for its process's"
                        " exit record (taskstats, bsdacct) before it is stored, so its CPU,"
                        " peak RSS and I/O come from that record.", check=positive),
}


def glob_regex(patterns: Sequence[str]) -> Optional[re.Pattern[str]]:
    """One compiled regex matching any of the glob *patterns* (None: no patterns).

    fnmatch semantics: ``*`` also matches ``/``, so ``/home/*`` covers every
    file under /home."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
