"""ELSA: Enhanced Linux System Accounting — per-job accounting for Linux."""

from elsa import _deferred

# Before anything imports structlog: keep its unused asyncio (and ssl) out of
# every ELSA process (8 MB of elsad's RSS budget; see elsa/_deferred.py).
_deferred.import_without("structlog", "asyncio")

from elsa.hookspecs import hookimpl  # noqa: E402

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
