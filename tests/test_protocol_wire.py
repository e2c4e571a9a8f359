"""elsa.protocol on its own: the envelopes and field readers both ends share."""

from __future__ import annotations

import math

import pytest

from elsa.errors import ProtocolError
from elsa.protocol import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    UnsupportedVersion,
    check_version,
    encode,
    error_reply,
    get_int,
    get_pids,
    get_str,
    get_str_map,
    ok_reply,
    parse_reply,
    parse_request,
    request_id,
)


def test_a_request_round_trips_through_encode_and_parse():
    req = {"v": PROTOCOL_VERSION, "id": 7, "op": "show", "jid": 5}
    line = encode(req)
    assert line.endswith(b"\n") and b" " not in line
    assert parse_request(line) == req
    assert request_id(req) == 7
    check_version(req)


@pytest.mark.parametrize("line, why", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"x": NaN}', "NaN is not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "nests too deeply"),
])
def test_bad_lines_are_bad_requests(line, why):
    with pytest.raises(ProtocolError, match=why) as info:
        parse_request(line)
    assert info.value.code == "bad-request"


def test_versions_and_ids():
    with pytest.raises(UnsupportedVersion):
        check_version({"v": 2})
    with pytest.raises(UnsupportedVersion):
        check_version({"v": True})
    for bad in (True, 2 ** 63, "x" * 257, 1.5):
        with pytest.raises(ProtocolError):
            request_id({"id": bad})
    assert request_id({}) is None


def test_encode_refuses_what_json_cannot_carry():
    with pytest.raises(ValueError):
        encode({"timeout": math.nan})


def test_replies():
    assert ok_reply(None, 1) == {"v": PROTOCOL_VERSION, "ok": True, "result": 1}
    err = error_reply("a", "no-such-job", "gone")
    assert err["id"] == "a" and err["error"] == {"code": "no-such-job", "message": "gone"}
    assert "no-such-job" in ERROR_CODES
    assert parse_reply(encode(err)) == err
    with pytest.raises(ProtocolError, match="not an object"):
        parse_reply(b"[]\n")


def test_field_readers():
    assert get_int({"n": 3}, "n") == 3
    assert get_int({}, "n", required=False) is None
    for bad in ({"n": True}, {"n": "3"}, {"n": -1}, {}):
        with pytest.raises(ProtocolError):
            get_int(bad, "n")
    assert get_pids({"pids": [3, 3, 4]}) == [3, 4]
    for bad in ([], [0], [True], [2 ** 31], "1"):
        with pytest.raises(ProtocolError):
            get_pids({"pids": bad})
    assert get_str({"name": None}, "name") == ""
    with pytest.raises(ProtocolError, match="control characters"):
        get_str({"name": "a\x1b[2J"}, "name")
    assert get_str_map({"tags": {"q": "short"}}, "tags") == {"q": "short"}
    for bad in ({"a b": "x"}, {"a=b": "x"}, {"a": 1}, {"": "x"}):
        with pytest.raises(ProtocolError):
            get_str_map({"tags": bad}, "tags")
