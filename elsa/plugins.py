"""Building the plugin manager, and the typed facade the core calls hooks through.

Nothing is loaded at import time (datasette #438): :func:`build_plugin_manager`
is called by each entry point. Loading one plugin failing, or one hook
implementation raising, is logged with the plugin's name and isolated; pluggy
itself would propagate the exception and stop the caller.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pluggy

from elsa import hookspecs
from elsa.errors import PluginError
from elsa.logsetup import structlog

ENTRY_POINT_GROUP = "elsa"
AUTOLOAD_ENV = "ELSA_DISABLE_PLUGIN_AUTOLOAD"

log = structlog.get_logger("elsa.plugins")


def _entry_points() -> List[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points()
    if sys.version_info >= (3, 10):
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, []))  # pragma: no cover - Python 3.9


def build_plugin_manager(*, autoload: Optional[bool] = None, blocked: Sequence[str] = (),
                         modules: Sequence[str] = (),
                         extra: Iterable[Any] = ()) -> pluggy.PluginManager:
    """A plugin manager with every ``elsa`` entry point loaded, minus *blocked*.

    *autoload* defaults to true unless ``ELSA_DISABLE_PLUGIN_AUTOLOAD`` is set
    (then only *modules* and *extra* are registered — useful for tests and for
    running with a hand-picked set). *modules* are imported by dotted path (the
    config's ``plugins`` key). A plugin that fails to import is logged and
    skipped. ``check_pending()`` refuses hooks with a typo'd name.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "") in ("", "0")
    blocked_set = set(blocked)
    for name in blocked_set:
        pm.set_blocked(name)
    if autoload:
        for ep in _entry_points():
            if ep.name in blocked_set or pm.is_registered(ep.name) or pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not stop us
                log.error("plugin failed to load", plugin=ep.name, target=ep.value,
                          error=f"{type(exc).__name__}: {exc}")
                continue
            pm.register(plugin, name=ep.name)
    for dotted in modules:
        if dotted in blocked_set or pm.has_plugin(dotted):
            continue
        try:
            plugin = importlib.import_module(dotted)
        except Exception as exc:
            log.error("plugin failed to load", plugin=dotted,
                      error=f"{type(exc).__name__}: {exc}")
            continue
        pm.register(plugin, name=dotted)
    for plugin in extra:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}; "
                          "check the hook name against elsa/hookspecs.py") from None
    return pm


class PluginHost:
    """Typed facade over the hooks; the only place the core touches ``pm.hook``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.failures: Dict[str, int] = {}

    def _call(self, hook_name: str, **kwargs: Any) -> List[Any]:
        hook = getattr(self.pm.hook, hook_name)
        results = []
        # Call each implementation ourselves so one raising cannot stop the rest.
        for impl in reversed(hook.get_hookimpls()):
            try:
                res = impl.function(*(kwargs[a] for a in impl.argnames))
            except Exception as exc:
                self.failures[impl.plugin_name] = self.failures.get(impl.plugin_name, 0) + 1
                log.exception("plugin hook raised; isolated", plugin=impl.plugin_name,
                          hook=hook_name, error=f"{type(exc).__name__}: {exc}")
                continue
            if res is not None:
                results.append(res)
        return results

    def plugin_names(self) -> List[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    # -- discovery ----------------------------------------------------------
    def backends(self) -> Mapping[str, Any]:
        return self._specs("elsa_backends", "backend")

    def sources(self) -> Mapping[str, Any]:
        return self._specs("elsa_sources", "source")

    def event_listeners(self, ctx: Any) -> List[Any]:
        return [lst for lists in self._call("elsa_event_listeners", ctx=ctx) for lst in lists]

    def _specs(self, hook_name: str, kind: str) -> Mapping[str, Any]:
        out: Dict[str, Any] = {}
        for specs in self._call(hook_name):
            for spec in specs:
                if spec.name in out:
                    raise PluginError(f"two plugins declare the {kind} {spec.name!r}; "
                                      "block one with disabled_plugins in the config")
                out[spec.name] = spec
        return out

    # -- notifications --------------------------------------------------------
    def daemon_ready(self, status: Mapping[str, object]) -> None:
        self._call("elsa_daemon_ready", status=status)

    def daemon_stopping(self, reason: str) -> None:
        self._call("elsa_daemon_stopping", reason=reason)

    def job_created(self, job: Any) -> None:
        self._call("elsa_job_created", job=job)

    def job_ended(self, job: Any) -> None:
        self._call("elsa_job_ended", job=job)

    def process_joined(self, job: Any, proc: Any, how: str) -> None:
        self._call("elsa_process_joined", job=job, proc=proc, how=how)

    def process_exited(self, jid: int, proc: Any, exit_code: int) -> None:
        self._call("elsa_process_exited", jid=jid, proc=proc, exit_code=exit_code)

    def has_impls(self, hook_name: str) -> bool:
        """Whether anyone implements *hook_name* (lets the hot path skip building args)."""
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())
