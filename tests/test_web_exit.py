"""The exit shown by ``elsa web``: the exit of each ended job's first member, as
``elsa jobs --format exit`` and ``elsa eff`` show it (Flask's test client over a store)."""

from __future__ import annotations

import re

from elsa.core.model import Job
from elsa.core.store import Store
from elsa.web.app import create_app
from tests.test_web_job_usage import WEB

HDR = {"Remote-User": "root"}


def test_jobs_and_job_page_show_the_exit_of_the_first_member(tmp_path):
    st = Store(str(tmp_path))
    failed, killed, running = 0x2A00000001, 0x2A00000002, 0x2A00000003
    for jid, state in ((failed, "ended"), (killed, "ended"), (running, "running")):
        st.insert_job(Job(jid=jid, name=f"j{jid & 0xF}", owner_uid=0, tags={}, created=1.0e9,
                          ended=1.0e9 + 60 if state == "ended" else None, state=state,
                          backend="cnproc", params={}))
    # wait(2) statuses: exit(3), killed by SIGKILL; the running job's member is alive.
    for jid, pid, status in ((failed, 100, 3 << 8), (killed, 200, 9), (running, 300, None)):
        st.add_member("boot", jid, pid, pid, 1.0e9, "run")
        if status is not None:
            st.close_member("boot", jid, pid, pid, 1.0e9 + 60, status)
    st.flush()
    client = create_app(db_path=st.path, state_dir=str(tmp_path), socket_path="/nonexistent",
                        web=WEB).test_client()

    jobs = {j["jid"]: j for j in client.get("/jobs.json", headers=HDR).get_json()["jobs"]}
    assert (jobs[f"{failed:#018x}"]["exit_code"], jobs[f"{failed:#018x}"]["exit_signal"]) == (3, 0)
    assert (jobs[f"{killed:#018x}"]["exit_code"], jobs[f"{killed:#018x}"]["exit_signal"]) == (0, 9)
    assert "exit_code" not in jobs[f"{running:#018x}"]

    page = client.get("/jobs", headers=HDR).get_data(as_text=True)
    rows = {m.group(1): m.group(2) for m in re.finditer(
        r'class="jid" href="[^"]*">(0x[0-9a-f]+)</a>.*?<td>([^<]*)</td>\s*</tr>', page, re.S)}
    assert rows == {f"{failed:#018x}": "3:0", f"{killed:#018x}": "0:9",
                    f"{running:#018x}": "-"}

    one = client.get(f"/jobs/{failed:#018x}", headers=HDR).get_data(as_text=True)
    assert "<th>Exit</th><td>3:0</td>" in one
    assert client.get(f"/jobs/{failed:#018x}.json", headers=HDR).get_json()["exit_code"] == 3
    st.close()
