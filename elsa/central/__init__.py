"""Central store: a site-wide PostgreSQL that every node ships its records to."""

from __future__ import annotations

import socket
from typing import Any, Mapping


def node_name(section: Mapping[str, Any]) -> str:
    """This node's name in the central store and in exports: ``[central] host``,
    else the host name (socket.gethostname(); not getfqdn(), which gives
    "localhost" where /etc/hosts lists that name first)."""
    return str(section["host"] or socket.gethostname())
