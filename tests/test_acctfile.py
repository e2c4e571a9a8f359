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


@pytest.mark.parametrize("bad,why", [
    ({"pid": pacct.PID_MAX + 1}, "beyond the kernel's limit"),
    ({"etime": -5.0}, "elapsed time -5.0 ticks is not plausible"),
    ({"btime": 4_000_000_000}, "in the future of this host's clock"),
])
@pytest.mark.parametrize("by", ["command", "user"])
def test_implausible_record_left_out_by_every_path(tmp_path, monkeypatch, by, bad, why):
    """A record the checked decoder drops as implausible (pacct.implausible) is not
    counted by the fast readers either: the same totals and the same problem."""
    import dataclasses

    monkeypatch.setattr(acctfile, "CHUNK_RECORDS", 64)
    recs = _records(300)
    recs[150] = dataclasses.replace(recs[150], **bad)
    p = tmp_path / "pacct"
    p.write_bytes(pacct.encode(recs))
    clean = tmp_path / "clean"
    clean.write_bytes(pacct.encode(recs[:150] + recs[151:]))
    assert acctfile._streamed([str(p)], by) is None
    assert acctfile._fast_columns([str(p)]) is None
    rows, problems = acctfile.summarize([str(p)], by)
    assert sorted(rows, key=lambda r: str(r[by])) == _loop_rows([str(p)], by) \
        == _summary([str(clean)], by)
    assert len(problems) == 1 and problems[0].startswith(f"{p}: offset {150 * 64}: ")
    assert why in problems[0] and problems[0].endswith("; record skipped")


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


def test_plausibility_bounds_agree_with_the_rule():
    """pacct.any_implausible (the fast readers' bounds, then the rule) says what
    pacct.implausible(...).any() says, on values at and beyond every limit; and
    pacct._implausible (the struct decoder's, one record) agrees with both."""
    now = 1_800_000_000.0
    latest = now + pacct.FUTURE_SLACK_S
    ok = (1000, 1, 1_700_000_000, 100.0)
    edge = [(0, 1, 1_700_000_000, 1.0), (1, 0, 0, 0.0), (pacct.PID_MAX, pacct.PID_MAX, 0, 0.0),
            (pacct.PID_MAX + 1, 1, 0, 0.0), (1, pacct.PID_MAX + 1, 0, 0.0),
            (1, 1, 0, -0.0), (1, 1, 0, -1.0), (1, 1, 0, float("nan")), (1, 1, 0, float("inf")),
            (1, 1, 0, pacct.MAX_ELAPSED_S * pacct.AHZ),
            (1, 1, 0, pacct.MAX_ELAPSED_S * pacct.AHZ * 1.0001),
            (1, 1, int(latest), 0.0), (1, 1, int(latest) + 1, 0.0),
            (1, 1, int(latest) - 10, 1000.0), (1, 1, int(latest) - 10, 1100.0),
            (2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1, 3e38)]
    for recs in [[e] for e in edge] + [[ok, e] for e in edge] + [[ok], edge]:
        for kind in ("u4", np.int64):  # the structured view's and the decoder's columns
            pid, ppid, btime = (np.array([r[i] for r in recs], dtype=kind) for i in range(3))
            etime = np.array([r[3] for r in recs], dtype=np.float32)
            want = bool(pacct.implausible(pid, ppid, btime, etime, now).any())
            assert pacct.any_implausible(pid, ppid, btime, etime, now) is want, recs
    for pid_, ppid_, btime_, et in edge:  # the struct decoder's form, one record
        one = pacct.implausible(np.array([pid_]), np.array([ppid_]), np.array([btime_]),
                                np.array([et], dtype=np.float32), now)
        assert bool(pacct._implausible(pid_, ppid_, btime_, float(np.float32(et)), latest)) \
            is bool(one[0]), (pid_, ppid_, btime_, et)
    assert not pacct.any_implausible(*(np.zeros(0, dtype="u4"),) * 3,
                                     np.zeros(0, dtype=np.float32), now)


def _sa(path: str, by: str) -> Dict[str, List[float]]:
    """GNU sa's rows (-l -j: per call, seconds) as name -> [count, re, u, s, k]
    totals; a command that forked without exec (sa's `name*`) is folded into
    its name."""
    import subprocess

    mode = "-a" if by == "command" else "-m"
    out = subprocess.run(["sa", "-i", "-l", "-j", mode, path], capture_output=True,
                         text=True, check=True).stdout
    rows: Dict[str, List[float]] = {}
    for line in out.splitlines()[1:]:  # the first line is the total
        f = line.split()  # count re u s avio k name, or name count re u s avio k
        name, f = (f[-1].rstrip("*"), f[:-1]) if by == "command" else (f[0], f[1:])
        n = float(f[0])
        re_, u, s, k = (float(x.rstrip("reusk")) for x in (f[1], f[2], f[3], f[5]))
        a = rows.setdefault(name, [0.0] * 5)
        for i, v in enumerate((n, re_ * n, u * n, s * n, k * n)):
            a[i] += v
    return rows


@pytest.mark.skipif(__import__("shutil").which("sa") is None, reason="needs GNU acct's sa")
@pytest.mark.parametrize("by", ["command", "user"])
def test_figures_agree_with_gnu_sa(tmp_path, by):
    # docs/accounting.md ("Against GNU sa"): sa -a's / sa -m's rows, the same
    # counts and times to sa's printed precision, AVGMEM 4 x sa's k.
    kernel_file = str(__import__("pathlib").Path(__file__).parent / "data" / "pacct_kernel.bin")
    files = [kernel_file]
    if by == "command":  # large comp_t values too (exponents above 0)
        big = tmp_path / "big"
        big.write_bytes(pacct.encode(_records(300, seed=7)))
        files.append(str(big))
    theirs = {}
    for f in files:
        for name, a in _sa(f, by).items():
            t = theirs.setdefault(name, [0.0] * 5)
            for i, v in enumerate(a):
                t[i] += v
    rows, problems = acctfile.summarize(files, by)
    assert not problems
    assert {str(r[by]) for r in rows} == set(theirs)
    for r in rows:
        n, re_, u, s, k = theirs[str(r[by])]
        slack = 0.005 * n + 1e-6  # sa prints per call to 0.01 s
        assert r["processes"] == n
        assert abs(r["elapsed_us"] / 1e6 - re_) <= slack
        assert abs(r["cpu_user_us"] / 1e6 - u) <= slack
        assert abs(r["cpu_system_us"] / 1e6 - s) <= slack
        assert abs(r["avg_mem_kb"] / 4 - k / n) <= 0.75  # both rounded
