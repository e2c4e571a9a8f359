"""Import a dependency without a module it imports but ELSA never uses.

structlog imports :mod:`asyncio` at module level (``structlog._native`` and
``structlog.stdlib``, for its ``ainfo``-style async methods), and asyncio imports
:mod:`ssl`, which maps libssl and libcrypto. elsad never runs an event loop, yet
those imports cost it 8.4 MB of its 40 MB budget (issue 6; measured here:
``python3 -c pass`` 13.6 MB RSS, ``python3 -c 'import asyncio'`` 22.0 MB) and
every ``elsa`` command ~20 ms of start-up.

:func:`import_without` imports structlog while ``sys.modules`` holds a
placeholder for asyncio, then takes the placeholder out again. structlog's
modules keep the placeholder as their ``asyncio`` global; it imports the real
asyncio the first time an attribute is read (only structlog's async methods do
that), so those methods still work. Everyone else imports asyncio normally,
because the placeholder is never left in ``sys.modules``: a lasting placeholder
would break ``import asyncio.subprocess`` as a first import, which reads the
package's ``__path__`` and would then execute the submodule twice.
(:class:`importlib.util.LazyLoader` does not help on CPython 3.9-3.11: the import
statement reads ``module.__spec__``, and LazyLoader loads on any attribute.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class _Deferred(types.ModuleType):
    """Stands in for a module; the first attribute read imports the real one."""

    def __getattr__(self, attr: str) -> Any:  # only for names not in __dict__
        real = importlib.import_module(self.__name__)
        if real is self:  # only while import_without() is still running
            raise AttributeError(f"{self.__name__} is deferred during import; "
                                 f"{attr!r} is not available yet")
        self.__dict__.update(real.__dict__)  # later reads skip this hook
        return getattr(real, attr)


def import_without(module: str, deferred: str) -> types.ModuleType:
    """Import *module* while *deferred* (if not yet imported) is a placeholder
    that imports itself on first use. Returns *module*."""
    if module in sys.modules or deferred in sys.modules:
        return importlib.import_module(module)
    spec = importlib.util.find_spec(deferred)
    if spec is None:
        return importlib.import_module(module)
    placeholder = _Deferred(deferred)
    # A real, not-initializing spec: `import asyncio` reads __spec__ and returns
    # the placeholder without any other attribute access.
    placeholder.__spec__ = spec
    sys.modules[deferred] = placeholder
    try:
        return importlib.import_module(module)
    finally:
        if sys.modules.get(deferred) is placeholder:
            del sys.modules[deferred]
