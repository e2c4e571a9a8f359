"""What elsad runs when the config does not say: the backend and the sources.

* ``backend = "auto"`` (the default) starts ``cgroup2`` where a writable cgroup
  v2 hierarchy is mounted (pure v2 or hybrid) and falls back to ``cnproc``
  otherwise. The reason is kept for ``status`` and the start-up log.
* A source is enabled by its ``[sources.<name>]`` table, or without one when its
  spec says ``default_enabled`` (taskstats, cgroupstat); ``enabled = false`` in
  the table switches either kind off. bsdacct is not enabled by default: it
  takes over the kernel's single accounting file.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Sequence, Tuple

from elsa.errors import ElsaError

AUTO = "auto"
PREFERRED = "cgroup2"
FALLBACK = "cnproc"


def choose_backend(configured: str, available: Sequence[str],
                   start: Callable[[str], Any]) -> Tuple[Any, str]:
    """Start the configured backend (or, for ``auto``, the best that starts here).

    *start(name)* builds and starts one backend, raising ElsaError when it cannot
    run on this host. Returns the started backend and why it was chosen."""
    if configured != AUTO:
        return start(configured), "configured"
    if PREFERRED in available:
        try:
            backend = start(PREFERRED)
        except ElsaError as exc:
            why = (f"auto: {PREFERRED} cannot run here ({exc}); {FALLBACK} follows "
                   "processes through the proc connector")
        else:
            mount = getattr(backend, "mount", None)
            where = f" at {mount}" if mount else ""
            return backend, f"auto: writable cgroup v2 hierarchy{where}"
    else:
        why = f"auto: no {PREFERRED} backend installed"
    return start(FALLBACK), why


def enabled_sources(explicit: Sequence[str], disabled: Sequence[str],
                    specs: Mapping[str, Any]) -> List[str]:
    """The sources to start: those with a table, plus every installed source whose
    spec is ``default_enabled``, minus those switched off with ``enabled = false``."""
    out = list(explicit)
    for name in sorted(specs):
        spec = specs[name]
        if getattr(spec, "default_enabled", False) and name not in out and name not in disabled:
            out.append(name)
    return out
