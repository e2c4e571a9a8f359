"""Small JSON state files (a follower's position, bsdacct's previous.json): read as
one object or nothing, written atomically and durably."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional


def read_object(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in *path*; None when it is absent, unreadable or not an object."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomic(path: str, data: Dict[str, Any]) -> None:
    """Write *data* to *path* so that a crash leaves the old file or the new one,
    never a torn one, and the new one survives a power loss once this returns."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
