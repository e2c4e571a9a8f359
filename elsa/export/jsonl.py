"""JSON lines of finished jobs (``elsa export jsonl``), for pipelines (Loki,
Elasticsearch, a data lake): one object per job, every field, stable keys.

Keys (docs/export.md lists them with units): ``jid`` (the JID string),
``name``, ``user`` (null: the uid has no passwd entry), ``uid``, ``host``,
``tags``, ``backend``, ``params``, ``start``, ``end`` (epoch seconds),
``wall_seconds``, ``usage`` (every metric of ``elsa jobs --json`` in its raw
unit: µs, KiB, bytes; null when no source measured it), ``usage_sources``
(metric -> the source its figure came from), ``incomplete`` (source -> why
its figures miss something), ``usage_note`` (why the job's CPU differs from
the sum of its process records, else null). A key is never dropped: unknown
is null.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Iterator

from elsa.core.usage import METRICS
from elsa.export.records import FinishedJob

KEYS = ("jid", "name", "user", "uid", "host", "tags", "backend", "params", "start", "end",
        "wall_seconds", "usage", "usage_sources", "incomplete", "usage_note")


def job_object(job: FinishedJob) -> Dict[str, Any]:
    return {
        "jid": job.jid_text, "name": job.name, "user": job.user, "uid": job.owner_uid,
        "host": job.host, "tags": dict(job.tags), "backend": job.backend,
        "params": dict(job.params), "start": job.created, "end": job.ended,
        "wall_seconds": round(job.wall_seconds, 6),
        "usage": {m: job.usage.get(m) for m in METRICS},
        "usage_sources": dict(job.chosen), "incomplete": dict(job.incomplete),
        "usage_note": job.note,
    }


def lines(jobs: Iterable[FinishedJob]) -> Iterator[str]:
    for job in jobs:
        yield json.dumps(job_object(job), sort_keys=False, separators=(",", ":")) + "\n"
