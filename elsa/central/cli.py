"""``elsa central ...``: administer the central store (an administrator's URL).

    elsa central migrate --url URL [--months-ahead N]    schema + monthly partitions
    elsa central add-node --url URL HOST [--role R] [--password-file F]
    elsa central map-user --url URL WHO@HOST SITE_USER [--account A]
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from elsa.errors import ElsaError


def _conn(args: argparse.Namespace) -> Any:
    from elsa.central.conn import connect

    return connect(args.url, what="administer the central store")


def cmd_migrate(args: argparse.Namespace, out) -> int:
    from elsa.central import schema

    conn = _conn(args)
    try:
        before, after, parts = schema.migrate(conn, args.months_ahead)
    except Exception as exc:
        import psycopg

        if isinstance(exc, psycopg.Error):
            raise ElsaError(f"elsa central migrate: {str(exc).strip()}; is the URL an "
                            "administrator's (owner of the database)?") from exc
        raise
    finally:
        conn.close()
    if args.json:
        json.dump({"from": before, "to": after, "partitions_created": parts}, out)
        out.write("\n")
    else:
        out.write(f"central schema {before} -> {after}; partitions created: "
                  f"{', '.join(parts) or 'none'}\n")
    return 0


def cmd_add_node(args: argparse.Namespace, out) -> int:
    from elsa.central import schema
    from elsa.central.conn import read_password_file

    role = args.role or "elsa_node_" + re.sub(r"[^a-z0-9_]", "_", args.host.lower())[:50]
    password = read_password_file(args.password_file) if args.password_file else None
    conn = _conn(args)
    try:
        schema.add_node(conn, args.host, role, password)
    finally:
        conn.close()
    out.write(f"node {args.host}: role {role} (member of elsa_node)\n")
    return 0


def cmd_map_user(args: argparse.Namespace, out) -> int:
    from elsa.central import schema

    who, sep, host = args.who.rpartition("@")
    if not sep or not who or not host:
        raise ElsaError(f"{args.who!r}: expected UID@HOST or USER@HOST (HOST '*': any host)")
    conn = _conn(args)
    try:
        schema.map_user(conn, host, who, args.site_user, args.account)
    finally:
        conn.close()
    out.write(f"{args.who} -> {args.site_user}"
              + (f" (account {args.account})" if args.account else "") + "\n")
    return 0


def add_commands(sub: Any) -> None:
    c = sub.add_parser("central", help="administer the site's central PostgreSQL store")
    csub = c.add_subparsers(dest="central_command", required=True)
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--url", required=True,
                     help="an administrator's libpq URL (postgresql://... or service=NAME)")
    url.add_argument("--json", action="store_true", help="JSON output")
    s = csub.add_parser("migrate", parents=[url],
                        help="create or upgrade the schema, roles and monthly partitions")
    s.add_argument("--months-ahead", type=int, default=3,
                   help="create usage partitions this many months ahead (default 3)")
    s.set_defaults(func=cmd_migrate)
    s = csub.add_parser("add-node", parents=[url],
                        help="create a node's login role, allowed to write its own rows only")
    s.add_argument("host", help="the node's [central] host name")
    s.add_argument("--role", help="login role (default elsa_node_<host>)")
    s.add_argument("--password-file", help="set the role's password from this file")
    s.set_defaults(func=cmd_add_node)
    s = csub.add_parser("map-user", parents=[url],
                        help="map uid@host or user@host to a site user and account")
    s.add_argument("who", metavar="WHO@HOST")
    s.add_argument("site_user")
    s.add_argument("--account", help="account / VO charged")
    s.set_defaults(func=cmd_map_user)
