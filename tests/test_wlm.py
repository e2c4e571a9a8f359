"""Batch-system jobs: tags from Slurm/PBS/LSF/HTCondor environments, `run --wlm`, and the
contrib/slurm prolog, task prolog and epilog run with the environment Slurm gives them
(no slurmd here: the scripts are run as slurmd would run them, against a real elsad)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from elsa import wlm
from elsa.errors import ElsaError
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "contrib" / "slurm"
BIN = Path(sys.executable).parent

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
             "SLURM_JOB_ACCOUNT": "chem", "SLURM_JOB_PARTITION": "short",
             "SLURM_JOB_NAME": "md-run", "SLURM_JOB_USER": "alice"}

LSF_ARRAY_ENV = {"LSB_JOBID": "99", "LSB_JOBINDEX": "7", "LSB_QUEUE": "normal"}


def test_detect_each_batch_system(tmp_path):
    assert wlm.detect(SLURM_ENV) == {
        "wlm": "slurm", "wlm_job_id": "4242", "wlm_array_id": "4240", "wlm_task_id": "2",
        "account": "chem", "queue": "short", "wlm_job_name": "md-run", "wlm_user": "alice"}
    assert wlm.detect({"PBS_JOBID": "17.server", "PBS_QUEUE": "batch",
                       "PBS_JOBNAME": "x"}) == {
        "wlm": "pbs", "wlm_job_id": "17.server", "queue": "batch", "wlm_job_name": "x"}
    # array subjobs: Torque, then PBS Pro
    assert wlm.detect({"PBS_JOBID": "18[3].server", "PBS_ARRAYID": "3"}) == {
        "wlm": "pbs", "wlm_job_id": "18[3].server", "wlm_array_id": "18[].server",
        "wlm_task_id": "3"}
    assert wlm.detect({"PBS_JOBID": "19[5].server", "PBS_ARRAY_INDEX": "5",
                       "PBS_ARRAY_ID": "19[].server"}) == {
        "wlm": "pbs", "wlm_job_id": "19[5].server", "wlm_array_id": "19[].server",
        "wlm_task_id": "5"}
    assert wlm.detect({"LSB_JOBID": "99", "LSB_QUEUE": "normal", "LSB_JOBINDEX": "0"}) == {
        "wlm": "lsf", "wlm_job_id": "99", "queue": "normal"}
    # An LSF array's elements share LSB_JOBID; each is LSF's JOBID[INDEX] (bjobs, bkill).
    assert wlm.detect(LSF_ARRAY_ENV) == {
        "wlm": "lsf", "wlm_job_id": "99[7]", "wlm_array_id": "99", "wlm_task_id": "7",
        "queue": "normal"}
    ad = tmp_path / ".job.ad"
    ad.write_text('ClusterId = 31\nProcId = 4\nOwner = "bob"\nAcctGroup = "group_physics"\n'
                  'JobBatchName = "sweep"\n')
    assert wlm.detect({"_CONDOR_JOB_AD": str(ad)}) == {
        "wlm": "htcondor", "wlm_job_id": "31.4", "wlm_array_id": "31", "wlm_task_id": "4",
        "wlm_user": "bob", "account": "group_physics", "wlm_job_name": "sweep"}
    assert wlm.detect({}) == {}
    with pytest.raises(ElsaError, match="not inside a slurm job"):
        wlm.detect({}, "slurm")
    with pytest.raises(ElsaError, match="expected auto, none"):
        wlm.detect(SLURM_ENV, "sge")


def _env(d, **extra):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env.update(extra)
    return env


@pytest.mark.root
def test_run_wlm_auto_records_tags(elsad):
    d = elsad()
    r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--wlm", "auto", "--tag",
                        "queue=override", "--", "sh", "-c", 'echo "$ELSA_JID"'],
                       env=_env(d, **SLURM_ENV), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip()
    show = subprocess.run(["elsa-jobmng", "--socket", d.socket, "show", jid, "--json"],
                          env=_env(d), capture_output=True, text=True)
    job = json.loads(show.stdout)
    assert job["name"] == "md-run"
    assert job["tags"]["wlm_job_id"] == "4242" and job["tags"]["account"] == "chem"
    assert job["tags"]["queue"] == "override"  # --tag wins over the environment


@pytest.mark.root
def test_lsf_array_elements_are_distinct_batch_jobs(elsad):
    """Two elements of one LSF array (the same LSB_JOBID): distinct wlm_job_id tags, so an
    APEL record (keyed by LocalJobId and EndTime, docs/export.md) keeps each, and one
    wlm_array_id that finds them both."""
    d = elsad()
    for index in ("1", "2"):
        r = subprocess.run(["elsa-jobmng", "--socket", d.socket, "run", "--wlm", "auto", "--",
                            "true"], env=_env(d, **dict(LSF_ARRAY_ENV, LSB_JOBINDEX=index)),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    out = subprocess.run([sys.executable, "-m", "elsa.report.cli", "jobs", "--state-dir",
                          d.state_dir, "--tag", "wlm_array_id=99", "--format", "wlm_job_id",
                          "-P", "-n"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["99[1]", "99[2]"]


def _job_user() -> int:
    """nobody, where this interpreter is usable by nobody; else root (a Python installed
    under /root cannot run as another user, and the scripts call elsa-jobmng)."""
    try:
        r = subprocess.run([sys.executable, "-c", "0"], user=65534, capture_output=True)
    except PermissionError:
        return 0
    return 65534 if r.returncode == 0 else 0


@pytest.fixture
def shared_dir():
    """A directory the job's user can traverse (pytest's tmp_path is root-only)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="elsa-billing-slurm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.root
def test_slurm_prolog_task_prolog_epilog(elsad, shared_dir, spawned):
    d = elsad(workdir=shared_dir / "d")
    state = shared_dir / "slurm-state"
    uid = _job_user()
    env = _env(d, **SLURM_ENV, SLURM_JOB_UID=str(uid), ELSA_SLURM_STATE=str(state),
               ELSA_JOBMNG_ARGS=f"--socket {d.socket}")
    r = subprocess.run([str(SLURM / "elsa-prolog")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    jid = (state / "4242.jid").read_text().strip()
    with d.client() as c:
        job = c.show(int(jid, 16))
    assert job["owner_uid"] == uid and job["tags"]["wlm_job_id"] == "4242"
    assert job["name"] == "md-run"
    # slurmstepd runs the task prolog as the user, then execs the task in its parent.
    os.chmod(shared_dir / "d", 0o755)
    task = subprocess.Popen(
        ["sh", "-c", f'eval "$({SLURM / "elsa-task-prolog"})"; echo "$ELSA_JID"; '
                     "exec sleep 300"],
        env=env, stdout=subprocess.PIPE, text=True, user=uid, start_new_session=True)
    spawned.append(task)
    assert task.stdout is not None
    assert task.stdout.readline().strip() == jid
    with d.client() as c:
        wait_for(lambda: task.pid in c.pids(int(jid, 16)), 10, what="task in the job")
    r = subprocess.run([str(SLURM / "elsa-epilog")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not (state / "4242.jid").exists()
    with d.client() as c:
        assert c.show(int(jid, 16))["state"] == "ended"
    # Epilog after the job already ended, and with elsad gone: still exit 0 (no drain).
    (state / "4242.jid").write_text(jid + "\n")
    d.stop()
    r = subprocess.run([str(SLURM / "elsa-epilog")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "elsa-epilog: job 4242" in r.stderr
    r = subprocess.run([str(SLURM / "elsa-prolog")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "no ELSA job created" in r.stderr


def test_scripts_are_posix_sh():
    for f in SLURM.glob("elsa-*"):
        assert os.access(f, os.X_OK), f
        subprocess.run(["sh", "-n", str(f)], check=True)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", "-s", "sh", str(f)], check=True)
