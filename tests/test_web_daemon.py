"""The /daemon page over a real elsad's status (Flask's test client, no browser)."""

from __future__ import annotations

import re

import pytest

from elsa.web.app import create_app
from tests.test_web_job_usage import WEB


@pytest.mark.root
def test_the_daemon_page_shows_readable_values_not_python_reprs(elsad, tmp_path):
    """The page printed status values with str(): False, None, ['apps', 'bsdacct', ...]
    and, two levels down, whole dicts. It writes them as elsa-jobmng status does:
    yes/no, comma lists, '-' for none, times as times; nested sections as tables."""
    d = elsad(backend="cnproc")
    client = create_app(db_path=str(tmp_path / "state" / "elsa.db"), state_dir=str(tmp_path),
                        socket_path=d.socket, web=WEB).test_client()
    r = client.get("/daemon", headers={"Remote-User": "root"})
    page = r.get_data(as_text=True)
    assert r.status_code == 200 and 'id="status"' in page
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert cells, page
    for repr_text in ("True", "False", "None", "[", "{"):
        assert not [c for c in cells if repr_text in c], (repr_text, cells)
    assert "<th>filtered</th><td>yes</td>" in page  # proc_connector.filtered
    assert "<th>active</th><td>no</td>" in page  # hold.active
    assert re.search(r"<th>plugins</th><td>([a-z0-9_]+, )+[a-z0-9_]+</td>", page), page
    assert "<th>quiet</th><td>0</td>" in page  # hold.ended.quiet: three levels down
    assert "<th>error</th><td>-</td>" in page  # store.error: None
