"""The application-accounting plugin: registered through the ``elsa`` entry points
like the built-in backends and sources, active when ``[apps] enabled = true``."""

from __future__ import annotations

from typing import List

from elsa.core.listener import EventListener, ListenerContext
from elsa.hookspecs import hookimpl


@hookimpl
def elsa_event_listeners(ctx: ListenerContext) -> List[EventListener]:
    options = ctx.config.section("apps")
    if not options["enabled"]:
        return []
    from elsa.apps.recorder import AppRecorder

    recorder = AppRecorder(ctx, dict(options))
    recorder.start()
    return [recorder]
