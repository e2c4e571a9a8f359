"""``elsa web``: serve the web pages with waitress (a production WSGI server)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from elsa.errors import ConfigError


def cmd_web(args: argparse.Namespace, out: Any) -> int:
    import logging

    from waitress import create_server

    from elsa import config
    from elsa.report.cli import _db_path
    from elsa.web.app import create_app

    cfg = config.load(config.resolve_path(args.config))
    web = dict(cfg.section("web"))
    if args.listen:
        from elsa.web import OPTIONS

        problem = OPTIONS["listen"].check(args.listen)  # type: ignore[misc]
        if problem:
            raise ConfigError(f"--listen {args.listen!r} {problem}")
        web["listen"] = args.listen
    if args.actions:
        web["actions"] = True
    state_dir = args.state_dir or cfg.state_dir
    from elsa.billing import rates

    app = create_app(db_path=_db_path(args), state_dir=state_dir, socket_path=cfg.socket,
                     web=web, admin_group=cfg.admin_group, billing=rates.from_config(cfg))
    host, _, port = web["listen"].rpartition(":")
    try:  # waitress.serve's steps, with the bind's error made one of ours
        server = create_server(app, host=host.strip("[]"), port=int(port), threads=8,
                               ident="elsa", trusted_proxy=None)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {web['listen']}: {exc.strerror}; is another "
                          "elsa web running there? Choose another address with --listen or "
                          "[web] listen") from exc
    out.write(f"elsa web: http://{host}:{port}/ (store {_db_path(args)}, pid {os.getpid()})\n")
    out.flush()
    logging.basicConfig()
    server.run()
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("web", parents=[common],
                       help="serve per-job accounting pages over HTTP (see docs/web.md)")
    s.add_argument("--listen", metavar="HOST:PORT",
                   help="address to listen on (default: [web] listen, 127.0.0.1:8466)")
    s.add_argument("--actions", action="store_true",
                   help="let admins kill/freeze/thaw/end jobs (default: [web] actions)")
    s.set_defaults(func=cmd_web)
