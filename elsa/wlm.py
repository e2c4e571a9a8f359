"""Batch-system (workload manager) job identity, read from the job's environment.

``elsa-jobmng run|create --wlm auto`` records it as job tags, so that reports
filter and group by them (``elsa bill --by tag:queue``, ``elsa jobs --format
account,partition``) and bills apply queue multipliers. The same tag names for
every batch system:

=================  ==================================================================
tag                meaning
=================  ==================================================================
``wlm``            ``slurm``, ``pbs``, ``lsf`` or ``htcondor``
``wlm_job_id``     the batch system's job id (an LSF array element: ``JOBID[INDEX]``)
``wlm_array_id``   array job id (Slurm ``SLURM_ARRAY_JOB_ID``, PBS Pro ``PBS_ARRAY_ID``, Torque
                   the job id with ``[]`` for the index, LSF ``LSB_JOBID``)
``wlm_task_id``    array task id (Slurm ``SLURM_ARRAY_TASK_ID``, PBS/LSF index)
``wlm_user``       the batch system's user name
``wlm_job_name``   the batch job's name
``account``        the account charged
``queue``          queue / partition
=================  ==================================================================
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Mapping, Optional

from elsa.errors import ElsaError

KINDS = ("slurm", "pbs", "lsf", "htcondor")

_SLURM = {"wlm_job_id": "SLURM_JOB_ID", "wlm_array_id": "SLURM_ARRAY_JOB_ID",
          "wlm_task_id": "SLURM_ARRAY_TASK_ID", "wlm_user": "SLURM_JOB_USER",
          "wlm_job_name": "SLURM_JOB_NAME", "account": "SLURM_JOB_ACCOUNT",
          "queue": "SLURM_JOB_PARTITION"}
_PBS = {"wlm_job_id": "PBS_JOBID", "wlm_task_id": "PBS_ARRAYID", "wlm_user": "PBS_O_LOGNAME",
        "wlm_job_name": "PBS_JOBNAME", "account": "PBS_ACCOUNT", "queue": "PBS_QUEUE"}
# PBS Pro names a subjob's index and its array job otherwise than Torque.
_PBS_PRO = {"wlm_array_id": "PBS_ARRAY_ID", "wlm_task_id": "PBS_ARRAY_INDEX"}
_LSF = {"wlm_job_id": "LSB_JOBID", "wlm_task_id": "LSB_JOBINDEX", "wlm_user": "LSFUSER",
        "wlm_job_name": "LSB_JOBNAME", "account": "LSB_PROJECT_NAME", "queue": "LSB_QUEUE"}
# HTCondor job ad attributes (the file _CONDOR_JOB_AD names).
_CONDOR = {"wlm_user": "Owner", "wlm_job_name": "JobBatchName", "account": "AcctGroup"}


def _from_env(env: Mapping[str, str], names: Mapping[str, str]) -> Dict[str, str]:
    return {tag: env[var] for tag, var in names.items() if env.get(var)}


def _slurm(env: Mapping[str, str]) -> Optional[Dict[str, str]]:
    if not env.get("SLURM_JOB_ID"):
        return None
    tags = _from_env(env, _SLURM)
    if tags.get("wlm_task_id") == "4294967294":  # NO_VAL: not an array task
        tags.pop("wlm_task_id")
    return tags


def _pbs(env: Mapping[str, str]) -> Optional[Dict[str, str]]:
    if not env.get("PBS_JOBID"):
        return None
    tags = {**_from_env(env, _PBS), **_from_env(env, _PBS_PRO)}
    if "wlm_task_id" in tags and "wlm_array_id" not in tags:
        # Torque sets no array id variable: its array job is the subjob's id with
        # the index left out ("123[4].server" -> "123[].server", as qstat -t names it).
        array = re.sub(r"\[[0-9]+\]", "[]", tags["wlm_job_id"], count=1)
        if array != tags["wlm_job_id"]:
            tags["wlm_array_id"] = array
    return tags


def _lsf(env: Mapping[str, str]) -> Optional[Dict[str, str]]:
    if not env.get("LSB_JOBID"):
        return None
    tags = _from_env(env, _LSF)
    if tags.get("wlm_task_id") == "0":  # LSF sets 0 outside job arrays
        tags.pop("wlm_task_id")
    elif "wlm_task_id" in tags:
        # An array's elements share LSB_JOBID: each is JOBID[INDEX] to LSF (bjobs, bkill),
        # and must be to reports and APEL (a record per LocalJobId and end second).
        tags["wlm_array_id"] = tags["wlm_job_id"]
        tags["wlm_job_id"] = f"{tags['wlm_job_id']}[{tags['wlm_task_id']}]"
    return tags


_AD_LINE = re.compile(r'^\s*(\w+)\s*=\s*(.*?)\s*$')


def parse_job_ad(text: str) -> Dict[str, str]:
    """The ``Attr = value`` lines of an HTCondor job ad (strings unquoted)."""
    ad = {}
    for line in text.splitlines():
        m = _AD_LINE.match(line)
        if m:
            v = m.group(2)
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1].replace('\\"', '"')
            ad[m.group(1)] = v
    return ad


def _htcondor(env: Mapping[str, str]) -> Optional[Dict[str, str]]:
    path = env.get("_CONDOR_JOB_AD")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            ad = parse_job_ad(fh.read())
    except OSError as exc:
        raise ElsaError(f"_CONDOR_JOB_AD={path}: cannot read the HTCondor job ad: "
                        f"{exc.strerror}; run without --wlm htcondor") from exc
    tags = {tag: ad[attr] for tag, attr in _CONDOR.items() if ad.get(attr)}
    if ad.get("ClusterId"):
        tags["wlm_job_id"] = f"{ad['ClusterId']}.{ad.get('ProcId', '0')}"
        tags["wlm_array_id"] = ad["ClusterId"]
        if ad.get("ProcId"):
            tags["wlm_task_id"] = ad["ProcId"]
    return tags


_DETECT: Dict[str, Callable[[Mapping[str, str]], Optional[Dict[str, str]]]] = {
    "slurm": _slurm, "pbs": _pbs, "lsf": _lsf, "htcondor": _htcondor}


def detect(env: Mapping[str, str], which: str = "auto") -> Dict[str, str]:
    """Tags of the batch job this environment belongs to.

    ``auto``: the first batch system whose variables are set (none: no tags);
    a named one: its tags, or an error when its variables are absent.
    """
    if which == "none":
        return {}
    if which == "auto":
        for kind in KINDS:
            tags = _DETECT[kind](env)
            if tags is not None:
                return {"wlm": kind, **tags}
        return {}
    if which not in _DETECT:
        raise ElsaError(f"--wlm {which!r}: expected auto, none, or one of {', '.join(KINDS)}")
    tags = _DETECT[which](env)
    if tags is None:
        var = {"slurm": "SLURM_JOB_ID", "pbs": "PBS_JOBID", "lsf": "LSB_JOBID",
               "htcondor": "_CONDOR_JOB_AD"}[which]
        raise ElsaError(f"--wlm {which}: not inside a {which} job ({var} is not set); "
                        "use --wlm auto to record a batch job only when there is one")
    return {"wlm": which, **tags}
