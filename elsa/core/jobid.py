"""64-bit job ids unique across hosts, state dirs, reboots and daemon restarts.

A job id is ``prefix << 32 | counter``, written everywhere as the zero-padded
hex string ``0x%016x`` (docs/jobid.md). As CSA's jobd did, the high half names
where the id was made and the low half is a persisted counter:

* The prefix (31 bits, so ids stay positive in SQLite's signed INTEGER) is a
  hash of the host's machine id and a random instance id created with the
  state dir. Two elsad instances with different state dirs on one host thus get
  different prefixes, and so do the hosts of a site. The state dir records the
  host it was created on: copied to another host (a cloned VM image), it draws
  a new instance id instead of repeating the first host's ids.
* The counter is reserved in blocks (one synchronous store write per block, not
  per job); after a crash the unused rest of a block is skipped, never reused.
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import Optional

from elsa.errors import StoreError

try:  # CPython's built-in SHA-256: same digest as hashlib's, without OpenSSL.
    from _sha2 import sha256  # 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # 3.9-3.11
    except ImportError:  # another implementation
        from hashlib import sha256
# hashlib.sha256 would load _hashlib, i.e. libcrypto: 3.6 MB of elsad's RSS
# budget for one hash at start-up.

BLOCK = 1024
COUNTER_BITS = 32
META_KEY = "jid_counter_reserved"
INSTANCE_KEY = "jid_instance"


def _host_seed(machine_id_path: str = "/etc/machine-id") -> str:
    """The machine id (systemd's stable per-install id), else the host name."""
    try:
        with open(machine_id_path) as fh:
            seed = fh.read().strip()
    except OSError:
        seed = ""
    return seed or socket.gethostname()


def _prefix(seed: str) -> int:
    digest = sha256(seed.encode()).digest()
    return (int.from_bytes(digest[:4], "big") & 0x7FFFFFFF) or 1


def host_id(machine_id_path: str = "/etc/machine-id") -> int:
    """31-bit id of the host alone: the prefix of state dirs created before
    instance ids existed (kept so their job ids continue)."""
    return _prefix(_host_seed(machine_id_path))


def instance_prefix(store, machine_id_path: str = "/etc/machine-id") -> int:
    """The job-id prefix of the state dir behind *store*, created on first use."""
    seed = _host_seed(machine_id_path)
    host_digest = sha256(seed.encode()).hexdigest()[:16]
    raw = store.get_meta(INSTANCE_KEY)
    if raw:
        try:
            saved = json.loads(raw)
            if saved.get("host") == host_digest:
                return int(saved["prefix"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: draw a new one below (a new prefix cannot repeat old ids)
        instance = uuid.uuid4().hex  # state dir copied from another host
        prefix = _prefix(f"{seed}/{instance}")
    elif int(store.get_meta(META_KEY, "0") or 0) > 0:
        instance, prefix = "host", host_id(machine_id_path)  # ids made before instance ids
    else:
        instance = uuid.uuid4().hex
        prefix = _prefix(f"{seed}/{instance}")
    store.set_meta_now(INSTANCE_KEY, json.dumps(
        {"prefix": prefix, "host": host_digest, "instance": instance}))
    return prefix


class JidAllocator:
    """Hands out job ids; persists the reserved counter through *store*."""

    def __init__(self, store, host: Optional[int] = None) -> None:
        self.store = store
        self.host = instance_prefix(store) if host is None else host
        reserved = int(store.get_meta(META_KEY, "0") or 0)
        self._next = reserved + 1  # ids up to `reserved` may have been handed out
        self._limit = reserved

    def next(self) -> int:
        if self._next > self._limit:
            new_limit = self._next + BLOCK - 1
            if new_limit >= 2 ** COUNTER_BITS:
                raise StoreError("job id counter exhausted for this state dir; "
                                 "start a new state_dir")
            self.store.set_meta_now(META_KEY, str(new_limit))
            self._limit = new_limit
        counter = self._next
        self._next += 1
        return (self.host << COUNTER_BITS) | counter

    def release(self) -> None:
        """At a clean stop: give back the unused rest of the block, so that the next
        start goes on from the last id handed out (a crash skips the rest)."""
        if self._next <= self._limit:
            self.store.set_meta_now(META_KEY, str(self._next - 1))
            self._limit = self._next - 1
