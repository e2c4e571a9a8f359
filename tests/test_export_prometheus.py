"""elsad's Prometheus exporter, checked by the real consumers: a Prometheus
server (Debian's ``prometheus``) started here on a loopback port scrapes elsad
every second, and a PromQL query through its HTTP API must give a job's CPU
within 2 % of the job cgroup's cpu.stat; ``promtool check metrics`` must have
nothing to say about the exposition."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from elsa.export.prometheus import ElsaCollector, PrometheusExporter, Snapshot
from elsa.kernel.cgroupfs import CgroupFS
from elsa.testing import DaemonProc, wait_for

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def promtool_check(body: bytes) -> str:
    """promtool's complaints about an exposition ("" when clean)."""
    assert PROMTOOL, "promtool missing: scripts/setup-tests installs Debian's prometheus"
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                       timeout=60)
    return (r.stdout + r.stderr).decode().strip() + ("" if r.returncode == 0
                                                     else f" (exit {r.returncode})")


class PrometheusServer:
    """A private Prometheus: own port, data directory and config."""

    def __init__(self, workdir: Path, target: str) -> None:
        assert PROMETHEUS, "prometheus missing: scripts/setup-tests installs it"
        self.port = free_port()
        self.dir = workdir / "prometheus"
        self.dir.mkdir()
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: elsad\n    scrape_interval: 1s\n"
            f"    scrape_timeout: 900ms\n    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

        def ready() -> bool:
            assert self.proc.poll() is None, self.logtext()
            try:
                return http_get(self.url + "/-/ready").startswith(b"Prometheus")
            except OSError:
                return False

        wait_for(ready, 60, what="prometheus to be ready")

    def logtext(self) -> str:
        return (self.dir / "prometheus.log").read_text()[-3000:]

    def query(self, promql: str) -> List[Dict[str, Any]]:
        got = json.loads(http_get(self.url + "/api/v1/query?"
                                  + urllib.parse.urlencode({"query": promql})))
        assert got["status"] == "success", got
        return got["data"]["result"]

    def target_health(self) -> Optional[str]:
        got = json.loads(http_get(self.url + "/api/v1/targets"))
        active = got["data"]["activeTargets"]
        return active[0]["health"] if active else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# -- the collector alone (no root) ----------------------------------------------------------

def _snapshot(n: int) -> Snapshot:
    rows = []
    for i in range(n):
        rows.append(((f"{0x1000 + i:#018x}", f"job {i} \"q\"\n", "alice", "proj-a"),
                     (12.5 + i, 0.25, 1 << 20, 2 << 20, 4096, None, 3), i % 2 == 0))
    status = {"events": 10, "lost_events": {"enobufs": 1, "seq_gap": 2}, "resyncs": 1,
              "jobs_running": n, "members": 3 * n, "uptime": 5.0,
              "sources": {"cgroupstat": {"callback_errors": 0}, "taskstats": {"error": "x"},
                          "aggregator": {"records": 7}},
              "hold": {"holds": 2, "held_seconds": 0.5, "active": False},
              "store": {"ok": True, "pending_writes": 0, "write_failures": 0,
                        "dropped_records": 0},
              "_jobs": {"created": n, "ended": 0}}
    return Snapshot(rows, status)


def test_exposition_is_clean_and_named_by_convention():
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(ElsaCollector(lambda: _snapshot(3), ["account"]))
    body = generate_latest(reg)
    assert promtool_check(body) == ""
    text = body.decode()
    for line in ("# TYPE elsa_job_cpu_user_seconds_total counter",
                 "# TYPE elsa_job_memory_bytes gauge",
                 "# TYPE elsa_events_lost_total counter",
                 'elsa_events_lost_total{reason="seq_gap"} 2.0',
                 'elsa_source_up{source="taskstats"} 0.0',
                 'elsa_source_up{source="cgroupstat"} 1.0',
                 "elsa_store_ok 1.0"):
        assert line in text, line
    assert "elsa_central_" not in text                       # no [central]: no family
    # [central]: the shipper's state, for alerts on a stuck or failing shipper.
    snap = _snapshot(1)
    snap.status["central"] = {"enabled": True, "failing": True, "backlog_records": 48210,
                              "backlog_jobs": 3, "backlog_apps": 0, "oldest_age_s": 412.0}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ElsaCollector(lambda: snap, []))
    central = generate_latest(reg)
    assert promtool_check(central) == ""
    for line in ("elsa_central_failing 1.0", "elsa_central_backlog_records 48210.0",
                 "elsa_central_backlog_jobs 3.0", "elsa_central_backlog_apps 0.0",
                 "elsa_central_oldest_age_seconds 412.0"):
        assert line in central.decode(), line
    assert ('elsa_job_cpu_user_seconds_total{account="proj-a",jid="0x0000000000001000",'
            'name="job 0 \\"q\\"\\n",user="alice"} 12.5') in text
    assert "elsa_job_written_bytes" not in text.replace("# HELP elsa_job_written_bytes", "") \
        .replace("# TYPE elsa_job_written_bytes", "")       # unknown: no sample, not 0


def test_ended_job_stays_for_the_grace_then_goes(tmp_path):
    from elsa.core.model import Job

    ex = PrometheusExporter({"listen": "", "labels": [], "ended_grace": 0.3, "interval": 1.0},
                            db_path=None, cgroup_mount=None)
    job = Job(jid=7, name="j", owner_uid=os.getuid(), tags=(), created=0.0, ended=None,
              state="running", backend="x", params={})
    ex.job_created(job)
    ex._last[7] = (1.0, 2.0, 3, 4, 5, 6, 1)       # a live reading taken earlier
    assert [r[2] for r in ex.sample().jobs] == [True]
    ex.job_ended(job)
    rows = ex.sample().jobs
    assert [(r[1][0], r[2]) for r in rows] == [(1.0, False)]  # final figures, not running
    wait_for(lambda: not ex.sample().jobs, 5, what="the grace to pass")


# -- elsad + a real Prometheus (root) ---------------------------------------------------------

FS = CgroupFS()
MOUNT = FS.cgroup2_mount() or "/nonexistent"

_BURNER = r'''
import os, sys, time
sys.stdin.readline()              # joined the job: burn
t = time.process_time()
x = 0
while time.process_time() - t < 1.5:
    x += 1
print("burnt", flush=True)
sys.stdin.readline()              # then idle until told to go
'''


@pytest.fixture
def area() -> Iterator[str]:
    if not os.path.isdir(MOUNT):
        pytest.skip("no cgroup2 mount")
    base = os.path.join(MOUNT, f"elsa-test-prom-{uuid.uuid4().hex[:8]}")
    yield base
    if os.path.isdir(base):
        for e in os.scandir(base):
            if e.is_dir():
                try:
                    os.rmdir(e.path)
                except OSError:
                    pass
        try:
            os.rmdir(base)
        except OSError:
            pass


@pytest.mark.root
@pytest.mark.slow
def test_prometheus_scrapes_job_cpu_within_2_percent(area, tmp_path):
    port = free_port()
    sockdir = tempfile.mkdtemp(prefix="elsa-export-")
    d = DaemonProc(Path(sockdir), backend="cgroup2", extra=(
        f'[backends.cgroup2]\nbase = "{area}"\n'
        '[sources.cgroupstat]\ninterval = 1.0\n'
        f'[export.prometheus]\nlisten = "127.0.0.1:{port}"\nlabels = ["account"]\n'
        'ended_grace = 30.0\ninterval = 0.5\n')).start()
    prom = None
    child = subprocess.Popen([sys.executable, "-c", _BURNER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert promtool_check(body) == ""
        prom = PrometheusServer(tmp_path, f"127.0.0.1:{port}")
        with d.client() as c:
            job = c.create(name="burn", tags={"account": "physics"}, pids=[child.pid])
            jid = job if isinstance(job, int) else job["jid"]
            shown = c.show(jid)
        jid_text = jid if isinstance(jid, str) else shown.get("jid_hex") or f"{jid:#018x}"
        cg = shown["params"]["cgroup_path"]
        cg = cg if os.path.isabs(cg) else os.path.join(MOUNT, cg)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "burnt"
        with open(os.path.join(cg, "cpu.stat")) as fh:
            stat = dict(line.split() for line in fh)
        truth = (int(stat["user_usec"]) + int(stat["system_usec"])) / 1e6
        assert truth >= 1.4
        sel = f'{{jid="{jid_text}"}}'
        q = (f"sum(elsa_job_cpu_user_seconds_total{sel}) + "
             f"sum(elsa_job_cpu_system_seconds_total{sel})")
        seen: List[float] = []

        def close_enough() -> bool:
            res = prom.query(q)
            if not res:
                return False
            seen.append(float(res[0]["value"][1]))
            return abs(seen[-1] - truth) <= 0.02 * truth

        wait_for(close_enough, 30, interval=0.5,
                 what=lambda: f"Prometheus to report the job's CPU ({truth:.3f} s; "
                              f"saw {seen[-3:]})")
        labels = prom.query(f"elsa_job_running{sel}")[0]["metric"]
        assert labels["name"] == "burn" and labels["account"] == "physics"
        assert labels["user"] and labels["job"] == "elsad"
        if os.path.exists(os.path.join(cg, "memory.peak")):  # memory controller on in v2
            assert float(prom.query(f"elsa_job_memory_peak_bytes{sel}")[0]["value"][1]) > 0
        else:  # hybrid hosts: no v2 memory controller, so no series (never a 0)
            assert prom.query(f"elsa_job_memory_peak_bytes{sel}") == []
        # Daemon metrics come from elsad's real status.
        assert float(prom.query("elsa_events_received_total")[0]["value"][1]) > 0
        up = prom.query('elsa_source_up{source="cgroupstat"}')
        assert up and up[0]["value"][1] == "1"
        assert float(prom.query("elsa_jobs_created_total")[0]["value"][1]) >= 1
        # elsad's own CPU (the client library's process collector): more than nothing,
        # and no more than the kernel counts for elsad after the query.
        scraped = float(prom.query("process_cpu_seconds_total")[0]["value"][1])
        with open(f"/proc/{d.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")  # the collector adds user and system in floats
        assert 0 < scraped <= int(fields[11]) / ticks + int(fields[12]) / ticks + 1e-9
        assert prom.target_health() == "up"
        # The job ends: it stays (running 0, final CPU) for ended_grace.
        child.stdin.write("go\n")
        child.stdin.flush()
        _, status, ru = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        # The ended job's CPU follows the job CPU rule (docs/accounting.md): never below its
        # process records, and the child's record includes its start-up before it joined.
        truth = max(truth, ru.ru_utime + ru.ru_stime)

        def ended() -> bool:
            res = prom.query(f"elsa_job_running{sel}")
            return bool(res) and res[0]["value"][1] == "0"

        wait_for(ended, 30, interval=0.5, what="the ended job to show running 0")
        # The child's exit record may be attributed a moment after the job shows
        # ended (the cgroup's final reading comes first): the counter then rises
        # to it, and never falls.
        finals: List[float] = []

        def final_close() -> bool:
            finals.append(float(prom.query(q)[0]["value"][1]))
            return abs(finals[-1] - truth) <= 0.02 * truth

        wait_for(final_close, 30, interval=0.5,
                 what=lambda: f"the ended job's CPU to reach {truth:.3f} s (saw {finals[-3:]})")
        assert finals == sorted(finals), finals
        assert float(prom.query("elsa_jobs_ended_total")[0]["value"][1]) >= 1
        assert promtool_check(http_get(f"http://127.0.0.1:{port}/metrics")) == ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if prom is not None:
            prom.stop()
        d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_body_is_the_job_rendering_plus_live_daemon_metrics():
    from elsa.core.model import Job

    ex = PrometheusExporter({"listen": "", "labels": ["account"], "ended_grace": 5.0,
                             "interval": 1.0}, db_path=None, cgroup_mount=None)
    job = Job(jid=9, name="n", owner_uid=os.getuid(), tags=(("account", "a"),), created=0.0,
              ended=None, state="running", backend="x", params={})
    ex.job_created(job)
    ex.publish_status({"events": 5})
    ex.sample()
    body = ex.body()
    assert promtool_check(body) == ""
    text = body.decode()
    assert 'elsa_job_running{account="a",jid="0x0000000000000009"' in text
    assert "elsa_job_cpu_user_seconds_total{" not in text       # no reading yet: no sample
    assert "elsa_jobs_created_total 1.0" in text
    ex.job_ended(job)                                          # counters are live
    assert "elsa_jobs_ended_total 1.0" in ex.body().decode()


def test_config_refuses_colliding_labels_and_bad_listen(tmp_path):
    from elsa import config
    from elsa.errors import ConfigError

    f = tmp_path / "elsa.toml"
    for body, why in (('labels = ["user"]', "user twice"),
                      ('labels = ["a-b", "a_b"]', "a_b twice"),
                      ('listen = "9466"', "HOST:PORT")):
        f.write_text(f"[export.prometheus]\n{body}\n")
        with pytest.raises(ConfigError, match=why):
            config.load(str(f))
    f.write_text('[export.prometheus]\nlisten = "127.0.0.1:9466"\nlabels = ["account"]\n')
    assert config.load(str(f)).section("export.prometheus")["labels"] == ["account"]


@pytest.mark.root
def test_a_taken_port_fails_before_elsad_touches_the_kernel(tmp_path):
    from elsa.elsad import EXIT_CONFIG

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        sockdir = tempfile.mkdtemp(prefix="elsa-export-")
        try:
            d = DaemonProc(Path(sockdir),
                           extra=f'[export.prometheus]\nlisten = "127.0.0.1:{port}"\n')
            r = subprocess.run([sys.executable, "-m", "elsa.elsad", "--config",
                                str(d.config_path)], capture_output=True, text=True, timeout=60)
            created_store = os.path.exists(d.state_dir)
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert f"listen = '127.0.0.1:{port}': cannot listen there" in r.stderr
    assert not created_store  # failed before the daemon opened its store


@pytest.mark.root
def test_sigterm_stops_cleanly_with_the_exporter_on(elsad, spawned):
    """The sampler's store connection is closed by the sampler's thread: SIGTERM
    stops elsad cleanly (exit 0, socket removed, "elsad stopped") once the sampler
    has read an ended job's figures from the store."""
    port = free_port()
    d = elsad(extra=f'[export.prometheus]\nlisten = "127.0.0.1:{port}"\n'
                    'interval = 0.2\nended_grace = 60.0\n')
    p = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE, start_new_session=True)
    spawned.append(p)
    with d.client() as c:
        jid = c.create(name="brief", pids=[p.pid])["jid"]
    jid_text = jid if isinstance(jid, str) else f"{jid:#018x}"
    p.stdin.write(b"go\n")
    p.stdin.flush()
    p.wait(10)

    def ended_shown() -> bool:  # an ended job's figures come from the store
        body = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        return any(line.startswith("elsa_job_running{") and f'jid="{jid_text}"' in line
                   and line.endswith(" 0.0") for line in body.splitlines())

    wait_for(ended_shown, 30, interval=0.2, what="the ended job in the exposition")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(30)
    log = d.log()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log and "elsad stopped" in log
    assert not os.path.exists(d.socket)


_FAILING_STOP = '''
import sys
from elsa import elsad
from elsa.export import prometheus

def stop(self):
    raise RuntimeError("exporter stop failed")

prometheus.PrometheusExporter.stop = stop
sys.exit(elsad.main(sys.argv[1:]))
'''


@pytest.mark.root
def test_a_failing_exporter_stop_does_not_skip_the_daemon_stop(tmp_path):
    port = free_port()
    d = DaemonProc(tmp_path, extra=f'[export.prometheus]\nlisten = "127.0.0.1:{port}"\n')
    with open(d.log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", _FAILING_STOP, "--config",
                                 str(d.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(d.socket) and "elsad ready" in d.log()
                 or proc.poll() is not None, 30, what="elsad to start")
        assert proc.poll() is None, d.log()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = d.log()
    assert "exporter stop failed" in log_text          # said, not hidden
    assert "elsad stopped" in log_text, log_text[-3000:]
    assert not os.path.exists(d.socket)
