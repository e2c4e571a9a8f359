"""64-bit job ids unique across hosts, reboots and daemon restarts.

As CSA's jobd did: the high half is a host id, the low half a counter that is
persisted. The counter is reserved in blocks (one synchronous store write per
block, not per job); after a crash the unused rest of a block is skipped, never
reused. The host id keeps 31 bits so ids stay positive in SQLite's signed
64-bit INTEGER.
"""

from __future__ import annotations

import socket
from typing import Optional

from elsa.errors import StoreError

try:  # CPython's built-in SHA-256: same digest as hashlib's, without OpenSSL.
    from _sha2 import sha256  # 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # 3.9-3.11
    except ImportError:  # another implementation
        from hashlib import sha256
# hashlib.sha256 would load _hashlib, i.e. libcrypto: 3.6 MB of elsad's 40 MB
# RSS budget (issue 6) for one hash at start-up.

BLOCK = 1024
COUNTER_BITS = 32
META_KEY = "jid_counter_reserved"


def host_id(machine_id_path: str = "/etc/machine-id") -> int:
    """31-bit host id from the machine id (systemd's stable per-install id),
    falling back to the host name."""
    try:
        with open(machine_id_path) as fh:
            seed = fh.read().strip()
    except OSError:
        seed = ""
    if not seed:
        seed = socket.gethostname()
    digest = sha256(seed.encode()).digest()
    return (int.from_bytes(digest[:4], "big") & 0x7FFFFFFF) or 1


class JidAllocator:
    """Hands out job ids; persists the reserved counter through *store*."""

    def __init__(self, store, host: Optional[int] = None) -> None:
        self.store = store
        self.host = host_id() if host is None else host
        reserved = int(store.get_meta(META_KEY, "0") or 0)
        self._next = reserved + 1  # ids up to `reserved` may have been handed out
        self._limit = reserved

    def next(self) -> int:
        if self._next > self._limit:
            new_limit = self._next + BLOCK - 1
            if new_limit >= 2 ** COUNTER_BITS:
                raise StoreError("job id counter exhausted for this host id; "
                                 "start a new state_dir")
            self.store.set_meta_now(META_KEY, str(new_limit))
            self._limit = new_limit
        counter = self._next
        self._next += 1
        return (self.host << COUNTER_BITS) | counter
