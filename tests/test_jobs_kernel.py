"""Job tracking on the real kernel with the cnproc backend (issue 2's "must show").

Every test drives a real process tree (tests/tree.py) and a real elsad
subprocess subscribed to the real proc connector.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from elsa.client import RequestFailed
from elsa.core.attribution import JOB_MEMBERS_SQL
from elsa.core.model import parse_jid
from tests.conftest import pid_alive, wait_for
from tests.tree import Tree, live_descendants

pytestmark = pytest.mark.root


def job_pids(d, jid):
    with d.client() as c:
        return set(c.pids(jid))


def is_process(pid: int) -> bool:
    """A thread-group leader (a process), not a thread."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Tgid:"):
                return int(line.split()[1]) == pid
    return False


def member_rows(d, jid):
    db = sqlite3.connect(os.path.join(d.state_dir, "elsa.db"))
    try:
        # The stored history: member rows, and the usage rows that carry short fork stays.
        return [(r[0], r[3], r[4], r[5])
                for r in db.execute(JOB_MEMBERS_SQL, (parse_jid(jid),)).fetchall()]
    finally:
        db.close()


@pytest.fixture
def tree():
    t = Tree()
    yield t
    t.close()


def test_every_descendant_joins_threads_do_not_exits_recorded(elsad, tree):
    d = elsad()
    with d.client() as c:
        jid = c.create(name="tree", pids=[tree.pid])["jid"]
    expected = {tree.pid}
    expected |= set(tree.cmd("child")["pids"])
    expected |= set(tree.cmd("grandchild")["pids"])
    expected |= set(tree.cmd("exec")["pids"])          # sh -> exec sh -> exec sleep
    daemon = tree.cmd("daemon")                           # double fork + setsid
    expected |= set(daemon["pids"])
    threaded = tree.cmd("threads 5")["pids"]
    expected |= set(threaded)
    exited = tree.cmd("exit 7")
    # The setsid daemon was re-parented to init, so it is no descendant by
    # ppid any more, yet it belongs to the job: it was born inside.
    assert daemon["pids"][0] not in live_descendants(tree.pid)
    assert expected - {daemon["pids"][0]} == set(live_descendants(tree.pid)) | {tree.pid}

    wait_for(lambda: job_pids(d, jid) == expected, what="job pids == every live descendant")
    pids = job_pids(d, jid)
    assert all(is_process(p) for p in pids), "a thread was counted as a process"
    assert len(os.listdir(f"/proc/{threaded[0]}/task")) == 6  # the 5 threads do exist
    with d.client() as c:
        st = c.status()
    assert st["counters"]["thread_forks"] >= 5

    # Exits are recorded with their wait status: exit(7) -> 7 << 8.
    def exit_rows():
        rows = {r[0]: r for r in member_rows(d, jid)}
        return all(rows.get(p, (0, None))[1] is not None for p in exited["exited"]) and rows

    rows = wait_for(exit_rows, what="exit rows in the store")
    assert rows[exited["exited"][0]][2] == 7 << 8
    assert rows[daemon["exited"][0]][2] == 0   # the intermediate of the double fork


def test_exec_chain_keeps_membership(elsad, tree):
    d = elsad()
    with d.client() as c:
        jid = c.create(pids=[tree.pid])["jid"]
    (pid,) = tree.cmd("exec")["pids"]
    wait_for(lambda: pid in job_pids(d, jid), what="exec'ing child in job")

    def execd():
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip() == "sleep"

    wait_for(execd, what="exec chain to end in sleep")
    with d.client() as c:
        assert c.jobof(pid) == jid


def _fork_with_pid(target: int, tries: int = 50) -> subprocess.Popen:
    """Start an outsider process that gets pid *target* (via ns_last_pid)."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(target - 1))
        p = subprocess.Popen(["sleep", "60"], start_new_session=True)
        if p.pid == target:
            return p
        p.kill()
        p.wait()
    pytest.skip(f"could not obtain pid {target} in {tries} tries (busy machine)")


def test_pid_reuse_does_not_join_old_job(elsad, tree):
    d = elsad()
    with d.client() as c:
        jid = c.create(pids=[tree.pid])["jid"]
    (victim,) = tree.cmd("child")["pids"]
    wait_for(lambda: victim in job_pids(d, jid), what="child in job")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in job_pids(d, jid), what="exit seen")
    wait_for(lambda: victim in tree.cmd("reap")["reaped"], what="victim reaped")
    outsider = _fork_with_pid(victim)
    try:
        with d.client() as c:
            with pytest.raises(RequestFailed) as exc:
                c.jobof(victim)
            assert exc.value.code == "not-in-job"
            assert victim not in c.pids(jid)
    finally:
        outsider.kill()
        outsider.wait()


def test_pid_reuse_while_daemon_down_is_not_recovered(elsad, tree, tmp_path):
    d = elsad()
    with d.client() as c:
        jid = c.create(pids=[tree.pid])["jid"]
    (victim,) = tree.cmd("child")["pids"]
    wait_for(lambda: victim in job_pids(d, jid), what="child in job")
    # Let the membership reach the store before the crash.
    wait_for(lambda: any(r[0] == victim for r in member_rows(d, jid)), what="member row")
    d.kill9()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim in tree.cmd("reap")["reaped"], what="victim reaped")
    # The pid now names an outsider started by us, not by a job member.
    outsider = _fork_with_pid(victim)
    try:
        d.start()
        with d.client() as c:
            assert victim not in c.pids(jid)
            with pytest.raises(RequestFailed) as exc:
                c.jobof(victim)
            assert exc.value.code == "not-in-job"
    finally:
        outsider.kill()
        outsider.wait()


def test_zombie_member_counts_as_exited_on_recovery(elsad, tree):
    d = elsad()
    with d.client() as c:
        jid = c.create(pids=[tree.pid])["jid"]
    (victim,) = tree.cmd("child")["pids"]
    wait_for(lambda: any(r[0] == victim for r in member_rows(d, jid)), what="member row")
    d.kill9()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not pid_alive(victim), what="victim is a zombie")
    assert os.path.exists(f"/proc/{victim}")  # not reaped: still in /proc
    d.start()
    with d.client() as c:
        assert victim not in c.pids(jid)


def test_forced_event_loss_is_resynced_with_nothing_missing(elsad, tree):
    # A receive buffer of a few events: the storm below overflows it.
    d = elsad(extra="netlink_rcvbuf = 1\n")
    with d.client() as c:
        jid = c.create(name="storm", pids=[tree.pid])["jid"]
    survivors = 0
    for _ in range(15):
        tree.cmd("storm 400")
        survivors += len(tree.cmd("child")["pids"])
        survivors += len(tree.cmd("grandchild")["pids"])
    live = set(live_descendants(tree.pid)) | {tree.pid}
    assert len(live) == survivors + 1

    with d.client() as c:
        st = wait_for(lambda: (lambda s: s["resyncs"] >= 2 and s)(c.status()),
                      what="a resync after the loss")
    lost = st["lost_events"]
    assert lost["enobufs"] + lost["seq_gap"] > 0, "the storm did not overflow the buffer"

    def missing():
        return live - job_pids(d, jid)

    try:
        wait_for(lambda: not missing(), timeout=15, what="resync to adopt every survivor")
    finally:
        print("lost:", lost, "resyncs:", st["resyncs"], "missing:", len(missing()))
    assert len(missing()) == 0
    assert job_pids(d, jid) == live  # and nothing extra


def test_kill9_restart_resumes_jobs_and_adopts_children(elsad, tree):
    d = elsad()
    with d.client() as c:
        jid = c.create(name="survivor", tags={"k": "v"}, pids=[tree.pid])["jid"]
        other = c.create(name="empty")["jid"]
    first = tree.cmd("child")["pids"]
    tree.cmd("grandchild")
    setsid_daemon = tree.cmd("daemon")["pids"][0]
    tree.cmd("threads 3")
    before = {tree.pid} | set(live_descendants(tree.pid)) | {setsid_daemon}
    wait_for(lambda: job_pids(d, jid) == before, what="members before the crash")
    # Wait until the membership is committed (the writer batches every 50 ms).
    wait_for(lambda: {r[0] for r in member_rows(d, jid) if r[1] is None} >= before,
             what="members persisted")

    d.kill9()
    born_while_down = tree.cmd("child")["pids"] + tree.cmd("grandchild")["pids"]
    os.kill(first[0], signal.SIGKILL)           # a member exits while we are down
    wait_for(lambda: not pid_alive(first[0]), what="member exit")
    d.start()

    expected = {tree.pid} | set(live_descendants(tree.pid)) | {setsid_daemon}
    assert set(born_while_down) <= expected and first[0] not in expected
    with d.client() as c:
        jobs = {j["jid"]: j for j in c.list()}
        assert set(jobs) == {jid, other}
        assert jobs[jid]["tags"] == {"k": "v"} and jobs[jid]["name"] == "survivor"
        assert set(c.pids(jid)) == expected
        assert c.pids(other) == []
        # New children after the restart still follow.
    new = tree.cmd("child")["pids"]
    wait_for(lambda: set(new) <= job_pids(d, jid), what="post-restart fork followed")


def test_a_job_whose_members_all_exited_while_down_ends_at_restart(elsad):
    """It had a member (its row is in the store) and has none now; a job that never
    had one stays open for its creator to attach to."""
    d = elsad()
    p = subprocess.Popen(["sleep", "60"])
    try:
        with d.client() as c:
            gone = c.create(name="gone", pids=[p.pid])["jid"]
            waiting = c.create(name="waiting")["jid"]
        wait_for(lambda: member_rows(d, gone), what="the member row committed")
        d.kill9()
    finally:
        p.kill()
        p.wait()
    d.start()
    with d.client() as c:
        assert c.show(gone)["state"] == "ended"
        assert c.show(waiting)["state"] == "running"


def test_a_cgroup_job_that_ended_while_down_keeps_its_cgroups_usage(c2base, elsad):
    """The member's CPU while elsad was down is in the job cgroup's counters: the
    cgroupstat source reads them before the job's cgroup is removed at the restart,
    and the taskstats source, which missed the member's exit, flags the job."""
    d = elsad(backend="cgroup2", extra=f'[backends.cgroup2]\nbase = "{c2base}"\n')
    # The work starts after the attach, so the cgroup counts all of it.
    p = subprocess.Popen(["sh", "-c", "read x; i=0; while [ $i -lt 200000 ]; do "
                          "i=$((i+1)); done; exit 5"], stdin=subprocess.PIPE)
    try:
        with d.client() as c:
            jid = c.create(name="ended-while-down", pids=[p.pid])["jid"]
        wait_for(lambda: member_rows(d, jid), what="the member row committed")
        d.kill9()
        p.stdin.close()
        assert p.wait(60) == 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    d.start()
    with d.client() as c:
        assert c.show(jid)["state"] == "ended"
    out = subprocess.run(["elsa", "job", jid, "--json", "--state-dir", d.state_dir],
                         capture_output=True, text=True, check=True).stdout
    usage = json.loads(out)["usage"]
    assert usage["sources"]["cgroupstat"]["cpu_user_us"] > 50_000, usage
    assert "taskstats" in usage["incomplete"], usage


def test_job_ends_with_last_member_or_stays_open_when_explicit(elsad, tmp_path):
    d = elsad()
    p = subprocess.Popen(["sh", "-c", "read x; exit 0"], stdin=subprocess.PIPE)
    with d.client() as c:
        jid = c.create(pids=[p.pid])["jid"]
        p.stdin.close()
        p.wait()
        res = c.wait(jid, timeout=10)
        assert res["ended"] is True and res["job"]["state"] == "ended"
    d.stop()

    d2 = elsad(extra='job_end = "explicit"\n', workdir=tmp_path / "explicit")
    p = subprocess.Popen(["sh", "-c", "read x; exit 0"], stdin=subprocess.PIPE)
    with d2.client() as c:
        jid = c.create(pids=[p.pid])["jid"]
        p.stdin.close()
        p.wait()
        wait_for(lambda: c.pids(jid) == [], what="member exit")
        assert c.wait(jid, timeout=0.3)["ended"] is False
        assert c.show(jid)["state"] == "running"
        assert c.end(jid)["state"] == "ended"


def test_sighup_reload_and_bad_reload_keeps_running(elsad):
    d = elsad()
    d.config_path.write_text(d.config_path.read_text().replace('log_level = "debug"',
                                                               'log_level = "info"'))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in d.log(), what="reload logged")
    d.config_path.write_text(d.config_path.read_text() + "bogus = 1\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in d.log(), what="bad reload refused")
    assert d.call("status")["backend"] == "cnproc"


def test_sigterm_stops_cleanly(elsad):
    d = elsad()
    assert d.stop() == 0
    assert not os.path.exists(d.socket)
    assert "elsad stopped" in d.log()


def test_ready_notification(tmp_path):
    import socket as so
    nsock = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    nsock.bind(str(tmp_path / "notify"))
    nsock.settimeout(20)
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(f'socket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}/st"\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    p = subprocess.Popen([sys.executable, "-m", "elsa.elsad", "-c", str(cfg)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        msg = nsock.recv(4096).decode()
        assert "READY=1" in msg.splitlines()
        assert os.path.exists(tmp_path / "s.sock")  # ready means serving
    finally:
        p.terminate()
        p.wait(10)
        nsock.close()
    assert p.returncode == 0


def test_refuses_to_start_without_privilege(tmp_path):
    # Root minus CAP_NET_ADMIN (dropped from the bounding set by util-linux's
    # setpriv): exactly the capability the proc connector needs.
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(f'socket = "{tmp_path}/s.sock"\nstate_dir = "{tmp_path}/st"\n')
    res = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
                          sys.executable, "-m", "elsa.elsad", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 4, res.stderr
    assert "CAP_NET_ADMIN" in res.stderr and "run it as root" in res.stderr
    assert not os.path.exists(tmp_path / "s.sock")


def test_raising_plugin_does_not_stop_the_daemon(elsad, tree, tmp_path, monkeypatch):
    plugdir = tmp_path / "plug"
    plugdir.mkdir()
    (plugdir / "raising_elsa_plugin.py").write_text(
        "from elsa import hookimpl\n\n"
        "@hookimpl\ndef elsa_process_joined(job, proc, how):\n"
        "    raise RuntimeError('plugin bug on purpose')\n\n"
        "@hookimpl\ndef elsa_job_created(job):\n"
        "    raise ValueError('another plugin bug')\n")
    monkeypatch.setenv("PYTHONPATH", f"{plugdir}:{os.environ.get('PYTHONPATH', '')}")
    d = elsad(extra='plugins = ["raising_elsa_plugin"]\n', workdir=tmp_path / "d")
    with d.client() as c:
        jid = c.create(pids=[tree.pid])["jid"]
    (child,) = tree.cmd("child")["pids"]
    wait_for(lambda: child in job_pids(d, jid), what="fork followed despite the plugin")
    st = d.call("status")
    assert st["plugin_failures"]["raising_elsa_plugin"] >= 3
    assert "raising_elsa_plugin" in d.log() and "plugin bug on purpose" in d.log()


def test_attach_refuses_dead_pid_and_ended_job(elsad):
    d = elsad()
    p = subprocess.Popen(["true"])
    p.wait()
    time.sleep(0)  # the pid is reaped: it names no process now
    with d.client() as c:
        jid = c.create()["jid"]
        with pytest.raises(RequestFailed) as exc:
            c.attach(jid, [p.pid])
        assert exc.value.code == "no-such-process"
        c.end(jid)
        with pytest.raises(RequestFailed) as exc:
            c.attach(jid, [os.getpid()])
        assert exc.value.code == "bad-job-state"


@pytest.fixture
def c2base():
    """A private cgroup2 base for elsad, removed afterwards (set up before the
    daemon and the tree, so torn down after them)."""
    from elsa.kernel.cgroupfs import CgroupFS

    mount = CgroupFS().cgroup2_mount()
    if not mount:
        pytest.skip("no cgroup2 mount")
    base = os.path.join(mount, f"elsa-test-resync-{os.getpid()}-{time.monotonic_ns()}")
    yield base

    def gone() -> bool:
        for root, dirs, _ in os.walk(base, topdown=False):
            for d in dirs:
                path = os.path.join(root, d)
                try:
                    with open(os.path.join(path, "cgroup.kill"), "w") as fh:
                        fh.write("1")
                    os.rmdir(path)
                except OSError:
                    pass
        try:
            os.rmdir(base)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    if os.path.isdir(base):
        wait_for(gone, timeout=10, what="the test's cgroups removed")


def test_forced_event_loss_resynced_from_cgroups(c2base, elsad, tree):
    """With the cgroup2 backend a resync reads only the processes the index and
    the job cgroups name (not all of /proc): after a lost storm the job holds
    exactly the tree's live processes."""
    d = elsad(backend="cgroup2",
              extra=f'netlink_rcvbuf = 1\n[backends.cgroup2]\nbase = "{c2base}"\n')
    with d.client() as c:
        jid = c.create(name="storm", pids=[tree.pid])["jid"]
    for _ in range(15):
        tree.cmd("storm 400")
        tree.cmd("child")
        tree.cmd("grandchild")
    live = set(live_descendants(tree.pid)) | {tree.pid}
    with d.client() as c:
        st = wait_for(lambda: (lambda s: s["resyncs"] >= 2 and s)(c.status()),
                      what="a resync after the loss")
    lost = st["lost_events"]
    assert lost["enobufs"] + lost["seq_gap"] > 0, "the storm did not overflow the buffer"
    wait_for(lambda: job_pids(d, jid) == live, timeout=15,
             what="resync to hold exactly the live tree")
    assert d.proc is not None and d.proc.poll() is None


def test_wait_answers_once_the_last_members_records_are_stored(elsad, tmp_path):
    # The last members' taskstats records are queued before their exit events, but
    # elsad reads the socket in batches (read_interval; 5 s here). 'wait' answers
    # once the end is committed: the records must be stored with it, so that a
    # report right after 'wait' (elsa jobs, elsa eff) has the whole job.
    from elsa.report import query

    d = elsad(extra="[sources.taskstats]\nread_interval = 5.0\n")
    jid_file = tmp_path / "jid"
    # /bin/true first: its record opens the socket's read window.
    script = (f'echo $ELSA_JID > {jid_file}; /bin/true; '
              'python3 -c "import time; t = time.process_time()\n'
              'while time.process_time() - t < 0.1: pass"; exit 0')
    r = subprocess.run([sys.executable, "-m", "elsa.jobmng", "--socket", d.socket, "run",
                        "--", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jid = jid_file.read_text().strip()
    with d.client() as c:
        assert c.call("wait", jid=jid, timeout=30)["ended"]
    db = sqlite3.connect(f"file:{d.state_dir}/elsa.db?mode=ro", uri=True)
    usage = query.job_usage(db, [parse_jid(jid)])[parse_jid(jid)]["usage"]
    db.close()
    assert usage["processes"] == 3, usage  # sh (elsa-jobmng exec'd), true, python3


def test_a_wait_before_the_end_gets_the_last_members_records(elsad, tmp_path):
    # The same, with the wait outstanding as the job ends: its end reads the queued
    # records because a client waits for it (jobs nobody waits for are not read).
    import threading

    from elsa.report import query

    d = elsad(extra="[sources.taskstats]\nread_interval = 5.0\n")
    jid_file, go = tmp_path / "jid", tmp_path / "go"
    os.mkfifo(go)
    script = (f'echo $ELSA_JID > {jid_file}; read x < {go}; /bin/true; '
              'python3 -c "import time; t = time.process_time()\n'
              'while time.process_time() - t < 0.1: pass"; exit 0')
    run = subprocess.Popen([sys.executable, "-m", "elsa.jobmng", "--socket", d.socket, "run",
                            "--", "sh", "-c", script])
    try:
        wait_for(lambda: jid_file.exists() and jid_file.read_text().strip(), 30,
                 what="the job's id")
        jid = jid_file.read_text().strip()
        replies = []
        waiter = threading.Thread(target=lambda: replies.append(
            d.call("wait", jid=jid, timeout=30)))
        waiter.start()
        wait_for(lambda: d.call("status")["control"]["waiters"] == 1, 10,
                 what="the wait to be outstanding")
        with open(go, "w") as f:
            f.write("x\n")
        waiter.join(40)
        assert replies and replies[0]["ended"], replies
    finally:
        run.wait(60)
    db = sqlite3.connect(f"file:{d.state_dir}/elsa.db?mode=ro", uri=True)
    usage = query.job_usage(db, [parse_jid(jid)])[parse_jid(jid)]["usage"]
    db.close()
    assert usage["processes"] == 3, usage  # sh (elsa-jobmng exec'd), true, python3
