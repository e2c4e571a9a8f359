"""A compact pid -> int map: the job manager's membership index.

elsad must track 100,000+ live processes in a 40 MB RSS budget (issue 6). A dict
costs ~118 B per process here (its table, plus a 32-byte int object for the key
and one for the value); this open-addressing table keeps both in flat arrays,
12 bytes a slot at a load of at most 1/2, i.e. 24-48 B per process.

Its lookups run in Python, though, on the event path for every fork and exit
on the machine: a probe costs 0.1-0.4 µs where a dict's costs 0.03-0.05 µs
(~0.4 µs per process started, of elsad's ~11 on the event thread; issue 18). Up
to :data:`DICT_MAX` entries, where memory does not matter (~0.5 MB), the index
is therefore a plain dict; above it, the arrays; back to a dict below a quarter
of it (hysteresis: no switching back and forth at the boundary).

Linear probing with backward-shift deletion (no tombstones, so a storm of
forks and exits never degrades lookups). Keys are pids, which the kernel hands
out sequentially: the multiplicative hash spreads a run of consecutive pids over
the table instead of letting it form one long probe sequence.
"""

from __future__ import annotations

from array import array
from typing import Dict, Iterator, List, Optional, Tuple

# Knuth's multiplicative constant (odd): multiplying by it permutes the low bits,
# so consecutive pids land far apart.
_MUL = 2654435761
_MIN_SIZE = 1024
_EMPTY = 0  # pid 0 is the idle task: never a job member
#: The most entries kept in a dict (see the module docstring).
DICT_MAX = 4096


class PidIndex:
    """Map pid (1 .. 2**32-1) -> unsigned 64-bit value, with the dict methods the
    manager uses. Not thread-safe: the manager runs on the event thread."""

    __slots__ = ("_keys", "_vals", "_mask", "_used", "_dict")

    def __init__(self) -> None:
        self._dict: Optional[Dict[int, int]] = {}
        self._alloc(_MIN_SIZE)

    def _alloc(self, size: int) -> None:
        self._keys = array("I", bytes(4 * size))
        self._vals = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._used = 0

    def _resize(self, size: int) -> None:
        keys, vals = self._keys, self._vals
        self._alloc(size)
        for k, v in zip(keys, vals):
            if k:
                self[k] = v

    def _to_arrays(self) -> None:
        d = self._dict
        assert d is not None
        size = _MIN_SIZE
        while size < 2 * len(d):
            size *= 2
        self._dict = None
        self._alloc(size)
        for k, v in d.items():
            self[k] = v

    def _to_dict(self) -> None:
        d = {k: v for k, v in zip(self._keys, self._vals) if k}
        self._alloc(_MIN_SIZE)
        self._dict = d

    def __len__(self) -> int:
        d = self._dict
        return self._used if d is None else len(d)

    def __bool__(self) -> bool:
        return len(self) > 0

    def _slot(self, pid: int) -> int:
        """The slot holding *pid*, or the empty slot ending its probe run (where
        it would go). Array mode only; the dict mode, where the event path runs
        below DICT_MAX members, does not pay for this call."""
        keys, mask = self._keys, self._mask
        i = pid * _MUL & mask
        while True:
            k = keys[i]
            if k == pid or k == _EMPTY:
                return i
            i = (i + 1) & mask

    def _fill(self, i: int, pid: int, value: int) -> None:
        """Put *pid* into empty slot *i* (from :meth:`_slot`), growing past half full."""
        self._keys[i] = pid
        self._vals[i] = value
        self._used += 1
        if self._used * 2 > self._mask + 1:
            self._resize((self._mask + 1) * 2)

    def _dict_grew(self, d: Dict[int, int]) -> None:
        if len(d) > DICT_MAX:
            self._to_arrays()

    def get(self, pid: int, default: Optional[int] = None) -> Optional[int]:
        d = self._dict
        if d is not None:
            return d.get(pid, default)
        i = self._slot(pid)
        return self._vals[i] if self._keys[i] == pid else default

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, int) and pid > 0 and self.get(pid) is not None

    def __getitem__(self, pid: int) -> int:
        v = self.get(pid)
        if v is None:
            raise KeyError(pid)
        return v

    def __setitem__(self, pid: int, value: int) -> None:
        if pid <= 0:
            raise ValueError(f"pid must be positive, not {pid}")
        d = self._dict
        if d is not None:
            d[pid] = value
            self._dict_grew(d)
            return
        i = self._slot(pid)
        if self._keys[i] == pid:
            self._vals[i] = value
        else:
            self._fill(i, pid, value)

    def insert(self, pid: int, value: int) -> Optional[int]:
        """Map *pid* to *value* unless it is mapped already; returns the value
        it had (then unchanged), or None. One probe for the event path's
        "look up, then add" (a fork's child)."""
        if pid <= 0:
            raise ValueError(f"pid must be positive, not {pid}")
        d = self._dict
        if d is not None:
            old = d.get(pid)
            if old is None:
                d[pid] = value
                self._dict_grew(d)
            return old
        i = self._slot(pid)
        if self._keys[i] == pid:
            return self._vals[i]
        self._fill(i, pid, value)
        return None

    def pop(self, pid: int, default: Optional[int] = None) -> Optional[int]:
        d = self._dict
        if d is not None:
            return d.pop(pid, default)
        keys, vals, mask = self._keys, self._vals, self._mask
        i = self._slot(pid)
        if keys[i] != pid:
            return default
        value = vals[i]
        # Backward shift: pull later entries of the probe run into the hole when
        # their home slot does not lie cyclically in (hole, their slot].
        j = i
        while True:
            j = (j + 1) & mask
            k = keys[j]
            if k == _EMPTY:
                break
            home = k * _MUL & mask
            if (i < home <= j) if i <= j else (home > i or home <= j):
                continue
            keys[i] = k
            vals[i] = vals[j]
            i = j
        keys[i] = _EMPTY
        vals[i] = 0
        self._used -= 1
        if self._used <= DICT_MAX // 4:
            self._to_dict()
        else:
            size = mask + 1
            if size > _MIN_SIZE and self._used * 8 < size:
                self._resize(size // 2)  # give the memory of a past storm back
        return value

    def __delitem__(self, pid: int) -> None:
        if self.pop(pid) is None:
            raise KeyError(pid)

    def items(self) -> List[Tuple[int, int]]:
        """(pid, value) pairs, as a list: safe to mutate the index while looping."""
        d = self._dict
        if d is not None:
            return list(d.items())
        return [(k, v) for k, v in zip(self._keys, self._vals) if k]

    def __iter__(self) -> Iterator[int]:
        d = self._dict
        if d is not None:
            return iter(list(d))
        return iter([k for k in self._keys if k])
