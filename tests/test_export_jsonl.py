"""`elsa export jsonl`: one JSON object per finished job, every documented key,
unknown as null (never 0), the JID as its string."""

from __future__ import annotations

import json

from elsa.core.usage import METRICS
from elsa.export.jsonl import KEYS
from elsa.report.cli import main
from tests.test_export_apel import NOW, _job, make_store


def test_one_object_per_finished_job(tmp_path, capsys):
    db = make_store(tmp_path, [_job(1, NOW - 7200, 60, tags={"account": "a"}),
                               _job(2, NOW - 3600, 30, cpu_u=None),
                               dict(jid=3, start=NOW, end=None)])
    capsys.readouterr()
    assert main(["export", "jsonl", "--db", db]) == 0
    cap = capsys.readouterr()
    objs = [json.loads(line) for line in cap.out.splitlines()]
    assert [o["jid"] for o in objs] == ["0x0000000000000001", "0x0000000000000002"]
    for o in objs:
        assert tuple(o) == KEYS
        assert set(o["usage"]) == set(METRICS)
    a, b = objs
    assert a["usage"]["cpu_user_us"] == 1_500_000 and a["wall_seconds"] == 60
    assert a["usage_sources"]["cpu_user_us"] == "cgroupstat"
    assert a["tags"] == {"account": "a"}
    assert a["usage"]["elapsed_us"] is None                  # no source measured it
    assert b["usage"]["cpu_user_us"] is None
    assert "0x0000000000000003 not exported" in cap.err


def test_host_is_the_name_the_central_store_knows(tmp_path, capsys):
    import socket

    db = make_store(tmp_path, [_job(1, NOW - 7200, 60)])
    capsys.readouterr()
    assert main(["export", "jsonl", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["host"] == socket.gethostname()
    cfg = tmp_path / "elsa.toml"
    cfg.write_text('[central]\nhost = "node-7"\n')
    assert main(["export", "jsonl", "--config", str(cfg), "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["host"] == "node-7"
