"""Boot the Debian guest under qemu, run the in-guest checks, collect their results.

The guest is a kernel plus an initramfs that holds the whole Debian root
(tests/vm/build-image): systemd runs on it as PID 1 like on a disk. A second,
small initramfs appended at boot carries ``guest_checks.py`` and a oneshot
unit that runs it after multi-user.target and then powers the guest off, so
editing the checks never rebuilds the image. Results come back as JSON lines
on the guest's second serial port (a file on the host); the first port is the
console, kept for failure reports. A raw scratch file is the virtio disk the
direct-I/O check writes to.

Nothing here waits without a deadline: qemu is killed by pid when the guest
does not finish in time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"

CHECK_UNIT = """\
[Unit]
Description=ELSA in-guest checks (tests/vm)
After=multi-user.target elsad.service

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /opt/elsa-vm/guest_checks.py /dev/ttyS1
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console
"""


def missing_tools() -> List[str]:
    """What this host lacks to build and boot the guest (empty: nothing)."""
    need = {QEMU: "qemu-system-x86", "debootstrap": "debootstrap", "cpio": "cpio"}
    return [f"{tool} (apt-get install {pkg})" for tool, pkg in need.items()
            if shutil.which(tool) is None]


def build_image() -> Path:
    """The cached guest image for this checkout (builds what is missing)."""
    p = subprocess.run([str(HERE / "build-image")], capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"tests/vm/build-image failed:\n{p.stderr[-4000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def kvm_works(kernel: Path, workdir: Path, deadline: float = 15.0) -> bool:
    """Whether a KVM guest boots here: the kernel alone must reach its 'no root'
    panic and exit (-no-reboot, panic=-1) in *deadline* seconds. /dev/kvm can
    exist while a KVM guest hangs in firmware (nested virtualisation)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    log = workdir / "kvm-probe.log"
    proc = subprocess.Popen(
        [QEMU, "-accel", "kvm", "-m", "256", "-display", "none", "-monitor", "none",
         "-no-reboot", "-serial", f"file:{log}", "-kernel", str(kernel),
         "-append", "console=ttyS0 panic=-1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return "Kernel panic" in log.read_text(errors="replace")


def overlay_cpio(workdir: Path) -> Path:
    """The initramfs appended to the image: the checks and the unit that runs them."""
    root = workdir / "overlay"
    (root / "opt/elsa-vm").mkdir(parents=True)
    shutil.copy(HERE / "guest_checks.py", root / "opt/elsa-vm/guest_checks.py")
    units = root / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "elsa-vm-checks.service").write_text(CHECK_UNIT)
    (units / "multi-user.target.wants/elsa-vm-checks.service").symlink_to(
        "/etc/systemd/system/elsa-vm-checks.service")
    out = workdir / "overlay.cpio"
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names,
                       stdout=f, check=True)
    return out


@dataclass
class GuestRun:
    accel: str
    results: Dict[str, dict] = field(default_factory=dict)
    done: bool = False
    boot_seconds: Optional[float] = None   # host time until the checks started
    total_seconds: float = 0.0
    console: Path = Path()
    error: str = ""

    def console_tail(self, n: int = 60) -> str:
        try:
            lines = self.console.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console log)"
        return "\n".join(lines[-n:])


def run_guest(image: Path, workdir: Path, boot_deadline: float = 420.0,
              deadline: float = 780.0, memory_mb: int = 2048) -> GuestRun:
    """Boot *image*, wait for the checks' results, make sure qemu is gone."""
    kernel = image / "vmlinuz"
    accel = "kvm" if kvm_works(kernel, workdir) else "tcg"
    initrd = workdir / "initrd"
    with open(initrd, "wb") as out:
        for part in (image / "initrd", overlay_cpio(workdir)):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    disk = workdir / "scratch.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    console, results = workdir / "console.log", workdir / "results.jsonl"
    argv = [QEMU, "-accel", accel, "-m", str(memory_mb), "-smp", "2",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console}", "-serial", f"file:{results}",
            "-drive", f"file={disk},format=raw,if=virtio",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 rdinit=/lib/systemd/systemd "
                       "systemd.show_status=error"]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    run = GuestRun(accel=accel, console=console)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "qemu.stderr", "wb"))
    try:
        while True:
            _read_results(results, run, t0)
            elapsed = time.monotonic() - t0
            if proc.poll() is not None:
                break
            if run.done:
                # The unit powers the guest off after the checks.
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    run.error = "the guest did not power off within 60 s of its last check"
                break
            if run.boot_seconds is None and elapsed > boot_deadline:
                run.error = f"the checks did not start within {boot_deadline:.0f} s of boot"
                break
            if elapsed > deadline:
                run.error = f"the guest did not finish within {deadline:.0f} s"
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        _read_results(results, run, t0)
    run.total_seconds = time.monotonic() - t0
    if not run.done and not run.error:
        err = (workdir / "qemu.stderr").read_text(errors="replace").strip()
        run.error = f"qemu exited ({proc.returncode}) before the checks were done: {err[-2000:]}"
    return run


def _read_results(path: Path, run: GuestRun, t0: float) -> None:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    for line in text.replace("\r", "").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if obj.get("start") and run.boot_seconds is None:
            run.boot_seconds = time.monotonic() - t0
        elif "check" in obj:
            run.results[obj["check"]] = obj
        elif obj.get("done"):
            run.done = True
