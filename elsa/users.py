"""User names of uids, looked up in the passwd database once per uid per process."""

from __future__ import annotations

import pwd
from typing import Dict, Optional

_NAMES: Dict[int, Optional[str]] = {}


def passwd_name(uid: int) -> Optional[str]:
    """The passwd name of *uid*; None when the passwd database has no entry."""
    try:
        return _NAMES[uid]
    except KeyError:
        pass
    try:
        name: Optional[str] = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    _NAMES[uid] = name
    return name


def user_name(uid: Optional[int]) -> str:
    """What reports show for *uid*: its name, else the number, ``?`` when unknown."""
    if uid is None or uid < 0:
        return "?"
    name = passwd_name(uid)
    return str(uid) if name is None else name
