"""The packages build, install into a throwaway root, and run; the unit's sandbox works.

Builds the .deb with packaging/build-deb (dpkg-buildpackage), unpacks it with
``dpkg-deb -x`` into a temporary root (nothing is installed on this machine),
and runs the packaged programs with Debian's own python3 and Debian's python3
dependencies (python3-pyroute2 0.7 etc., not the pip versions the dev tree
uses). The systemd unit cannot be started here (PID 1 is not systemd), so its
sandbox is checked three ways: statically (``systemd-analyze verify`` and
``security --offline``), option by option against the code's defaults, and by
running the packaged elsad with exactly the unit's capability bounding set,
no_new_privs and MemoryDenyWriteExecute's kernel equivalent (PR_SET_MDWE),
for every grouping backend, with the taskstats source on.

Build and run dependencies: packaging/ci-apt-packages.txt.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from elsa import __version__, config
from elsa.client import Client
from elsa.errors import DaemonUnavailable
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "packaging/elsad.service"
SYS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
APT_HINT = "apt-get install $(cat packaging/ci-apt-packages.txt)"


def _need(*tools: str) -> None:
    """Skip when a build tool is not installed (CI installs them: .ci/run)."""
    missing = [t for t in tools if shutil.which(t, path=SYS_PATH) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; {APT_HINT}")


def _need_debian_python_deps() -> None:
    res = subprocess.run(["/usr/bin/python3", "-c", "import pluggy, pyroute2, structlog"],
                         capture_output=True, text=True, env={"PATH": SYS_PATH})
    if res.returncode != 0:
        msg = f"Debian's python3 lacks the package's dependencies ({APT_HINT}): {res.stderr}"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs them; missing there is a real failure
        pytest.skip(msg)


def _unit() -> Dict[str, List[str]]:
    """The unit's keys (every section) -> values in order; systemd allows repeats."""
    out: Dict[str, List[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- .deb ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    _need("dpkg-buildpackage", "dh", "dpkg-deb", "dh_python3")
    out = tmp_path_factory.mktemp("debs")
    res = subprocess.run([str(ROOT / "packaging/build-deb"), str(out)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"build-deb failed:\n{res.stdout}\n{res.stderr}"
    debs = sorted(out.glob(f"elsa_{__version__}_all.deb"))
    assert len(debs) == 1, list(out.iterdir())
    return debs[0]


@pytest.fixture(scope="module")
def deb_root(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("debroot")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
    return root


def _deb_env(root: Path) -> Dict[str, str]:
    return {"PATH": SYS_PATH, "LANG": "C.UTF-8", "HOME": "/root",
            "PYTHONPATH": str(root / "usr/lib/python3/dist-packages")}


def _run_packaged(root: Path, prog: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(root / "usr/bin" / prog), *args], env=_deb_env(root),
                          capture_output=True, text=True, timeout=60)


def test_deb_metadata(deb):
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture",
                             "Depends"], capture_output=True, text=True, check=True).stdout
    assert "Package: elsa\n" in fields
    assert f"Version: {__version__}\n" in fields
    assert "Architecture: all\n" in fields
    for dep in ("python3-pluggy", "python3-pyroute2", "python3-structlog"):
        assert re.search(rf"\b{dep}\b", fields), f"Depends lacks {dep}: {fields}"


def test_deb_contents(deb, deb_root):
    r = deb_root
    for prog in ("elsad", "elsa-jobmng", "elsa"):
        assert os.access(r / "usr/bin" / prog, os.X_OK), prog
        assert (r / "usr/bin" / prog).read_text().startswith("#!/usr/bin/python3")
    assert (r / "lib/systemd/system/elsad.service").read_text() == UNIT.read_text()
    assert (r / "usr/lib/tmpfiles.d/elsa.conf").read_text() == \
        (ROOT / "packaging/elsa.tmpfiles").read_text()
    assert (r / "etc/elsa/elsa.toml").read_text() == (ROOT / "packaging/elsa.toml").read_text()
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                               text=True, check=True).stdout.split()
    assert conffiles == ["/etc/elsa/elsa.toml"]
    pages = sorted((ROOT / "packaging/man").iterdir())
    assert {p.name for p in pages} >= {"elsad.8", "elsa-jobmng.1", "elsa.1"}
    for page in pages:
        installed = r / f"usr/share/man/man{page.suffix[1:]}/{page.name}.gz"
        assert gzip.decompress(installed.read_bytes()).decode() == page.read_text()
    for comp in (ROOT / "packaging/completion").iterdir():
        assert (r / "usr/share/bash-completion/completions" / comp.name).read_text() == \
            comp.read_text()
    # Built-in backends and sources register through entry points: they must ship.
    eps = next((r / "usr/lib/python3/dist-packages").glob("elsa_accounting-*.dist-info"))
    shipped = (eps / "entry_points.txt").read_text()
    pyproject = config.tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name, target in pyproject["project"]["entry-points"]["elsa"].items():
        assert f"{name} = {target}" in shipped


def test_deb_postinst_sets_up_unit_and_tmpfiles(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "ctl")], check=True)
    postinst = (tmp_path / "ctl/postinst").read_text()
    assert "deb-systemd-helper enable 'elsad.service'" in postinst
    assert "systemd-tmpfiles" in postinst and "elsa.conf" in postinst


def test_packaged_elsad_version_and_jobmng_help(deb_root):
    _need_debian_python_deps()
    res = _run_packaged(deb_root, "elsad", "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"elsad {__version__}"
    res = _run_packaged(deb_root, "elsa-jobmng", "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: elsa-jobmng" in res.stdout and "create" in res.stdout
    res = _run_packaged(deb_root, "elsa", "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: elsa" in res.stdout
    res = _run_packaged(deb_root, "elsad", "--list-plugins")
    assert res.returncode == 0, res.stderr
    assert re.search(r"^backend\s+cnproc\b", res.stdout, re.M), res.stdout
    assert "plugin failed to load" not in res.stdout + res.stderr


# -- the unit's sandbox, emulated ----------------------------------------------------------

# PR_SET_MDWE (prctl 65, kernel >= 6.3) refuses writable+executable
# mappings like systemd's MemoryDenyWriteExecute= seccomp filter; it survives execve.
_MDWE_EXEC = ("import ctypes, os, sys\n"
              "libc = ctypes.CDLL(None, use_errno=True)\n"
              "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
              "    sys.exit('PR_SET_MDWE failed: errno %d' % ctypes.get_errno())\n"
              "os.execv(sys.argv[1], sys.argv[1:])\n")

# Capability numbers (docs/kernel.md, "Sockets and credentials").
_CAP_BITS = {"CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_NET_ADMIN": 12, "CAP_SYS_PACCT": 20,
             "CAP_SYS_NICE": 23}


def _cgroup_mounts() -> Dict[str, str]:
    out = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype, _, opts = right.split()[:3]
            mnt = left.split()[4]
            if fstype == "cgroup2":
                out["cgroup2"] = mnt
            elif fstype == "cgroup" and "cpuset" in opts.split(","):
                out["cpuset"] = mnt
    return out


def _rmtree_cgroup(path: Path) -> None:
    """Remove a cgroup directory tree leaf first (cgroupfs only allows rmdir)."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            _rmtree_cgroup(child)
    try:
        path.rmdir()
    except OSError:
        pass


def _backends(root: Path) -> List[str]:
    res = _run_packaged(root, "elsad", "--list-plugins")
    return re.findall(r"^backend\s+(\S+)", res.stdout, re.M)


@pytest.fixture
def cgroup_bases() -> Iterator[Dict[str, str]]:
    """Private job-cgroup parents for this test, removed afterwards."""
    mounts = _cgroup_mounts()
    tag = f"elsa-pkgtest-{os.getpid()}"
    bases = {}
    if "cgroup2" in mounts:
        bases["cgroup2"] = f"{mounts['cgroup2']}/{tag}"
    if "cpuset" in mounts:
        bases["cpuset_v1"] = f"{mounts['cpuset']}/{tag}"
    yield bases
    for base in bases.values():
        _rmtree_cgroup(Path(base))


@pytest.mark.parametrize("backend", ["cnproc", "cgroup2", "cpuset"])
def test_packaged_elsad_runs_with_only_the_units_privileges(deb_root, backend, tmp_path,
                                                            cgroup_bases, spawned):
    _need_debian_python_deps()
    _need("setpriv")
    if backend not in _backends(deb_root):
        pytest.skip(f"backend {backend!r} is not in this tree")
    caps = _unit()["CapabilityBoundingSet"][0].split()
    assert set(caps) <= set(_CAP_BITS), f"add the new capability's bit to _CAP_BITS: {caps}"
    extra = '[sources.taskstats]\n'
    if backend == "cnproc":
        # acct(2) is global: only one case switches it (elsad switches it back on stop).
        extra += '[sources.bsdacct]\n'
    if backend == "cgroup2":
        if "cgroup2" not in cgroup_bases:
            pytest.skip("no cgroup2 mount")
        extra += f'[backends.cgroup2]\nbase = "{cgroup_bases["cgroup2"]}"\n'
    elif backend == "cpuset":
        extra += "[backends.cpuset]\n"
        if "cgroup2" in cgroup_bases:
            extra += f'base = "{cgroup_bases["cgroup2"]}"\n'
        if "cpuset_v1" in cgroup_bases:
            extra += f'v1_base = "{cgroup_bases["cpuset_v1"]}"\n'
    sock = tmp_path / "elsad.sock"
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(f'backend = "{backend}"\nsocket = "{sock}"\n'
                   f'state_dir = "{tmp_path / "state"}"\nlog_level = "debug"\n' + extra)
    bounding = "-all," + ",".join("+" + c[len("CAP_"):].lower() for c in caps)
    cmd = ["setpriv", "--no-new-privs", "--inh-caps", "-all", "--bounding-set", bounding,
           "--", "/usr/bin/python3", "-c", _MDWE_EXEC,
           str(deb_root / "usr/bin/elsad"), "--config", str(cfg)]
    log_path = tmp_path / "elsad.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(cmd, env=_deb_env(deb_root), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    spawned.append(daemon)

    def ready() -> bool:
        if daemon.poll() is not None:
            raise AssertionError(f"sandboxed elsad exited {daemon.returncode}:\n"
                                 + log_path.read_text()[-4000:])
        try:
            with Client(str(sock), timeout=2.0) as c:
                return bool(c.status())
        except DaemonUnavailable:
            return False

    wait_for(ready, 30, what="the sandboxed packaged elsad to answer")
    # The sandbox really applied (else this test proves nothing).
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    cap_eff = int(re.search(r"^CapEff:\s*(\w+)", status, re.M).group(1), 16)
    # elsad keeps only what its backend and sources use (elsa/kernel/caps.py).
    from elsa.kernel import caps as caps_mod
    kept = caps_mod.needed(backend, ["taskstats"] + (["bsdacct"] if backend == "cnproc" else []))
    assert set(kept) <= set(caps)
    assert cap_eff == sum(1 << _CAP_BITS[c] for c in kept), hex(cap_eff)
    assert re.search(r"^NoNewPrivs:\s*1", status, re.M)
    child = subprocess.Popen(["sh", "-c", "read x; sleep 30 & wait"], stdin=subprocess.PIPE,
                             start_new_session=True)
    spawned.append(child)
    with Client(str(sock), timeout=30.0) as c:
        st = c.status()
        assert st["backend"] == backend
        assert "taskstats" in st["sources"], st["sources"]
        job = c.create(name="pkgtest", pids=[child.pid])
        child.stdin.write(b"go\n")
        child.stdin.flush()
        wait_for(lambda: len(c.pids(job["jid"])) >= 2, 10, what="the forked sleep to join")
        c.kill(job["jid"], signal=signal.SIGKILL)
        c.wait(job["jid"], timeout=20)
    child.wait(10)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(20) == 0, log_path.read_text()[-4000:]
    if backend == "cnproc":
        assert "bsdacct" in st["sources"], st["sources"]
        # Accounting no longer goes to elsad's files once it stopped.
        pacct = list((tmp_path / "state").rglob("pacct*"))
        sizes = {p: p.stat().st_size for p in pacct if p.is_file()}
        subprocess.run(["true"], check=True)
        assert {p: p.stat().st_size for p in sizes if p.exists()} == \
            {p: n for p, n in sizes.items() if p.exists()}
    assert '"level": "error"' not in log_path.read_text(), log_path.read_text()[-4000:]


# -- the unit, statically -----------------------------------------------------------------

def test_unit_options_fit_elsa():
    u = _unit()
    one = {k: v[-1] for k, v in u.items()}
    assert one["Type"] == "notify"  # elsad sends READY=1 itself
    assert one["Delegate"] == "yes"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["KillMode"] == "process"  # jobs in the delegated subtree outlive a restart
    # No restart loop on what a restart cannot mend: elsad's config and privilege exits.
    from elsa import elsad

    assert one["Restart"] == "on-failure"
    assert set(one["RestartPreventExitStatus"].split()) == {
        str(elsad.EXIT_CONFIG), str(elsad.EXIT_PRIVILEGE)}
    exec_start = one["ExecStart"].split()
    assert exec_start[:3] == ["/usr/bin/elsad", "--config", config.DEFAULT_PATH]
    families = one["RestrictAddressFamilies"].split()
    assert {"AF_NETLINK", "AF_UNIX"} <= set(families)
    assert {"CAP_NET_ADMIN", "CAP_SYS_PACCT"} <= set(one["CapabilityBoundingSet"].split())
    assert "acct" in one["SystemCallFilter"].split()  # acct(2) is outside @system-service
    # Each of these would break netlink, cgroupfs writes or /proc scanning.
    assert one.get("ProtectControlGroups", "no") == "no"
    assert one.get("PrivateNetwork", "no") == "no"
    assert one.get("PrivateUsers", "no") == "no"
    assert one.get("ProtectProc", "default") in ("default", "noaccess", "ptraceable") \
        and one.get("ProtectProc", "default") != "invisible"
    assert one.get("ProcSubset", "all") == "all"
    # Accounting data is private (docs/security.md).
    assert one["UMask"] == "0077" and one["ProtectHome"] == "yes"
    assert one["StateDirectoryMode"] == "0700"
    # The directories systemd creates are the ones the default config uses.
    assert f"/run/{one['RuntimeDirectory']}" == os.path.dirname(
        config.CORE_OPTIONS["socket"].default)
    assert f"/var/lib/{one['StateDirectory']}" == config.CORE_OPTIONS["state_dir"].default
    tmpfiles = (ROOT / "packaging/elsa.tmpfiles").read_text()
    for d in ("/run/elsa", "/var/lib/elsa"):
        assert re.search(rf"^d {d}\s", tmpfiles, re.M), d
    assert re.search(r"^d /var/lib/elsa\s+0700 root root", tmpfiles, re.M)


def test_unit_verifies_and_exposure_is_low(deb_root, tmp_path):
    _need("systemd-analyze")
    unit = tmp_path / "elsad.service"
    # verify checks that ExecStart exists: point it at the unpacked package.
    unit.write_text(UNIT.read_text().replace("/usr/bin/elsad", str(deb_root / "usr/bin/elsad")))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60)
    # systemd < 254 does not know DelegateSubgroup= and says so; nothing else may be said.
    complaints = [line for line in res.stderr.splitlines()
                  if line.strip() and "Unknown key 'DelegateSubgroup'" not in line]
    assert res.returncode == 0 and not complaints, res.stderr
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for elsad\.service: ([\d.]+)", res.stdout)
    if m is None and "offline" in res.stderr:
        pytest.skip(f"systemd-analyze security has no --offline here: {res.stderr.strip()}")
    assert m, res.stdout + res.stderr
    # 2.5 when written ("OK" band is < 4.0); a rise means a hardening option was dropped.
    assert float(m.group(1)) <= 3.0, res.stdout


# -- RPM ----------------------------------------------------------------------------------

def test_rpm_spec_builds(tmp_path):
    _need("rpmbuild", "rpmspec", "rpm")
    spec = ROOT / "packaging/rpm/elsa.spec"
    res = subprocess.run(["rpmspec", "-q", "--qf", "%{VERSION}\n", str(spec)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == __version__
    res = subprocess.run([str(ROOT / "packaging/build-rpm"), str(tmp_path), "-ba"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    srpm = tmp_path / f"elsa-{__version__}-1.src.rpm"
    rpm = tmp_path / f"elsa-{__version__}-1.noarch.rpm"
    assert srpm.exists() and rpm.exists(), list(tmp_path.iterdir())
    files = subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for want in ("/usr/lib/systemd/system/elsad.service", "/usr/lib/tmpfiles.d/elsa.conf",
                 "/etc/elsa/elsa.toml"):
        assert want in files, want
    for prog in ("elsad", "elsa-jobmng", "elsa"):
        assert any(f.endswith(f"/bin/{prog}") for f in files), prog
        assert f"/usr/share/bash-completion/completions/{prog}" in files
    assert any(re.search(r"/man8/elsad\.8", f) for f in files)
    configs = subprocess.run(["rpm", "-qcp", str(rpm)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert configs == ["/etc/elsa/elsa.toml"]
    requires = subprocess.run(["rpm", "-qp", "--requires", str(rpm)], capture_output=True,
                              text=True, check=True).stdout
    for dep in ("python3-pluggy", "python3-pyroute2", "python3-structlog"):
        assert dep in requires


def test_ci_apt_package_list_covers_the_tools():
    lines = (ROOT / "packaging/ci-apt-packages.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for pkg in ("debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all",
                "python3-setuptools", "rpm", "python3-pluggy", "python3-pyroute2",
                "python3-structlog", "python3-build", "python3-installer"):
        assert pkg in listed, pkg
    assert all(" " not in p for p in listed), "one package per line"
