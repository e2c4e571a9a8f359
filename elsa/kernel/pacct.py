"""BSD process accounting (acct v3) adapter: the only module that knows the pacct layout.

Record layout (docs/kernel.md, "BSD accounting"): ``struct acct_v3``, 64
bytes, written in the writer's native byte order; the version byte carries
``ACCT_BYTEORDER`` (0x80) when the writer was big-endian. Times are in AHZ
(100) ticks encoded as ``comp_t`` (13-bit mantissa, 3-bit base-8 exponent);
``ac_etime`` is an IEEE float of AHZ ticks; ``ac_btime`` is epoch seconds
(*exit time minus elapsed*, truncated to seconds).
``ac_mem`` is the process's virtual size at exit in KiB;
GNU ``sa`` treats it as pages and reports memory 4x too low — we do not.
``ac_io`` is documented as "chars transferred" and was long written as 0, but
this kernel (6.18) fills it with non-zero values whose unit we could not tie
to /proc/PID/io (a 600 MB ``dd`` showed 7625); it is decoded and carried
verbatim (``extra["acct_io"]``) and used for no figure. ``ac_rw`` is 0.

Two decoders give identical results: a vectorized numpy path (structured
``frombuffer`` dtype; ~0.07 s per million records here) and a pure-``struct``
fallback when numpy (the optional ``fast`` extra) is absent.

Corrupt input never loses good records: the decoder returns every record it
could decode plus a list of :class:`~elsa.errors.AccountingFormatError`
problems, each naming the file and byte offset. After a bad record it
resynchronises by scanning for the next offset where a plausible record starts.
Following a file as the kernel appends to it: :mod:`elsa.kernel.pacct_follower`.
A gzip-compressed file (a rotation compressed by Debian's ``savelog``:
``pacct.1.gz``) is read decompressed; offsets then count decompressed bytes.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import stat
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from elsa.core.source import UsageRecord
from elsa.errors import AccountingFormatError

#: Inputs smaller than this are decoded with struct: numpy is imported only
#: when it pays. Importing it costs ~12 MB of RSS, which the daemon (whose
#: bsdacct follower decodes a few records at a time) must not pay: the
#: memory target is 40 MB with 100,000 tracked processes (issue 6).
NUMPY_MIN_BYTES = 256 * 1024

_numpy: Any = False  # False: not tried yet; None: not installed


def _np() -> Any:
    """numpy (the optional ``fast`` extra), imported on first use, or None."""
    global _numpy
    if _numpy is False:
        try:
            import numpy
        except ImportError:  # pragma: no cover - exercised by forcing use_numpy=False
            numpy = None  # type: ignore[assignment]
        _numpy = numpy
    return _numpy


def __getattr__(name: str) -> Any:
    # ``pacct.np`` for the report code: numpy, imported on first access.
    if name == "np":
        return _np()
    raise AttributeError(name)

RECORD_SIZE = 64
ACCT_VERSION = 3
ACCT_BYTEORDER = 0x80
AHZ = 100  # ticks per second of v3 records
US_PER_TICK = 1_000_000 // AHZ

# ac_flag bits.
AFORK = 0x01   # forked but did not exec
ASU = 0x02     # used super-user privileges
ACOMPAT = 0x04
ACORE = 0x08   # dumped core
AXSIG = 0x10   # killed by a signal
_FLAG_MASK = AFORK | ASU | ACOMPAT | ACORE | AXSIG

#: What each ac_version value is, so a refusal can say what the file holds.
VERSION_NAMES = {
    0: "v0 (no version byte: pre-2.6.8 struct acct)",
    1: "v1 (struct acct of m68k kernels without CONFIG_BSD_PROCESS_ACCT_V3)",
    2: "v2 (struct acct of kernels without CONFIG_BSD_PROCESS_ACCT_V3)",
    3: "v3 (struct acct_v3)",
}

_FIELDS = ("flag", "version", "tty", "exitcode", "uid", "gid", "pid", "ppid", "btime", "etime",
           "utime", "stime", "mem", "io", "rw", "minflt", "majflt", "swaps", "comm")
_STRUCT_FMT = "BBHIIIIIIf8H16s"
_LE = struct.Struct("<" + _STRUCT_FMT)
_BE = struct.Struct(">" + _STRUCT_FMT)
assert _LE.size == RECORD_SIZE

#: Columns a decode returns (comp_t fields already expanded to integers).
COLUMNS = ("offset", "flag", "tty", "exitcode", "uid", "gid", "pid", "ppid", "btime", "etime",
           "utime", "stime", "mem", "io", "rw", "minflt", "majflt", "comm", "big_endian")


#: Plausible values: a record outside them is garbage (a misaligned read, a
#: foreign file) and is reported and skipped instead of stored (docs/kernel.md,
#: "BSD accounting": PID_MAX_LIMIT is 4M on 64-bit kernels).
PID_MAX = 4 * 1024 * 1024
MAX_ELAPSED_S = 20 * 365 * 86400
#: A record may end at most this far after the reader's clock (clock skew
#: between hosts of a site); beyond it (e.g. 2106, the u32 btime's end) it is garbage.
FUTURE_SLACK_S = 86400
#: Problems listed one by one per decode; the rest are counted.
MAX_LISTED = 10


def decode_comp_t(c: int) -> int:
    """Expand a comp_t: 13-bit mantissa, 3-bit base-8 exponent."""
    return (c & 0x1FFF) << (3 * (c >> 13))


def encode_comp_t(value: int) -> int:
    """The kernel's encode_comp_t, for building test samples:
    shift right 3 bits at a time until 13 bits fit, rounding on the last bit lost."""
    exp = 0
    rnd = 0
    while value > 0x1FFF:
        rnd = value & (1 << 2)
        value >>= 3
        exp += 1
    if rnd:
        value += 1
        if value > 0x1FFF:
            value >>= 3
            exp += 1
    if exp > 7:
        return 0xFFFF
    return (exp << 13) + value


@dataclass(frozen=True)
class AcctRecord:
    """One decoded acct v3 record, in kernel units (ticks are AHZ = 100 Hz)."""

    offset: int
    flag: int
    tty: int
    exitcode: int
    uid: int
    gid: int
    pid: int
    ppid: int
    btime: int          # epoch seconds
    etime: float        # AHZ ticks
    utime: int          # AHZ ticks
    stime: int          # AHZ ticks
    mem: int            # KiB (virtual size at exit)
    io: int             # ac_io, decoded; see the module doc
    rw: int             # ac_rw, decoded (0 on Linux)
    minflt: int
    majflt: int
    comm: str
    big_endian: bool = False

    @property
    def utime_us(self) -> int:
        return self.utime * US_PER_TICK

    @property
    def stime_us(self) -> int:
        return self.stime * US_PER_TICK

    @property
    def elapsed_us(self) -> int:
        return int(round(self.etime * US_PER_TICK))

    def to_usage(self, source: str = "bsdacct") -> UsageRecord:
        """The common form. acct has no start ticks: attribution matches ``start_time``
        (1 s resolution) against the membership history with a tolerance."""
        end = self.btime + self.etime / AHZ
        return UsageRecord(
            source=source, pid=self.pid, ppid=self.ppid, uid=self.uid, gid=self.gid,
            comm=self.comm, start_time=float(self.btime), end_time=end,
            exit_code=self.exitcode, cpu_user_us=self.utime_us, cpu_system_us=self.stime_us,
            elapsed_us=self.elapsed_us, max_vm_kb=self.mem, minflt=self.minflt,
            majflt=self.majflt,
            extra={"acct_flag": self.flag, "acct_tty": self.tty, "acct_io": self.io})


@dataclass
class Decoded:
    """The result of decoding a buffer: good records, problems, and how far it got.

    ``columns`` maps each name of :data:`COLUMNS` to a numpy array (numpy path)
    or a list (struct path); ``consumed`` is the number of bytes fully handled
    (a trailing partial record is left unconsumed unless ``final``).
    """

    columns: Dict[str, Any]
    problems: List[AccountingFormatError] = field(default_factory=list)
    consumed: int = 0

    @property
    def count(self) -> int:
        return len(self.columns["pid"])

    def records(self) -> List[AcctRecord]:
        cols = self.columns
        np = _numpy or None
        if np is not None and isinstance(cols["pid"], np.ndarray):
            cols = {k: v.tolist() for k, v in cols.items()}
        out = []
        for i in range(len(cols["pid"])):
            kw = {k: cols[k][i] for k in COLUMNS}
            comm = kw["comm"]
            kw["comm"] = _comm_str(comm) if isinstance(comm, bytes) else comm
            kw["big_endian"] = bool(kw["big_endian"])
            out.append(AcctRecord(**kw))
        return out


def _comm_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# -- plausibility and resynchronisation -------------------------------------------

def _version_byte_ok(v: int) -> bool:
    return (v & 0x7F) == ACCT_VERSION


def _plausible(data: bytes, off: int) -> bool:
    """Could a v3 record start at *off*? Version byte 3 or 0x83, only known flag bits."""
    if off + RECORD_SIZE > len(data):
        return False
    return _version_byte_ok(data[off + 1]) and not (data[off] & ~_FLAG_MASK)


def _next_plausible(data: bytes, start: int) -> int:
    """The next offset >= *start* where a record plausibly starts (two in a row when
    possible, so one lucky byte does not restart decoding in the middle of garbage);
    ``len(data)`` when none."""
    n = len(data)
    pos = start
    while True:
        a = data.find(b"\x03", pos + 1, n)
        b = data.find(b"\x83", pos + 1, n)
        cands = [x for x in (a, b) if x >= 0]
        if not cands:
            return n
        hit = min(cands) - 1  # the version byte is the record's second byte
        pos = hit + 1
        if hit < start or not _plausible(data, hit):
            continue
        nxt = hit + RECORD_SIZE
        if nxt + RECORD_SIZE > n or _plausible(data, nxt):
            return hit


def _problem(path: str, offset: int, what: str) -> AccountingFormatError:
    return AccountingFormatError(f"{path}: offset {offset}: {what}")


def _describe_bad(data: bytes, off: int) -> str:
    v = data[off + 1]
    if (v & 0x7F) != ACCT_VERSION:
        name = VERSION_NAMES.get(v & 0x7F)
        if name:
            return (f"acct record version {name} is not supported (only v3); "
                    "switch the kernel to CONFIG_BSD_PROCESS_ACCT_V3 records")
        return f"not an acct record (version byte {v:#04x}, flag byte {data[off]:#04x})"
    return f"not an acct record (unknown flag bits {data[off]:#04x})"


# -- decoding ----------------------------------------------------------------------

def decode(data: bytes, *, path: str = "<memory>", base_offset: int = 0, final: bool = True,
           use_numpy: Optional[bool] = None, now: Optional[float] = None) -> Decoded:
    """Decode acct v3 records from *data* (file bytes starting at *base_offset*).

    The file's byte order is the first good record's; a record of the other
    order is still decoded (its version byte says how) but reported, since one
    kernel never writes both. With ``final`` false a trailing partial record is
    left for later (a growing file); with ``final`` true it is reported as
    truncated. A record whose values cannot be real (see :data:`PID_MAX`,
    :data:`MAX_ELAPSED_S`, :data:`FUTURE_SLACK_S`; *now* is the reader's
    clock) is reported and left out.
    """
    if use_numpy is None:
        use_numpy = (len(data) >= NUMPY_MIN_BYTES or bool(_numpy)) and _np() is not None
    problems: List[AccountingFormatError] = []
    segments: List[Tuple[int, int]] = []  # (start, end) runs of good aligned records
    n = len(data)
    pos = 0
    file_big: Optional[bool] = None
    while pos + RECORD_SIZE <= n:
        end = _good_run_end(data, pos, use_numpy)
        if end > pos:
            segments.append((pos, end))
            if file_big is None:
                file_big = bool(data[pos + 1] & ACCT_BYTEORDER)
            pos = end
            continue
        # data[pos:pos+64] is not a record: explain, then resynchronise.
        what = _describe_bad(data, pos)
        nxt = _next_plausible(data, pos)
        if nxt + RECORD_SIZE > n and not final:
            # Garbage up to the end of what we have: maybe the writer is still
            # mid-record. Report it, but consume only what is certainly bad.
            nxt = max(pos + 1, n - RECORD_SIZE + 1)
            problems.append(_problem(path, base_offset + pos,
                                     f"{what}; skipped {nxt - pos} bytes"))
            pos = nxt
            break
        skipped = nxt - pos
        problems.append(_problem(
            path, base_offset + pos,
            f"{what}; skipped {skipped} bytes to the next plausible record at offset "
            f"{base_offset + nxt}" if nxt < n else f"{what}; skipped {skipped} bytes to the end"))
        pos = nxt
    consumed = pos
    if pos < n:
        if final:
            problems.append(_problem(path, base_offset + pos,
                                     f"truncated record: {n - pos} of {RECORD_SIZE} bytes at "
                                     "the end of the file; dropped"))
            consumed = n
    cols = (_decode_numpy if use_numpy else _decode_struct)(data, segments, base_offset)
    cols = _drop_implausible(cols, path, problems, now if now is not None else time.time())
    if file_big is not None and cols["pid"] is not None:
        foreign = _foreign_offsets(cols, file_big)
        for off in foreign[:10]:
            order = "big" if not file_big else "little"
            problems.append(_problem(path, off, f"record in {order}-endian byte order in a file "
                                     "of the other order (concatenated files?); decoded anyway"))
        if len(foreign) > 10:
            problems.append(_problem(path, foreign[10], f"{len(foreign) - 10} more records "
                                     "in the foreign byte order"))
    return Decoded(columns=cols, problems=problems, consumed=consumed)


def implausible(pid: Any, ppid: Any, btime: Any, etime: Any, now: Optional[float] = None
                ) -> Any:
    """Which records' values cannot be real (numpy arrays of the columns; *now* is
    the reader's clock): the plausibility rule of every numpy reader, the checked
    decoder's and ``summary --acct-file``'s fast one, so that they keep the same
    records. :func:`_implausible` is its form for one record (the struct decoder,
    the messages)."""
    np = _np()
    latest = (time.time() if now is None else now) + FUTURE_SLACK_S
    et = etime.astype(np.float64, copy=False)  # the checked decoder's etime column
    with np.errstate(invalid="ignore", over="ignore"):
        secs = et / AHZ
        return (~np.isfinite(et) | (et < 0) | (secs > MAX_ELAPSED_S)
                | (pid <= 0) | (pid > PID_MAX) | (ppid > PID_MAX)
                | (btime + secs > latest))


def any_implausible(pid: Any, ppid: Any, btime: Any, etime: Any,
                    now: Optional[float] = None) -> bool:
    """Whether :func:`implausible` marks any record, at the cost of a few
    reductions for clean input (the fast readers' case): bounds that hold for
    every record settle it (each condition is monotone in its columns), and
    only input that fails them pays for the full rule."""
    if not len(pid):
        return False
    np = _np()
    latest = (time.time() if now is None else now) + FUTURE_SLACK_S
    with np.errstate(invalid="ignore"):
        lo, hi = float(etime.min()), float(etime.max())  # NaN fails every bound below
    if (int(pid.min()) > 0 and int(pid.max()) <= PID_MAX and int(ppid.max()) <= PID_MAX
            and lo >= 0 and hi / AHZ <= MAX_ELAPSED_S
            and float(btime.max()) + hi / AHZ <= latest):
        return False
    return bool(implausible(pid, ppid, btime, etime, now).any())


def _implausible(pid: int, ppid: int, btime: int, etime: float, latest: float) -> str:
    """Why a record's values cannot be real ("" when they can): :func:`implausible`
    for one record."""
    if not math.isfinite(etime) or etime < 0 or etime / AHZ > MAX_ELAPSED_S:
        return f"elapsed time {etime!r} ticks is not plausible"
    if not 0 < pid <= PID_MAX or ppid > PID_MAX:
        return f"pid {pid} / ppid {ppid} beyond the kernel's limit {PID_MAX}"
    if btime + etime / AHZ > latest:
        return (f"ends at {btime + etime / AHZ:.0f} (epoch s), in the future of this "
                "host's clock")
    return ""


def _drop_implausible(cols: Dict[str, Any], path: str, problems: List[AccountingFormatError],
                      now: float) -> Dict[str, Any]:
    """*cols* without the records whose values cannot be real; each is reported
    (the first MAX_LISTED by offset, the rest counted)."""
    latest = now + FUTURE_SLACK_S
    np = _numpy or None
    if np is not None and isinstance(cols["pid"], np.ndarray):
        if not any_implausible(cols["pid"], cols["ppid"], cols["btime"], cols["etime"], now):
            return cols
        bad = implausible(cols["pid"], cols["ppid"], cols["btime"], cols["etime"], now)
        idx = np.flatnonzero(bad).tolist()
        keep = ~bad
        out = {k: v[keep] for k, v in cols.items()}
    else:
        idx = [i for i, (pid, ppid, bt, et) in enumerate(zip(
            cols["pid"], cols["ppid"], cols["btime"], cols["etime"]))
            if _implausible(pid, ppid, bt, et, latest)]
        if not idx:
            return cols
        gone = set(idx)
        out = {k: [x for i, x in enumerate(v) if i not in gone] for k, v in cols.items()}
    for i in idx[:MAX_LISTED]:
        why = _implausible(int(cols["pid"][i]), int(cols["ppid"][i]), int(cols["btime"][i]),
                           float(cols["etime"][i]), latest)
        problems.append(_problem(path, int(cols["offset"][i]), f"{why}; record skipped"))
    if len(idx) > MAX_LISTED:
        problems.append(_problem(path, int(cols["offset"][idx[MAX_LISTED]]),
                                 f"{len(idx) - MAX_LISTED} more records with implausible "
                                 "values skipped"))
    return out


def _good_run_end(data: bytes, pos: int, use_numpy: bool) -> int:
    """The end of the run of plausible, aligned records starting at *pos*."""
    n = len(data)
    if not use_numpy:
        end = pos
        while end + RECORD_SIZE <= n and _plausible(data, end):
            end += RECORD_SIZE
        return end
    np = _np()
    # Check a window at a time so a file full of garbage (many short runs)
    # stays linear instead of re-checking the whole rest after each bad record.
    end = pos
    window = 1 << 16
    while True:
        nrec = min((n - end) // RECORD_SIZE, window)
        if nrec == 0:
            return end
        arr = np.frombuffer(data, dtype=np.uint8, count=nrec * RECORD_SIZE, offset=end)
        arr = arr.reshape(nrec, RECORD_SIZE)
        ok = ((arr[:, 1] & 0x7F) == ACCT_VERSION) & ((arr[:, 0] & (0xFF & ~_FLAG_MASK)) == 0)
        if not ok.all():
            return end + int(np.argmin(ok)) * RECORD_SIZE
        end += nrec * RECORD_SIZE


def _dtype(order: str) -> Any:
    np = _np()
    return np.dtype([
        ("flag", "u1"), ("version", "u1"), ("tty", order + "u2"), ("exitcode", order + "u4"),
        ("uid", order + "u4"), ("gid", order + "u4"), ("pid", order + "u4"),
        ("ppid", order + "u4"), ("btime", order + "u4"), ("etime", order + "f4"),
        ("utime", order + "u2"), ("stime", order + "u2"), ("mem", order + "u2"),
        ("io", order + "u2"), ("rw", order + "u2"), ("minflt", order + "u2"),
        ("majflt", order + "u2"), ("swaps", order + "u2"), ("comm", "S16")])


def _comp_np(c: Any) -> Any:
    np = _np()
    c = c.astype(np.int64)
    exp = c >> 13
    if not exp.any():  # common: every value fits the mantissa, nothing to shift
        return c
    return (c & 0x1FFF) << (3 * exp)


def _decode_numpy(data: bytes, segments: Sequence[Tuple[int, int]],
                  base_offset: int) -> Dict[str, Any]:
    np = _np()
    le, be = _dtype("<"), _dtype(">")
    parts: List[Dict[str, Any]] = []
    for start, end in segments:
        count = (end - start) // RECORD_SIZE
        raw = np.frombuffer(data, dtype=le, count=count, offset=start)
        offsets = base_offset + start + RECORD_SIZE * np.arange(count, dtype=np.int64)
        big = (raw["version"] & ACCT_BYTEORDER) != 0
        braw = np.frombuffer(data, dtype=be, count=count, offset=start) if big.any() else None

        def col(name: str, kind: Any = np.int64, raw: Any = raw, braw: Any = braw,
                big: Any = big) -> Any:
            # Big-endian records (version byte 0x83) are re-read with the
            # big-endian dtype; a file is normally all one order.
            v = raw[name].astype(kind)
            return v if braw is None else np.where(big, braw[name].astype(kind), v)

        parts.append({
            "offset": offsets, "flag": col("flag"), "tty": col("tty"),
            "exitcode": col("exitcode"), "uid": col("uid"), "gid": col("gid"),
            "pid": col("pid"), "ppid": col("ppid"), "btime": col("btime"),
            "etime": col("etime", np.float64), "utime": _comp_np(col("utime")),
            "stime": _comp_np(col("stime")), "mem": _comp_np(col("mem")),
            "io": _comp_np(col("io")), "rw": _comp_np(col("rw")),
            "minflt": _comp_np(col("minflt")), "majflt": _comp_np(col("majflt")),
            "comm": raw["comm"], "big_endian": big,
        })
    if not parts:
        empty = {k: np.zeros(0, dtype=np.int64) for k in COLUMNS}
        empty["etime"] = np.zeros(0, dtype=np.float64)
        empty["comm"] = np.zeros(0, dtype="S16")
        empty["big_endian"] = np.zeros(0, dtype=bool)
        return empty
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}


def _decode_struct(data: bytes, segments: Sequence[Tuple[int, int]],
                   base_offset: int) -> Dict[str, Any]:
    cols: Dict[str, List[Any]] = {k: [] for k in COLUMNS}
    comp = decode_comp_t
    for start, end in segments:
        if data.count(b"\x83", start + 1, end) == 0 or not any(
                data[off + 1] & ACCT_BYTEORDER for off in range(start, end, RECORD_SIZE)):
            _decode_le_run(data, start, end, base_offset, cols)
            continue
        for off in range(start, end, RECORD_SIZE):
            big = bool(data[off + 1] & ACCT_BYTEORDER)
            (flag, _v, tty, exitcode, uid, gid, pid, ppid, btime, etime, utime, stime, mem,
             io, rw, minflt, majflt, _swaps, comm) = (_BE if big else _LE).unpack_from(data, off)
            for k, v in (("offset", base_offset + off), ("flag", flag), ("tty", tty),
                         ("exitcode", exitcode), ("uid", uid), ("gid", gid), ("pid", pid),
                         ("ppid", ppid), ("btime", btime), ("etime", etime),
                         ("utime", comp(utime)), ("stime", comp(stime)), ("mem", comp(mem)),
                         ("io", comp(io)), ("rw", comp(rw)),
                         ("minflt", comp(minflt)), ("majflt", comp(majflt)),
                         ("comm", _comm_str(comm)), ("big_endian", big)):
                cols[k].append(v)
    return cols


def _decode_le_run(data: bytes, start: int, end: int, base_offset: int,
                   cols: Dict[str, List[Any]]) -> None:
    """A run of little-endian records (the daemon's follower, a few hundred at
    a time): one iter_unpack and a transpose instead of a loop per field."""
    n = (end - start) // RECORD_SIZE
    if not n:
        return
    (flag, _v, tty, exitcode, uid, gid, pid, ppid, btime, etime, utime, stime, mem, io, rw,
     minflt, majflt, _swaps, comm) = zip(*_LE.iter_unpack(memoryview(data)[start:end]))
    comp = decode_comp_t

    def expand(col: Tuple[int, ...]) -> List[int]:
        return [c if c < 0x2000 else comp(c) for c in col]

    first = base_offset + start
    cols["offset"].extend(range(first, first + n * RECORD_SIZE, RECORD_SIZE))
    for k, v in (("flag", flag), ("tty", tty), ("exitcode", exitcode), ("uid", uid),
                 ("gid", gid), ("pid", pid), ("ppid", ppid), ("btime", btime),
                 ("etime", etime)):
        cols[k].extend(v)
    for k, v in (("utime", utime), ("stime", stime), ("mem", mem), ("io", io), ("rw", rw),
                 ("minflt", minflt), ("majflt", majflt)):
        cols[k].extend(expand(v))
    cols["comm"].extend(_comm_str(c) for c in comm)
    cols["big_endian"].extend([False] * n)


def usage_rows(dec: Decoded, source: str = "bsdacct") -> List[Tuple[Any, ...]]:
    """Usage rows (elsa.core.source.ROW_FIELDS) of decoded records, straight
    from the columns (the daemon's hot path and ``elsa import-acct``); the same
    values as ``record_row(rec.to_usage(source), None)`` for each record."""
    c = dec.columns
    np = _numpy or None
    if np is not None and isinstance(c["pid"], np.ndarray):
        btime = c["btime"].astype(np.float64)
        end = (btime + c["etime"] / AHZ).tolist()
        elapsed = np.rint(c["etime"] * US_PER_TICK).astype(np.int64).tolist()
        comm = [x.split(b"\0", 1)[0].decode("utf-8", "replace") for x in c["comm"].tolist()]
        cols = {k: c[k].tolist() for k in ("pid", "ppid", "uid", "gid", "exitcode", "utime",
                                           "stime", "mem", "minflt", "majflt", "flag", "tty",
                                           "io")}
        start = btime.tolist()
    else:
        end = [b + e / AHZ for b, e in zip(c["btime"], c["etime"])]
        elapsed = [int(round(e * US_PER_TICK)) for e in c["etime"]]
        comm = c["comm"]
        cols = c
        start = [float(b) for b in c["btime"]]
    t = US_PER_TICK
    return [(source, None, pid, None, st, en, ppid, uid, gid, cm, ex, ut * t, stt * t, el, None,
             mem, None, None, None, None, mi, ma, None, None, None, None,
             f'{{"acct_flag":{fl},"acct_tty":{tty},"acct_io":{io}}}')
            for pid, st, en, ppid, uid, gid, cm, ex, ut, stt, el, mem, mi, ma, fl, tty, io in zip(
                cols["pid"], start, end, cols["ppid"], cols["uid"], cols["gid"], comm,
                cols["exitcode"], cols["utime"], cols["stime"], elapsed, cols["mem"],
                cols["minflt"], cols["majflt"], cols["flag"], cols["tty"], cols["io"])]


def _foreign_offsets(cols: Dict[str, Any], file_big: bool) -> List[int]:
    np = _numpy or None  # arrays can only be numpy's if it was imported
    big = cols["big_endian"]
    offs = cols["offset"]
    if np is not None and isinstance(big, np.ndarray):
        return offs[big != file_big].tolist()
    return [o for o, b in zip(offs, big) if b != file_big]


#: The first bytes of a gzip file (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"
#: What reading a damaged gzip file raises.
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def open_file(path: str) -> Any:
    """*path* opened for reading its records: decompressed when it is gzip. A
    pipe (/dev/stdin, a shell's ``<(ssh node cat pacct)``) can be read once."""
    fh = open(path, "rb", buffering=0)
    try:
        if not fh.seekable():
            # The magic cannot be read and sought back: peek at it. The
            # GzipFile holds the only reference to *piped*, which is closed
            # when the GzipFile is dropped.
            piped = io.BufferedReader(fh)
            if piped.peek(2)[:2] == GZIP_MAGIC:
                return gzip.GzipFile(fileobj=piped, mode="rb")
            return piped
        if fh.read(2) != GZIP_MAGIC:
            fh.seek(0)
            return fh
    except OSError:
        fh.close()
        raise
    fh.close()
    return gzip.GzipFile(path, "rb")


def rereadable(path: str) -> bool:
    """Whether *path* can be read more than once: a regular file, not a pipe
    (also True when it cannot be stat'ed: reading it reports why)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def read_file(path: str, *, use_numpy: Optional[bool] = None) -> Decoded:
    """Decode a whole pacct file (a trailing partial record is reported as truncated;
    a gzip file is decompressed, and a damaged one decoded up to the damage)."""
    chunks: List[bytes] = []
    damage = ""
    try:
        with open_file(path) as fh:
            if not isinstance(fh, gzip.GzipFile):
                chunks.append(fh.read())  # one allocation, no join
            else:
                try:
                    while True:  # read1: a read that meets damage loses only its block
                        chunk = fh.read1(1 << 24)
                        if not chunk:
                            break
                        chunks.append(chunk)
                except GZIP_ERRORS as exc:
                    damage = str(exc) or type(exc).__name__
    except OSError as exc:
        raise AccountingFormatError(f"{path}: cannot read accounting file: "
                                    f"{exc.strerror or exc}") from None
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # b"" for an empty file
    dec = decode(data, path=path, use_numpy=use_numpy)
    if damage:
        dec.problems.append(_problem(path, len(data), f"compressed data damaged ({damage}); "
                                     "the records before are kept"))
    return dec


def encode(records: Sequence[AcctRecord], *, big_endian: bool = False) -> bytes:
    """Build acct v3 bytes (test samples, benchmarks). comp_t fields are re-encoded
    with the kernel's rounding, so large values lose precision exactly as the kernel's do."""
    st = _BE if big_endian else _LE
    version = ACCT_VERSION | (ACCT_BYTEORDER if big_endian else 0)
    out = bytearray()
    for r in records:
        out += st.pack(r.flag, version, r.tty, r.exitcode, r.uid, r.gid, r.pid, r.ppid,
                       r.btime, float(r.etime), encode_comp_t(r.utime), encode_comp_t(r.stime),
                       encode_comp_t(r.mem), encode_comp_t(r.io), encode_comp_t(r.rw),
                       encode_comp_t(r.minflt),
                       encode_comp_t(r.majflt), 0, r.comm.encode()[:16])
    return bytes(out)
