"""Bad query arguments of the web pages: a JSON request gets a 400 naming them, never
a 500 or a silently ignored filter (Flask's test client over a real store)."""

from __future__ import annotations

import pytest

from elsa.core.model import Job
from elsa.core.store import Store
from elsa.web.app import create_app
from tests.test_web_job_usage import WEB

HDR = {"Remote-User": "root"}


@pytest.fixture
def client(tmp_path):
    st = Store(str(tmp_path))
    for jid, tags in ((0x2A00000001, {"a": "b", "c": "d"}), (0x2A00000002, {"a": "b"}),
                      (0x2A00000003, {"a.b": "1", "c[0]": "2", 'q"k': "3"})):
        st.insert_job(Job(jid=jid, name="j", owner_uid=0, tags=tags, created=1.0e9,
                          ended=1.0e9 + 60, state="ended", backend="cnproc", params={}))
    st.flush()
    app = create_app(db_path=st.path, state_dir=str(tmp_path), socket_path="/nonexistent",
                     web=WEB)
    yield app.test_client()
    st.close()


@pytest.mark.parametrize("url, names", [
    ("/jobs.json?state=zombie", "state 'zombie'"),
    ("/jobs.json?order=sideways", "order 'sideways'"),
    ("/jobs.json?page=abc", "page 'abc'"),
    ("/jobs.json?page=-1", "page '-1'"),
    ("/jobs.json?page=99999999999999999999999", "page '99999999999999999999999'"),
    ("/jobs.json?since=1e300", "since: '1e300'"),
    ("/users.json?since=1e300", "since: '1e300'"),
    ("/users.json?since=garbage", "since:"),
    ("/apps.json?by=nosuch", "'nosuch'"),
])
def test_a_bad_argument_is_a_400_that_names_it(client, url, names):
    r = client.get(url, headers=HDR)
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    assert names in r.get_json()["error"]


def test_repeated_tag_filters_all_apply_and_are_all_shown(client):
    r = client.get("/jobs.json?tag=a=b&tag=c=d&page=1", headers=HDR).get_json()
    assert [j["jid"] for j in r["jobs"]] == ["0x0000002a00000001"]
    assert r["filters"] == {"tag": ["a=b", "c=d"], "page": "1"}


def test_a_job_id_beyond_the_store_s_integers_is_not_found(client):
    assert client.get("/jobs/0xffffffffffffffff.json", headers=HDR).status_code == 404


@pytest.mark.parametrize("tag, found", [
    ("a.b=1", ["0x0000002a00000003"]), ("c[0]=2", ["0x0000002a00000003"]),
    ('q"k=3', ["0x0000002a00000003"]), ("a=b", ["0x0000002a00000002", "0x0000002a00000001"]),
    ("['x=y", []), ("a\x00b=1", []), ("b=1", [])])
def test_a_tag_key_is_matched_as_written_never_as_a_json_path(client, tag, found):
    """Job tag keys are free text (`elsa-jobmng --tag 'a.b=1'`): a key with '.', '[' or
    a quote is found, and one that is no valid JSON path is no match, not a 500."""
    from urllib.parse import quote

    r = client.get(f"/jobs.json?tag={quote(tag)}", headers=HDR)
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    assert [j["jid"] for j in r.get_json()["jobs"]] == found


def test_the_form_s_empty_tag_field_is_no_filter_and_no_problem(client):
    """The filter form sends every field; an empty Tag field (a filter by name only) is
    no tag filter, as an empty Name is no name filter."""
    r = client.get("/jobs.json?user=&name=&tag=&state=&since=&until=", headers=HDR)
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    assert r.get_json()["total"] == 3
    page = client.get("/jobs?name=j&tag=", headers=HDR).get_data(as_text=True)
    assert 'class="problems"' not in page


def test_the_form_keeps_each_of_several_tag_filters(client):
    """A bookmarked view with two tag filters: the form shows each in its own Tag field,
    so pressing Filter again sends the same two (not the text of a Python list)."""
    import re

    page = client.get("/jobs?tag=a=b&tag=c=d", headers=HDR).get_data(as_text=True)
    assert re.findall(r'<input name="tag" value="([^"]*)"', page) == ["a=b", "c=d"]
    one = client.get("/jobs?tag=a=b", headers=HDR).get_data(as_text=True)
    assert re.findall(r'<input name="tag" value="([^"]*)"', one) == ["a=b"]
    none = client.get("/jobs", headers=HDR).get_data(as_text=True)
    assert re.findall(r'<input name="tag" value="([^"]*)"', none) == [""]


def test_a_page_past_the_end_says_so_and_links_the_last_page(client):
    """A bookmarked page the jobs no longer fill said "page 2 of 1 · No job matches",
    though jobs do match. It stays empty (a script walking pages stops at an empty one;
    showing the last page instead would never end its walk) and says it is past the end."""
    r = client.get("/jobs.json?page=2", headers=HDR).get_json()
    assert r["total"] == 3 and r["page"] == 2 and r["jobs"] == []
    page = client.get("/jobs?page=2&state=ended", headers=HDR).get_data(as_text=True)
    assert "page 2 of 1" not in page and "No job matches" not in page
    assert "3 jobs · page 2 is past the end: there is 1 page" in page
    assert 'href="/jobs?page=1&amp;state=ended">go to the last</a>' in page
    assert 'rel="prev" href="/jobs?page=1&amp;state=ended"' in page
    empty = client.get("/jobs?name=nosuch&page=2", headers=HDR).get_data(as_text=True)
    assert "No job matches" in empty  # no job at all: nothing is past the end
