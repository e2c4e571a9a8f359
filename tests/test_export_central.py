"""`elsa export ... --db postgresql://...`: the exports read the central store as they
read a node's (the report queries run on both), each job named by its node."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from elsa.central.pgserver import PgServer
from elsa.report.cli import main
from tests import apel_strict
from tests.central_support import add_node, fill_store, fresh_db, pg, ship_all

__all__ = ["pg"]  # the fixture


def test_exports_from_the_central_store(pg: PgServer, tmp_path: Path, capsys,
                                       monkeypatch) -> None:
    apel_strict.use_config(tmp_path, monkeypatch)  # APEL requires a benchmark
    fresh_db(pg, "exp")
    url = add_node(pg, "n1", "exp")
    st = fill_store(tmp_path / "n1", 1)
    ship_all(st, url, "n1")
    dburl = pg.admin_url.replace("/postgres?", "/exp?")
    capsys.readouterr()  # the shipper's log lines
    assert main(["export", "jsonl", "--db", st.path]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["export", "jsonl", "--db", dburl]) == 0
    central = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(central) == 5 and {o["host"] for o in central} == {"n1"}
    assert [o["usage"] for o in central] == [o["usage"] for o in local]
    assert all(o["user"].endswith("@n1") for o in central)   # the central store's user label
    assert main(["export", "ur", "--db", dburl]) == 0
    root = ET.fromstring(capsys.readouterr().out.encode())
    assert {e.text for e in root.iter("{http://schema.ogf.org/urf/2003/09/urf}MachineName")} \
        == {"n1"}
    out = tmp_path / "out"
    assert main(["export", "apel", "--summary", "--db", dburl, "--site", "S", "--outgoing",
                 str(out), "--path-type", "directory"]) == 0
    recs = []
    for p in sorted(out.iterdir()):
        kind, got, rejects = apel_strict.parse_message(p.read_text())
        assert kind == "summary" and rejects == []
        recs.extend(got)
    assert sum(r["NumberOfJobs"] for r in recs) == 5 and {r["SubmitHost"] for r in recs} == {"n1"}
    # Job records: each job once, remembered in a ledger file of the exporting machine
    # (the central store is written by nodes only).
    ledger = tmp_path / "exporter" / "apel-central.db"

    def apel_jobs(*args: str) -> dict:
        capsys.readouterr()
        assert main(["export", "apel", "--site", "S", "--path-type", "directory", "--json",
                     *args]) == 0
        return json.loads(capsys.readouterr().out)

    def records(out_dir: Path) -> list:
        got = []
        for p in sorted(out_dir.iterdir()):
            kind, recs, rejects = apel_strict.parse_message(p.read_text())
            assert kind == "job" and rejects == [], rejects
            got.extend(recs)
        return got

    res = apel_jobs("--db", dburl, "--outgoing", str(tmp_path / "o2"), "--ledger", str(ledger))
    assert res["records"] == 5 and ledger.exists(), res
    central_recs = records(tmp_path / "o2")
    # The node's own export of the same jobs: APEL keys a record by Site, LocalJobId and
    # EndTime (it replaces one with the same key), so a job sent both ways is one record.
    node_cfg = tmp_path / "n1.toml"  # the node's config names it as the central store does
    node_cfg.write_text(f'state_dir = "{tmp_path / "n1"}"\n[central]\nhost = "n1"\n'
                        + apel_strict.CONFIG)
    apel_jobs("--config", str(node_cfg), "--db", st.path, "--outgoing", str(tmp_path / "o3"))
    key = ("Site", "LocalJobId", "EndTime", "MachineName", "CpuDuration", "WallDuration")
    assert sorted(tuple(r[k] for k in key) for r in central_recs) == sorted(
        tuple(r[k] for k in key) for r in records(tmp_path / "o3"))
    # A rerun writes nothing (the ledger), --again everything.
    again = apel_jobs("--db", dburl, "--outgoing", str(tmp_path / "o4"), "--ledger",
                      str(ledger))
    assert again["records"] == 0 and again["messages"] == [], again
    assert apel_jobs("--db", dburl, "--outgoing", str(tmp_path / "o5"), "--ledger",
                     str(ledger), "--again")["records"] == 5
    # --ledger belongs to the central store; a ledger that cannot be written says where.
    assert main(["export", "apel", "--db", st.path, "--site", "S", "--ledger",
                 str(ledger)]) == 2
    assert "--ledger applies to job records from the central store" in capsys.readouterr().err
    (tmp_path / "ro").write_text("")  # a file where the ledger's directory should be
    assert main(["export", "apel", "--db", dburl, "--site", "S", "--outgoing",
                 str(tmp_path / "o6"), "--ledger", str(tmp_path / "ro" / "l.db")]) == 2
    err = capsys.readouterr().err
    assert f"cannot open the export ledger {tmp_path / 'ro' / 'l.db'}" in err, err
    assert not (tmp_path / "o6").exists()
    st.close()
