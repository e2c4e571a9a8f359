"""``elsad``: the ELSA job daemon (runs in the foreground; systemd supervises it)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from elsa import __version__, config, logsetup
from elsa.errors import ElsaError
from elsa.logsetup import structlog

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_PRIVILEGE = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elsad",
        description="ELSA job daemon: groups processes into jobs from the kernel's proc "
                    "connector and keeps per-job accounting. Runs in the foreground.",
        epilog="Config: --config, else $ELSA_CONFIG, else /etc/elsa/elsa.toml if present, else "
               "embedded defaults. Exit codes: 0 stopped cleanly, 1 runtime failure, "
               "2 bad configuration, 4 missing privilege.")
    p.add_argument("--version", action="version", version=f"elsad {__version__}")
    p.add_argument("-c", "--config", metavar="PATH", help="TOML config file")
    p.add_argument("--log-level", choices=config.LOG_LEVELS, help="override the config's log_level")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config (and the chosen backend's table), print it, exit")
    p.add_argument("--print-default-config", action="store_true",
                   help="print a commented config with every key and its default, exit")
    p.add_argument("--list-plugins", action="store_true",
                   help="list installed backends and sources, exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Log to stderr until the config says otherwise: a config error must be
    # readable on a terminal and in the journal alike.
    logsetup.configure(args.log_level or "info", stream=sys.stderr)
    log = structlog.get_logger("elsad")
    try:
        path = config.resolve_path(args.config)
        cfg = config.load(path)
    except ElsaError as exc:
        print(f"elsad: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    level = args.log_level or cfg.log_level
    logsetup.configure(level)

    from elsa.plugins import PluginHost, build_plugin_manager

    try:
        host = PluginHost(build_plugin_manager(blocked=cfg.disabled_plugins,
                                              modules=cfg.plugins))
        if args.print_default_config:
            print(_default_config(host), end="")
            return EXIT_OK
        if args.list_plugins:
            for kind, specs in (("backend", host.backends()), ("source", host.sources())):
                for name, spec in sorted(specs.items()):
                    print(f"{kind:8} {name:12} {spec.description}")
            return EXIT_OK
        if args.check_config:
            _check(cfg, host)
            print(f"elsad: {cfg.path}: configuration is valid (backend {cfg.backend})")
            return EXIT_OK
    except ElsaError as exc:
        print(f"elsad: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG

    from elsa.core.daemon import Daemon, check_privileges
    from elsa.errors import ConfigError, PrivilegeError

    daemon = None
    exporter = None
    # Whatever ends the run, stop() runs: it switches kernel accounting back and
    # lets the store writer finish its batch.
    reason = "error: internal"
    try:
        check_privileges()
        _check(cfg, host)
        from elsa.export import prometheus

        exporter = prometheus.bind(cfg)  # before the daemon: a taken port fails early
        daemon = Daemon(cfg, host, check_config=lambda c: _check(c, host))
        daemon.install_signal_handlers()
        daemon.start()
        if exporter is not None:
            prometheus.attach(exporter, daemon)
        reason = daemon.run()
        return EXIT_OK
    except ConfigError as exc:
        reason = f"error: {exc.code}"
        print(f"elsad: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except PrivilegeError as exc:
        reason = f"error: {exc.code}"
        print(f"elsad: {exc.message}", file=sys.stderr)
        return EXIT_PRIVILEGE
    except ElsaError as exc:
        reason = f"error: {exc.code}"
        log.error("elsad failed", error=exc.message, code=exc.code)
        print(f"elsad: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        log.exception("elsad failed unexpectedly", error=f"{type(exc).__name__}: {exc}")
        print(f"elsad: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        try:
            if exporter is not None:
                exporter.stop()
        except Exception as exc:  # the daemon's clean stop must run whatever the exporter does
            log.exception("prometheus exporter failed to stop",
                          error=f"{type(exc).__name__}: {exc}")
        finally:
            if daemon is not None:
                daemon.stop(reason)


def _check(cfg: config.Config, host) -> None:
    """Validate what the core cannot: the chosen backend's and sources' tables, and
    [central]'s URL and password file."""
    from elsa.core.defaults import AUTO
    from elsa.errors import ConfigError

    backends = host.backends()
    if cfg.backend not in backends and cfg.backend != AUTO:
        known = ", ".join([AUTO] + sorted(backends))
        raise ConfigError(f"{cfg.path}: key 'backend': no backend named {cfg.backend!r}; "
                          f"available: {known}")
    for name in cfg.backends:
        if name in backends:
            config.validate_table(cfg.backend_table(name), backends[name].options,
                                  where=f"backends.{name}", path=cfg.path)
        else:
            raise ConfigError(f"{cfg.path}: table 'backends.{name}': no backend named "
                              f"{name!r}; available: {', '.join(sorted(backends))}")
    sources = host.sources()
    for name in list(cfg.sources) + list(cfg.source_tables):
        if name not in sources:
            known = ", ".join(sorted(sources)) or "(none installed)"
            raise ConfigError(f"{cfg.path}: source {name!r} is not installed; "
                              f"available: {known}")
        config.validate_table(cfg.source_table(name), sources[name].options,
                              where=f"sources.{name}", path=cfg.path)
    if "central" in config.SECTIONS and cfg.section("central")["url"]:
        from elsa.central.shipper import check_config

        check_config(cfg.section("central"), cfg.path)


def _default_config(host) -> str:
    tables = {}
    for name, spec in sorted(host.backends().items()):
        if spec.options:
            tables[f"backends.{name}"] = spec.options
    for name, spec in sorted(host.sources().items()):
        if spec.options:
            tables[f"sources.{name}"] = spec.options
    return config.render_example(tables)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
