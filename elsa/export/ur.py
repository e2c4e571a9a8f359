"""OGF Usage Record 1.0 (GFD.98) XML (``elsa export ur``).

One ``urf:JobUsageRecord`` per finished job inside a ``urf:UsageRecords``
document, in the namespace ``http://schema.ogf.org/urf/2003/09/urf``; the
attributes are namespace-qualified (``urf:recordId``), as in GFD.98's
examples. Durations are xsd:duration (``PT3723.5S``), times xsd:dateTime in
UTC. ``Charge`` is written only when a charge function is given (from the
billing rates, ``elsa.export.cli.billing_charge``); without one it is left out.
"""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from elsa.export.records import FinishedJob

NS = "http://schema.ogf.org/urf/2003/09/urf"

#: A job's charge: (amount, unit, formula), or None when it has no rate.
Charge = Tuple[float, str, str]
ChargeFn = Callable[[FinishedJob], Optional[Charge]]


def _q(name: str) -> str:
    return f"{{{NS}}}{name}"


def duration(seconds: float) -> str:
    """xsd:duration of *seconds*, millisecond resolution ("PT12.5S", "PT0S")."""
    text = f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".")
    return f"PT{text}S"


def timestamp(epoch: float) -> str:
    """xsd:dateTime in UTC ("2026-11-25T21:00:00.250Z")."""
    t = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


#: What XML 1.0 cannot hold at all, even escaped (its Char production): ElementTree
#: would write it as it is and the document would not parse. A user's tag may hold it.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def _sub(parent: ET.Element, name: str, text: Optional[str] = None,
         **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, _q(name), {_q(k): _xml_text(v) for k, v in attrs.items()})
    if text is not None:
        el.text = _xml_text(text)
    return el


def job_element(job: FinishedJob, *, job_id_tag: str = "wlm_job_id",
                queue_tag: str = "queue", project_tag: str = "account",
                global_user_names: Mapping[str, str] = {},
                charge: Optional[ChargeFn] = None,
                created: Optional[float] = None) -> ET.Element:
    """The ``urf:JobUsageRecord`` of *job*."""
    import time

    rec = ET.Element(_q("JobUsageRecord"))
    _sub(rec, "RecordIdentity", recordId=f"{job.host}:{job.jid_text}",
         createTime=timestamp(time.time() if created is None else created))
    ident = _sub(rec, "JobIdentity")
    local_id = job.tags.get(job_id_tag) or job.jid_text
    _sub(ident, "GlobalJobId", f"{job.host}:{local_id}")
    _sub(ident, "LocalJobId", local_id)
    user = _sub(rec, "UserIdentity")
    _sub(user, "LocalUserId", job.user or str(job.owner_uid))
    if job.user and job.user in global_user_names:
        _sub(user, "GlobalUserName", global_user_names[job.user])
    if job.name:
        _sub(rec, "JobName", job.name)
    if charge is not None:
        got = charge(job)
        if got is not None:
            amount, unit, formula = got
            _sub(rec, "Charge", repr(float(amount)), unit=unit, formula=formula)
    _sub(rec, "Status", "completed")
    _sub(rec, "WallDuration", duration(job.wall_seconds))
    cu, cs = job.usage.get("cpu_user_us"), job.usage.get("cpu_system_us")
    if cu is not None:
        _sub(rec, "CpuDuration", duration(cu / 1e6), usageType="user")
    if cs is not None:
        _sub(rec, "CpuDuration", duration(cs / 1e6), usageType="system")
    _sub(rec, "StartTime", timestamp(job.created))
    _sub(rec, "EndTime", timestamp(job.ended))
    _sub(rec, "MachineName", job.host)
    _sub(rec, "Host", job.host, primary="true")
    if job.tags.get(queue_tag):
        _sub(rec, "Queue", job.tags[queue_tag])
    if job.tags.get(project_tag):
        _sub(rec, "ProjectName", job.tags[project_tag])
    rss = job.usage.get("max_rss_kb")
    if rss:  # positiveInteger: a 0 reading is no peak worth a record
        _sub(rec, "Memory", str(int(rss)), storageUnit="KB", metric="max", type="physical")
    if job.processors:
        _sub(rec, "Processors", str(job.processors))
    _sub(rec, "NodeCount", "1")
    return rec


def document(jobs: Sequence[FinishedJob], **kwargs: Any) -> bytes:
    """The ``urf:UsageRecords`` document of *jobs*, UTF-8. A figure no source
    measured is left out (CpuDuration, Memory are optional in GFD.98)."""
    ET.register_namespace("urf", NS)
    root = ET.Element(_q("UsageRecords"))
    for job in jobs:
        root.append(job_element(job, **kwargs))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
