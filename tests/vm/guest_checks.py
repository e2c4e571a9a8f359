"""In-guest checks: ELSA's Debian package on a pure cgroup v2 host under systemd.

This file runs INSIDE the Debian bookworm guest that tests/vm/test_vm.py boots
(as root, started by a oneshot systemd unit once multi-user.target is reached),
with Debian's python3 and the installed ``elsa`` package. The host imports it
only for the names in ``CHECKS`` (one pytest test each), so it must stay
importable there: standard library only, nothing runs at import.

    python3 guest_checks.py RESULTS_PATH

writes one JSON line per check to RESULTS_PATH (the guest's second serial
port): ``{"check": name, "outcome": "pass"|"fail", "output": ..., "seconds": ...}``,
then ``{"done": true}``. Each check logs the commands it ran and their output,
which the host shows when the check fails. The checks run in order and share
one elsad (the packaged unit) whose config they rewrite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

CONFIG = Path("/etc/elsa/elsa.toml")
UNIT = "elsad.service"
CGROOT = Path("/sys/fs/cgroup")
#: The delegated subtree systemd gives the packaged unit.
UNIT_CGROUP = CGROOT / "system.slice" / UNIT
#: The virtio disk the host attaches for direct I/O (a raw scratch file).
SCRATCH_DISK = "/dev/vda"
#: An unprivileged user for the limit-escape check.
USER = "elsavm"

CheckFn = Callable[["Log"], None]
CHECKS: List[CheckFn] = []


def check(fn: CheckFn) -> CheckFn:
    CHECKS.append(fn)
    return fn


class CheckFailed(AssertionError):
    pass


class Log:
    """What a check did: commands, their output, notes; shown on failure."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)

    def sh(self, cmd: str, timeout: float = 60, ok: bool = True,
           user: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run *cmd* with /bin/sh (as *user* via runuser); log it; raise unless it
        exits 0 (when *ok*)."""
        argv = ["/bin/sh", "-c", cmd]
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        self.lines.append(f"$ {cmd}" + (f"   (as {user})" if user else ""))
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.lines.append(f"  TIMEOUT after {timeout} s; output: {exc.stdout!r} {exc.stderr!r}")
            raise CheckFailed(f"command timed out after {timeout} s: {cmd}") from None
        out = (p.stdout + p.stderr).rstrip()
        if out:
            self.lines.append("  " + out.replace("\n", "\n  ")[-4000:])
        self.lines.append(f"  (exit {p.returncode})")
        if ok and p.returncode != 0:
            raise CheckFailed(f"command failed (exit {p.returncode}): {cmd}")
        return p

    def expect(self, cond: bool, what: str) -> None:
        self.lines.append(("ok: " if cond else "FAILED: ") + what)
        if not cond:
            raise CheckFailed(what)


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll *pred* until true; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# -- helpers ---------------------------------------------------------------------

def unit_prop(log: Log, *props: str) -> Dict[str, str]:
    out = log.sh(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def write_config(log: Log, backend: str, extra: str = "") -> None:
    text = (f'backend = "{backend}"\n{extra}\n'
            "[sources.cgroupstat]\ninterval = 1.0\n\n[sources.taskstats]\n")
    CONFIG.write_text(text)
    log.note(f"{CONFIG}:\n  " + text.rstrip().replace("\n", "\n  "))


def restart(log: Log) -> None:
    log.sh(f"systemctl restart {UNIT}", timeout=120)
    props = unit_prop(log, "ActiveState", "SubState")
    log.expect(props.get("ActiveState") == "active", f"{UNIT} active after restart: {props}")


def reconfigure(log: Log) -> None:
    """Restart elsad on a new config with no job running, from a clean subtree:
    stop, remove what earlier checks left in the unit's cgroup, start."""
    log.sh(f"systemctl stop {UNIT}", timeout=120)
    release_subtree(log)
    log.sh(f"systemctl reset-failed {UNIT}", ok=False)
    log.sh(f"systemctl start {UNIT}", timeout=120)
    props = unit_prop(log, "ActiveState", "SubState")
    log.expect(props.get("ActiveState") == "active", f"{UNIT} active after start: {props}")


def release_subtree(log: Log) -> None:
    """Kill what is left in the unit's child cgroups, remove them, disable the
    controllers of the unit's subtree_control. (systemd removes the unit's
    cgroup itself when the stopped unit left no process in it.)"""
    if not UNIT_CGROUP.exists():
        return
    for child in sorted(d for d in UNIT_CGROUP.iterdir() if d.is_dir()):
        procs = (child / "cgroup.procs").read_text().split()
        if procs:
            log.note(f"killing {procs} left in {child}")
            (child / "cgroup.kill").write_text("1")
            events = child / "cgroup.events"
            wait_until(lambda e=events: "populated 0" in e.read_text(), 30, f"{child} to empty")
        try:
            child.rmdir()
        except OSError as exc:
            log.note(f"rmdir {child}: {exc}")
    enabled = (UNIT_CGROUP / "cgroup.subtree_control").read_text().split()
    if enabled:
        log.note(f"disabling {enabled} in {UNIT_CGROUP}/cgroup.subtree_control")
        (UNIT_CGROUP / "cgroup.subtree_control").write_text(" ".join("-" + c for c in enabled))


def recover(log: Log) -> None:
    """After a failed check: make sure the next check finds elsad running."""
    if unit_prop(log, "ActiveState").get("ActiveState") != "active":
        log.note("recovering: elsad is not active")
        reconfigure(log)


def status(log: Log) -> dict:
    return json.loads(log.sh("elsa-jobmng status --json").stdout)


def jobmng_json(log: Log, args: str, user: Optional[str] = None) -> dict:
    return json.loads(log.sh(f"elsa-jobmng {args} --json", user=user).stdout)


def start_job(log: Log, script: str, user: Optional[str] = None,
              prefix: str = "") -> subprocess.Popen:
    """``elsa-jobmng run -- sh -c SCRIPT`` in the background; returns the runner."""
    argv = prefix.split() + ["elsa-jobmng", "run", "--", "sh", "-c", script]
    if user:
        argv = ["runuser", "-u", user, "--"] + argv
    log.note(f"$ {' '.join(argv)} &")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def job_of(log: Log, pid: int, timeout: float = 30) -> str:
    jid: List[str] = []

    def found() -> bool:
        p = subprocess.run(["elsa-jobmng", "jobof", str(pid)], capture_output=True, text=True)
        if p.returncode == 0:
            jid.append(p.stdout.strip())
        return bool(jid)

    wait_until(found, timeout, f"pid {pid} to be in a job")
    log.note(f"pid {pid} is in job {jid[0]}")
    return jid[0]


def job_pids(jid: str) -> List[int]:
    p = subprocess.run(["elsa-jobmng", "pids", jid], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def cgroup_of(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROOT / line[3:].lstrip("/")
    raise CheckFailed(f"pid {pid} has no cgroup v2 line in /proc/{pid}/cgroup")


def job_report(log: Log, jid: str) -> dict:
    """``elsa job --json JID``, once the job has ended and its records are stored."""
    def ended() -> bool:
        p = subprocess.run(["elsa", "job", "--json", jid], capture_output=True, text=True)
        return p.returncode == 0 and json.loads(p.stdout).get("state") == "ended"

    wait_until(ended, 60, f"job {jid} to be stored as ended")
    return json.loads(log.sh(f"elsa job --json {jid}").stdout)


def run_job(log: Log, script: str, suffix: str = ".py", timeout: float = 180,
            ) -> tuple[str, str]:
    """Create a job, run SCRIPT (python, or sh with suffix ".sh") in it in the
    foreground: (jid, stdout)."""
    path = Path(f"/tmp/elsa-vm-job{suffix}")
    path.write_text(script)
    log.note(f"{path}:\n  " + script.rstrip().replace("\n", "\n  "))
    jid = log.sh("elsa-jobmng create").stdout.strip()
    interp = "python3" if suffix == ".py" else "sh"
    out = log.sh(f"elsa-jobmng run --job {jid} -- {interp} {path}", timeout=timeout).stdout
    return jid, out


def figure(log: Log, report: dict, metric: str) -> int:
    usage = report["usage"]
    chosen = (usage.get("chosen") or {}).get(metric)
    value = usage.get(metric)
    log.note(f"elsa job: {metric} = {value} from source {chosen}; per source: "
             + ", ".join(f"{s}={v.get(metric)}" for s, v in (usage.get("sources") or {}).items()))
    log.expect(value is not None and chosen is not None,
               f"'elsa job' shows {metric} with its source")
    return int(value)


def dump_state(log: Log) -> None:
    log.sh(f"journalctl -u {UNIT} --no-pager -n 40", ok=False)


# -- the checks (in order) -------------------------------------------------------

@check
def unit_starts_ready(log: Log) -> None:
    """The package's unit is enabled, started at boot with the packaged config, and
    active: for Type=notify that means elsad sent READY=1."""
    props = unit_prop(log, "Type", "ActiveState", "SubState", "UnitFileState", "MainPID",
                      "Delegate", "ControlGroup")
    log.expect(props.get("UnitFileState") == "enabled", "the package enabled elsad.service")
    log.expect(props.get("Type") == "notify", "Type=notify")
    log.expect(props.get("ActiveState") == "active" and props.get("SubState") == "running",
               "active (running) after boot: READY=1 received")
    log.expect(props.get("Delegate") == "yes", "Delegate=yes")
    log.sh("elsa-jobmng status")


@check
def cgroup2_jobs_in_delegated_subtree(log: Log) -> None:
    write_config(log, "cgroup2")
    reconfigure(log)
    st = status(log)
    log.expect(st.get("backend") == "cgroup2", f"backend cgroup2 (status: {st.get('backend')})")
    main_pid = int(unit_prop(log, "MainPID")["MainPID"])
    own = cgroup_of(main_pid)
    log.expect(own == UNIT_CGROUP / "daemon", f"elsad runs in the leaf {UNIT_CGROUP}/daemon: {own}")
    jid = log.sh("elsa-jobmng create --name subtree").stdout.strip()
    job = jobmng_json(log, f"show {jid}")
    path = Path(job["params"]["cgroup_path"])
    log.expect(path.parent == UNIT_CGROUP and path.is_dir(),
               f"job cgroup {path} is a directory directly in {UNIT_CGROUP}")
    log.sh(f"elsa-jobmng end {jid}")


@check
def controllers_enabled(log: Log) -> None:
    st = status(log)
    enabled = (UNIT_CGROUP / "cgroup.subtree_control").read_text().split()
    log.note(f"{UNIT_CGROUP}/cgroup.subtree_control: {enabled}")
    for c in ("cpu", "memory", "io", "pids"):
        log.expect(c in enabled, f"controller {c} enabled for job cgroups")
    missing = st.get("controllers_missing")
    if missing is None:
        missing = (st.get("backend_status") or {}).get("controllers_missing")
    log.note(f"status controllers_missing: {missing}")
    log.expect(not missing, "status reports no missing controller")
    jid = log.sh("elsa-jobmng create --name files").stdout.strip()
    path = Path(jobmng_json(log, f"show {jid}")["params"]["cgroup_path"])
    for f in ("memory.peak", "io.stat", "pids.peak", "cpu.max", "memory.max"):
        log.expect((path / f).exists(), f"{path}/{f} exists")
    log.sh(f"elsa-jobmng end {jid}")


@check
def reload_applies_changed_key(log: Log) -> None:
    """limits.max_request_bytes is applied on reload: a 2 KiB request passes before,
    is refused after ``systemctl reload``."""
    big = "--tag a=" + "x" * 1000 + " --tag b=" + "y" * 1000
    jid = log.sh(f"elsa-jobmng create {big}").stdout.strip()
    log.sh(f"elsa-jobmng end {jid}")
    write_config(log, "cgroup2", "[limits]\nmax_request_bytes = 1024\n")
    pid_before = unit_prop(log, "MainPID")["MainPID"]
    log.sh(f"systemctl reload {UNIT}", timeout=60)

    def refused() -> bool:
        p = subprocess.run(["elsa-jobmng", "create"] + big.split(), capture_output=True,
                           text=True)
        if p.returncode == 0:  # not reloaded yet
            subprocess.run(["elsa-jobmng", "end", p.stdout.strip()], capture_output=True)
        return p.returncode != 0

    wait_until(refused, 30, "the new max_request_bytes to refuse a 2 KiB request")
    p = log.sh(f"elsa-jobmng create {big}", ok=False)
    log.expect(p.returncode != 0, "a 2 KiB request is refused after reload")
    jid = log.sh("elsa-jobmng create --name small").stdout.strip()
    log.sh(f"elsa-jobmng end {jid}")
    log.expect(unit_prop(log, "MainPID")["MainPID"] == pid_before,
               "same elsad process (reload, not restart)")
    log.sh(f"journalctl -u {UNIT} --no-pager -n 5 -g reload", ok=False)
    write_config(log, "cgroup2")
    log.sh(f"systemctl reload {UNIT}", timeout=60)


def _restart_keeps_job(log: Log, delegated: bool) -> None:
    runner = start_job(log, "(sleep 600 &); sleep 600")
    jid = job_of(log, runner.pid)
    cg = cgroup_of(runner.pid)
    try:
        wait_until(lambda: len(job_pids(jid)) >= 2, 30, "two members")
        before = sorted(job_pids(jid))
        log.note(f"members before: {before}, job cgroup {cg}")
        restart(log)
        after: List[int] = []

        def recovered() -> bool:
            after[:] = sorted(job_pids(jid))
            return bool(after)

        wait_until(recovered, 30, f"job {jid} after restart")
        log.note(f"members after: {after}")
        log.expect(after == before, "the same members after 'systemctl restart'")
        log.expect(all(Path(f"/proc/{p}").exists() and cgroup_of(p) == cg for p in before),
                   f"every member alive and still in {cg}")
        if delegated:
            # systemd 252 starts the new elsad in the unit's cgroup: the old one turned
            # the controllers off at stop, the new one turns them on again.
            enabled = (UNIT_CGROUP / "cgroup.subtree_control").read_text().split()
            log.note(f"{UNIT_CGROUP}/cgroup.subtree_control after restart: {enabled}")
            log.expect(all(c in enabled for c in ("cpu", "memory", "io", "pids")),
                       "controllers enabled again for job cgroups")
            log.expect((cg / "memory.current").exists(), f"{cg}/memory.current exists")
        log.sh(f"elsa-jobmng kill -s KILL {jid}")
    finally:
        if cg.exists() and (cg / "cgroup.procs").read_text().split():
            (cg / "cgroup.kill").write_text("1")
        runner.wait(30)


@check
def restart_keeps_jobs(log: Log) -> None:
    """``systemctl restart`` with a job running, job cgroups in the delegated
    subtree (the packaged default)."""
    _restart_keeps_job(log, delegated=True)


@check
def restart_keeps_jobs_base_outside_unit(log: Log) -> None:
    """The same with ``[backends.cgroup2] base`` outside the unit's cgroup (the
    configuration docs/packaging.md gives for systemd < 254)."""
    base = CGROOT / "elsa"
    try:
        write_config(log, "cgroup2", f'[backends.cgroup2]\nbase = "{base}"\n')
        reconfigure(log)
        _restart_keeps_job(log, delegated=False)
    finally:
        write_config(log, "cgroup2")
        reconfigure(log)


@check
def memory_peak_matches_vmhwm(log: Log) -> None:
    """A job touching 200 MiB: memory.peak (and 'elsa job' max RSS) within 5 % of VmHWM."""
    script = (
        "import re\n"
        "b = bytearray(200 << 20)\n"
        "b[::4096] = b'x' * len(b[::4096])  # touch every page\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "cg = open('/proc/self/cgroup').read().split('::')[1].strip()\n"
        "print(open('/sys/fs/cgroup' + cg + '/memory.peak').read().strip())\n")
    jid, out = run_job(log, script)
    hwm_kb, peak = (int(x) for x in out.split())
    log.note(f"VmHWM {hwm_kb} kB, memory.peak {peak // 1024} kB")
    log.expect(abs(peak / 1024 - hwm_kb) <= 0.05 * hwm_kb, "memory.peak within 5 % of VmHWM")
    rss = figure(log, job_report(log, jid), "max_rss_kb")
    log.expect(abs(rss - hwm_kb) <= 0.05 * hwm_kb, "'elsa job' max RSS within 5 % of VmHWM")


@check
def eff_reports_job_limits(log: Log) -> None:
    """``elsa-jobmng run --cpu-limit 0.5 --mem-limit 256M``: the job cgroup's cpu.max
    and memory.max hold them; memory.max raised by hand while the job runs is the
    limit the job keeps (read once more at its end); ``elsa eff --json`` shows the
    cores and the limit, and memory efficiency = max RSS / limit. A job without
    limits has none."""
    path = Path("/tmp/elsa-vm-limits.py")
    path.write_text(
        "import os, time\n"
        "b = bytearray(64 << 20)\n"
        "b[::4096] = b'x' * len(b[::4096])  # touch every page: 64 MiB resident\n"
        "cg = '/sys/fs/cgroup' + open('/proc/self/cgroup').read().split('::')[1].strip()\n"
        "print(os.environ['ELSA_JID'], open(cg + '/cpu.max').read().strip(),\n"
        "      open(cg + '/memory.max').read().strip(), flush=True)\n"
        "with open(cg + '/memory.max', 'w') as fh:  # an administrator raises it\n"
        "    fh.write(str(512 << 20))\n"
        "time.sleep(0.5)\n")
    out = log.sh(f"elsa-jobmng run --cpu-limit 0.5 --mem-limit 256M -- python3 {path}").stdout
    jid, quota, period, memory_max = out.split()
    log.expect(f"{quota} {period}" == "50000 100000", f"cpu.max {quota} {period}")
    log.expect(memory_max == str(256 << 20), f"memory.max {memory_max} == 256 MiB")
    report = job_report(log, jid)
    rss = figure(log, report, "max_rss_kb")
    params = jobmng_json(log, f"show {jid}")["params"]
    log.expect(params.get("cpu_limit") == "0.5" and params.get("memory_limit") == str(512 << 20),
               f"the job keeps the limits in force at its end: {params}")
    eff = json.loads(log.sh(f"elsa eff --json {jid}").stdout)
    log.expect(eff["cores"] == 0.5 and eff["memory_limit_kb"] == 512 << 10,
               f"elsa eff: cores {eff['cores']}, memory_limit_kb {eff['memory_limit_kb']}")
    want = rss / (512 << 10)
    log.expect(eff["memory_efficiency"] is not None
               and abs(eff["memory_efficiency"] - want) < 1e-9 and want >= 0.125,
               f"memory efficiency {eff['memory_efficiency']} == max RSS {rss} kB / 512 MiB")
    log.expect(eff["cpu_efficiency"] is not None, f"CPU efficiency {eff['cpu_efficiency']}")
    jid = log.sh("elsa-jobmng run -- sh -c 'echo $ELSA_JID'").stdout.strip()
    job_report(log, jid)
    params = jobmng_json(log, f"show {jid}")["params"]
    log.expect(set(params) == {"cgroup_path"}, f"no limits kept without any: {params}")
    eff = json.loads(log.sh(f"elsa eff --json {jid}").stdout)
    log.expect(eff["cores"] is None and eff["memory_limit_kb"] is None
               and eff["memory_efficiency_why"] == "the job has no memory limit",
               f"elsa eff without limits: {eff}")


@check
def io_stat_direct_io(log: Log) -> None:
    """8 MiB written with O_DIRECT to the virtio disk show in io.stat and 'elsa job'."""
    size = 8 << 20
    dev = os.stat(SCRATCH_DISK).st_rdev
    key = f"{os.major(dev)}:{os.minor(dev)}"
    script = (f"dd if=/dev/zero of={SCRATCH_DISK} bs=1M count=8 oflag=direct status=none\n"
              "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/io.stat\n")
    jid, out = run_job(log, script, suffix=".sh")
    line = [ln for ln in out.splitlines() if ln.startswith(key + " ")]
    log.expect(bool(line), f"io.stat has a line for {SCRATCH_DISK} ({key})")
    fields = dict(kv.split("=") for kv in line[-1].split()[1:])
    log.expect(int(fields["wbytes"]) == size, f"io.stat wbytes {fields['wbytes']} == {size}")
    wb = figure(log, job_report(log, jid), "write_bytes")
    log.expect(wb >= size, f"'elsa job' write bytes {wb} >= {size}")


@check
def pids_peak_counts_processes(log: Log) -> None:
    """A job of 1 + 4 concurrent processes: pids.peak 5, and 'elsa job' says 5."""
    script = (
        "import subprocess\n"
        "ps = [subprocess.Popen(['sleep', '2']) for _ in range(4)]\n"
        "[p.wait() for p in ps]\n"
        "cg = open('/proc/self/cgroup').read().split('::')[1].strip()\n"
        "print(open('/sys/fs/cgroup' + cg + '/pids.peak').read().strip())\n")
    jid, out = run_job(log, script)
    peak = int(out.split()[0])
    log.expect(peak == 5, f"pids.peak {peak} == 5 (python + 4 sleeps)")
    report = job_report(log, jid)
    extra = {s: (v.get("extra") or {}).get("pids_peak")
             for s, v in (report["usage"].get("sources") or {}).items()}
    log.note(f"pids_peak per source: {extra}")
    log.expect(5 in extra.values(), "'elsa job' carries pids_peak 5 from cgroupstat")
    procs = figure(log, report, "processes") if "processes" in report["usage"] else None
    log.expect(procs is None or procs == 5, f"'elsa job' processes {procs} == 5")


@check
def cpuset_v2_pins(log: Log) -> None:
    write_config(log, "cpuset", '[backends.cpuset]\nmode = "v2"\n')
    reconfigure(log)
    log.expect(status(log).get("backend") == "cpuset", "backend cpuset")
    p = log.sh("elsa-jobmng run --cpus 1 -- grep Cpus_allowed_list /proc/self/status")
    log.expect(p.stdout.split()[-1] == "1", "the job's Cpus_allowed_list is 1")
    p = log.sh("elsa-jobmng run --cpus 0 -- grep Cpus_allowed_list /proc/self/status")
    log.expect(p.stdout.split()[-1] == "0", "the job's Cpus_allowed_list is 0")
    write_config(log, "cgroup2")
    reconfigure(log)


@check
def kill_double_forked(log: Log) -> None:
    runner = start_job(log, "(sleep 600 &); (setsid sleep 600 &); sleep 600")
    jid = job_of(log, runner.pid)
    wait_until(lambda: len(job_pids(jid)) >= 3, 30, "three members")
    pids = job_pids(jid)
    log.note(f"members (two double-forked, reparented to init): {pids}")
    log.sh(f"elsa-jobmng kill -s KILL {jid}", timeout=60)
    runner.wait(30)
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 30,
               "every member gone")
    log.sh(f"elsa-jobmng wait --timeout 30 {jid}", timeout=60)


@check
def freeze_thaw_double_forked(log: Log) -> None:
    tick = "/tmp/elsa-vm-tick"
    runner = start_job(log, f"(while :; do date +%s%N > {tick}; sleep 0.2; done &); sleep 600")
    jid = job_of(log, runner.pid)
    wait_until(lambda: len(job_pids(jid)) >= 2 and os.path.exists(tick), 30, "the ticker")
    log.sh(f"elsa-jobmng freeze {jid}", timeout=60)
    frozen = Path(tick).read_text()
    time.sleep(1.5)  # a running ticker writes 7 times in this span
    log.expect(Path(tick).read_text() == frozen, "the double-forked ticker stops while frozen")
    log.sh(f"elsa-jobmng thaw {jid}", timeout=60)
    wait_until(lambda: Path(tick).read_text() != frozen, 10, "the ticker to resume after thaw")
    log.note("the ticker resumed")
    log.sh(f"elsa-jobmng kill -s KILL {jid}", timeout=60)
    runner.wait(30)


def _limit_in_force(log: Log, pid: int, limit: int) -> None:
    cg = cgroup_of(pid)
    effective = []
    for d in [cg] + list(cg.parents):
        if d == CGROOT or not str(d).startswith(str(CGROOT)):
            break
        f = d / "memory.max"
        if f.exists() and f.read_text().strip() != "max":
            effective.append((str(d), int(f.read_text())))
    log.note(f"pid {pid} in {cg}; memory.max along its ancestors: {effective}")
    log.expect(any(v <= limit for _, v in effective),
               f"MemoryMax={limit} still applies to pid {pid}")


@check
def limit_escape_run_and_attach(log: Log) -> None:
    """A user's process in a systemd scope with MemoryMax=64M must stay under that
    limit when the user runs or attaches it to an ELSA job: elsad acts as root, and a
    non-root caller must never leave the limits that apply to its process (a job
    nested where the limits hold, or a refusal that says why)."""
    limit = 64 << 20
    log.sh(f"id {USER} || useradd --no-create-home {USER}")
    scope = f"systemd-run --scope --quiet --slice=elsavm.slice -p MemoryMax={limit} --uid={USER}"
    # run: CMD is born in the job; its cgroup must still be under the limit, or
    # elsa-jobmng must refuse (exit 125) and leave it where it was.
    argv = scope.split() + ["elsa-jobmng", "run", "--", "sleep", "600"]
    log.note(f"$ {' '.join(argv)} &")
    runner = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    ok_run = False
    try:
        jid: List[str] = []

        def settled() -> bool:
            if runner.poll() is not None:
                return True
            p = subprocess.run(["elsa-jobmng", "jobof", str(runner.pid)],
                               capture_output=True, text=True)
            if p.returncode == 0:
                jid.append(p.stdout.strip())
            return bool(jid)

        wait_until(settled, 30, "'run' to join a job or refuse")
        if runner.poll() is not None:
            err = runner.stderr.read() if runner.stderr else ""
            log.note(f"run exited {runner.returncode}: {err.strip()}")
            ok_run = runner.returncode == 125 and bool(err.strip())
        else:
            log.note(f"run: sleep {runner.pid} is in job {jid[0]}")
            try:
                _limit_in_force(log, runner.pid, limit)
                ok_run = True
            except CheckFailed:
                pass
    finally:
        runner.kill()
        runner.wait(30)
    # attach: a process already running in the scope, attached by its owner.
    sleeper = subprocess.Popen(scope.split() + ["sleep", "600"])
    try:
        wait_until(lambda: Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == "sleep",
                   30, "the scope's sleep")
        _limit_in_force(log, sleeper.pid, limit)
        jid = log.sh("elsa-jobmng create --name escape", user=USER).stdout.strip()
        p = log.sh(f"elsa-jobmng attach {jid} {sleeper.pid}", user=USER, ok=False)
        log.note("attach " + ("refused" if p.returncode else "accepted"))
        _limit_in_force(log, sleeper.pid, limit)
        log.sh(f"elsa-jobmng end {jid}", user=USER, ok=False)
    finally:
        sleeper.kill()
        sleeper.wait(30)
    log.expect(ok_run, "the limit held for 'run' (see above)")


def _schema7_store(path: Path, rows: int) -> None:
    """A store at schema 7 (members keyed by pid first) holding *rows* ended members,
    as an ELSA of before migration 8 left it."""
    import sqlite3

    from elsa.core.schema import migrate
    from elsa.core.store import INSERT_MEMBER
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    migrate(db, str(path), target=7)
    boot = "0" * 36  # no boot of this guest: history only
    db.execute("BEGIN")
    db.executemany(INSERT_MEMBER, ((boot, 300 + i % 32000, 10_000 + i, 1 + i // 1000,
                                    1.7e9 + i, "fork", 1.7e9 + i + 1, 0, 0)
                                   for i in range(rows)))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    os.chmod(path, 0o600)


def _start_seconds(log: Log) -> float:
    """How long the unit's last start took: from exec to READY=1."""
    p = unit_prop(log, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    return (int(p["ActiveEnterTimestampMonotonic"])
            - int(p["ExecMainStartTimestampMonotonic"])) / 1e6


@check
def migration_outlasts_start_timeout(log: Log) -> None:
    """The first start after an upgrade migrates the store; on a large store that takes
    longer than TimeoutStartSec. elsad asks systemd for more time while it migrates
    (EXTEND_TIMEOUT_USEC), so it starts instead of being killed mid-transaction. The
    check sizes a schema-7 store (from a migration timed here) so that its migration
    outlasts a TimeoutStartSec set above elsad's normal start."""
    import sqlite3
    import tempfile

    from elsa.core.schema import MIGRATIONS, migrate
    state = Path("/var/lib/elsa")
    dropin = Path("/run/systemd/system/elsad.service.d/timeout.conf")
    restart(log)
    normal = _start_seconds(log)
    with tempfile.TemporaryDirectory() as d:
        sample = 50_000
        _schema7_store(Path(d) / "elsa.db", sample)
        db = sqlite3.connect(str(Path(d) / "elsa.db"), isolation_level=None)
        t0 = time.monotonic()
        db.execute("PRAGMA quick_check").fetchall()  # elsad's integrity check, first
        check_per_row = (time.monotonic() - t0) / sample
        t0 = time.monotonic()
        migrate(db, str(Path(d) / "elsa.db"))
        per_row = (time.monotonic() - t0) / sample
        db.close()
    # Rows for a migration 5 s longer than TimeoutStartSec, which covers the normal
    # start and the integrity check (before the migration: no extension yet) with 3 s
    # to spare. (The guest's root is in memory: as few rows as that takes.)
    rows = int((normal + 8) / max(per_row - check_per_row, 1e-7))
    timeout = int(normal + check_per_row * rows + 3) + 1
    log.note(f"normal start {normal:.1f} s; per row: migration {per_row * 1e6:.1f} us, "
             f"integrity check {check_per_row * 1e6:.1f} us: {rows} rows, about "
             f"{rows * per_row:.0f} s of migration, against TimeoutStartSec={timeout}s")
    log.expect(rows <= 1_000_000, "a store the guest's memory holds (raise its memory)")
    saved = Path(tempfile.mkdtemp(prefix="elsa-store-", dir="/var/lib"))  # the real store
    log.sh(f"systemctl stop {UNIT}", timeout=120)
    for name in ("elsa.db", "elsa.db-wal", "elsa.db-shm"):
        if (state / name).exists():
            (state / name).rename(saved / name)
    try:
        _schema7_store(state / "elsa.db", rows)
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(f"[Service]\nTimeoutStartSec={timeout}s\n")
        log.sh("systemctl daemon-reload")
        log.sh(f"systemctl start {UNIT}", timeout=600)
        took = _start_seconds(log)
        log.expect(unit_prop(log, "ActiveState").get("ActiveState") == "active",
                   f"{UNIT} active after migrating {rows} members")
        log.expect(took > timeout, f"the start took {took:.1f} s, longer than "
                                   f"TimeoutStartSec={timeout}s: it needed the extension")
        version = sqlite3.connect(str(state / "elsa.db")).execute(
            "PRAGMA user_version").fetchone()[0]
        log.expect(version == len(MIGRATIONS), f"store at schema {version}")
    finally:
        log.sh(f"systemctl stop {UNIT}", timeout=120, ok=False)
        dropin.unlink(missing_ok=True)
        log.sh("systemctl daemon-reload", ok=False)
        for name in ("elsa.db", "elsa.db-wal", "elsa.db-shm"):
            (state / name).unlink(missing_ok=True)
            if (saved / name).exists():
                (saved / name).rename(state / name)
        saved.rmdir()
        log.sh(f"systemctl reset-failed {UNIT}", ok=False)
        log.sh(f"systemctl start {UNIT}", timeout=120)


@check
def peer_systemd_run_scope_rate(log: Log) -> None:
    """Function check and rates only: emulated timings are not benchmark figures."""
    n = 20
    log.sh("elsa-jobmng run -- true && systemd-run --scope --quiet true")  # warm up
    t0 = time.monotonic()
    for _ in range(n):
        subprocess.run(["elsa-jobmng", "run", "--", "true"], check=True)
    t_elsa = time.monotonic() - t0
    t0 = time.monotonic()
    for _ in range(n):
        subprocess.run(["systemd-run", "--scope", "--quiet", "true"], check=True)
    t_sd = time.monotonic() - t0
    log.note(f"RATE elsa-jobmng run: {n / t_elsa:.1f} jobs/s; systemd-run --scope: "
             f"{n / t_sd:.1f} scopes/s; ratio elsa/systemd-run {t_sd / t_elsa:.2f} "
             f"({n} each, under emulation)")


def main(argv: List[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/dev/stdout"
    if path.startswith("/dev/tty"):
        subprocess.run(["stty", "-F", path, "raw", "-echo"], check=False)
    subprocess.run(["modprobe", "virtio_blk"], check=False)
    with open(path, "w") as out:
        def emit(obj: dict) -> None:
            out.write(json.dumps(obj) + "\n")
            out.flush()

        emit({"start": True, "uptime": float(Path("/proc/uptime").read_text().split()[0])})
        for fn in CHECKS:
            log = Log()
            t0 = time.monotonic()
            try:
                fn(log)
                outcome = "pass"
            except Exception:
                outcome = "fail"
                log.note(traceback.format_exc())
                try:
                    dump_state(log)
                    recover(log)
                except Exception:
                    log.note(traceback.format_exc())
            emit({"check": fn.__name__, "outcome": outcome, "output": "\n".join(log.lines)[-20000:],
                  "seconds": round(time.monotonic() - t0, 1)})
        emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
