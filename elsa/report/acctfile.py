"""``elsa summary --acct-file FILE``: summarize pacct files directly, like GNU
``sa`` (per command) and ``sa -m`` (per user), without a store.

Vectorized and streamed: clean files are read CHUNK_RECORDS records at a
time into one reused buffer, each record's group found by an 18-bit hash
slot of its 16-byte command name (checked for collisions) or its uid, and
per-slot sums accumulated with ``np.bincount``; memory stays a few chunk
sizes whatever the file's size (a 10M-record file decoded whole needed
1.5 GB, and the page faults of that memory were most of the run). Any other
input (corrupt, mixed byte order, colliding names, large uids) goes through
the checked numpy decoder and ``np.unique``; so does a file with a record
whose values cannot be real (``pacct.any_implausible``, the checked decoder's own
rule), which the checked decoder reports and leaves out of the totals, as
``elsa import-acct`` leaves it out of the store. Without numpy a plain loop does
the same, slower. Memory is the acct ``ac_mem`` figure in KiB (GNU sa
divides by 4 here).
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from elsa.kernel import pacct

Window = Tuple[Optional[float], Optional[float]]


def summarize(files: Sequence[str], by: str, since: Optional[float] = None,
              until: Optional[float] = None) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The rows of the records that ended in [*since*, *until*) (the store's
    window, on btime + etime), and the problems met, each naming file and offset."""
    rows, per_file = summarize_files(files, by, since, until)
    return rows, [p for found in per_file.values() for p in found]


def _add_problems(problems: Dict[str, List[str]], files: Sequence[str],
                  decs: Sequence[pacct.Decoded]) -> None:
    for f, d in zip(files, decs):  # (a file given twice: its problems twice, as read)
        problems[f].extend(p.message for p in d.problems)


def summarize_files(files: Sequence[str], by: str, since: Optional[float] = None,
                    until: Optional[float] = None
                    ) -> Tuple[List[Dict[str, Any]], Dict[str, List[str]]]:
    """:func:`summarize`, with the problems of each file apart (in *files*' order)."""
    np = pacct.np
    window = (since, until)
    problems: Dict[str, List[str]] = {f: [] for f in files}
    # A pipe is read once, by the checked decoder: the fast paths may give up
    # halfway through a file and hand it to that decoder, which reads it again.
    once = not all(pacct.rereadable(f) for f in files)
    streamed = _streamed(files, by, window) if np is not None and not once else None
    if streamed is not None:
        rows = streamed
    elif np is not None:
        cols = None if once else _fast_columns(files)
        if cols is None:  # corrupt or mixed-order input: the checked decoder
            decs = [pacct.read_file(f) for f in files]
            _add_problems(problems, files, decs)
            cols = {k: np.concatenate([d.columns[k] for d in decs])
                    for k in ("uid", "comm", "btime", "utime", "stime", "etime", "mem",
                              "minflt", "majflt")}
        if since is not None or until is not None:
            keep = _in_window(cols["btime"], cols["etime"], window)
            cols = {k: v[keep] for k, v in cols.items()}
        rows = _numpy(cols, by)
    else:
        decs = [pacct.read_file(f) for f in files]
        _add_problems(problems, files, decs)
        rows = _loop(decs, by, window)
    rows.sort(key=lambda r: -(r["cpu_user_us"] + r["cpu_system_us"]))
    return rows, problems


def _in_window(btime: Any, etime: Any, window: Window) -> Any:
    """Which records ended in the window: end = btime + etime / AHZ, as the
    store's end_time (pacct.usage_rows)."""
    np = pacct.np
    end = btime.astype(np.float64) + etime.astype(np.float64) / pacct.AHZ
    since, until = window
    keep = np.ones(len(end), dtype=bool)
    if since is not None:
        keep &= end >= since
    if until is not None:
        keep &= end < until
    return keep


#: Records per read of the streamed path: 1 MiB of file, small enough that the
#: chunk and its arrays stay in the CPU's L2 cache through the dozen strided
#: passes over it (field reads, the plausibility bounds) and are reused by the
#: allocator instead of being faulted in afresh, large enough that numpy's
#: per-call cost is small. In-process, 10M records by command on a 2-core VM
#: (2 MiB L2): 0.98-1.17 s with 16 MiB chunks and no plausibility check,
#: 0.77-0.79 s with these chunks and the check (benchmarks/bench_pacct_summary.py).
CHUNK_RECORDS = 1 << 14
_SLOTS = 1 << 18  # command hash table size (18-bit slots)
_MAX_UID = 1 << 20  # larger uids: the general path


def _slot_of(comm: Any) -> Any:
    """The 18-bit hash slot of each 16-byte command name."""
    np = pacct.np
    words = np.ascontiguousarray(comm).view(np.uint64).reshape(-1, 2)
    h = (words[:, 0] * np.uint64(0x9E3779B97F4A7C15)) ^ words[:, 1]
    return ((h ^ (h >> np.uint64(29))) & np.uint64(_SLOTS - 1)).astype(np.intp)


def _streamed(files: Sequence[str], by: str, window: Window = (None, None)
              ) -> Optional[List[Dict[str, Any]]]:
    """The summary of clean v3 files of one byte order, read chunk by chunk
    (gzip files decompressed as they are read); None when the input needs the
    general path (checked per chunk)."""
    np = pacct.np
    size = CHUNK_RECORDS * pacct.RECORD_SIZE
    buf = bytearray(size)
    view = memoryview(buf)
    bad_flags = 0xFF & ~pacct._FLAG_MASK
    nslots = 0
    sums = np.zeros((7, 0))  # per group: count, utime, stime, etime, mem, minflt, majflt
    table = np.zeros(_SLOTS, dtype="S16")  # a command name per used slot
    # slot (command hash or uid) -> group, in order of appearance
    dense = np.full(_SLOTS if by == "command" else _MAX_UID, -1, dtype=np.intp)
    names: List[Any] = []  # command name or uid of each group
    slotbuf = np.empty(CHUNK_RECORDS, dtype=np.intp)
    keybuf = np.empty(CHUNK_RECORDS, dtype=np.intp)
    order = ""
    dtypes = {"<": pacct._dtype("<"), ">": pacct._dtype(">")}
    t = pacct.US_PER_TICK
    comp = pacct._comp_np
    windowed = window != (None, None)
    now = time.time()
    for path in files:
        try:
            fh = pacct.open_file(path)
        except OSError:
            return None
        with fh:
            while True:
                try:
                    n = fh.readinto(buf)
                    while n and n % pacct.RECORD_SIZE:  # a short read inside a record
                        more = fh.readinto(view[n:])
                        if not more:
                            return None  # a partial record: the general path reports it
                        n += more
                except (OSError, *pacct.GZIP_ERRORS):
                    return None  # the general path reports it
                if not n:
                    break
                raw = np.frombuffer(buf, dtype=np.uint8, count=n).reshape(-1, pacct.RECORD_SIZE)
                version = raw[:, 1]
                if (version == pacct.ACCT_VERSION).all():
                    o = "<"
                elif (version == (pacct.ACCT_VERSION | pacct.ACCT_BYTEORDER)).all():
                    o = ">"
                else:
                    return None
                if order and o != order:
                    return None
                order = o
                if (raw[:, 0] & bad_flags).any():
                    return None
                rec = np.frombuffer(buf, dtype=dtypes[o], count=n // pacct.RECORD_SIZE)
                if pacct.any_implausible(rec["pid"], rec["ppid"], rec["btime"], rec["etime"],
                                         now):
                    return None  # the checked decoder drops and reports it
                if windowed:
                    rec = rec[_in_window(rec["btime"], rec["etime"], window)]
                    if not len(rec):
                        continue
                if by == "command":
                    comm = rec["comm"]
                    slot = _slot_of(comm)
                else:
                    # Into reused buffers: fresh temporaries of each chunk were
                    # faulted in anew (the allocator trims the heap between chunks).
                    slot = slotbuf[:len(rec)]
                    np.copyto(slot, rec["uid"], casting="unsafe")
                    if int(slot.max()) >= _MAX_UID:
                        return None
                fresh = dense[slot] < 0
                if fresh.any():
                    first = np.unique(slot[fresh])
                    dense[first] = np.arange(nslots, nslots + len(first))
                    nslots += len(first)
                    if by == "command":
                        table[slot[fresh]] = comm[fresh]
                        names.extend(table[first].tolist())
                    else:
                        names.extend(first.tolist())
                    sums = np.concatenate([sums, np.zeros((7, nslots - sums.shape[1]))], axis=1)
                if by == "command" and not np.array_equal(table[slot], comm):
                    return None  # two names share a slot
                key = np.take(dense, slot, out=keybuf[:len(rec)])
                m = sums.shape[1]
                sums[0] += np.bincount(key, minlength=m)
                sums[1] += np.bincount(key, weights=comp(rec["utime"]) * t, minlength=m)
                sums[2] += np.bincount(key, weights=comp(rec["stime"]) * t, minlength=m)
                sums[3] += np.bincount(key, weights=np.rint(rec["etime"].astype(np.float64) * t),
                                       minlength=m)
                sums[4] += np.bincount(key, weights=comp(rec["mem"]), minlength=m)
                sums[5] += np.bincount(key, weights=comp(rec["minflt"]), minlength=m)
                sums[6] += np.bincount(key, weights=comp(rec["majflt"]), minlength=m)
    if not order:
        return None
    used = np.flatnonzero(sums[0])
    totals = sums[:, used].round().astype(np.int64).tolist()
    if by == "command":
        labels: List[Any] = [names[i].split(b"\0", 1)[0].decode("utf-8", "replace")
                             for i in used.tolist()]
    else:
        labels = [names[i] for i in used.tolist()]
    return _rows(labels, totals, by)


def _fast_columns(files: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Only the columns a summary needs, straight from the structured view,
    when every file is clean little- or big-endian v3 (checked vectorized)."""
    np = pacct.np
    parts = []
    for f in files:
        try:
            data = _map(f)
        except OSError:
            return None
        if len(data) % pacct.RECORD_SIZE or data[:2] == pacct.GZIP_MAGIC:
            return None
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, pacct.RECORD_SIZE)
        if not len(raw):
            continue
        version = raw[:, 1]
        if (version == pacct.ACCT_VERSION).all():
            order = "<"
        elif (version == (pacct.ACCT_VERSION | pacct.ACCT_BYTEORDER)).all():
            order = ">"
        else:
            return None
        if (raw[:, 0] & (0xFF & ~pacct._FLAG_MASK)).any():
            return None
        rec = np.frombuffer(data, dtype=pacct._dtype(order))
        if pacct.any_implausible(rec["pid"], rec["ppid"], rec["btime"], rec["etime"]):
            return None  # the checked decoder drops and reports it
        parts.append(rec)
    if not parts:
        return None
    rec = parts[0] if len(parts) == 1 else np.concatenate(parts)
    comp = pacct._comp_np
    return {"uid": rec["uid"], "comm": rec["comm"], "btime": rec["btime"],
            "utime": comp(rec["utime"]),
            "stime": comp(rec["stime"]), "etime": rec["etime"].astype(np.float64),
            "mem": comp(rec["mem"]), "minflt": comp(rec["minflt"]),
            "majflt": comp(rec["majflt"])}


def _map(path: str) -> Any:
    """The file's bytes without copying them: a read-only mapping, pre-faulted
    from the page cache (MAP_POPULATE) where available. Reading 64 MB with
    read() into a new buffer was a third of a 1M-record summary."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return b""
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fh.fileno(), size, flags=flags, prot=mmap.PROT_READ)


def _group(cols: Dict[str, Any], by: str) -> Tuple[List[Any], Any]:
    """(labels, index of each record's group) without a full sort when possible."""
    np = pacct.np
    if by == "user":
        uid = cols["uid"].astype(np.int64)
        if len(uid) and uid.max() < (1 << 20):
            present = np.flatnonzero(np.bincount(uid))
            slot = np.full(int(uid.max()) + 1, -1, dtype=np.int64)
            slot[present] = np.arange(len(present))
            return present.tolist(), slot[uid]
        keys, inv = np.unique(uid, return_inverse=True)
        return keys.tolist(), inv.ravel()
    comm = np.ascontiguousarray(cols["comm"])
    words = comm.view(np.uint64).reshape(-1, 2)
    h = (words[:, 0] * np.uint64(0x9E3779B97F4A7C15)) ^ words[:, 1]
    h = (h ^ (h >> np.uint64(29))) & np.uint64((1 << 18) - 1)
    table = np.zeros(1 << 18, dtype=comm.dtype)
    table[h] = comm           # one representative per hash slot
    if np.array_equal(table[h], comm):  # no two commands share a slot
        used = np.flatnonzero(np.bincount(h.astype(np.int64), minlength=1 << 18))
        idx = np.full(1 << 18, -1, dtype=np.int64)
        idx[used] = np.arange(len(used))
        names = table[used]
        inv = idx[h.astype(np.int64)]
    else:
        names, inv = np.unique(comm, return_inverse=True)
        inv = inv.ravel()
    return [n.split(b"\0", 1)[0].decode("utf-8", "replace") for n in names.tolist()], inv


def _numpy(cols: Dict[str, Any], by: str) -> List[Dict[str, Any]]:
    np = pacct.np
    labels, inv = _group(cols, by)
    n = len(labels)
    count = np.bincount(inv, minlength=n)

    def total(x: Any) -> List[int]:
        return np.bincount(inv, weights=x, minlength=n).round().astype(np.int64).tolist()

    t = pacct.US_PER_TICK
    cu, cs = total(cols["utime"] * t), total(cols["stime"] * t)
    el = total(np.rint(cols["etime"] * t))
    mem, mi, ma = total(cols["mem"]), total(cols["minflt"]), total(cols["majflt"])
    return _rows(labels, [count.tolist(), cu, cs, el, mem, mi, ma], by)


def _rows(labels: Sequence[Any], totals: Sequence[Sequence[int]],
          by: str) -> List[Dict[str, Any]]:
    """Report rows from per-group totals: count, user and system CPU µs,
    elapsed µs, memory sum, minor and major faults, in *labels*' order."""
    # Command names are grouped by their bytes, labelled by their text: names the
    # kernel cut inside a character (15 bytes) can read the same and are one
    # row, as in the store, which keeps the text.
    if len(set(labels)) < len(labels):
        merged: Dict[Any, List[int]] = {}
        for i, label in enumerate(labels):
            acc = merged.setdefault(label, [0] * 7)
            for k in range(7):
                acc[k] += int(totals[k][i])
        labels, totals = list(merged), [list(t) for t in zip(*merged.values())]
    count, cu, cs, el, mem, mi, ma = totals
    out = []
    for i, label in enumerate(labels):
        c = int(count[i])
        row: Dict[str, Any] = {by: label}
        if by == "user":
            from elsa.users import user_name

            row["uid"] = label
            row[by] = user_name(label)
            row["job_residual_cpu_us"] = 0  # a pacct file has no jobs
        # The keys and their order of the store's summary (query.summary), so
        # that JSON and CSV read the same from either; pacct has no peak RSS
        # and no I/O bytes.
        row.update({"processes": c, "cpu_user_us": cu[i], "cpu_system_us": cs[i],
                    "elapsed_us": el[i], "max_rss_kb": None, "read_bytes": None,
                    "write_bytes": None, "minflt": mi[i], "majflt": ma[i],
                    "avg_mem_kb": round(mem[i] / c) if c else 0})
        out.append(row)
    return out


def _loop(decs: List[pacct.Decoded], by: str, window: Window = (None, None)
          ) -> List[Dict[str, Any]]:
    since, until = window
    acc: Dict[Any, List[int]] = {}
    for d in decs:
        for r in d.records():
            end = r.btime + r.etime / pacct.AHZ
            if (since is not None and end < since) or (until is not None and end >= until):
                continue
            k = r.uid if by == "user" else r.comm
            a = acc.setdefault(k, [0, 0, 0, 0, 0, 0, 0])
            a[0] += 1
            a[1] += r.utime_us
            a[2] += r.stime_us
            a[3] += r.elapsed_us
            a[4] += r.mem
            a[5] += r.minflt
            a[6] += r.majflt
    if not acc:
        return []
    return _rows(list(acc), [list(t) for t in zip(*acc.values())], by)
