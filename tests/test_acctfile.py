"""``elsa summary --acct-file``: the streamed numpy path (elsa/report/acctfile.py)
gives the same rows as the plain loop over the checked decoder, across chunk
boundaries, in both byte orders, and hands anything it cannot stream (mixed
byte order, corrupt records, colliding command names) to the general path."""

from __future__ import annotations

import random
from typing import Any, Dict, List

import pytest

from elsa.kernel import pacct
from elsa.report import acctfile

np = pytest.importorskip("numpy")


def _records(n: int, seed: int = 1, uid_max: int = 70000) -> List[pacct.AcctRecord]:
    rnd = random.Random(seed)
    comms = [f"cmd{k}" for k in range(40)] + ["sixteen-chars-xx", "ünï"]
    return [pacct.AcctRecord(
        offset=0, flag=rnd.choice((0, pacct.AFORK, pacct.ASU)), tty=0, exitcode=0,
        uid=rnd.choice((0, 1000, 1001, 65534, uid_max)), gid=0, pid=1000 + i, ppid=1,
        btime=1_700_000_000 + i, etime=float(rnd.randrange(0, 5000)),
        utime=rnd.randrange(0, 20000), stime=rnd.randrange(0, 300), mem=rnd.randrange(0, 90000),
        io=0, rw=0, minflt=rnd.randrange(0, 10000), majflt=rnd.randrange(0, 20),
        comm=rnd.choice(comms)) for i in range(n)]


def _loop_rows(paths: List[str], by: str) -> List[Dict[str, Any]]:
    rows = acctfile._loop([pacct.read_file(p, use_numpy=False) for p in paths], by)
    return sorted(rows, key=lambda r: str(r[by]))


def _summary(paths: List[str], by: str) -> List[Dict[str, Any]]:
    return sorted(acctfile.summarize(paths, by), key=lambda r: str(r[by]))


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("by", ["command", "user"])
def test_streamed_equals_loop_across_chunks(tmp_path, monkeypatch, by, big_endian):
    monkeypatch.setattr(acctfile, "CHUNK_RECORDS", 64)  # many chunks, a partial last one
    paths = []
    for k, n in enumerate((1000, 77)):
        p = tmp_path / f"pacct{k}"
        p.write_bytes(pacct.encode(_records(n, seed=k), big_endian=big_endian))
        paths.append(str(p))
    assert acctfile._streamed(paths, by) is not None  # the streamed path ran
    assert _summary(paths, by) == _loop_rows(paths, by)


@pytest.mark.parametrize("by", ["command", "user"])
def test_mixed_byte_order_goes_general_path(tmp_path, by):
    a, b = tmp_path / "le", tmp_path / "be"
    a.write_bytes(pacct.encode(_records(50, seed=3)))
    b.write_bytes(pacct.encode(_records(50, seed=4), big_endian=True))
    paths = [str(a), str(b)]
    assert acctfile._streamed(paths, by) is None
    assert _summary(paths, by) == _loop_rows(paths, by)


def test_corrupt_record_goes_general_path(tmp_path):
    data = bytearray(pacct.encode(_records(200)))
    data[64 * 10 + 1] = 0x7F  # a version byte no kernel writes
    p = tmp_path / "pacct"
    p.write_bytes(bytes(data))
    assert acctfile._streamed([str(p)], "command") is None
    rows = acctfile.summarize([str(p)], "command")
    assert rows and all(r.get("problems") for r in rows)


def test_large_uid_and_hash_collision_go_general_path(tmp_path, monkeypatch):
    p = tmp_path / "pacct"
    p.write_bytes(pacct.encode(_records(300, uid_max=4_000_000_000)))
    assert acctfile._streamed([str(p)], "user") is None
    assert _summary([str(p)], "user") == _loop_rows([str(p)], "user")
    # Every name in one hash slot: the collision check must notice.
    monkeypatch.setattr(acctfile, "_slot_of", lambda comm: np.zeros(len(comm), dtype=np.intp))
    assert acctfile._streamed([str(p)], "command") is None
    assert _summary([str(p)], "command") == _loop_rows([str(p)], "command")
