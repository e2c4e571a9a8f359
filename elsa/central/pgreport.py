"""The report adapter for the central store: the queries of elsa/report/query.py
run here unchanged, through psycopg 3."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from elsa.central.conn import connect
from elsa.errors import StoreError
from elsa.report.connect import BUCKET, Db

_PLACEHOLDER = re.compile(r"\?")


class PgDb(Db):
    central = True

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self._sql: Dict[str, str] = {}
        self._map: Optional[Dict[Tuple[str, Any], Tuple[str, Optional[str]]]] = None
        self._names: Dict[Tuple[str, int], str] = {}

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        q = self._sql.get(sql)
        if q is None:
            # The shared queries hold no literal '%' or '?' besides placeholders.
            q = self._sql[sql] = _PLACEHOLDER.sub("%s", sql)
        try:
            return self.conn.execute(q, params)
        except Exception as exc:
            raise _refused(self.conn, exc) from None

    def host(self, alias: str = "") -> str:
        return f"{alias}host"

    def hour(self, col: str) -> str:
        return f"floor({col} / {BUCKET})::bigint"

    def tag(self, key_param: str = "?") -> str:
        return f"(tags::jsonb ->> {key_param})"

    def hosts(self) -> List[str]:
        """The nodes this store knows: every one that shipped anything (a shipped row's
        user is in host_users) and every one added with ``elsa central add-node``."""
        return [h for (h,) in self.execute(
            "SELECT host FROM host_users UNION SELECT host FROM elsa_nodes ORDER BY 1")]

    def _load_map(self) -> None:
        self._map = {}
        for host, uid, name, site_user, account in self.conn.execute(
                "SELECT host, uid, user_name, site_user, account FROM user_map"):
            self._map[(host, uid if uid is not None else name)] = (site_user, account)
        for host, uid, name in self.conn.execute("SELECT host, uid, name FROM host_users"):
            self._names[(host, uid)] = name

    def user_label(self, host: str, uid: Optional[int]) -> Tuple[str, Optional[str]]:
        """The site user: user_map by uid@host, then user@host (host '*' for any host);
        unmapped, the node's own name for the uid as user@host."""
        if self._map is None:
            self._load_map()
        assert self._map is not None
        name = self._names.get((host, uid)) if uid is not None else None
        for key in ((host, uid), (host, name), ("*", uid), ("*", name)):
            if key[1] is not None and key in self._map:
                return self._map[key]
        if uid is None or uid < 0:
            return "?", None
        return f"{name or uid}@{host}", None


def _refused(conn: Any, exc: Exception) -> Exception:
    """*exc* as a message saying what to do when the server refused the login role
    the read (a role not in elsa_reader: a node's, or one made without it); any
    other error as it is."""
    import psycopg

    if not isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return exc
    return StoreError(
        f"central store {conn.info.host}/{conn.info.dbname}: role {conn.info.user!r} may not "
        f"read it ({str(exc).strip().splitlines()[0]}); reports need a role in elsa_reader, "
        "not a node's: as the database owner, CREATE ROLE report LOGIN PASSWORD '...' "
        "IN ROLE elsa_reader, and give its URL")


def open_central(url: str) -> PgDb:
    """A read connection to the central store at *url* (checks its schema version)."""
    from elsa.central import schema

    conn = connect(url, what="read the central store")
    try:
        version = schema.schema_version(conn)
    except Exception as exc:
        err = _refused(conn, exc)
        conn.close()
        raise err from None
    if version != schema.VERSION:
        raise StoreError(f"central store {conn.info.host}/{conn.info.dbname} is at schema "
                         f"{version}, this ELSA reads {schema.VERSION}; run 'elsa central "
                         "migrate' with an administrator's URL")
    return PgDb(conn)
