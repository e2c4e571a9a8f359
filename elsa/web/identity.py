"""Who the web visitor is, and what they may see and do.

Two ways in, both configured in ``[web]``:

* a reverse proxy that authenticated the visitor sets ``user_header``
  (``REMOTE_USER``); the header is believed only from ``trusted_proxies``
  addresses, so a visitor who reaches the server directly cannot claim a name;
* the login form, checked against the system's accounts through PAM; the name
  is then kept in Flask's signed session cookie for ``session_hours``.

The visitor sees the jobs they own; root and members of ``admin_group`` see
every job and may act on jobs when ``actions`` is on — the rule elsad applies
to ``elsa-jobmng`` callers.
"""

from __future__ import annotations

import grp
import pwd
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Visitor:
    name: str
    uid: int
    admin: bool

    def may_see(self, owner_uid: Optional[int]) -> bool:
        return self.admin or (owner_uid is not None and owner_uid == self.uid)


def lookup(name: str, admin_group: str) -> Optional[Visitor]:
    """The :class:`Visitor` for account *name*, or None when there is no such account."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return Visitor(name=pw.pw_name, uid=pw.pw_uid, admin=_is_admin(pw, admin_group))


def _is_admin(pw: pwd.struct_passwd, admin_group: str) -> bool:
    if pw.pw_uid == 0:
        return True
    if not admin_group:
        return False
    try:
        g = grp.getgrnam(admin_group)
    except KeyError:
        return False
    return pw.pw_gid == g.gr_gid or pw.pw_name in g.gr_mem


def from_request(remote_addr: Optional[str], headers: Mapping[str, str],
                 session: Mapping[str, Any], web: Mapping[str, Any],
                 admin_group: str) -> Optional[Visitor]:
    """The visitor of one request, or None (not signed in)."""
    if remote_addr in web["trusted_proxies"]:
        name = headers.get(web["user_header"])
        if name:
            return lookup(name, admin_group)
    name = session.get("user")
    if name and session.get("expires", 0) > time.time():
        return lookup(name, admin_group)
    return None


def check_password(name: str, password: str, service: str) -> bool:
    """PAM authentication (needs root, or a PAM stack that lets this user check)."""
    import pam

    return bool(pam.authenticate(name, password, service=service))
