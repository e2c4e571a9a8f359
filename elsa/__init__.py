"""ELSA: Enhanced Linux System Accounting — per-job accounting for Linux."""

from elsa.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
