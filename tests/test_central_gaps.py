"""Gaps (intervals in which a source missed records: elsa.core.usage, "its gaps") reach
the central store, so a central report reads a gap's hours process by process as the
node's own report does, against a real PostgreSQL (tests/central_support.py)."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List

import pytest

psycopg = pytest.importorskip("psycopg")

from elsa.central.pgserver import PgServer, pg_bindir  # noqa: E402
from elsa.central.shipper import Shipper  # noqa: E402
from elsa.core.aggregator import INSERT_PROC  # noqa: E402
from elsa.core.store import Store  # noqa: E402
from elsa.core.usage import ROW_FIELDS, gap_stmt, save_priorities  # noqa: E402
from elsa.report.cli import main as elsa_main  # noqa: E402
from tests.central_support import NOW, add_node, admin, fresh_db, pg, shipper  # noqa: E402

__all__ = ["pg"]  # the fixture

pytestmark = pytest.mark.skipif(pg_bindir() is None, reason="Debian's postgresql not installed")

#: An hour a day ago (in a month partition migrate made), and the gap in it: taskstats
#: lost records for 10 s (elsad down, or ENOBUFS).
HOUR = math.floor((NOW - 86400) / 3600) * 3600
GAP = (HOUR + 970.0, HOUR + 980.0)


def _row(source: str, pid: int, comm: str, end: float, cpu: int) -> tuple:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(source=source, pid=pid, start_time=end - 1, end_time=end, uid=1000, comm=comm,
               cpu_user_us=cpu, cpu_system_us=0, elapsed_us=1_000_000)
    return tuple(row.values())


def _node(state: Path, gap: bool) -> Store:
    """A node's store: processes both sources recorded (bsdacct's end up to 1 s early,
    its CPU rounded) in HOUR and the hour after; with *gap*, one more that ran while
    taskstats missed records, which only bsdacct has; without, 5 short processes of
    HOUR that taskstats folded ([thresholds]): one proc_folded row."""
    st = Store(str(state))
    save_priorities(st.db, st.submit, {"taskstats": 20, "bsdacct": 30})
    rows = []
    for i, minute in enumerate((5, 10, 15, 20, 30, 40)):
        end = HOUR + 60 * minute + 0.37
        rows += [_row("taskstats", 100 + i, f"cmd{i}", end, 1_234_567),
                 _row("bsdacct", 100 + i, f"cmd{i}", end - 0.8, 1_230_000)]
    for i in range(3):
        end = HOUR + 3600 + 600 + i
        rows += [_row("taskstats", 400 + i, "after", end, 1_000_000),
                 _row("bsdacct", 400 + i, "after", end - 0.5, 990_000)]
    if gap:
        rows.append(_row("bsdacct", 200, "downburn", GAP[0] + 7, 360_000))
        st.submit(*gap_stmt("taskstats", *GAP))
    else:
        st.submit("INSERT INTO proc_folded(source, uid, comm, end_time, folded, mem_kb_sum, "
                  "cpu_user_us) VALUES ('taskstats', 1000, 'tiny', ?, 5, 0, 500)",
                  (HOUR + 1500.0,))
    st.submit_many(INSERT_PROC, rows)
    st.flush()
    return st


def _ship(st: Store, url: str, host: str) -> Shipper:
    """A shipper that has shipped everything, by rounds run here (still open: stop it)."""
    sh = shipper(st, url, host)
    sh._open_local()
    sh._connect()
    while sh._round():
        pass
    return sh


def _summary(capsys: Any, db: str, *args: str) -> Dict[Any, Dict[str, Any]]:
    capsys.readouterr()
    assert elsa_main(["summary", "--by", "command", "--json", "--db", db, *args]) == 0
    return {r["command"]: r for r in json.loads(capsys.readouterr().out)}


def _central_gaps(pg: PgServer, db: str) -> List[tuple]:
    with admin(pg, db) as c:
        return c.execute("SELECT host, source, start_time, end_time FROM gaps "
                         "ORDER BY host, source, start_time").fetchall()


def test_central_summary_counts_a_gap_hour_as_the_node_does(
        pg: PgServer, tmp_path: Path, capsys) -> None:
    """A process only bsdacct recorded, in an hour where taskstats had a gap: counted
    centrally as on the node. A second node without a gap: its records of that hour
    are read as on its own store (the records [thresholds] folded count; read process
    by process they were left out)."""
    fresh_db(pg, "gaps")
    stores = {"g1": _node(tmp_path / "g1", gap=True), "g2": _node(tmp_path / "g2", gap=False)}
    for host, st in stores.items():
        _ship(st, add_node(pg, host, "gaps"), host).stop()
    assert _central_gaps(pg, "gaps") == [("g1", "taskstats", *GAP)]
    dburl = pg.admin_url.replace("/postgres?", "/gaps?")
    site: Dict[str, int] = {}
    for window in ([], ["--since", str(HOUR), "--until", str(HOUR + 7200)],
                   ["--since", str(HOUR + 180), "--until", str(HOUR + 5400)]):
        for host, st in stores.items():
            node = _summary(capsys, st.path, *window)
            central = _summary(capsys, dburl, "--host", host, *window)
            assert central == node, (host, window)
        g1 = _summary(capsys, stores["g1"].path, *window)
        assert g1["downburn"]["processes"] == 1
        assert g1["downburn"]["cpu_user_us"] == 360_000
        assert g1["cmd1"]["processes"] == 1 and g1["cmd1"]["cpu_user_us"] == 1_234_567
        g2 = _summary(capsys, stores["g2"].path, *window)
        site = {c: r["processes"] for c, r in _summary(capsys, dburl, *window).items()}
        assert site == {c: sum(n.get(c, {"processes": 0})["processes"] for n in (g1, g2))
                        for c in set(g1) | set(g2)}
        # The folded records count in whole hours and at a window's edges alike (the
        # last window's first hour is an edge), on the node as centrally.
        assert site.get("tiny") == 5 and g2["tiny"]["processes"] == 5, (window, site)
        assert g2["tiny"]["cpu_user_us"] == 500, g2["tiny"]
    assert site["downburn"] == 1 and site["after"] == 6
    # elsa bill reads the same parts: its outside-job processes, centrally as on the nodes.
    cfg = tmp_path / "bill.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[billing]\n[billing.rates]\ncpu_user = 1\n')
    for window in (["--since", str(HOUR), "--until", str(HOUR + 7200)],
                   ["--since", str(HOUR + 180), "--until", str(HOUR + 5400)]):
        bills = {}
        for where in [st.path for st in stores.values()] + [dburl]:
            capsys.readouterr()
            assert elsa_main(["bill", "--config", str(cfg), "--db", where, "--json",
                              *window]) == 0
            bills[where] = json.loads(capsys.readouterr().out)
        nodes = [bills[st.path] for st in stores.values()]
        # Centrally each node's best source per hour, and only g1's records of its gap
        # hour read process by process: g2's folded records count there too.
        # (one row per node here: uid 1000 is user@g1 and user@g2, as no mapping joins them)
        assert sorted(r["processes"] for r in bills[dburl]["rows"]) == sorted(
            b["rows"][0]["processes"] for b in nodes), (window, bills)
        assert Decimal(bills[dburl]["total"]) == sum(Decimal(b["total"]) for b in nodes)
        # g2's 5 folded records count at the edges too: 6 + 3 + 5 processes on g2.
        assert nodes[1]["rows"][0]["processes"] == 14, (window, nodes[1])
    for st in stores.values():
        st.close()


def test_gaps_resent_or_extended_are_not_doubled(pg: PgServer, tmp_path: Path) -> None:
    """An extended gap (same source and start, a later end) updates its central row;
    a restarted shipper sends every gap once more, which changes nothing; an older
    version sent again never shrinks one; a round with nothing new sends nothing."""
    fresh_db(pg, "gapsre")
    url = add_node(pg, "e1", "gapsre")
    st = _node(tmp_path / "e1", gap=True)
    sh = _ship(st, url, "e1")
    try:
        assert _central_gaps(pg, "gapsre") == [("e1", "taskstats", *GAP)]
        assert sh.status()["shipped_gaps"] == 1
        sent: List[Any] = []
        send = sh._send

        def counted(*a: Any, **kw: Any) -> None:
            sent.append(a[7] if len(a) > 7 else kw.get("gaps"))
            send(*a, **kw)

        sh._send = counted  # type: ignore[method-assign]
        assert sh._round() is False and sent == []  # nothing changed: nothing sent
        st.submit(*gap_stmt("taskstats", GAP[0], GAP[1] + 30))  # extended
        st.submit(*gap_stmt("bsdacct", HOUR + 3000, HOUR + 3010))  # a new one
        st.flush()
        assert sh._round() is False
        assert len(sent) == 1 and sorted(sent[0]) == [("bsdacct", HOUR + 3000, HOUR + 3010),
                                                      ("taskstats", GAP[0], GAP[1] + 30)]
        want = [("e1", "bsdacct", HOUR + 3000, HOUR + 3010),
                ("e1", "taskstats", GAP[0], GAP[1] + 30)]
        assert _central_gaps(pg, "gapsre") == want
        assert sh._round() is False and len(sent) == 1
        assert sh.status()["shipped_gaps"] == 3  # the first, the extended, the new one
        # The round of the older version again (its commit unseen, say): no shrinking.
        sh._send([], [], [], set(), None, (), (), [("taskstats", *GAP)])
        assert _central_gaps(pg, "gapsre") == want
    finally:
        sh.stop()
    st.flush()  # the marks the shipper wrote
    sh = shipper(st, url, "e1")  # a restart: every gap sent again, once
    try:
        sh._open_local()
        sh._connect()
        assert len(sh._changed_gaps(sh._local)) == 2
        assert sh._round() is False
        assert sh.status()["shipped_records"] == 0  # the records were shipped before
        assert sh.status()["shipped_gaps"] == 2  # the gaps are sent again, once
        assert sh._changed_gaps(sh._local) == []
        assert _central_gaps(pg, "gapsre") == want
    finally:
        sh.stop()
    st.close()


def test_a_node_writes_only_its_own_gaps(pg: PgServer) -> None:
    from tests.central_support import assert_reader_reads_only

    fresh_db(pg, "gapsrls")
    url_a = add_node(pg, "ga", "gapsrls")
    add_node(pg, "gb", "gapsrls")
    ins = "INSERT INTO gaps (host, source, start_time, end_time) VALUES (%s, %s, %s, %s)"
    with admin(pg, "gapsrls") as c:
        c.execute(ins, ("gb", "taskstats", 10.0, 20.0))
    with psycopg.connect(url_a, autocommit=True) as a:
        a.execute(ins, ("ga", "taskstats", 10.0, 20.0))  # its own gap
        a.execute("UPDATE gaps SET end_time = 30 WHERE host = 'ga'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            a.execute(ins, ("gb", "bsdacct", 10.0, 20.0))
        # Another node's gaps are invisible: an UPDATE finds nothing to change.
        assert a.execute("UPDATE gaps SET end_time = 99 WHERE host = 'gb'").rowcount == 0
        assert a.execute("SELECT count(*) FROM gaps").fetchone()[0] == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            a.execute("UPDATE gaps SET host = 'gb' WHERE host = 'ga'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            a.execute("DELETE FROM gaps WHERE host = 'ga'")  # not even its own
    with admin(pg, "gapsrls") as c:
        assert c.execute("SELECT host, end_time FROM gaps ORDER BY host").fetchall() == [
            ("ga", 30.0), ("gb", 20.0)]
    assert_reader_reads_only(pg, "gapsrls", "gaps", 2, "UPDATE gaps SET end_time = 0")


def test_a_hosts_gap_hour_is_read_per_process_for_that_host_only() -> None:
    """window_parts: the hour of g1's gap is a processes part of g1's records and an
    hours (whole) or records (edge) part of every other host's."""
    from elsa.report.window import Part, window_parts

    h = 500_000
    g1 = frozenset({"g1"})
    assert window_parts(h * 3600, (h + 2) * 3600, {h: g1}) == [
        Part("processes", h * 3600, (h + 1) * 3600, only=g1),
        Part("hours", h, h + 1, but=g1), Part("hours", h + 1, h + 2)]
    assert window_parts(h * 3600 + 60, (h + 1) * 3600, {h: g1}) == [
        Part("processes", h * 3600 + 60, (h + 1) * 3600, only=g1),
        Part("records", h * 3600 + 60, (h + 1) * 3600, but=g1)]
    # A node's store: the hour is read process by process, whole.
    assert window_parts(h * 3600, (h + 1) * 3600, {h: None}) == [
        Part("processes", h * 3600, (h + 1) * 3600)]
