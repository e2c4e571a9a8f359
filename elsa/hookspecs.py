"""Every ELSA hook specification, grouped by lifecycle.

Plugins implement these with the :data:`hookimpl` marker (re-exported as
``elsa.hookimpl``) and register through the ``elsa`` entry-point group, exactly
as the built-in backends (``elsa.backends.*``) and sources (``elsa_plugins.*``)
do. All hooks are called from the daemon's single event thread, in event order,
through :class:`elsa.plugins.PluginHost`, which isolates a raising
implementation (logged with the plugin's name) so it cannot stop the daemon.

Notification hooks must not block: the proc connector is read on the same
thread, and the kernel drops events when we fall behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Mapping

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from elsa.core.backend import BackendSpec
    from elsa.core.listener import EventListener, ListenerContext
    from elsa.core.model import Job, ProcessId
    from elsa.core.source import SourceSpec

PROJECT = "elsa"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- discovery (daemon start, and `elsad --list-plugins`) ----------------------

@hookspec
def elsa_backends() -> List[BackendSpec]:
    """Declare the grouping backends this plugin provides.

    Called once when elsad starts (and by ``elsad --list-plugins``), before any
    job exists, from the main thread. May import modules but must not touch
    the kernel.

    :return: a list of :class:`elsa.core.backend.BackendSpec`; the lists of all
        plugins are concatenated and the config's ``backend`` key picks one by
        name. Two plugins declaring the same name is a startup error.
    """


@hookspec
def elsa_sources() -> List[SourceSpec]:
    """Declare the accounting sources this plugin provides.

    Called once when elsad starts (and by ``elsad --list-plugins``), from the
    main thread. Must not touch the kernel.

    :return: a list of :class:`elsa.core.source.SourceSpec`; the config's
        ``sources`` list enables them by name.
    """


@hookspec
def elsa_event_listeners(ctx: ListenerContext) -> List[EventListener]:
    """Return listeners for the exec and exit events of every process.

    Called once when elsad starts, from the main thread, after the store and
    the job manager exist and before events are read. Each listener's
    ``on_exec``/``on_exit`` then run on the event thread for every exec and
    exit on the machine (a fork or exec storm: keep them cheap, never block);
    a listener that overrides ``on_usage`` also gets, on the event thread, each
    batch of per-process usage rows the accounting sources store (every
    process's exit records, attributed); ``stop`` runs when the daemon stops,
    before the store closes. Return an empty list when the feature is
    switched off in the config.

    :param ctx: :class:`elsa.core.listener.ListenerContext` (config, procfs,
        store, boot id, host id, ``job_of(pid)``, ``add_timer``).
    :return: a list of :class:`elsa.core.listener.EventListener`; the lists of
        all plugins are concatenated.
    """


# -- daemon lifecycle -----------------------------------------------------------

@hookspec
def elsa_daemon_ready(status: Mapping[str, object]) -> None:
    """Called once on the event thread when the daemon has subscribed to the
    proc connector and recovered its jobs, just before it tells systemd
    READY=1. Must not block.

    :param status: the same mapping the ``status`` request returns (version,
        backend, counters).
    :return: ignored.
    """


@hookspec
def elsa_daemon_stopping(reason: str) -> None:
    """The daemon is stopping (SIGTERM, SIGINT, or a fatal error).

    Called once, before the backend and sources stop. Must return promptly.

    :param reason: a short human-readable reason ("SIGTERM", ...).
    :return: ignored.
    """


# -- jobs ---------------------------------------------------------------------

@hookspec
def elsa_job_created(job: Job) -> None:
    """Called on the event thread after a job was created (by a client
    request) and persisted, before the reply is sent. Must not block.

    :param job: snapshot of the new job (no members yet).
    :return: ignored.
    """


@hookspec
def elsa_job_ended(job: Job) -> None:
    """Called on the event thread after a job ended: its last member exited
    (``job_end = "last-exit"``) or a client ended it. Sources have already
    taken their final readings and the backend removed its kernel object.
    Must not block.

    :param job: snapshot of the ended job, ``state == "ended"``.
    :return: ignored.
    """


# -- processes ------------------------------------------------------------------

@hookspec
def elsa_process_joined(job: Job, proc: ProcessId, how: str) -> None:
    """Called on the event thread when a process became a member of a job.

    Called for every member, including forked children, so implementations
    must be cheap (this runs once per fork during a fork storm).

    :param job: the job the process joined (snapshot; ``pids`` is empty to
        keep the call cheap).
    :param proc: the process identity (pid, start ticks).
    :param how: ``"fork"`` (child of a member), ``"attach"`` (client request),
        ``"resync"`` (found by walking /proc ancestry after event loss) or
        ``"recover"`` (re-validated after a daemon restart).
    :return: ignored.
    """


@hookspec
def elsa_process_exited(jid: int, proc: ProcessId, exit_code: int) -> None:
    """Called on the event thread when a member process exited (seen by the
    proc connector or inferred by resync). Runs once per exit during a fork
    storm: keep it cheap, never block.

    :param jid: the job the process belonged to.
    :param proc: the process identity.
    :param exit_code: the wait(2)-style status, or -1 when the exit was
        inferred by resync and the status is unknown.
    :return: ignored.
    """
