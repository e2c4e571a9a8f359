"""ELSA: Enhanced Linux System Accounting — per-job accounting for Linux."""

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The plugin marker (`from elsa import hookimpl`) is imported on first use
    # (PEP 562): pluggy added ~5 ms to the start-up of every command-line tool,
    # most of which never load a plugin (`elsa ja`'s start-up is a benchmark row).
    if name == "hookimpl":
        from elsa.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'elsa' has no attribute {name!r}")
