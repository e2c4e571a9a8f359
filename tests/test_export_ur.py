"""`elsa export ur`: OGF Usage Record 1.0 XML, validated against a GFD.98 schema
(tests/data/urf-gfd98.xsd) with xmlschema; figures and units checked."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from elsa.export import ur
from elsa.export.records import FinishedJob
from elsa.report.cli import main
from tests.test_export_apel import NOW, _job, make_store

xmlschema = pytest.importorskip("xmlschema")
SCHEMA = Path(__file__).parent / "data" / "urf-gfd98.xsd"
NS = {"urf": ur.NS}
ME = pwd.getpwuid(os.getuid()).pw_name


def test_records_validate_against_gfd98(tmp_path, capsys):
    db = make_store(tmp_path, [
        _job(1, NOW - 7200, 3600.25, tags={"wlm_job_id": "slurm-77", "queue": "short",
                                            "account": "atlas"}, params={"cpus": "0-1"}),
        _job(2, NOW - 3000, 100, cpu_u=None),                 # CPU unknown: no CpuDuration
        dict(jid=3, start=NOW - 10, end=None)])               # running: not a record
    out = tmp_path / "ur.xml"
    assert main(["export", "ur", "--db", db, "-o", str(out)]) == 0
    assert "0x0000000000000003 not exported: it has not ended yet" in capsys.readouterr().err
    schema = xmlschema.XMLSchema(str(SCHEMA))
    schema.validate(str(out))                                 # raises on any violation
    root = ET.parse(out).getroot()
    recs = root.findall("urf:JobUsageRecord", NS)
    assert len(recs) == 2
    r = recs[0]
    assert r.find("urf:JobIdentity/urf:LocalJobId", NS).text == "slurm-77"
    assert r.find("urf:UserIdentity/urf:LocalUserId", NS).text == ME
    assert r.find("urf:WallDuration", NS).text == "PT3600.25S"
    cpu = {c.get(f"{{{ur.NS}}}usageType"): c.text for c in r.findall("urf:CpuDuration", NS)}
    assert cpu == {"user": "PT1.5S", "system": "PT0.5S"}
    mem = r.find("urf:Memory", NS)
    assert mem.text == "20481" and mem.get(f"{{{ur.NS}}}storageUnit") == "KB"
    assert mem.get(f"{{{ur.NS}}}metric") == "max"
    assert r.find("urf:Processors", NS).text == "2"
    assert r.find("urf:Queue", NS).text == "short"
    host = socket.gethostname()                               # the central store's name
    assert r.find("urf:MachineName", NS).text == host
    assert r.find("urf:JobIdentity/urf:GlobalJobId", NS).text == f"{host}:slurm-77"
    assert r.find("urf:Charge", NS) is None                   # no billing rates: no Charge
    assert recs[1].findall("urf:CpuDuration", NS) == []


def test_charge_when_a_rate_is_given(tmp_path):
    db = make_store(tmp_path, [_job(1, NOW - 7200, 60)])
    import sqlite3

    from elsa.export.records import finished_jobs

    jobs, _ = finished_jobs(sqlite3.connect(db))

    def charge(job: FinishedJob):
        return (round(job.cpu_us / 1e6 * 0.02, 6), "EUR", "0.02 EUR per CPU second")

    data = ur.document(jobs, charge=charge)
    xmlschema.XMLSchema(str(SCHEMA)).validate(data.decode())
    c = ET.fromstring(data).find("urf:JobUsageRecord/urf:Charge", NS)
    assert float(c.text) == pytest.approx(0.04)
    assert c.get(f"{{{ur.NS}}}unit") == "EUR"


def test_schema_rejects_what_gfd98_rejects():
    schema = xmlschema.XMLSchema(str(SCHEMA))
    good = (f'<urf:UsageRecords xmlns:urf="{ur.NS}"><urf:JobUsageRecord>'
            '<urf:RecordIdentity urf:recordId="h:1" urf:createTime="2026-01-01T00:00:00Z"/>'
            '<urf:Status>completed</urf:Status><urf:WallDuration>PT1S</urf:WallDuration>'
            '</urf:JobUsageRecord></urf:UsageRecords>')
    assert schema.is_valid(good)
    assert not schema.is_valid(good.replace("<urf:Status>completed</urf:Status>", ""))
    assert not schema.is_valid(good.replace("PT1S", "1"))
    assert not schema.is_valid(good.replace("</urf:WallDuration>",
                                            "</urf:WallDuration><urf:Bogus>1</urf:Bogus>"))


def test_charge_from_the_billing_rates(tmp_path, capsys):
    db = make_store(tmp_path, [_job(1, NOW - 7200, 60), _job(2, NOW - 3600, 60)])
    cfg = tmp_path / "elsa.toml"
    out = tmp_path / "ur.xml"
    # Without rates: no Charge.
    assert main(["export", "ur", "--db", db, "-o", str(out)]) == 0
    assert ET.parse(out).getroot().find("urf:JobUsageRecord/urf:Charge", NS) is None
    cfg.write_text('[billing]\nunit = "EUR"\ndecimals = 4\n'
                   '[billing.rates]\ncpu_user = "0.01"\ncpu_system = "0.02"\n')
    assert main(["export", "ur", "--config", str(cfg), "--db", db, "-o", str(out)]) == 0
    xmlschema.XMLSchema(str(SCHEMA)).validate(str(out))
    charges = [c for c in ET.parse(out).getroot().iterfind("urf:JobUsageRecord/urf:Charge", NS)]
    assert len(charges) == 2
    # 1.5 s user x 0.01 + 0.499999 s system x 0.02 = 0.025 (4 decimals), as `elsa bill` says
    assert [float(c.text) for c in charges] == [0.025, 0.025]
    assert {c.get(f"{{{ur.NS}}}unit") for c in charges} == {"EUR"}


def test_output_errors_and_format_flags(tmp_path, capsys):
    db = make_store(tmp_path, [_job(1, NOW - 7200, 60)])
    for fmt in ("ur", "jsonl"):
        assert main(["export", fmt, "--db", db, "-o", "/nonexistent/dir/f"]) == 2
        err = capsys.readouterr().err
        assert "cannot write /nonexistent/dir/f: No such file or directory" in err
        assert "give -o a writable file" in err
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "elsa.report.cli", "export", fmt, "--db",
                                db], stdout=full, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
                               timeout=120)
        assert r.returncode == 2
        assert r.stderr == ("elsa: cannot write standard output: No space left on device; "
                            "check the disk or file standard output goes to\n")
        for flag in ("--json", "--csv"):
            assert main(["export", fmt, "--db", db, flag]) == 2
            assert f"--{flag[2:]} does not apply here" in capsys.readouterr().err


def test_control_characters_in_a_tag_leave_the_document_well_formed(tmp_path):
    """XML 1.0 cannot hold most control characters even escaped; a user's tag may."""
    db = make_store(tmp_path, [_job(1, NOW - 7200, 60, tags={"queue": "q\x01\x1b[2J",
                                                              "wlm_job_id": "7\x00"})])
    out = tmp_path / "ur.xml"
    assert main(["export", "ur", "--db", db, "-o", str(out)]) == 0
    r = ET.parse(out).getroot().find("urf:JobUsageRecord", NS)   # parses
    assert r.find("urf:Queue", NS).text == "q\ufffd\ufffd[2J"
    xmlschema.XMLSchema(str(SCHEMA)).validate(str(out))
