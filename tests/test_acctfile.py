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
    rows, problems = acctfile.summarize(paths, by)
    assert not problems
    return sorted(rows, key=lambda r: str(r[by]))


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
    rows, problems = acctfile.summarize([str(p)], "command")
    assert rows and len(problems) == 1
    assert problems[0].startswith(f"{p}: offset 640: not an acct record (version byte 0x7f")


def test_large_uid_and_hash_collision_go_general_path(tmp_path, monkeypatch):
    p = tmp_path / "pacct"
    p.write_bytes(pacct.encode(_records(300, uid_max=4_000_000_000)))
    assert acctfile._streamed([str(p)], "user") is None
    assert _summary([str(p)], "user") == _loop_rows([str(p)], "user")
    # Every name in one hash slot: the collision check must notice.
    monkeypatch.setattr(acctfile, "_slot_of", lambda comm: np.zeros(len(comm), dtype=np.intp))
    assert acctfile._streamed([str(p)], "command") is None
    assert _summary([str(p)], "command") == _loop_rows([str(p)], "command")


@pytest.mark.parametrize("use_numpy", [True, False])
@pytest.mark.parametrize("by", ["command", "user"])
def test_window_keeps_the_records_that_ended_in_it(tmp_path, monkeypatch, by, use_numpy):
    """[since, until) on btime + etime, as the store's windows (tests/test_report.py)."""
    if not use_numpy:
        monkeypatch.setattr(pacct, "_numpy", None)
    monkeypatch.setattr(acctfile, "CHUNK_RECORDS", 64)
    recs = _records(500)
    p = tmp_path / "pacct"
    p.write_bytes(pacct.encode(recs))
    ends = sorted(r.btime + r.etime / pacct.AHZ for r in recs)
    since, until = ends[100], ends[300]  # a record ends exactly at each bound
    kept = [r for r in recs if since <= r.btime + r.etime / pacct.AHZ < until]
    q = tmp_path / "kept"
    q.write_bytes(pacct.encode(kept))
    rows, problems = acctfile.summarize([str(p)], by, since, until)
    want, _ = acctfile.summarize([str(q)], by)
    assert not problems and len(kept) == 200
    key = lambda r: str(r[by])  # noqa: E731
    assert sorted(rows, key=key) == sorted(want, key=key)
    # The checked decoder's path (a corrupt record first) applies the same window.
    data = bytearray(p.read_bytes())
    data[1] = 0x7F
    p.write_bytes(bytes(data))
    rows, problems = acctfile.summarize([str(p)], by, since, until)
    assert len(problems) == 1 and sorted(rows, key=key) == sorted(want, key=key)


@pytest.mark.parametrize("by", ["command", "user"])
def test_gzip_files_are_read_like_plain_ones(tmp_path, monkeypatch, by):
    import gzip

    monkeypatch.setattr(acctfile, "CHUNK_RECORDS", 64)
    plain = tmp_path / "pacct"
    plain.write_bytes(pacct.encode(_records(700)))
    gz = tmp_path / "pacct.1.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert acctfile._streamed([str(gz)], by) is not None
    assert _summary([str(gz)], by) == _summary([str(plain)], by)
    dec = pacct.read_file(str(gz))
    assert dec.count == 700 and not dec.problems
    # A damaged compressed file: the records before the damage, and a problem naming it.
    gz.write_bytes(gz.read_bytes()[:len(gz.read_bytes()) // 2])
    rows, problems = acctfile.summarize([str(gz)], by)
    assert rows and 0 < sum(r["processes"] for r in rows) < 700
    assert any(f"{gz}: offset" in p and "compressed data damaged" in p for p in problems)
