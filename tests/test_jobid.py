"""Job ids: one spelling everywhere, unique per state dir (docs/jobid.md)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from elsa.core import jobid
from elsa.core.model import Job, format_jid, parse_jid
from elsa.core.store import Store

HEX = re.compile(r"0x[0-9a-f]{16}")


def _alloc(state_dir, machine_id) -> int:
    store = Store(str(state_dir))
    try:
        return jobid.JidAllocator(store, host=jobid.instance_prefix(store, str(machine_id))).next()
    finally:
        store.close()


def test_one_spelling_and_round_trip():
    jid = (0x35969E << 32) | 0x402
    assert format_jid(jid) == "0x0035969e00000402"
    for text in ("0x0035969e00000402", "0x35969e00000402", str(jid), " 0X35969E00000402 "):
        assert parse_jid(text) == jid
    assert parse_jid(jid) == jid
    for bad in ("", "0x", "zz", "0", "-1", str(2 ** 63), "1_000", "0x35_969e", True, None, 1.5):
        with pytest.raises(ValueError):
            parse_jid(bad)  # type: ignore[arg-type]
    # Above 2^53 a JSON number would round; the string survives any JSON reader.
    big = (0x7FFFFFFF << 32) | 0xFFFFFFFF
    assert parse_jid(json.loads(json.dumps(format_jid(big)))) == big
    assert float(big) != big
    job = Job(jid=big, name="", owner_uid=0, tags={}, created=0.0, ended=None,
              state="running", backend="cnproc")
    assert job.to_json()["jid"] == "0x7fffffffffffffff"


def test_state_dirs_on_one_host_get_distinct_prefixes(tmp_path):
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    a = _alloc(tmp_path / "a", mid)
    b = _alloc(tmp_path / "b", mid)
    assert a != b and a >> 32 != b >> 32
    # The prefix is kept across restarts; the counter moves on.
    a2 = _alloc(tmp_path / "a", mid)
    assert a2 >> 32 == a >> 32 and a2 > a


def test_copied_state_dir_draws_a_new_prefix(tmp_path):
    mid = tmp_path / "machine-id"
    mid.write_text("host-one\n")
    a = _alloc(tmp_path / "a", mid)
    shutil.copytree(tmp_path / "a", tmp_path / "clone")
    mid.write_text("host-two\n")
    c = _alloc(tmp_path / "clone", mid)
    assert c >> 32 != a >> 32


def test_older_store_keeps_its_host_prefix(tmp_path):
    mid = tmp_path / "machine-id"
    mid.write_text("legacy-host\n")
    store = Store(str(tmp_path / "old"))
    store.set_meta_now(jobid.META_KEY, "1024")  # ids were made before instance prefixes
    store.close()
    jid = _alloc(tmp_path / "old", mid)
    assert jid >> 32 == jobid.host_id(str(mid)) and jid & 0xFFFFFFFF == 1025


@pytest.mark.root
def test_two_daemons_on_one_host_hand_out_distinct_ids(elsad, tmp_path):
    d1 = elsad(workdir=tmp_path / "one")
    d2 = elsad(workdir=tmp_path / "two")
    ids = set()
    for d in (d1, d2):
        with d.client() as c:
            for _ in range(3):
                job = c.create(name="jid")
                assert HEX.fullmatch(job["jid"]), job
                ids.add(job["jid"])
                assert c.end(job["jid"])["jid"] == job["jid"]
    assert len(ids) == 6
    # The log spells it the same way.
    created = [json.loads(line) for line in d1.log().splitlines()
               if '"job created"' in line]
    assert created and all(HEX.fullmatch(e["jid"]) for e in created)


def test_a_clean_restart_goes_on_from_the_last_id(elsad, tmp_path):
    """Ids are reserved in blocks; a clean stop gives the unused rest back (a crash
    skips it)."""
    d = elsad(workdir=tmp_path / "one")
    counters = []
    for restart in (d.stop, d.kill9):
        with d.client() as c:
            counters.append(parse_jid(c.create(name="jid")["jid"]) & 0xFFFFFFFF)
        restart()
        d.start()
    with d.client() as c:
        counters.append(parse_jid(c.create(name="jid")["jid"]) & 0xFFFFFFFF)
    assert counters[1] == counters[0] + 1  # after the clean stop
    assert counters[2] == counters[1] + jobid.BLOCK  # after the crash: the block's rest skipped
