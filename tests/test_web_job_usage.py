"""The job page's usage notes, rendered by the web app over a store (no browser).

A job whose best figures come from a lower-ranked source because the preferred one
is flagged incomplete needs elsad to have been down while the job ran; the browser
tests (test_web.py) drive a live elsad, so this one writes that store state itself
and renders the page through Flask's test client.
"""

from __future__ import annotations

from elsa.core.aggregator import FLAG_INCOMPLETE, INSERT_PROC
from elsa.core.model import Job
from elsa.core.store import Store
from elsa.core.usage import UsageRecord, record_row
from elsa.web.app import create_app

WEB = {"trusted_proxies": ["127.0.0.1"], "user_header": "Remote-User", "login": False,
       "pam_service": "login", "actions": False, "page_size": 50, "session_hours": 1.0}


def test_job_page_names_the_fallback_and_the_incomplete_source(tmp_path):
    st = Store(str(tmp_path))
    jid = 0x2A00000001
    st.insert_job(Job(jid=jid, name="gap", owner_uid=0, tags={}, created=1.0e9,
                      ended=1.0e9 + 60, state="ended", backend="cnproc", params={}))
    st.submit(FLAG_INCOMPLETE, (jid, "taskstats", "elsad was not running for 3.0 s", 1.0e9))
    for pid, src in ((10, "taskstats"), (10, "bsdacct"), (11, "bsdacct")):
        st.submit(INSERT_PROC, record_row(UsageRecord(
            src, pid, start_ticks=pid, cpu_user_us=1_000_000, cpu_system_us=5,
            start_time=1.0e9, end_time=1.0e9 + 1), jid))
    st.flush()
    app = create_app(db_path=st.path, state_dir=str(tmp_path), socket_path="/nonexistent",
                     web=WEB)
    client = app.test_client()
    hdr = {"Remote-User": "root"}
    usage = client.get(f"/jobs/{jid:#018x}.json", headers=hdr).get_json()["usage"]
    assert usage["processes"] == 2 and usage["chosen"]["processes"] == "bsdacct"
    why = "from bsdacct: taskstats incomplete for this job"
    assert usage["fallback"]["processes"] == why
    page = client.get(f"/jobs/{jid:#018x}", headers=hdr).get_data(as_text=True)
    fallback = [line for line in page.splitlines() if 'class="fallback"' in line]
    assert len(fallback) == 1 and "processes" in fallback[0] and why in fallback[0]
    assert "Incomplete (taskstats): elsad was not running for 3.0 s" in page
    st.close()
