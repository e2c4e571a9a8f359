"""``elsa web`` in a real browser: Debian's Chromium, headless, driven by Selenium
through Debian's chromedriver, against a real elsad (cgroup2 backend, cgroup
samples every 0.2 s) and a real ``elsa web`` server (waitress) on loopback.

Visitors sign in through the login form, checked by PAM against accounts this
module creates (and removes). With ``ELSA_WEB_SCREENSHOTS=DIR`` the tests also
save a screenshot of each page there (``scripts/web-screenshots`` regenerates
docs/web/ that way).
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from elsa.client import Client
from elsa.testing import DaemonProc, wait_for
from tests.test_control_auth import User, as_user

pytestmark = [pytest.mark.root, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = os.environ.get("ELSA_WEB_SCREENSHOTS")


def _run(*cmd: str, input: Optional[str] = None) -> None:
    subprocess.run(cmd, check=True, input=input, text=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def _mount() -> str:
    from elsa.kernel.cgroupfs import CgroupFS

    return CgroupFS().cgroup2_mount()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """The accounts, the daemon and the web server of this module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.suffix = secrets.token_hex(3)
        self.group = f"elsaweb-g-{self.suffix}"
        self.admin = f"elsaweb-a-{self.suffix}"
        self.user = f"elsaweb-u-{self.suffix}"
        self.password = secrets.token_urlsafe(12)
        self.base = os.path.join(_mount(), f"elsa-test-web-{self.suffix}")
        self.daemon: Optional[DaemonProc] = None
        self.web: Optional[subprocess.Popen] = None
        self.url = ""
        self.jobs: Dict[str, str] = {}

    def accounts(self) -> None:
        _run("groupadd", self.group)
        for name, extra in ((self.admin, ["-G", self.group]), (self.user, [])):
            _run("useradd", "-M", "-s", "/usr/sbin/nologin", *extra, name)
            _run("chpasswd", input=f"{name}:{self.password}\n")

    def start(self) -> None:
        self.accounts()
        self.daemon = DaemonProc(self.tmp / "d", backend="cgroup2", extra=(
            f'admin_group = "{self.group}"\n'
            f'[backends.cgroup2]\nbase = "{self.base}"\n'
            "[sources.taskstats]\n[sources.cgroupstat]\ninterval = 0.2\n"
            "[apps]\nenabled = true\nmin_uid = 0\n")).start()
        os.chmod(self.tmp / "d", 0o755)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = self.tmp / "web.toml"
        cfg.write_text(f'state_dir = "{self.daemon.state_dir}"\nsocket = "{self.daemon.socket}"\n'
                       f'admin_group = "{self.group}"\n'
                       f'[web]\nlisten = "127.0.0.1:{self.port}"\nactions = true\n'
                       'trusted_proxies = ["127.0.0.2"]\n'
                       '[billing]\nunit = "SBU"\n[billing.rates]\ncpu_user = 2\n')
        self.web_log = open(self.tmp / "web.log", "wb")
        self.web = subprocess.Popen([sys.executable, "-m", "elsa.report.cli", "web", "--config",
                                     str(cfg)], stdout=self.web_log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.web is not None and self.web.poll() is None, (
                self.tmp / "web.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(up, 20, what="elsa web to listen")

    def run_jobs(self) -> None:
        assert self.daemon is not None
        sock = self.daemon.socket
        # root's job: burns CPU for ~2.5 s in two processes, so the chart has points.
        burn = ("import time\nt = time.time()\nwhile time.time() - t < 2.5:\n    pass\n")
        out = subprocess.run(
            [sys.executable, "-m", "elsa.jobmng", "--socket", sock, "--json", "run", "--name",
             "burn", "--tag", "partition=short", "--", "sh", "-c",
             f"{sys.executable} -c '{burn}' & {sys.executable} -c '{burn}'; wait"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        import pwd

        pw = pwd.getpwnam(self.user)
        user = User(self.user, pw.pw_uid, pw.pw_gid)

        def mine() -> str:
            with Client(sock, timeout=10) as c:
                job = c.create(name="mine")
                c.end(job["jid"])
                return str(job.get("jid_hex") or job["jid"])

        as_user(user, mine)
        with Client(sock) as c:
            jobs = c.call("list", all=True)
        for j in jobs:
            self.jobs[j["name"]] = str(j.get("jid_hex") or j["jid"])

        def ended() -> bool:
            with Client(sock) as c:
                return not [j for j in c.call("list") if j["name"] in ("burn", "mine")]

        wait_for(ended, 30, what="both jobs to end")

        def programs() -> bool:  # sh and two python3: written once their exit records are in
            out = subprocess.run([sys.executable, "-m", "elsa.report.cli", "apps", "--job",
                                  self.jobs["burn"], "--json", "--state-dir",
                                  self.daemon.state_dir],  # type: ignore[union-attr]
                                 capture_output=True, text=True)
            return out.returncode == 0 and len(json.loads(out.stdout)) >= 3

        wait_for(programs, 30, what="the burn job's application records")

    def stop(self) -> None:
        if self.web is not None:
            self.web.terminate()
            self.web.wait(10)
            self.web_log.close()
        if self.daemon is not None:
            self.daemon.stop()
        for name in (self.admin, self.user):
            subprocess.run(["userdel", name], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        subprocess.run(["groupdel", self.group], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if os.path.isdir(self.base):
            for d in sorted((p for p, _, _ in os.walk(self.base)), reverse=True):
                os.rmdir(d)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    import tempfile

    # A 0755 directory (pytest's tmp dirs are 0700): the user's client reaches the socket.
    tmp = Path(tempfile.mkdtemp(prefix="elsa-web-", dir="/tmp"))
    tmp.chmod(0o755)
    s = Site(tmp)
    try:
        s.start()
        s.run_jobs()
        yield s
    finally:
        s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def chrome_ok() -> None:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/setup-tests "
                    "installs them)")


@pytest.fixture
def browser(chrome_ok: None, tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def login(driver: Any, site: Site, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(site.url + "/jobs")
    assert "/login" in driver.current_url  # not signed in: sent to the form
    driver.find_element(By.NAME, "user").send_keys(name)
    driver.find_element(By.NAME, "password").send_keys(site.password)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_for(lambda: "/jobs" in driver.current_url and "/login" not in driver.current_url, 15,
             what="the jobs page after signing in")


def shot(driver: Any, name: str) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        driver.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def console_errors(driver: Any) -> List[Dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def job_rows(driver: Any) -> List[str]:
    from selenium.webdriver.common.by import By

    return [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#jobs a.jid")]


def test_jobs_page_lists_and_filters(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    login(browser, site, site.admin)
    rows = job_rows(browser)
    assert site.jobs["burn"] in rows and site.jobs["mine"] in rows
    shot(browser, "jobs")
    box = browser.find_element(By.NAME, "name")
    box.send_keys("burn")
    browser.find_element(By.CSS_SELECTOR, "#filters button").click()
    wait_for(lambda: "name=burn" in browser.current_url, 10, what="the filtered URL")
    assert job_rows(browser) == [site.jobs["burn"]]
    # The filter lives in the URL: a bookmark opens the same view.
    browser.get(site.url + "/jobs?tag=partition%3Dshort")
    assert job_rows(browser) == [site.jobs["burn"]]
    browser.get(site.url + "/jobs?sort=name&order=asc")
    names = [td.text for td in
             browser.find_elements(By.CSS_SELECTOR, "#jobs tbody td:nth-child(2)")]
    assert names == sorted(names)
    assert console_errors(browser) == []


def test_job_page_chart_and_tree(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    login(browser, site, site.admin)
    browser.get(f"{site.url}/jobs/{site.jobs['burn']}")
    assert site.jobs["burn"] in browser.find_element(By.TAG_NAME, "h1").text
    canvas = browser.find_element(By.ID, "usage-chart")
    points = browser.execute_script(
        "const c = Chart.getChart(arguments[0]); return c ? c.data.labels.length : -1;", canvas)
    assert points >= 3, points
    # Drawn, not just present: some pixel of the canvas is not transparent.
    painted = browser.execute_script(
        "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height)"
        ".data; for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false;",
        canvas)
    assert painted
    # The command flow: sh with its two python children, collapsible.
    top = browser.find_element(By.CSS_SELECTOR, "#tree > details.proc")
    assert "sh" in top.find_element(By.TAG_NAME, "summary").text
    kids = top.find_elements(By.CSS_SELECTOR, ":scope > details.proc")
    assert len(kids) >= 2
    assert top.get_attribute("open") is not None
    top.find_element(By.TAG_NAME, "summary").click()
    assert top.get_attribute("open") is None
    top.find_element(By.TAG_NAME, "summary").click()
    assert top.get_attribute("open") is not None
    # Its programs, from the exec events: sh and the two python3 burners.
    progs = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#apps td:nth-child(2)")]
    assert sum("python3" in p for p in progs) == 2 and any(p.endswith("sh") for p in progs)
    assert browser.find_element(By.ID, "charge").text.endswith(" SBU")  # 2 SBU per user CPU s
    # elsa eff's figures: the burn job has no cpuset and no CPU or memory limit, so the
    # cores it was allowed, and its memory efficiency, are unknown, and the page says why.
    eff = browser.find_element(By.ID, "efficiency").text
    assert "unknown (the job has no core limit" in eff, eff
    mem = browser.find_element(By.ID, "memory-efficiency").text
    assert "unknown (the job has no memory limit)" in mem, mem
    shot(browser, "job")
    assert console_errors(browser) == []


def test_user_sees_only_own_jobs(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    login(browser, site, site.user)
    assert job_rows(browser) == [site.jobs["mine"]]
    browser.get(f"{site.url}/jobs/{site.jobs['burn']}")
    assert "404" in browser.find_element(By.TAG_NAME, "h1").text
    assert "burn" not in browser.page_source
    browser.get(f"{site.url}/jobs/{site.jobs['mine']}")
    assert site.jobs["mine"] in browser.find_element(By.TAG_NAME, "h1").text


def test_other_pages(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    login(browser, site, site.admin)
    for page, marker in (("users", "summary"), ("accounts", "summary"), ("apps", "apps"),
                         ("daemon", "status")):
        browser.get(f"{site.url}/{page}")
        assert browser.find_elements(By.ID, marker) or browser.find_elements(
            By.ID, f"{page}-error"), page
        shot(browser, page)
    browser.get(f"{site.url}/users")
    assert browser.find_elements(By.ID, "daily-chart")
    browser.get(f"{site.url}/apps?by=binary")
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#apps td:first-child")]
    assert any("python3" in c for c in cells), cells
    assert console_errors(browser) == []


# -- HTTP: identity, JSON, actions (no browser needed) ---------------------------------------

def _get(site: Site, path: str, headers: Optional[Dict[str, str]] = None,
         source: str = "127.0.0.1", opener: Any = None) -> Tuple[int, Any]:
    req = urllib.request.Request(site.url.replace("127.0.0.1", "127.0.0.1") + path,
                                 headers=headers or {})
    if opener is None:
        import http.client

        class Bound(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.create_connection((self.host, self.port), self.timeout,
                                                     (source, 0))

        class Handler(urllib.request.HTTPHandler):
            def http_open(self, r: Any) -> Any:
                return self.do_open(Bound, r)

        opener = urllib.request.build_opener(Handler)
    try:
        with opener.open(req, timeout=20) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def test_proxy_header_only_from_trusted_address(site: Site) -> None:
    hdr = {"Remote-User": site.admin, "Accept": "application/json"}
    status, body = _get(site, "/jobs", hdr, source="127.0.0.1")  # not a trusted proxy
    assert status == 401 and "not signed in" in body["error"]
    status, body = _get(site, "/jobs", hdr, source="127.0.0.2")
    assert status == 200 and {j["jid"] for j in body["jobs"]} >= set(site.jobs.values())
    status, body = _get(site, "/jobs.json", {"Remote-User": site.user}, source="127.0.0.2")
    assert status == 200 and [j["jid"] for j in body["jobs"]] == [site.jobs["mine"]]
    status, body = _get(site, f"/jobs/{site.jobs['burn']}.json", {"Remote-User": site.user},
                        source="127.0.0.2")
    assert status == 404


def test_json_keys_match_cli(site: Site) -> None:
    status, body = _get(site, f"/jobs/{site.jobs['burn']}.json", {"Remote-User": site.admin},
                        source="127.0.0.2")
    assert status == 200
    cli = daemon_job(site, site.jobs["burn"])
    assert cli.keys() <= body.keys() | {"processes"}
    # The page and the report are the same code: the same figures.
    assert body["usage"]["cpu_user_us"] == cli["usage"]["cpu_user_us"] > 0
    assert body["wall_us"] == cli["wall_us"]
    # Efficiency is elsa eff's, key for key.
    eff = _eff_json(site, site.jobs["burn"])
    assert body["efficiency"] == {k: eff[k] for k in body["efficiency"]}
    assert body["efficiency"]["cpu_efficiency_why"] and body["efficiency"]["cpu_s"] > 0
    # The charge is elsa bill's: 2 SBU per user CPU second of the job.
    assert body["charge"]["unit"] == "SBU" and float(body["charge"]["charge"]) > 0
    status, users = _get(site, "/users.json", {"Remote-User": site.admin}, source="127.0.0.2")
    assert status == 200 and any(r.get("charge") for r in users["rows"])


def _eff_json(site: Site, jid: str) -> Dict[str, Any]:
    return _report_json(site, "eff", jid)


def daemon_job(site: Site, jid: str) -> Dict[str, Any]:
    return _report_json(site, "job", jid)


def _report_json(site: Site, *argv: str) -> Dict[str, Any]:
    """`elsa ARGV... --json` on the site's store."""
    assert site.daemon is not None
    out = subprocess.run([sys.executable, "-m", "elsa.report.cli", *argv, "--json",
                          "--state-dir", site.daemon.state_dir], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_actions_need_admin_and_csrf(site: Site) -> None:
    assert site.daemon is not None
    with Client(site.daemon.socket) as c:
        job = c.create(name="victim")
    jid = str(job.get("jid_hex") or job["jid"])
    raw = job["jid"]
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def post(path: str, form: Dict[str, str]) -> int:
        req = urllib.request.Request(site.url + path, data=urllib.parse.urlencode(form).encode())
        try:
            with opener.open(req, timeout=20) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    # Sign in as the admin through the form (PAM).
    assert post("/login", {"user": site.admin, "password": site.password}) == 200
    status, page = _get(site, f"/jobs/{jid}", opener=opener)
    assert status == 200
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert post(f"/jobs/{jid}/action", {"op": "end", "confirm": "yes"}) == 400  # no token
    assert post(f"/jobs/{jid}/action", {"op": "end", "confirm": "yes", "csrf": "x"}) == 400
    with Client(site.daemon.socket) as c:
        assert c.call("show", jid=raw)["state"] == "running"
    assert post(f"/jobs/{jid}/action", {"op": "end", "confirm": "yes", "csrf": token}) == 200
    with Client(site.daemon.socket) as c:
        wait_for(lambda: c.call("show", jid=raw)["state"] == "ended", 10, what="job ended")
    # A signed-in user who is not an admin may not act, even with their own token.
    jar2 = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar2))
    assert post("/login", {"user": site.user, "password": site.password}) == 200
    assert post(f"/jobs/{site.jobs['mine']}/action", {"op": "kill", "confirm": "yes",
                                                      "csrf": "x"}) == 403


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 302 comes back as an HTTPError, with its Location


def test_login_redirects_only_to_a_path_on_this_site(site: Site) -> None:
    """A browser drops the tab in "/\t/evil.example" and goes to //evil.example."""
    opener = urllib.request.build_opener(_NoRedirect)
    data = urllib.parse.urlencode({"user": site.admin, "password": site.password}).encode()
    for nxt, where in (("/\t/evil.example", "/jobs"), ("//evil.example", "/jobs"),
                       ("/\\evil.example", "/jobs"), ("https://evil.example/", "/jobs"),
                       ("/jobs?state=running", "/jobs?state=running")):
        url = site.url + "/login?" + urllib.parse.urlencode({"next": nxt})
        with pytest.raises(urllib.error.HTTPError) as exc:
            opener.open(url, data=data, timeout=20)
        assert exc.value.code == 302
        location = urllib.parse.urlsplit(exc.value.headers["Location"])
        assert location.netloc in ("", urllib.parse.urlsplit(site.url).netloc), nxt
        assert location.path + ("?" + location.query if location.query else "") == where, nxt


def test_wrong_password_refused(site: Site) -> None:
    data = urllib.parse.urlencode({"user": site.admin, "password": "wrong"}).encode()
    try:
        urllib.request.urlopen(site.url + "/login", data=data, timeout=20)
        raise AssertionError("a wrong password was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
