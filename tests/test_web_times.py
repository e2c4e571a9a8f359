"""Times on ``elsa web``'s pages: the page's times and its chart's time axis are in one
zone (the server's, as the CLI prints them) and the zone is named, so a visitor whose
browser runs in another zone does not read two different times for one moment
(Flask's test client over a store; the server in New York's zone)."""

from __future__ import annotations

import pytest

from elsa.core.aggregator import INSERT_SAMPLE
from elsa.core.model import Job
from elsa.core.store import Store
from elsa.web.app import create_app
from tests.test_web_job_usage import WEB

HDR = {"Remote-User": "root"}
T0 = 1.7e9  # 2023-11-14 22:13:20 UTC = 17:13:20 EST


@pytest.fixture
def new_york(host_zone):
    host_zone("America/New_York")


def test_page_times_and_chart_labels_share_the_named_server_zone(tmp_path, new_york):
    st = Store(str(tmp_path))
    jid = 0x2A00000001
    st.insert_job(Job(jid=jid, name="j", owner_uid=0, tags={}, created=T0, ended=T0 + 3,
                      state="ended", backend="cgroup2", params={}))
    for i in range(3):
        st.submit(INSERT_SAMPLE, (jid, T0 + i, 1_000_000 * i, 1 << 20))
    st.flush()
    client = create_app(db_path=st.path, state_dir=str(tmp_path), socket_path="/nonexistent",
                        web=WEB).test_client()
    page = client.get(f"/jobs/{jid:#018x}", headers=HDR).get_data(as_text=True)
    assert "<th>Start</th><td>2023-11-14 17:13:20 EST</td>" in page
    listing = client.get("/jobs", headers=HDR).get_data(as_text=True)
    assert "<td>2023-11-14 17:13:20 EST</td><td>2023-11-14 17:13:23 EST</td>" in listing
    samples = client.get(f"/jobs/{jid:#018x}.json", headers=HDR).get_json()["samples"]
    # The chart's axis labels, written by the server in its zone (elsa.js shows them
    # as they are instead of formatting the times in the browser's zone).
    assert [s["label"] for s in samples] == ["17:13:20", "17:13:21", "17:13:22"]
    js = client.get("/static/elsa.js").get_data(as_text=True)
    assert "s[i].label" in js and "toLocaleTimeString" not in js
    st.close()
