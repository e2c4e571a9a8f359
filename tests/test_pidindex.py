"""PidIndex: the manager's compact pid -> value table behaves like a dict."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elsa.core import pidindex
from elsa.core.pidindex import PidIndex

PIDS = st.one_of(st.integers(1, 64), st.integers(1, 4_194_304))
OPS = st.lists(st.tuples(st.sampled_from(["set", "pop", "get"]), PIDS,
                         st.integers(1, 2**63 - 1)), max_size=3000)


@pytest.mark.parametrize("dict_max", [8, pidindex.DICT_MAX], ids=["switching", "dict"])
@settings(max_examples=60, deadline=None)
@given(OPS)
def test_matches_a_dict(dict_max, ops):
    saved, pidindex.DICT_MAX = pidindex.DICT_MAX, dict_max
    try:
        _matches_a_dict(ops)
    finally:
        pidindex.DICT_MAX = saved


def _matches_a_dict(ops):
    ref, idx = {}, PidIndex()
    for op, pid, value in ops:
        if op == "set":
            ref[pid] = value
            idx[pid] = value
        elif op == "pop":
            assert idx.pop(pid) == ref.pop(pid, None)
        else:
            assert idx.get(pid) == ref.get(pid)
            assert (pid in idx) == (pid in ref)
    assert sorted(idx.items()) == sorted(ref.items())
    assert len(idx) == len(ref) and sorted(idx) == sorted(ref)


def test_grows_for_a_storm_and_shrinks_after_it():
    idx = PidIndex()
    assert idx._dict == {}  # small: a dict
    small = len(idx._keys)
    pids = range(300, 300 + 100_000)  # consecutive, as the kernel hands them out
    for pid in pids:
        idx[pid] = pid << 40 | 7
    assert len(idx) == 100_000 and len(idx._keys) >= 200_000
    assert all(idx.get(pid) == pid << 40 | 7 for pid in pids)
    assert idx.get(299) is None and idx.get(300 + 100_000) is None
    # 12 bytes a slot at load <= 1/2: what lets elsad hold 100k processes in 40 MB
    bytes_per_pid = (idx._keys.itemsize + idx._vals.itemsize) * len(idx._keys) / len(idx)
    assert bytes_per_pid <= 48
    assert idx._dict is None  # large: the arrays
    for pid in pids:
        del idx[pid]
    assert len(idx) == 0 and len(idx._keys) == small and not idx and idx._dict == {}


def test_rejects_pid_zero_and_missing_keys():
    idx = PidIndex()
    for bad in (0, -1):
        try:
            idx[bad] = 1
        except ValueError:
            pass
        else:
            raise AssertionError(f"pid {bad} accepted")
    try:
        del idx[5]
    except KeyError:
        pass
    else:
        raise AssertionError("deleting a missing pid did not raise KeyError")
    assert 0 not in idx and "5" not in idx


@pytest.mark.parametrize("dict_max", [8, pidindex.DICT_MAX], ids=["arrays", "dict"])
def test_insert_adds_only_an_absent_pid_and_returns_the_present_value(dict_max, monkeypatch):
    monkeypatch.setattr(pidindex, "DICT_MAX", dict_max)
    ix = PidIndex()
    assert ix.insert(7, 70) is None and ix[7] == 70
    assert ix.insert(7, 71) == 70 and ix[7] == 70  # unchanged
    for pid in range(100, 5000):  # grows like __setitem__
        assert ix.insert(pid, pid) is None
    assert len(ix) == 4901 and all(ix[p] == p for p in range(100, 5000))
    with pytest.raises(ValueError):
        ix.insert(0, 1)
