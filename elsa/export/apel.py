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

A job that cannot make a valid record (not ended, CPU unknown) is left out
whole, with a line saying why; it is never written half. A job tag APEL's
loader cannot take (:func:`unsendable`: it would split the message, read as
NULL, or overflow APEL's column, and APEL rejects the whole message) is left
out of that one record with a line saying so: LocalJobId falls back to the
JID, Queue and VO are not written. Individual records are written once per job
(the store's ``exported`` table, or from the central store a ledger file's:
elsa.export.records.open_ledger), unless ``again`` is given.

Summaries are per UTC month of the job's end, and APEL replaces a month's
summary with the one sent last: a month the window covers only in part (from
its first second UTC to its end, or to now) is not written, with a line.
"""

from __future__ import annotations

import calendar
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
#: Characters APEL's loader splits a record's lines on (it uses str.splitlines).
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
#: APEL's database columns (schemas/server.sql): VARCHAR(255) for names and ids,
#: VARCHAR(100) for InfrastructureDescription.
COLUMN = 255
#: The queue's width in APEL's loader: its ReplaceJobRecord procedure takes ``queue
#: VARCHAR(100)`` (schemas/server.sql), and MySQL's strict mode rejects a longer value.
QUEUE_COLUMN = 100

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
                                 " hepscore23 (required by 'elsa export apel': APEL rejects"
                                 " records without it).",
                                 choices=("",) + SERVICE_LEVEL_TYPES),
    "service_level": Option(float, 0.0, "Benchmark value per core (with"
                            " service_level_type)."),
    "job_id_tag": Option(str, "wlm_job_id", "Job tag holding the batch system's job id (APEL"
                         " 'LocalJobId', as 'elsa-jobmng run --wlm' writes it); a job without"
                         " it is exported with its JID."),
    "queue_tag": Option(str, "queue", "Job tag exported as APEL 'Queue' (as 'elsa-jobmng run"
                        " --wlm' writes it)."),
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
    "ledger": Option(str, "", "File that remembers the job records written from the central"
                     " store (--db postgresql://...), so each job is written once. Empty:"
                     " apel-central.db in state_dir."),
}


@dataclass
class Result:
    messages: List[str]       # where each message went (queue element or file)
    records: int
    skipped: List[Skipped]
    notes: List[str]          # what was left out of records that were written


def _null(v: Any) -> bool:
    return v is None or v == ""


def unsendable(value: str, limit: int = COLUMN) -> Optional[str]:
    """Why APEL's loader cannot take *value* as a field's value, else None. Its
    RecordFactory splits a message on ``%%`` anywhere and a record on line breaks,
    strips values, reads "", none and null (any case) as NULL, and stores names
    and ids in VARCHAR(255) columns; one record it cannot load rejects the whole
    message (the loader's reject queue)."""
    if "%%" in value:
        return "contains %% (APEL's record separator)"
    if any(c in LINE_BREAKS for c in value):
        return "contains a line break"
    v = value.strip()
    if v.lower() in ("", "none", "null"):
        return f"is {v!r}, which APEL reads as NULL"
    if len(v) > limit:
        return f"is longer than {limit} characters (APEL's column)"
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid text (UTF-8)"
    return None


def _setting(where: str, value: str, limit: int = COLUMN) -> str:
    why = unsendable(value, limit)
    if why is not None:
        raise ConfigError(f"[export.apel] {where} = {value!r} {why}; APEL would reject every "
                          "message: set it to a name APEL accepts")
    return value.strip()


def _settings(options: Mapping[str, Any], site: Optional[str]) -> Dict[str, Any]:
    st = dict(options)
    st["site"] = site or options["site"]
    if not st["site"]:
        raise ConfigError("no site name for 'elsa export apel'; give --site NAME or set site in "
                          "[export.apel] (the GOCDB name of the site)")
    slt, sl = options["service_level_type"], options["service_level"]
    if not slt and not sl:
        # APEL's loader turns a job record without them into ("custom", 1), then refuses
        # "custom" when it re-checks the record on storing it; its Summaries table has
        # ServiceLevel NOT NULL. Either way the whole message would be rejected.
        raise ConfigError("[export.apel]: service_level_type and service_level are not set; "
                          "APEL rejects every message without them (EGI normalises CPU time "
                          "by them): set service_level_type (hepscore23, hepspec or si2k) "
                          "and service_level (this node's benchmark score per core)")
    if bool(slt) != bool(sl):
        raise ConfigError("[export.apel]: service_level_type and service_level go together "
                          "(APEL rejects a record with one of them): set both")
    st["site"] = _setting("site (or --site)", st["site"])
    for key, limit in (("submit_host", COLUMN), ("machine_name", COLUMN), ("vo", COLUMN),
                       ("infrastructure", 100)):
        if options[key]:  # empty: the job's host (the names), none (vo)
            st[key] = _setting(key, options[key], limit)
    st["global_user_names"] = {user: _setting(f"global_user_names.{user}", dn)
                               for user, dn in options["global_user_names"].items()}
    return st


def _tag(job: FinishedJob, key: str, field: str, instead: str,
         notes: Optional[List[str]], limit: int = COLUMN) -> Optional[str]:
    """Tag *key* of *job* as APEL's *field*, or None (absent, or a value APEL cannot
    take: then a note says so and what is written *instead*)."""
    value = job.tags.get(key)
    if not value:
        return None
    why = unsendable(value, limit)
    if why is None:
        return value.strip()
    if notes is not None:
        notes.append(f"job {job.jid_text}: its tag {key!r} {why}; {field} {instead}")
    return None


def job_record(job: FinishedJob, st: Mapping[str, Any], notes: Optional[List[str]] = None,
               written: Sequence[str] = JOB_FIELDS
               ) -> Tuple[Optional[Dict[str, str]], Optional[str]]:
    """The v0.3 record of *job* (keys in JOB_FIELDS order), or (None, why not). A tag
    APEL cannot take is left out (LocalJobId: the JID), with a line in *notes* when
    its field is among the *written* ones (a summary writes no Queue)."""
    cpu = job.cpu_us
    if cpu is None:
        return None, ("no accounting source measured its CPU time (APEL's CpuDuration is "
                      "mandatory); enable the cgroupstat or taskstats source")

    def tag(key: str, field: str, instead: str, limit: int = COLUMN) -> Optional[str]:
        return _tag(job, key, field, instead, notes if field in written else None, limit)

    vo_key = st["vo_tag"] if job.tags.get(st["vo_tag"]) else "vo"
    vo = tag(vo_key, "VO", "is not written") if job.tags.get(vo_key) else st["vo"]
    # APEL does not need LocalUserId: a uid without a (sendable) name goes without it.
    user = job.user if job.user is not None and unsendable(job.user) is None else None
    rec: Dict[str, Any] = {
        "Site": st["site"], "SubmitHost": st["submit_host"] or job.host,
        "MachineName": st["machine_name"] or job.host,
        "Queue": tag(st["queue_tag"], "Queue", "is not written", QUEUE_COLUMN),
        "LocalJobId": tag(st["job_id_tag"], "LocalJobId", "is the JID") or job.jid_text,
        "LocalUserId": user,
        "GlobalUserName": st["global_user_names"].get(user) if user else None,
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


def month_bounds(year: int, month: int) -> Tuple[float, float]:
    """[first second, first second of the next month) of a UTC month, epoch seconds."""
    nxt = (year + 1, 1) if month == 12 else (year, month + 1)
    return (float(calendar.timegm((year, month, 1, 0, 0, 0))),
            float(calendar.timegm((nxt[0], nxt[1], 1, 0, 0, 0))))


def summary_records(jobs: Sequence[FinishedJob], st: Mapping[str, Any],
                    notes: Optional[List[str]] = None
                    ) -> Tuple[List[Dict[str, str]], List[Skipped]]:
    """v0.2 records: one per (year, UTC month of the end, user, VO, submit host,
    processors). Durations are summed exactly and rounded once per record.
    Processors is always written (0: unknown, as APEL's own client sends it): APEL's
    Summaries table has it NOT NULL, and a summary without it rejects the message."""
    groups: Dict[Tuple[int, int, str, str, str, int], Dict[str, Any]] = {}
    skipped: List[Skipped] = []
    for job in jobs:
        rec, why = job_record(job, st, notes, SUMMARY_FIELDS)
        if rec is None:
            skipped.append(Skipped(job.jid, why or "invalid"))
            continue
        end = dt.datetime.fromtimestamp(job.ended, dt.timezone.utc)
        user = rec.get("GlobalUserName") or rec.get("LocalUserId", "")
        key = (end.year, end.month, user, rec.get("VO", ""), rec["SubmitHost"],
               job.processors or 0)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"wall": 0.0, "cpu_us": 0, "n": 0, "first": None, "last": None}
        g["wall"] += job.wall_seconds
        g["cpu_us"] += job.cpu_us or 0
        g["n"] += 1
        e = int(rec["EndTime"])
        g["first"] = e if g["first"] is None else min(g["first"], e)
        g["last"] = e if g["last"] is None else max(g["last"], e)
    out = []
    for (year, month, user, vo, submit_host, processors), g in sorted(groups.items()):
        rec = {
            "Site": st["site"], "Month": month, "Year": year, "GlobalUserName": user or None,
            "VO": vo or None, "VOGroup": None, "VORole": None,
            "SubmitHost": submit_host, "InfrastructureType": st["infrastructure_type"],
            "InfrastructureDescription": st["infrastructure"],
            "ServiceLevelType": st["service_level_type"] or None,
            "ServiceLevel": st["service_level"] or None, "NodeCount": 1, "Processors": processors,
            "EarliestEndTime": g["first"], "LatestEndTime": g["last"],
            "WallDuration": round(g["wall"]), "CpuDuration": round(g["cpu_us"] / 1e6),
            "NumberOfJobs": g["n"],
        }
        out.append({k: str(rec[k]) for k in SUMMARY_FIELDS if not _null(rec[k])})
    return out, skipped


def whole_months(records: Sequence[Mapping[str, str]], since: Optional[float],
                 until: Optional[float], now: Optional[float] = None
                 ) -> Tuple[List[Mapping[str, str]], List[str]]:
    """The summary records of months the window [since, until) covers from their first
    second (UTC) to their end or to now, and a note per month left out: APEL replaces
    a month's summary with the one sent last, so a partial month would erase the rest."""
    now = time.time() if now is None else now
    keep: List[Mapping[str, str]] = []
    cut: Dict[Tuple[int, int], None] = {}
    for rec in records:
        year, month = int(rec["Year"]), int(rec["Month"])
        lo, hi = month_bounds(year, month)
        if (since is None or since <= lo) and (until is None or until >= min(hi, now)):
            keep.append(rec)
        else:
            cut[(year, month)] = None
    notes = [f"summary of {y}-{m:02d} not written: the window covers only part of that UTC "
             "month, and APEL would replace the month's whole summary with it; use "
             f"--month {y}-{m:02d} (or --since/--until at 00:00 UTC)" for y, m in cut]
    return keep, notes


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
           outgoing: Optional[str] = None, path_type: Optional[str] = None,
           host: Optional[str] = None, state: Optional[ExportState] = None) -> Result:
    """Write the messages for jobs that ended in [since, until). *state*: which jobs
    were written before (default: the store's ``exported`` table)."""
    st = _settings(options, site)
    jobs, skipped = finished_jobs(db, since, until, host=host)
    out = Outgoing(outgoing or st["outgoing"], path_type or st["path_type"])
    written: List[str] = []
    notes: List[str] = []
    if summary:
        recs, bad = summary_records(jobs, st, notes)
        skipped.extend(bad)
        whole, cut = whole_months(recs, since, until)
        for i in range(0, len(whole), MAX_RECORDS):
            written.append(out.add(render(SUMMARY_HEADER, whole[i:i + MAX_RECORDS])))
        return Result(written, len(whole), skipped, notes + cut)
    state = state or ExportState(db, "apel")
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
        rec, why = job_record(job, st, notes)
        if rec is None:
            skipped.append(Skipped(job.jid, why or "invalid"))
            continue
        batch.append((job.jid, rec))
        if len(batch) >= MAX_RECORDS:
            flush()
    flush()
    return Result(written, total, skipped, notes)

