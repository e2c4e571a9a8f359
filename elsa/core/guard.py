"""Isolation of plugin callbacks on the event thread (sources and backends).

A plugin's reader or timer callback that raises must not take the daemon down
(pluggy treats a raising hookimpl as fatal): the failure is logged with its
traceback and counted, and a callback that keeps failing on a descriptor stops
being watched instead of spinning the loop.
"""

from __future__ import annotations

from typing import Callable, Optional

from elsa.logsetup import structlog

log = structlog.get_logger("elsa.guard")

#: Failures in a row after which a descriptor's callback is given up.
MAX_CONSECUTIVE_ERRORS = 100


def run_isolated(cb: Callable[[], None], what: str, plugin: str = "") -> bool:
    """Run *cb*; log an exception with its traceback and return False instead of raising."""
    try:
        cb()
        return True
    except Exception as exc:
        log.exception("plugin callback raised; isolated", plugin=plugin, what=what,
                      error=f"{type(exc).__name__}: {exc}")
        return False


class Guard:
    """Wraps a plugin callback: logs and counts failures instead of raising."""

    def __init__(self, name: str, what: str, fn: Callable[[], None],
                 on_give_up: Optional[Callable[[], None]] = None) -> None:
        self.name, self.what, self.fn = name, what, fn
        self.errors = 0
        self.consecutive = 0
        self.on_give_up = on_give_up

    def __call__(self) -> None:
        if run_isolated(self.fn, self.what, self.name):
            self.consecutive = 0
            return
        self.errors += 1
        self.consecutive += 1
        if self.consecutive >= MAX_CONSECUTIVE_ERRORS and self.on_give_up is not None:
            log.error("plugin callback keeps failing; its descriptor is no longer watched",
                      plugin=self.name, what=self.what)
            self.on_give_up()
            self.on_give_up = None
