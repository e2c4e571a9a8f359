"""pacct (acct v3) decoder and follower: golden samples, GNU dump-acct agreement,
corrupt inputs, and following a growing file across restarts."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from elsa.kernel import pacct
from elsa.kernel.pacct import AcctRecord, decode, decode_comp_t, encode_comp_t
from elsa.kernel.pacct_follower import PacctFollower

DATA = Path(__file__).parent / "data"
HAVE_NUMPY = pacct.np is not None
BOTH = [False, True] if HAVE_NUMPY else [False]


def _raw(flag=0, version=3, tty=0, exitcode=0, uid=1000, gid=100, pid=4242, ppid=1,
         btime=1_700_000_000, etime=250.0, utime=0x0064, stime=0x0032, mem=0x2000 | 100,
         io=0, rw=0, minflt=300, majflt=2, swaps=0, comm=b"golden", order="<") -> bytes:
    """One record packed independently of pacct.encode (comp_t values given raw)."""
    return struct.pack(order + "BBHIIIIIIf8H16s", flag, version, tty, exitcode, uid, gid, pid,
                       ppid, btime, etime, utime, stime, mem, io, rw, minflt, majflt, swaps, comm)


# -- comp_t ----------------------------------------------------------------------------------

def test_comp_t_decoding_examples():
    assert decode_comp_t(0) == 0
    assert decode_comp_t(0x1FFF) == 8191
    assert decode_comp_t(0x2000 | 100) == 800          # exponent 1: x8
    assert decode_comp_t((7 << 13) | 0x1FFF) == 8191 << 21


@pytest.mark.parametrize("value", [0, 1, 8191, 8192, 8195, 8196, 65535, 10**6, 123456789])
def test_comp_t_round_trip_within_kernel_precision(value):
    # 13-bit mantissa, shifted 3 bits at a time: the error stays below one
    # unit of the last shift, i.e. under 1/1024 of the value (or exact).
    got = decode_comp_t(encode_comp_t(value))
    assert abs(got - value) <= max(0, value / 1024)


# -- golden records ----------------------------------------------------------------------------

@pytest.mark.parametrize("use_numpy", BOTH)
@pytest.mark.parametrize("order", ["<", ">"])
def test_golden_record_both_byte_orders(use_numpy, order):
    version = 3 if order == "<" else 0x83  # ACCT_BYTEORDER marks a big-endian writer
    data = _raw(order=order, version=version, flag=pacct.AFORK | pacct.AXSIG, exitcode=9)
    dec = decode(data, use_numpy=use_numpy)
    assert dec.problems == []
    (r,) = dec.records()
    assert (r.pid, r.ppid, r.uid, r.gid, r.btime) == (4242, 1, 1000, 100, 1_700_000_000)
    assert (r.utime, r.stime, r.mem, r.minflt, r.majflt) == (100, 50, 800, 300, 2)
    assert r.etime == 250.0 and r.comm == "golden" and r.flag == 0x11 and r.exitcode == 9
    assert r.big_endian is (order == ">")
    u = r.to_usage()
    # AHZ = 100: one tick is 10 ms; ac_mem is KiB (not pages, unlike GNU sa).
    assert (u.cpu_user_us, u.cpu_system_us, u.elapsed_us) == (1_000_000, 500_000, 2_500_000)
    assert u.max_vm_kb == 800 and u.start_time == 1_700_000_000 and u.end_time == 1_700_000_002.5


def test_numpy_and_struct_paths_agree_on_kernel_file():
    if not HAVE_NUMPY:
        pytest.skip("numpy not installed")
    a = pacct.read_file(str(DATA / "pacct_kernel.bin"), use_numpy=True)
    b = pacct.read_file(str(DATA / "pacct_kernel.bin"), use_numpy=False)
    assert a.problems == b.problems == []
    assert a.records() == b.records()
    assert a.count == 56


def _parse_dump_acct(text: str) -> List[List[str]]:
    return [[f.strip() for f in line.split("|")] for line in text.splitlines() if line.strip()]


def _compare_with_dump_acct(recs: List[AcctRecord], lines: List[List[str]]) -> None:
    assert len(recs) == len(lines)
    letters = {"F": pacct.AFORK, "S": pacct.ASU, "C": pacct.ACORE, "X": pacct.AXSIG}
    for r, f in zip(recs, lines):
        comm, ver, ut, st, et, uid, gid, mem, io, pid, ppid, flags, ex, _tty, btime = f
        assert comm == r.comm and ver == "v3"
        assert float(ut) == r.utime and float(st) == r.stime
        assert float(et) == pytest.approx(r.etime, abs=0.005)
        assert (int(uid), int(gid), int(pid), int(ppid)) == (r.uid, r.gid, r.pid, r.ppid)
        assert float(mem) == r.mem and float(io) == r.io
        want = sum(bit for ch, bit in letters.items() if ch in flags)
        assert want == r.flag & (pacct.AFORK | pacct.ASU | pacct.ACORE | pacct.AXSIG)
        assert int(ex) == r.exitcode >> 8  # dump-acct prints the exit status byte
        assert btime == time.ctime(r.btime)


def test_golden_kernel_file_matches_recorded_dump_acct_output():
    """tests/data/pacct_kernel.bin was written by this kernel (acct v3, 6.18);
    pacct_kernel.dump-acct.txt is GNU acct 6.6.4's dump-acct of it (TZ=UTC)."""
    os.environ["TZ"] = "UTC"
    time.tzset()
    recs = pacct.read_file(str(DATA / "pacct_kernel.bin")).records()
    _compare_with_dump_acct(recs, _parse_dump_acct(
        (DATA / "pacct_kernel.dump-acct.txt").read_text()))


# -- corrupt inputs ------------------------------------------------------------------------------

def _good(n: int, start_pid: int = 100) -> bytes:
    return b"".join(_raw(pid=start_pid + i) for i in range(n))


@pytest.mark.parametrize("use_numpy", BOTH)
def test_truncated_file_keeps_every_whole_record(use_numpy):
    data = _good(5) + _raw(pid=999)[:40]
    dec = decode(data, path="/x/pacct", use_numpy=use_numpy)
    assert [r.pid for r in dec.records()] == [100, 101, 102, 103, 104]
    (p,) = dec.problems
    assert "/x/pacct" in p.message and "offset 320" in p.message and "truncated" in p.message


@pytest.mark.parametrize("use_numpy", BOTH)
@pytest.mark.parametrize("junk", [b"\xff" * 64, b"\xee" * 10, b"\x00\x07" * 37])
def test_garbage_in_the_middle_resynchronises(use_numpy, junk):
    data = _good(3) + junk + _good(4, start_pid=200)
    dec = decode(data, path="/x/pacct", use_numpy=use_numpy)
    assert [r.pid for r in dec.records()] == [100, 101, 102, 200, 201, 202, 203]
    assert len(dec.problems) == 1
    msg = dec.problems[0].message
    assert "offset 192" in msg and f"skipped {len(junk)} bytes" in msg
    assert f"offset {192 + len(junk)}" in msg  # where decoding resumed


@pytest.mark.parametrize("use_numpy", BOTH)
def test_wrong_version_is_refused_by_name(use_numpy):
    data = _raw(version=2) * 3
    dec = decode(data, path="/x/old", use_numpy=use_numpy)
    assert dec.records() == []
    assert "v2 (struct acct" in dec.problems[0].message and "/x/old" in dec.problems[0].message
    assert "offset 0" in dec.problems[0].message
    # A v2 record in the middle of a v3 file: named too, the rest kept.
    dec = decode(_good(2) + _raw(version=2) + _good(2, 300), use_numpy=use_numpy)
    assert [r.pid for r in dec.records()] == [100, 101, 300, 301]
    assert "v2" in dec.problems[0].message and "offset 128" in dec.problems[0].message


@pytest.mark.parametrize("use_numpy", BOTH)
def test_foreign_byte_order_record_is_decoded_and_reported(use_numpy):
    data = _good(2) + _raw(order=">", version=0x83, pid=777) + _good(1, 300)
    dec = decode(data, path="/x/mixed", use_numpy=use_numpy)
    assert [r.pid for r in dec.records()] == [100, 101, 777, 300]
    (p,) = dec.problems
    assert "offset 128" in p.message and "big-endian" in p.message


def test_partial_record_waits_when_not_final():
    dec = decode(_good(2) + _raw(pid=5)[:20], final=False)
    assert dec.count == 2 and dec.consumed == 128 and dec.problems == []


# -- following -----------------------------------------------------------------------------------

def test_follower_waits_for_partial_record_and_resumes_after_restart(tmp_path):
    f = tmp_path / "pacct"
    state = str(tmp_path / "state.json")
    rec = [_raw(pid=1000 + i) for i in range(10)]
    f.write_bytes(b"".join(rec[:3]) + rec[3][:30])
    fol = PacctFollower(str(f), state)
    assert [r.pid for r in fol.read()] == [1000, 1001, 1002]
    fol.commit()
    with open(f, "ab") as fh:
        fh.write(rec[3][30:] + rec[4])
    assert [r.pid for r in fol.read()] == [1003, 1004]
    # Crash before committing: the next instance re-reads 1003/1004 (the
    # store's unique key drops the repeats); nothing is lost.
    fol.close()
    with open(f, "ab") as fh:
        fh.write(b"".join(rec[5:]))
    fol2 = PacctFollower(str(f), state)
    assert [r.pid for r in fol2.read()] == list(range(1003, 1010))
    fol2.commit()
    fol2.close()
    fol3 = PacctFollower(str(f), state)
    assert fol3.read() == []


def test_follower_finishes_a_rotated_file_then_follows_the_new_one(tmp_path):
    f = tmp_path / "pacct"
    state = str(tmp_path / "state.json")
    f.write_bytes(_good(2))
    fol = PacctFollower(str(f), state)
    assert len(fol.read()) == 2
    fol.commit()
    with open(f, "ab") as fh:
        fh.write(_good(1, 500))        # written before the rotation, not yet read
    os.rename(f, tmp_path / "pacct.0")  # logrotate-style rename, new file created
    f.write_bytes(_good(2, 600))
    assert [r.pid for r in fol.read()] == [500, 600, 601]
    # Restart pointing at the rotated file's inode: found beside the path.
    fol.close()
    fol2 = PacctFollower(str(f), state)  # state still names pacct.0 @ 128
    assert [r.pid for r in fol2.read()] == [500, 600, 601]


# -- live kernel ---------------------------------------------------------------------

@pytest.fixture
def kernel_acct(tmp_path):
    """Switch kernel accounting to a temp file; restore what was there after."""
    from elsa_plugins.bsdacct import BsdAcctSource, _libc_acct

    previous = BsdAcctSource()._probe(["/var/log/account/pacct", "/var/account/pacct"])
    path = tmp_path / "pacct"
    path.touch()
    _libc_acct(str(path))
    try:
        yield path
    finally:
        _libc_acct(previous)


@pytest.mark.root
@pytest.mark.skipif(shutil.which("dump-acct") is None, reason="GNU acct not installed")
def test_live_kernel_file_agrees_with_dump_acct_field_for_field(kernel_acct):
    subprocess.run(["sh", "-c", "exit 3"])
    subprocess.run(["sh", "-c", "kill -9 $$"])
    big = subprocess.Popen(["python3", "-c", "import os\nx = bytearray(40_000_000)\n"
                            "sum(range(3_000_000))\nos._exit(0)"])
    big.wait()
    from elsa_plugins.bsdacct import _libc_acct

    _libc_acct(None)  # close the file so every record is in
    env = dict(os.environ, TZ="UTC")
    out = subprocess.run(["dump-acct", str(kernel_acct)], capture_output=True, text=True,
                         env=env, check=True).stdout
    os.environ["TZ"] = "UTC"
    time.tzset()
    dec = pacct.read_file(str(kernel_acct))
    assert dec.problems == []
    _compare_with_dump_acct(dec.records(), _parse_dump_acct(out))
    (mine,) = [r for r in dec.records() if r.pid == big.pid]
    # ac_mem is the virtual size in KiB at exit: the 40 MB bytearray is in it
    # (GNU sa, reading it as pages, would report a quarter).
    assert mine.mem > 40_000_000 // 1024
    assert mine.utime > 0 and mine.comm == "python3"
