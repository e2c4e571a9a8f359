"""A strict reader of APEL messages applying the rules of APEL's own loader
(apel/db/records/record.py, job.py, summary.py), so the tests check what the
server side would accept, not what ELSA thinks it wrote:

* the header line names the message type and version;
* the body is split into records on the text ``%%`` wherever it is (as
  ``RecordFactory._create_record_objects`` does), each record into lines on
  every line break ``str.splitlines`` knows; values are stripped;
* records are ``Key: value`` lines, each record closed by a ``%%`` line;
* keys are case-sensitive; a key outside the record type's fields rejects the
  record (as ``Record.set_field`` does), so does a line without ``:``;
* null is an empty value, ``none`` or ``null`` (any case); a mandatory field
  null or missing rejects the record;
* int fields must parse as int (``int("1.5")`` fails: whole seconds), float
  fields as float, time fields as integer epoch seconds (ELSA writes no ISO);
* ServiceLevelType and ServiceLevel: both, the type one of si2k, hepspec,
  hepscore23. APEL's parser takes a job record with neither (it makes them
  "custom" and 1) but its loader re-checks the record when storing it and
  refuses "custom"; its Summaries table has ServiceLevel NOT NULL;
* EndTime not before StartTime, not more than 2 days in the future;
* summaries: Month 1..12, Earliest/LatestEndTime inside that month; NodeCount and
  Processors present (NOT NULL columns of APEL's Summaries table);
* a string longer than its column in APEL's database (schemas/server.sql:
  VARCHAR(255) for names and ids; the Queue parameter of its ReplaceJobRecord
  procedure is VARCHAR(100)) is refused: MySQL's strict mode rejects it.

Stricter than APEL where ELSA promises more: a key twice rejects the record,
and EGI's documented set (SubmitHost) must be present.
"""

from __future__ import annotations

import calendar
import time
from typing import Any, Dict, List, Optional, Tuple

JOB = {
    "header": "APEL-individual-job-message: v0.3",
    "fields": ["Site", "SubmitHost", "MachineName", "Queue", "LocalJobId", "LocalUserId",
               "GlobalUserName", "FQAN", "VO", "VOGroup", "VORole", "WallDuration",
               "CpuDuration", "Processors", "NodeCount", "StartTime", "EndTime",
               "InfrastructureDescription", "InfrastructureType", "MemoryReal",
               "MemoryVirtual", "ServiceLevelType", "ServiceLevel"],
    "mandatory": ["Site", "LocalJobId", "WallDuration", "CpuDuration", "StartTime", "EndTime",
                  "SubmitHost", "ServiceLevelType", "ServiceLevel"],
    "int": ["WallDuration", "CpuDuration", "Processors", "NodeCount", "MemoryReal",
            "MemoryVirtual"],
    "float": ["ServiceLevel"],
    "time": ["StartTime", "EndTime"],
}
SUMMARY = {
    "header": "APEL-summary-job-message: v0.2",
    "fields": ["Site", "Month", "Year", "GlobalUserName", "VO", "VOGroup", "VORole",
               "SubmitHost", "InfrastructureType", "InfrastructureDescription",
               "ServiceLevelType", "ServiceLevel", "NodeCount", "Processors",
               "EarliestEndTime", "LatestEndTime", "WallDuration", "CpuDuration",
               "NumberOfJobs"],
    # NodeCount and Processors: NOT NULL in APEL's Summaries table (schemas/server.sql),
    # and its ReplaceSummary procedure passes them as they come: one missing fails the
    # whole message (MySQL error 1048), though the message parser accepts it.
    "mandatory": ["Site", "Month", "Year", "WallDuration", "CpuDuration", "NumberOfJobs",
                  "NodeCount", "Processors", "ServiceLevelType", "ServiceLevel"],
    "int": ["Month", "Year", "NodeCount", "Processors", "WallDuration", "CpuDuration",
            "NumberOfJobs"],
    "float": ["ServiceLevel"],
    "time": ["EarliestEndTime", "LatestEndTime"],
}
SLTS = ("si2k", "hepspec", "hepscore23")
#: The [export.apel] keys every export needs (APEL rejects records without a benchmark).
CONFIG = '[export.apel]\nservice_level_type = "hepscore23"\nservice_level = 10.0\n'


def use_config(tmp_path: Any, monkeypatch: Any, extra: str = "") -> Any:
    """Point ``elsa`` at a config with :data:`CONFIG` (plus *extra*) through
    $ELSA_CONFIG; returns its path."""
    path = tmp_path / "apel-elsa.toml"
    path.write_text(CONFIG + extra)
    monkeypatch.setenv("ELSA_CONFIG", str(path))
    return path
#: Column widths of APEL's database (schemas/server.sql) for the string fields.
#: Queue: the loader's procedure ReplaceJobRecord takes it as ``queue VARCHAR(100)``.
WIDTH = {"InfrastructureDescription": 100, "InfrastructureType": 20, "ServiceLevelType": 50,
         "Queue": 100}
STRINGS = ("Site", "SubmitHost", "MachineName", "Queue", "LocalJobId", "LocalUserId",
           "GlobalUserName", "FQAN", "VO", "VOGroup", "VORole", "InfrastructureDescription",
           "InfrastructureType", "ServiceLevelType")


class Invalid(Exception):
    pass


def _null(v: str) -> bool:
    return v.strip().lower() in ("", "none", "null")


def parse_record(lines: List[str], kind: Dict[str, Any]) -> Dict[str, Any]:
    rec: Dict[str, Any] = {}
    for line in lines:
        if ":" not in line:
            raise Invalid(f"line without a key-value pair: {line!r}")
        key, value = (x.strip() for x in line.split(":", 1))
        if key not in kind["fields"]:
            raise Invalid(f"unknown field: {key}")
        if key in rec:
            raise Invalid(f"field twice: {key}")
        if _null(value):
            rec[key] = None
            continue
        try:
            if key in kind["int"]:
                rec[key] = int(value)
            elif key in kind["float"]:
                rec[key] = float(value)
            elif key in kind["time"]:
                rec[key] = int(value)
            else:
                if key in STRINGS and len(value) > WIDTH.get(key, 255):
                    raise Invalid(f"{key} longer than APEL's column")
                rec[key] = value
        except ValueError:
            raise Invalid(f"invalid value {value!r} in field {key}") from None
    for key in kind["mandatory"]:
        if rec.get(key) is None:
            raise Invalid(f"missing mandatory field: {key}")
    slt, sl = rec.get("ServiceLevelType"), rec.get("ServiceLevel")
    if (slt is None) != (sl is None):
        raise Invalid("ServiceLevelType and ServiceLevel: one without the other")
    if slt is not None and slt.lower() not in SLTS:
        raise Invalid(f"unknown ServiceLevelType {slt}")
    if kind is JOB:
        if rec["EndTime"] < rec["StartTime"]:
            raise Invalid("EndTime is before StartTime")
        if rec["EndTime"] > time.time() + 2 * 86400:
            raise Invalid("EndTime in the future")
        if rec["StartTime"] <= 0 or rec["EndTime"] <= 0:
            raise Invalid("zero time")
    else:
        if not 1 <= rec["Month"] <= 12:
            raise Invalid("Month out of range")
        lo = calendar.timegm((rec["Year"], rec["Month"], 1, 0, 0, 0))
        days = calendar.monthrange(rec["Year"], rec["Month"])[1]
        hi = lo + days * 86400
        for key in ("EarliestEndTime", "LatestEndTime"):
            v = rec.get(key)
            if v is not None and not lo <= v < hi:
                raise Invalid(f"{key} outside {rec['Year']}-{rec['Month']:02d}")
    for key in ("WallDuration", "CpuDuration", "MemoryReal", "MemoryVirtual", "NumberOfJobs"):
        v = rec.get(key)
        if v is not None and v < 0:
            raise Invalid(f"negative {key}")
    return rec


def parse_message(text: str) -> Tuple[str, List[Dict[str, Any]], List[str]]:
    """(kind: 'job'|'summary', accepted records, rejections). APEL's loader rejects
    the whole message when there is any rejection."""
    lines = text.splitlines()
    header = lines[0].strip()
    if header == JOB["header"]:
        kind, name = JOB, "job"
    elif header == SUMMARY["header"]:
        kind, name = SUMMARY, "summary"
    else:
        raise Invalid(f"unknown message header {header!r}")
    if lines[-1] != "%%":  # ELSA's promise; APEL itself does not need the last one
        raise Invalid("the last record is not closed by %%")
    recs: List[Dict[str, Any]] = []
    rejects: List[str] = []
    for chunk in "\n".join(lines[1:]).strip().split("%%"):
        if chunk == "" or chunk.isspace():
            continue
        try:
            recs.append(parse_record(chunk.strip().splitlines(), kind))
        except Invalid as exc:
            rejects.append(str(exc))
    return name, recs, rejects


def read_dirq(path: str) -> List[str]:
    """Every message of a dirq QueueSimple, as ssmsend reads them."""
    from dirq.QueueSimple import QueueSimple

    q = QueueSimple(path)
    out = []
    name: Optional[str] = q.first()
    while name:
        if q.lock(name):
            got = q.get(name)
            out.append(got.decode("utf-8") if isinstance(got, bytes) else got)
            q.unlock(name)
        name = q.next()
    return out
