"""`elsa import-acct` against hostile input: impossible values and a v2 file
(whose bytes the resynchronisation could misread as v3 records) are reported
with file and offset and skipped; every good record is kept."""

from __future__ import annotations

import math
import sqlite3
import struct
import subprocess
import sys

import pytest

from elsa.kernel import pacct

BOTH = [False, True] if pacct.np is not None else [False]
T0 = 1_700_000_000


def _raw(pid=4242, ppid=1, btime=T0, etime=250.0, version=3, comm=b"good") -> bytes:
    return struct.pack("<BBHIIIIIIf8H16s", 0, version, 0, 0, 1000, 100, pid, ppid, btime,
                       etime, 100, 50, 100, 0, 0, 3, 0, 0, comm)


def _v2(i: int) -> bytes:
    """A struct acct (v2) record (docs/kernel.md, "BSD accounting"; 64 bytes): comp_t
    times and 16-bit ids up front, the 32-bit ids at the end."""
    return struct.pack("<BBHHHIHHHHHHHHHI17sBII", 0, 2, 1000, 100, 0, T0 + i, 0x0303, 3,
                       0x2303, 0x0303, 0, 0, 0x0303, 3, 0, 0x0300, b"v2cmd\3\3\3",
                       0, 1000, 100)


BAD = {  # index in the file -> the record that replaces a good one
    3: _raw(etime=math.nan, comm=b"nan"),
    7: _raw(etime=math.inf, comm=b"inf"),
    11: _raw(btime=4_290_000_000, comm=b"y2106"),
    15: _raw(pid=4_245_784_576 & 0xFFFFFFFF, comm=b"bigpid"),
    19: _raw(etime=1.8e31, comm=b"huge"),
}


def _file(tmp_path, n=26):
    data = b"".join(BAD.get(i, _raw(pid=1000 + i, btime=T0 + i)) for i in range(n))
    f = tmp_path / "pacct"
    f.write_bytes(data)
    return f, n - len(BAD)


@pytest.mark.parametrize("use_numpy", BOTH)
def test_decoder_reports_and_skips_implausible_records(tmp_path, use_numpy):
    f, good = _file(tmp_path)
    dec = pacct.decode(f.read_bytes(), path=str(f), use_numpy=use_numpy)
    assert dec.count == good
    assert {r.comm for r in dec.records()} == {"good"}
    msgs = [p.message for p in dec.problems]
    assert len(msgs) == len(BAD)
    for i, m in zip(sorted(BAD), msgs):
        assert m.startswith(f"{f}: offset {i * 64}: ") and "skipped" in m


def test_import_acct_keeps_every_good_record(tmp_path):
    f, good = _file(tmp_path)
    v2 = tmp_path / "pacct-v2"
    v2.write_bytes(b"".join(_v2(i) for i in range(50)))
    db = tmp_path / "state" / "elsa.db"
    r = subprocess.run([sys.executable, "-m", "elsa.report.cli", "import-acct", "--db", str(db),
                        str(f), str(v2)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    assert f"{f}: offset {3 * 64}:" in r.stderr
    assert "v2" in r.stderr
    rows = sqlite3.connect(str(db)).execute(
        "SELECT comm, pid FROM proc_usage").fetchall()
    assert sorted(rows) == sorted(("good", 1000 + i) for i in range(26) if i not in BAD)
