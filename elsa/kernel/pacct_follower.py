"""Following a pacct file as the kernel appends to it, across rotations: where to
resume after a restart, and which file a rotation left to finish. The records
themselves are decoded by :mod:`elsa.kernel.pacct`, the only module that knows
their layout.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from elsa.errors import AccountingFormatError
from elsa.jsonfile import read_object, write_atomic
from elsa.kernel.pacct import decode, usage_rows


class PacctFollower:
    """Follows a pacct file as the kernel appends to it, across rotations.

    The position (device, inode, offset) is persisted as JSON in *state_path*
    only when the caller :meth:`commit`\\ s it, i.e. after the records read so
    far were handed on; a restart resumes there, so nothing is lost. Records
    handed on but not yet committed may be read again after a crash; the store
    ignores a process record it already holds (unique key), so nothing is
    counted twice either.

    A partial record at the end is left unread until the rest arrives. When
    the followed path names a new file (external rotation) or :meth:`switch_to`
    is called (managed rotation), the old file is read to its end first.
    """

    def __init__(self, path: str, state_path: Optional[str] = None, *,
                 chunk: int = 4 * 1024 * 1024) -> None:
        self.path = path
        self.state_path = state_path
        self.chunk = chunk
        self._fh: Optional[Any] = None
        self._ident: Optional[Tuple[int, int]] = None
        self.offset = 0
        self._committed: Dict[str, Any] = {}
        self.problems: List[AccountingFormatError] = []
        self.records_read = 0
        self.bytes_skipped = 0
        self._load_state()

    # -- state ---------------------------------------------------------------------
    def _load_state(self) -> None:
        if not self.state_path:
            return
        st = read_object(self.state_path)
        if st is None:
            return  # none, or unreadable: start at the current file's beginning
        self._committed = st
        want = (int(st.get("dev", -1)), int(st.get("inode", -1)))
        offset = int(st.get("offset", 0))
        # The file we were reading may have been rotated away: find it by inode
        # beside the followed path (pacct.0, pacct.1, ...) and finish it first.
        for cand in [st.get("path", self.path), self.path] + _siblings(self.path):
            try:
                s = os.stat(cand)
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == want:
                self._open(cand, offset)
                return

    def position(self) -> Dict[str, Any]:
        """The current position, for :meth:`commit`."""
        if self._ident is None:
            return {"path": self.path, "dev": -1, "inode": -1, "offset": 0}
        return {"path": self._fh.name if self._fh else self.path, "dev": self._ident[0],
                "inode": self._ident[1], "offset": self.offset}

    def commit(self, pos: Optional[Dict[str, Any]] = None) -> None:
        """Persist *pos* (default: the current position) atomically."""
        pos = pos or self.position()
        if not self.state_path or pos == self._committed:
            return
        write_atomic(self.state_path, pos)
        self._committed = dict(pos)

    # -- reading ---------------------------------------------------------------------
    def _open(self, path: str, offset: int) -> bool:
        try:
            fh = open(path, "rb")
        except OSError:
            return False
        if self._fh is not None:
            self._fh.close()
        s = os.fstat(fh.fileno())
        self._fh = fh
        self._ident = (s.st_dev, s.st_ino)
        if offset > s.st_size:
            offset = 0  # truncated in place (copytruncate): start over
        self.offset = offset
        return True

    def switch_to(self, path: str, rows: Optional[str] = None) -> List[Any]:
        """Finish the current file, then follow *path* from its start."""
        out = self.read(final=True, rows=rows)
        self.path = path
        self._open(path, 0)
        return out

    def read(self, final: bool = False, rows: Optional[str] = None) -> List[Any]:
        """Records appended since the last call (the file may have been rotated):
        :class:`AcctRecord` values, or with *rows* (a source name) usage rows
        (:func:`usage_rows`, the daemon's hot path)."""
        out: List[Any] = []
        if self._fh is None and not self._open(self.path, 0):
            return out
        while True:
            out.extend(self._drain(final, rows))
            # Did the followed path start naming another file? Finish the old one
            # (done above, to its end) and move on.
            try:
                s = os.stat(self.path)
            except OSError:
                return out
            if self._ident == (s.st_dev, s.st_ino):
                if s.st_size < self.offset:  # truncated in place
                    self.offset = 0
                    continue
                return out
            out.extend(self._drain(True, rows))
            if not self._open(self.path, 0):
                return out

    def _drain(self, final: bool, rows: Optional[str] = None) -> List[Any]:
        assert self._fh is not None
        out: List[Any] = []
        while True:
            self._fh.seek(self.offset)
            data = self._fh.read(self.chunk)
            if not data:
                return out
            last = len(data) < self.chunk
            dec = decode(data, path=self._fh.name, base_offset=self.offset,
                         final=final and last)
            out.extend(dec.records() if rows is None else usage_rows(dec, rows))
            self.problems.extend(dec.problems)
            self.records_read += dec.count
            if dec.consumed == 0:
                return out  # only a partial record so far: wait for the rest
            self.offset += dec.consumed
            if last:
                return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _siblings(path: str) -> List[str]:
    d, base = os.path.split(path)
    try:
        names = os.listdir(d or ".")
    except OSError:
        return []
    return [os.path.join(d, n) for n in sorted(names) if n.startswith(base) and n != base]
