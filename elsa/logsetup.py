"""structlog configured once per entry point.

JSON lines when stdout is not a terminal (journald, files, pipes), the console
renderer when it is. No self-daemonizing and no PID file: systemd runs us.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, TextIO

from elsa._deferred import import_without

# structlog without its unused asyncio and ssl (8.4 MB of elsad's 40 MB RSS
# budget, ~20 ms of every command's start-up; see elsa/_deferred.py). ELSA's
# modules import structlog from here, so this is the first import of it.
structlog = import_without("structlog", "asyncio")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", stream: Optional[TextIO] = None,
              json: Optional[bool] = None) -> None:
    """Configure structlog for this process. Safe to call again (SIGHUP reload)."""
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
