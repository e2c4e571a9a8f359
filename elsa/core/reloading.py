"""What a SIGHUP reload does with each configuration key.

Every key of :class:`elsa.config.Config` is in exactly one of the two sets
(tests/test_hardening_reload.py checks it, so a new key must be classified):
either the daemon applies a change on reload, or it keeps the running value,
logs the key as needing a restart and lists it in ``status``
(``config.restart_needed``). Nothing is kept silently.
"""

from __future__ import annotations

import dataclasses
from typing import FrozenSet, List, Tuple

from elsa.config import Config

#: Applied by Daemon._do_reload without a restart.
APPLIED: FrozenSet[str] = frozenset({
    "log_level", "job_end", "exited_linger", "burst_hold", "nice", "limits", "admin_group",
})
#: Fixed for the daemon's lifetime: the socket is bound, the store open, the
#: kernel interfaces subscribed and the plugins loaded at start.
NEEDS_RESTART: FrozenSet[str] = frozenset({
    "backend", "socket", "state_dir", "netlink_rcvbuf", "proc_event_filter",
    "sources", "disabled_sources",
    "disabled_plugins",
    "plugins", "backends", "source_tables", "sections",
})
#: Not configuration (where it came from).
IGNORED: FrozenSet[str] = frozenset({"path"})


def plan(running: Config, new: Config) -> Tuple[Config, List[str]]:
    """The config to run with after a reload, and the changed keys it could
    not apply (their running values are kept, so the next reload reports them
    again until a restart)."""
    restart = sorted(k for k in NEEDS_RESTART if getattr(new, k) != getattr(running, k))
    kept = {k: getattr(running, k) for k in restart}
    return dataclasses.replace(new, **kept), restart
