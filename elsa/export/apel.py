"""APEL job messages for EGI accounting (``elsa export apel``).

Writes "APEL-individual-job-message: v0.3" (one record per finished job) or,
with ``--summary``, "APEL-summary-job-message: v0.2" (one record per month,
user and VO), as APEL's own client does: a header line, then ``Key: value``
lines per record, each record followed by a ``%%`` line, at most
:data:`MAX_RECORDS` records a message. Units as APEL's loader reads them:
durations in whole seconds, times as UTC epoch seconds, memory in kB.

The messages go where ``ssmsend`` picks them up: a ``dirq`` QueueSimple
(``path_type = "dirq"``, what APEL's client writes) or one file per message
in a plain directory (``path_type = "directory"``).

A job that cannot make a valid record (not ended, CPU unknown, a uid without
a user name) is left out whole, with a line saying why; it is never written
half. Individual records are written once per job (the store's ``exported``
table), unless ``again`` is given.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from elsa.config import Option
from elsa.errors import ConfigError
from elsa.export.records import ExportState, FinishedJob, Skipped, finished_jobs

JOB_HEADER = "APEL-individual-job-message: v0.3"
SUMMARY_HEADER = "APEL-summary-job-message: v0.2"
MAX_RECORDS = 1000
SERVICE_LEVEL_TYPES = ("si2k", "hepspec", "hepscore23")

#: The v0.3 job record's keys, in APEL's order.
JOB_FIELDS = ("Site", "SubmitHost", "MachineName", "Queue", "LocalJobId", "LocalUserId",
              "GlobalUserName", "FQAN", "VO", "VOGroup", "VORole", "WallDuration",
              "CpuDuration", "Processors", "NodeCount", "StartTime", "EndTime",
              "InfrastructureDescription", "InfrastructureType", "MemoryReal", "MemoryVirtual",
              "ServiceLevelType", "ServiceLevel")
#: The v0.2 summary record's keys, in APEL's order.
SUMMARY_FIELDS = ("Site", "Month", "Year", "GlobalUserName", "VO", "VOGroup", "VORole",
                  "SubmitHost", "InfrastructureType", "InfrastructureDescription",
                  "ServiceLevelType", "ServiceLevel", "NodeCount", "Processors",
                  "EarliestEndTime", "LatestEndTime", "WallDuration", "CpuDuration",
                  "NumberOfJobs")

OPTIONS: Dict[str, Option] = {
    "site": Option(str, "", "GOCDB site name (APEL 'Site'); --site overrides."),
    "submit_host": Option(str, "", "APEL 'SubmitHost' (the CE or batch head node). Empty:"
                          " this host's name."),
    "machine_name": Option(str, "", "APEL 'MachineName'. Empty: this host's name."),
    "infrastructure": Option(str, "ELSA", "APEL 'InfrastructureDescription'."),
    "infrastructure_type": Option(str, "local", "APEL 'InfrastructureType' (grid or local).",
                                  choices=("grid", "local")),
    "service_level_type": Option(str, "", "Benchmark of service_level: si2k, hepspec or"
                                 " hepscore23. Empty: neither is written.",
                                 choices=("",) + SERVICE_LEVEL_TYPES),
    "service_level": Option(float, 0.0, "Benchmark value per core (with"
                            " service_level_type)."),
    "job_id_tag": Option(str, "job_id", "Job tag holding the batch system's job id (APEL"
                         " 'LocalJobId'); a job without it is exported with its JID."),
    "queue_tag": Option(str, "partition", "Job tag exported as APEL 'Queue'."),
    "vo_tag": Option(str, "account", "Job tag exported as APEL 'VO' (else 'vo')."),
    "vo": Option(str, "", "VO of jobs without the vo_tag tag. Empty: none."),
    "global_user_names": Option(dict, {}, "Local user name -> grid identity (DN) written"
                                " as 'GlobalUserName'.", item_type=str,
                                check=lambda v: None if all(isinstance(x, str)
                                                            for x in v.values())
                                else "values must be strings (DNs)"),
    "outgoing": Option(str, "/var/spool/apel/outgoing", "Directory ssmsend sends from (its"
                       " [outgoing] path)."),
    "path_type": Option(str, "dirq", "How ssmsend reads 'outgoing': dirq (a QueueSimple, as"
                        " APEL's client writes) or directory.", choices=("dirq", "directory")),
}


@dataclass
class Result:
    messages: List[str]       # where each message went (queue element or file)
    records: int
    skipped: List[Skipped]


def _null(v: Any) -> bool:
    return v is None or v == ""


def _settings(options: Mapping[str, Any], site: Optional[str]) -> Dict[str, Any]:
    from elsa.export.records import host_name

    st = dict(options)
    st["site"] = site or options["site"]
    if not st["site"]:
        raise ConfigError("elsa export apel: no site name; give --site NAME or set site in "
                          "[export.apel] (the GOCDB name of the site)")
    slt, sl = options["service_level_type"], options["service_level"]
    if bool(slt) != bool(sl):
        raise ConfigError("[export.apel]: service_level_type and service_level go together "
                          "(APEL rejects a record with one of them); set both or neither")
    st["submit_host"] = options["submit_host"] or host_name()
    st["machine_name"] = options["machine_name"] or host_name()
    return st


def job_record(job: FinishedJob, st: Mapping[str, Any]) -> Tuple[Optional[Dict[str, str]],
                                                                 Optional[str]]:
    """The v0.3 record of *job* (keys in JOB_FIELDS order), or (None, why not)."""
    if job.user is None:
        return None, (f"uid {job.owner_uid} has no user name (no passwd entry), and APEL "
                      "needs LocalUserId; add the user or leave the job out")
    cpu = job.cpu_us
    if cpu is None:
        return None, ("no accounting source measured its CPU time (APEL's CpuDuration is "
                      "mandatory); enable the cgroupstat or taskstats source")
    tags = job.tags
    vo = tags.get(st["vo_tag"]) or tags.get("vo") or st["vo"]
    rec: Dict[str, Any] = {
        "Site": st["site"], "SubmitHost": st["submit_host"],
        "MachineName": st["machine_name"], "Queue": tags.get(st["queue_tag"]),
        "LocalJobId": tags.get(st["job_id_tag"]) or job.jid_text,
        "LocalUserId": job.user,
        "GlobalUserName": st["global_user_names"].get(job.user),
        "FQAN": None, "VO": vo or None, "VOGroup": None, "VORole": None,
        "WallDuration": round(job.wall_seconds), "CpuDuration": round(cpu / 1e6),
        "Processors": job.processors, "NodeCount": 1,
        "StartTime": int(job.created), "EndTime": int(job.ended),
        "InfrastructureDescription": st["infrastructure"],
        "InfrastructureType": st["infrastructure_type"],
        "MemoryReal": job.usage.get("max_rss_kb"), "MemoryVirtual": job.usage.get("max_vm_kb"),
        "ServiceLevelType": st["service_level_type"] or None,
        "ServiceLevel": st["service_level"] or None,
    }
    return {k: str(rec[k]) for k in JOB_FIELDS if not _null(rec[k])}, None


def summary_records(jobs: Sequence[FinishedJob], st: Mapping[str, Any]
                    ) -> Tuple[List[Dict[str, str]], List[Skipped]]:
    """v0.2 records: one per (year, month of the end, user, VO)."""
    groups: Dict[Tuple[int, int, str, str], Dict[str, Any]] = {}
    skipped: List[Skipped] = []
    for job in jobs:
        rec, why = job_record(job, st)
        if rec is None:
            skipped.append(Skipped(job.jid, why or "invalid"))
            continue
        end = dt.datetime.fromtimestamp(job.ended, dt.timezone.utc)
        user = rec.get("GlobalUserName") or rec["LocalUserId"]
        key = (end.year, end.month, user, rec.get("VO", ""))
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"wall": 0, "cpu": 0, "n": 0, "first": None, "last": None}
        g["wall"] += int(rec["WallDuration"])
        g["cpu"] += int(rec["CpuDuration"])
        g["n"] += 1
        e = int(rec["EndTime"])
        g["first"] = e if g["first"] is None else min(g["first"], e)
        g["last"] = e if g["last"] is None else max(g["last"], e)
    out = []
    for (year, month, user, vo), g in sorted(groups.items()):
        rec = {
            "Site": st["site"], "Month": month, "Year": year, "GlobalUserName": user,
            "VO": vo or None, "VOGroup": None, "VORole": None,
            "SubmitHost": st["submit_host"], "InfrastructureType": st["infrastructure_type"],
            "InfrastructureDescription": st["infrastructure"],
            "ServiceLevelType": st["service_level_type"] or None,
            "ServiceLevel": st["service_level"] or None, "NodeCount": 1, "Processors": None,
            "EarliestEndTime": g["first"], "LatestEndTime": g["last"],
            "WallDuration": g["wall"], "CpuDuration": g["cpu"], "NumberOfJobs": g["n"],
        }
        out.append({k: str(rec[k]) for k in SUMMARY_FIELDS if not _null(rec[k])})
    return out, skipped


def render(header: str, records: Sequence[Mapping[str, str]]) -> str:
    """One message: the header, then each record's lines and a ``%%`` line."""
    lines = [header]
    for rec in records:
        lines.extend(f"{k}: {v}" for k, v in rec.items())
        lines.append("%%")
    return "\n".join(lines) + "\n"


class Outgoing:
    """Where messages go: a dirq QueueSimple or a plain directory."""

    def __init__(self, path: str, path_type: str) -> None:
        self.path = path
        self.path_type = path_type
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the outgoing directory {path}: {exc.strerror}; "
                              "set [export.apel] outgoing or --outgoing to a writable "
                              "directory") from exc
        self.queue: Any = None
        if path_type == "dirq":
            try:
                from dirq.QueueSimple import QueueSimple
            except ImportError as exc:
                raise ConfigError("path_type 'dirq' needs the Python package dirq (pip install "
                                  "'elsa[export]', or Debian's python3-dirq); or use "
                                  "path_type 'directory'") from exc
            self.queue = QueueSimple(path)
        self._n = 0

    def add(self, message: str) -> str:
        if self.queue is not None:
            return os.path.join(self.path, self.queue.add(message))
        self._n += 1
        name = f"{time.time():.6f}-{os.getpid()}-{self._n:04d}.msg"
        final = os.path.join(self.path, name)
        tmp = os.path.join(self.path, "." + name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:  # ssmsend must never see half a file
            fh.write(message)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, final)
        return final


def export(db: Any, options: Mapping[str, Any], *, site: Optional[str] = None,
           since: Optional[float] = None, until: Optional[float] = None,
           summary: bool = False, again: bool = False,
           outgoing: Optional[str] = None, path_type: Optional[str] = None) -> Result:
    """Write the messages for jobs that ended in [since, until)."""
    st = _settings(options, site)
    jobs, skipped = finished_jobs(db, since, until)
    out = Outgoing(outgoing or st["outgoing"], path_type or st["path_type"])
    written: List[str] = []
    if summary:
        recs, bad = summary_records(jobs, st)
        skipped.extend(bad)
        for i in range(0, len(recs), MAX_RECORDS):
            written.append(out.add(render(SUMMARY_HEADER, recs[i:i + MAX_RECORDS])))
        return Result(written, len(recs), skipped)
    state = ExportState(db, "apel")
    done = set() if again else state.done()
    batch: List[Tuple[int, Dict[str, str]]] = []
    total = 0

    def flush() -> None:
        nonlocal total
        if not batch:
            return
        written.append(out.add(render(JOB_HEADER, [r for _, r in batch])))
        state.mark(j for j, _ in batch)  # after the message is safely written
        total += len(batch)
        batch.clear()

    for job in jobs:
        if job.jid in done:
            continue
        rec, why = job_record(job, st)
        if rec is None:
            skipped.append(Skipped(job.jid, why or "invalid"))
            continue
        batch.append((job.jid, rec))
        if len(batch) >= MAX_RECORDS:
            flush()
    flush()
    return Result(written, total, skipped)

