"""`elsa export ... --db postgresql://...`: the exports read the central store as they
read a node's (the report queries run on both), each job named by its node."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from elsa.central.pgserver import PgServer
from elsa.report.cli import main
from elsa.testing import wait_for
from tests import apel_strict
from tests.central_support import add_node, drained, fill_store, fresh_db, pg, shipper

__all__ = ["pg"]  # the fixture


def test_exports_from_the_central_store(pg: PgServer, tmp_path: Path, capsys) -> None:
    fresh_db(pg, "exp")
    url = add_node(pg, "n1", "exp")
    st = fill_store(tmp_path / "n1", 1)
    sh = shipper(st, url, "n1").start()
    try:
        wait_for(lambda: drained(sh), 30, what="the backlog to drain")
    finally:
        sh.stop()
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
    capsys.readouterr()
    assert main(["export", "apel", "--db", dburl, "--site", "S", "--outgoing",
                 str(tmp_path / "o2")]) == 2
    # Individual records: refused, saying what to do instead (and nothing written).
    err = capsys.readouterr().err
    assert ("job records are not exported from the central store (--db ...), which keeps "
            "no record of the jobs already sent; run 'elsa export apel' (without --db) on "
            "each node, whose store's 'exported' table sends each job once, or add "
            "--summary here for the site's monthly summaries") in err, err
    assert not (tmp_path / "o2").exists()
    st.close()
