"""Connections to the central PostgreSQL: credentials, redaction, error messages.

A password never comes from the config file's URL into a log line: URLs are
redacted before they are shown, and a node reads its password from a file
readable by root only (``[central] password_file``) or lets libpq find it in
its own password or service files (``~/.pgpass``, ``PGPASSFILE``,
``service=...``).
"""

from __future__ import annotations

import os
import re
import stat
from decimal import Decimal
from typing import Any, Optional

from elsa.errors import ConfigError, StoreError

_PASSWORD_IN_URL = re.compile(r"(://[^:/@?#]*:)[^@/?#]*@")
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.I)


def redact(url: str) -> str:
    """*url* with any password replaced by ``***``."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", url))


def read_password_file(path: str, where: str = "[central] password_file") -> str:
    """The password in *path*, which only its owner (root) may read. *where*: the
    setting named in errors."""
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{where} {path} is readable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"{where} {path} belongs to uid {st.st_uid}; "
                              "it must belong to root")
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{where} {path}: {exc.strerror}") from None


def check_url(url: str, where: str) -> None:
    """Refuse *url* unless libpq can parse it (a postgresql:// URL or a ``key=value
    ...`` string such as ``service=NAME``), without connecting. *where*: the setting
    named in errors."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigError(f"{where}: the central store needs psycopg 3: pip install "
                          "'elsa-accounting[central]' (or Debian's python3-psycopg)") from None
    try:
        conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's own message
        raise ConfigError(f"{where} {redact(url)!r} is neither a postgresql:// URL nor a "
                          f"libpq 'key=value ...' string: {redact(str(exc)).strip()}") from None


def _numeric_loader() -> Any:
    from psycopg.types.numeric import NumericLoader

    class IntOrDecimal(NumericLoader):
        # SUM(bigint) is numeric in PostgreSQL; reports (and JSON) want integers.
        def load(self, data: Any) -> Any:
            v = super().load(data)
            if isinstance(v, Decimal) and v == v.to_integral_value():
                return int(v)
            return float(v)

    return IntOrDecimal


def connect(url: str, *, what: str, password: Optional[str] = None,
            timeout: float = 10.0, autocommit: bool = True) -> Any:
    """A psycopg connection to *url*; errors say what failed where, never the password."""
    try:
        import psycopg
    except ImportError:
        raise StoreError("the central store needs psycopg 3: pip install "
                         "'elsa-accounting[central]' (or Debian's python3-psycopg)") from None
    kw: dict = {"connect_timeout": max(1, int(timeout)), "autocommit": autocommit,
                "application_name": "elsa"}
    if password is not None:
        kw["password"] = password
    try:
        conn = psycopg.connect(url, **kw)
    except psycopg.Error as exc:
        raise StoreError(f"cannot {what}: connecting to {redact(url)} failed: "
                         f"{redact(str(exc)).strip()}") from None
    except Exception as exc:  # a malformed URL raises ProgrammingError or ValueError
        raise StoreError(f"cannot {what}: bad URL {redact(url)}: {redact(str(exc))}") from None
    conn.adapters.register_loader("numeric", _numeric_loader())
    return conn
