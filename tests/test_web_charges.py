"""Charges on the users and accounts pages of ``elsa web`` (Flask's test client over a
store with ``[billing]`` rates): the charge of a row is that of the usage beside it."""

from __future__ import annotations

import pwd

import pytest

from elsa import config
from elsa.billing import rates
from elsa.core.aggregator import INSERT_PROC
from elsa.core.model import Job
from elsa.core.store import Store
from elsa.core.usage import UsageRecord, record_row
from elsa.web.app import create_app
from tests.test_web_job_usage import WEB

T0 = 1.7e9
NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def client(tmp_path):
    st = Store(str(tmp_path))
    # Two users' jobs in account chem: root's 3 user CPU seconds, nobody's 1.
    for jid, uid, cpu_s in ((0x2A00000001, 0, 3), (0x2A00000002, NOBODY, 1)):
        st.insert_job(Job(jid=jid, name="j", owner_uid=uid, tags={"account": "chem"},
                          created=T0, ended=T0 + 60, state="ended", backend="cnproc",
                          params={}))
        st.submit(INSERT_PROC, record_row(UsageRecord(
            "taskstats", 100 + uid, start_ticks=1, uid=uid, cpu_user_us=cpu_s * 1_000_000,
            cpu_system_us=0, start_time=T0, end_time=T0 + 30), jid))
    st.flush()
    cfg = tmp_path / "elsa.toml"
    cfg.write_text('[billing]\ntimezone = "UTC"\n[billing.rates]\ncpu_user = 1\n')
    app = create_app(db_path=st.path, state_dir=str(tmp_path), socket_path="/nonexistent",
                     web=WEB, billing=rates.from_config(config.load(str(cfg))))
    yield app.test_client()
    st.close()


def _rows(client, path, who):
    r = client.get(path, headers={"Remote-User": who})
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    return r.get_json()["rows"]


@pytest.mark.parametrize("path", ["/users.json?since=2100-01-01",
                                  "/accounts.json?since=2100-01-01",
                                  "/users.json?since=2026-01-02&until=2026-01-01",
                                  "/accounts.json?since=2026-01-02&until=2026-01-01"])
def test_an_empty_window_is_no_charge_or_a_400_not_a_500(client, path):
    r = client.get(path, headers={"Remote-User": "root"})
    if "until" in path:  # as `elsa bill`: until before since is refused, named
        assert r.status_code == 400, r.get_data(as_text=True)[:500]
        assert "until" in r.get_json()["error"] and "since" in r.get_json()["error"]
        page = client.get(path.replace(".json", ""), headers={"Remote-User": "root"})
        assert page.status_code == 200 and 'class="problems"' in page.get_data(as_text=True)
    else:  # a window after now: nothing used, nothing charged
        assert r.status_code == 200, r.get_data(as_text=True)[:500]
        assert r.get_json()["rows"] == []


def test_a_user_s_account_row_charges_only_their_own_usage(client):
    """A user sees their own usage only (docs/security.md: a bill holds the caller's
    own items), so the charge beside it is theirs, not the whole account's."""
    mine = _rows(client, "/accounts.json", "nobody")
    assert [(r["account"], r["cpu_user_us"], r["charge"]) for r in mine] == \
        [("chem", 1_000_000, "1.00")]
    assert [(r["user"], r["charge"]) for r in _rows(client, "/users.json", "nobody")] == \
        [("nobody", "1.00")]
    every = _rows(client, "/accounts.json", "root")
    assert [(r["account"], r["cpu_user_us"], r["charge"]) for r in every] == \
        [("chem", 4_000_000, "4.00")]


def test_the_accounts_page_is_titled_accounts(client):
    page = client.get("/accounts", headers={"Remote-User": "root"}).get_data(as_text=True)
    assert "<title>Accounts · ELSA</title>" in page
    page = client.get("/users", headers={"Remote-User": "root"}).get_data(as_text=True)
    assert "<title>Users · ELSA</title>" in page


def test_a_row_without_a_charge_shows_a_dash_not_none(tmp_path):
    """An account whose only job still runs has usage and no charge yet (elsa bill
    charges ended jobs): its Charge cell is '-', as every unknown figure on the pages."""
    st = Store(str(tmp_path))
    st.insert_job(Job(jid=0x2A00000001, name="j", owner_uid=0, tags={"account": "live"},
                      created=T0, ended=None, state="running", backend="cnproc", params={}))
    st.flush()
    cfg = tmp_path / "elsa.toml"
    cfg.write_text('[billing]\ntimezone = "UTC"\n[billing.rates]\ncpu_user = 1\n')
    client = create_app(db_path=st.path, state_dir=str(tmp_path), socket_path="/nonexistent",
                        web=WEB, billing=rates.from_config(config.load(str(cfg)))).test_client()
    assert [(r["account"], r["charge"]) for r in _rows(client, "/accounts.json", "root")] == \
        [("live", None)]
    page = client.get("/accounts", headers={"Remote-User": "root"}).get_data(as_text=True)
    row = [line for line in page.splitlines() if "<td>live</td>" in line]
    assert len(row) == 1 and row[0].endswith("<td>-</td></tr>") and "None" not in row[0]
    st.close()
