"""Starting `elsa web` where it cannot serve: a clear error, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys


def test_an_address_in_use_is_an_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "elsa.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n')
        r = subprocess.run([sys.executable, "-m", "elsa.report.cli", "web", "--config", str(cfg),
                            "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--listen" in r.stderr


def test_a_missing_store_is_a_503_naming_it_on_every_page(tmp_path):
    """elsa web may start before elsad made its store (or on a wrong state_dir): each
    page says which store is missing and what to check, instead of a bare 500."""
    from elsa.web.app import create_app
    from tests.test_web_job_usage import WEB

    path = str(tmp_path / "none" / "elsa.db")
    client = create_app(db_path=path, state_dir=str(tmp_path), socket_path="/nonexistent",
                        web=WEB).test_client()
    hdr = {"Remote-User": "root"}
    for url in ("/jobs.json", "/jobs/0x1.json", "/users.json", "/accounts.json"):
        r = client.get(url, headers=hdr)
        assert r.status_code == 503, (url, r.get_data(as_text=True)[:300])
        assert path in r.get_json()["error"] and "state_dir" in r.get_json()["error"]
    page = client.get("/jobs", headers=hdr)
    assert page.status_code == 503 and path in page.get_data(as_text=True)


def test_the_apps_page_without_a_store_is_the_same_503(tmp_path):
    """/apps caught every error as "no application records": a missing store was a 200
    with an empty table, where every other page answers 503 naming the store."""
    from elsa.web.app import create_app
    from tests.test_web_job_usage import WEB

    path = str(tmp_path / "none" / "elsa.db")
    client = create_app(db_path=path, state_dir=str(tmp_path), socket_path="/nonexistent",
                        web=WEB).test_client()
    hdr = {"Remote-User": "root"}
    r = client.get("/apps.json", headers=hdr)
    assert r.status_code == 503, r.get_data(as_text=True)[:300]
    assert path in r.get_json()["error"] and "state_dir" in r.get_json()["error"]
    page = client.get("/apps?by=user", headers=hdr)
    assert page.status_code == 503 and path in page.get_data(as_text=True)


def test_a_get_on_an_action_url_is_elsa_s_405_page(tmp_path):
    """A GET on a job's action URL (a followed link, a reload) was Werkzeug's bare 405
    page, outside ELSA's layout and without saying what to do."""
    from elsa.core.store import Store
    from elsa.web.app import create_app
    from tests.test_web_job_usage import WEB

    st = Store(str(tmp_path))
    st.close()
    client = create_app(db_path=st.path, state_dir=str(tmp_path), socket_path="/nonexistent",
                        web=dict(WEB, actions=True)).test_client()
    r = client.get("/jobs/0x2a00000001/action", headers={"Remote-User": "root"})
    page = r.get_data(as_text=True)
    assert r.status_code == 405 and r.headers["Allow"] == "OPTIONS, POST"
    assert 'id="error"' in page and "Sign out" in page  # ELSA's page, signed in
    assert "GET is not allowed on /jobs/0x2a00000001/action: it takes POST only" in page
    r = client.get("/jobs/0x2a00000001/action",
                   headers={"Remote-User": "root", "Accept": "application/json"})
    assert r.status_code == 405 and "takes POST only" in r.get_json()["error"]
