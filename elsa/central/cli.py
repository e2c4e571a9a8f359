"""``elsa central ...``: administer the central store (an administrator's URL).

    elsa central migrate --url URL [--months-ahead N]    schema + monthly partitions
    elsa central add-node --url URL HOST [--role R] [--password-file F]
    elsa central map-user --url URL WHO@HOST SITE_USER [--account A]
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any, Callable, TypeVar

from elsa.errors import ElsaError

T = TypeVar("T")


def _admin(args: argparse.Namespace, command: str, work: Callable[[Any], T]) -> T:
    """*work* on a connection to ``--url``; a server's refusal becomes a message
    saying what failed where and what to do."""
    from elsa.central.conn import connect, redact

    conn = connect(args.url, what="administer the central store")
    try:
        return work(conn)
    except Exception as exc:
        import psycopg

        if not isinstance(exc, psycopg.Error):
            raise
        if isinstance(exc, psycopg.errors.UndefinedTable):
            hint = "run 'elsa central migrate' there first"
        elif (isinstance(exc, psycopg.errors.InsufficientPrivilege)
              and "create role" in str(exc)):
            # The owner makes the group roles (migrate) and a login role per node.
            hint = (f"the owner also needs CREATEROLE: as a superuser, ALTER ROLE "
                    f"{conn.info.user} CREATEROLE")
        else:
            hint = "is the URL an administrator's (owner of the database)?"
        # main() puts "elsa: " in front.
        raise ElsaError(f"central {command} on {redact(args.url)}: "
                        f"{redact(str(exc).strip())}; {hint}") from exc
    finally:
        conn.close()


def cmd_migrate(args: argparse.Namespace, out) -> int:
    from elsa.central import schema

    before, after, parts = _admin(args, "migrate",
                                  lambda conn: schema.migrate(conn, args.months_ahead))
    if args.json:
        json.dump({"from": before, "to": after, "partitions_created": parts}, out)
        out.write("\n")
    else:
        out.write(f"central schema {before} -> {after}; partitions created: "
                  f"{', '.join(parts) or 'none'}\n")
    return 0


def _months(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of months, 0 or more")
    return n


def cmd_add_node(args: argparse.Namespace, out) -> int:
    from elsa.central import schema
    from elsa.central.conn import read_password_file

    role = args.role or "elsa_node_" + re.sub(r"[^a-z0-9_]", "_", args.host.lower())[:50]
    password = (read_password_file(args.password_file, where="--password-file")
                if args.password_file else None)
    # A role named on the command line moves to this host (the node's own hint for
    # a host mismatch); a default one never: another host's name may give the same.
    was = _admin(args, "add-node", lambda conn: schema.add_node(
        conn, args.host, role, password, rebind=bool(args.role)))
    out.write(f"node {args.host}: role {role} (member of elsa_node"
              + (f"; moved from host {was}" if was else "") + ")\n")
    return 0


def cmd_map_user(args: argparse.Namespace, out) -> int:
    from elsa.central import schema

    who, sep, host = args.who.rpartition("@")
    if not sep or not who or not host:
        raise ElsaError(f"{args.who!r}: expected UID@HOST or USER@HOST (HOST '*': any host)")
    _admin(args, "map-user",
           lambda conn: schema.map_user(conn, host, who, args.site_user, args.account))
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
    s.add_argument("--months-ahead", type=_months, default=3,
                   help="create usage partitions this many months ahead (default 3)")
    s.set_defaults(func=cmd_migrate)
    s = csub.add_parser("add-node", parents=[url],
                        help="create a node's login role, allowed to write its own rows only")
    s.add_argument("host", help="the node's [central] host name")
    s.add_argument("--role", help="login role (default elsa_node_<host>); a role bound to "
                   "another host moves to this one")
    s.add_argument("--password-file", help="set the role's password from this file")
    s.set_defaults(func=cmd_add_node)
    s = csub.add_parser("map-user", parents=[url],
                        help="map uid@host or user@host to a site user and account")
    s.add_argument("who", metavar="WHO@HOST")
    s.add_argument("site_user")
    s.add_argument("--account", help="account / VO charged")
    s.set_defaults(func=cmd_map_user)
