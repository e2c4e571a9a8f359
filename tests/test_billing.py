"""`elsa bill` against figures computed by hand (docs/billing.md has the same example).

Schedule (UTC): weekdays 08:00-18:00 prime, weekends non-prime; the CSA
holidays file makes Thu 2026-11-26 a holiday. Rates: cpu_user 0.01 prime /
0.004 non-prime per s; cpu_system 0.02; mem_peak 0.001 prime / 0 non-prime
per MiB-hour; job 1 prime / 0.5 non-prime; queue=debug multiplier 0.5.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from elsa import config
from elsa.billing import rates
from elsa.billing.bill import Biller
from elsa.billing.schedule import parse_holidays
from elsa.core.aggregator import add_to_sums
from elsa.core.schema import migrate
from elsa.errors import ConfigError
from elsa.report.cli import main
from elsa.users import user_name

HOLIDAYS = """HOLIDAYFILE_VERSION1
*  Prime/non-prime table, CSA format
YEAR 2026
weekday   0800  1800
saturday  none  all
sunday    none  all
*  day-of-year  month day  name
330  Nov 26  Thanksgiving
"""

CONFIG = """
state_dir = "{state}"
[billing]
unit = "SBU"
timezone = "UTC"
holidays = "{holidays}"
[billing.rates]
cpu_user = 0.01
cpu_system = 0.02
mem_peak = 0.001
job = 1
[billing.nonprime]
cpu_user = 0.004
cpu_system = 0.02
job = 0.5
[billing.multipliers.queue]
debug = 0.5
"""


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def _proc(db, jid, source, pid, start, end, cu, cs, rss, uid=1000):
    (lo,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM proc_usage").fetchone()
    db.execute("INSERT INTO proc_usage(source, jid, pid, start_time, end_time, uid, comm, "
               "cpu_user_us, cpu_system_us, elapsed_us, max_rss_kb) "
               "VALUES (?, ?, ?, ?, ?, ?, 'x', ?, ?, ?, ?)",
               (source, jid, pid, start, end, uid, cu, cs, int((end - start) * 1e6), rss))
    add_to_sums(db, lo)


def _job(db, jid, uid, tags, start, end):
    db.execute("INSERT INTO jobs VALUES (?, 'j', ?, ?, ?, ?, 'ended', 'cnproc', '{}')",
               (jid, uid, json.dumps(tags), start, end))


@pytest.fixture
def site(tmp_path):
    hol = tmp_path / "csa.holidays"
    hol.write_text(HOLIDAYS)
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(CONFIG.format(state=state, holidays=hol))
    db = sqlite3.connect(str(state / "elsa.db"), isolation_level=None)
    migrate(db, str(state / "elsa.db"))
    # A: Wed 17:00-19:00, one hour prime and one non-prime.
    a0, a1 = ts("2026-11-25T17:00"), ts("2026-11-25T19:00")
    _job(db, 1, 1000, {"queue": "normal", "account": "chem"}, a0, a1)
    _proc(db, 1, "taskstats", 100, a0, a1, 1000_000_000, 100_000_000, 1024 * 1024)
    # B: on the holiday, queue debug (x0.5), no memory figure.
    b0, b1 = ts("2026-11-26T10:00"), ts("2026-11-26T11:00")
    _job(db, 2, 1000, {"queue": "debug", "account": "chem"}, b0, b1)
    _proc(db, 2, "taskstats", 101, b0, b1, 500_000_000, 0, None)
    # C: Fri 09:00-09:30, all prime.
    c0, c1 = ts("2026-11-27T09:00"), ts("2026-11-27T09:30")
    _job(db, 3, 1001, {"account": "physics"}, c0, c1)
    _proc(db, 3, "taskstats", 102, c0, c1, 1_000_000, 333_333, 1024, uid=1001)
    # Outside jobs, uid 1001: P1 Saturday noon (also reported by bsdacct: billed once),
    # P2 across Friday's 18:00 boundary.
    p0, p1 = ts("2026-11-28T12:00"), ts("2026-11-28T12:10")
    _proc(db, None, "taskstats", 200, p0, p1, 100_000_000, 0, None, uid=1001)
    _proc(db, None, "bsdacct", 200, p0, p1, 100_000_000, 0, None, uid=1001)
    q0, q1 = ts("2026-11-27T17:30"), ts("2026-11-27T18:30")
    _proc(db, None, "taskstats", 201, q0, q1, 200_000_000, 10_000_000, 2048, uid=1001)
    # Outside the month: not billed.
    _job(db, 4, 1000, {}, ts("2026-11-30T23:00"), ts("2026-12-01T01:00"))
    _proc(db, 4, "taskstats", 103, ts("2026-11-30T23:00"), ts("2026-12-01T01:00"),
          9_000_000_000, 0, 1)
    db.close()
    return str(cfg)


def _bill(capsys, cfg, *extra):
    assert main(["bill", "--config", cfg, "--period", "2026-11", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_bill_by_job_hand_computed(site, capsys):
    data = _bill(capsys, site, "--by", "job")
    rows = {r["key"]: r for r in data["rows"]}
    from elsa.core.model import format_jid

    a, b, c = rows[format_jid(1)], rows[format_jid(2)], rows[format_jid(3)]
    # A: cpu_user 1000 s x (0.5 x 0.01 + 0.5 x 0.004) = 7; cpu_system 100 x 0.02 = 2;
    # mem 1024 MiB x 2 h x 0.5 x 0.001 = 1.024; job 0.5 x 1 + 0.5 x 0.5 = 0.75.
    assert (a["prime_s"], a["nonprime_s"]) == (3600, 3600)
    assert a["charges"] == {"cpu_user": "7.00", "cpu_system": "2.00", "mem_peak": "1.02",
                            "job": "0.75"}
    assert a["charge"] == "10.77"  # 10.774
    # B: holiday, all non-prime: (500 x 0.004 + 0.5) x 0.5; memory unknown, not charged.
    assert (b["prime_s"], b["nonprime_s"]) == (0, 3600)
    assert b["charge"] == "1.25" and b["unpriced"] == ["mem_peak"]
    assert b["multiplier"] == "0.5"
    # C: 0.01 + 0.333333 x 0.02 + 0.5 h x 1 MiB x 0.001 + 1 = 1.01716666 -> 1.02
    assert c["charge"] == "1.02"
    nojob = [r for r in data["rows"] if r["key"] is None]
    assert len(nojob) == 1
    # Whole hours: from the hourly rollup, each hour split by its prime seconds.
    # P1: 100 s x 0.004 = 0.4 (once, not per source); P2 ended in Friday's 18:00 hour,
    # all non-prime: 200 x 0.004 + 10 x 0.02 = 1.0; no memory figure in the rollup.
    assert nojob[0]["charge"] == "1.40" and nojob[0]["processes"] == 2
    assert nojob[0]["unpriced"] == ["mem_peak"]
    assert data["total"] == "14.44"
    assert format_jid(4) not in rows


def test_per_job_charges_sum_to_user_totals(site, capsys):
    users = {r["key"]: r for r in _bill(capsys, site, "--by", "user")["rows"]}
    assert users[user_name(1000)]["charge"] == "12.02"
    assert users[user_name(1001)]["charge"] == "2.42"
    jobs = _bill(capsys, site, "--by", "job")
    for name, row in users.items():
        mine = [Decimal(r["charge"]) for r in jobs["rows"] if r["user"] == name]
        assert sum(mine) == Decimal(row["charge"])
    accounts = {r["key"]: r["charge"] for r in _bill(capsys, site, "--by", "account")["rows"]}
    assert accounts == {"chem": "12.02", "physics": "1.02", None: "1.40"}
    queues = {r["key"]: r["charge"] for r in _bill(capsys, site, "--by", "tag:queue")["rows"]}
    assert queues["debug"] == "1.25" and queues["normal"] == "10.77"


def test_bill_states_rate_table_and_filters(site, capsys):
    data = _bill(capsys, site, "--tag", "queue=debug")
    assert data["total"] == "1.25"
    rt = data["rate_table"]
    assert rt["resources"]["cpu_user"] == {"base_unit": "CPU second", "prime": "0.01",
                                           "nonprime": "0.004"}
    assert rt["holiday_files"][0]["holidays"] == ["2026-11-26"]
    assert main(["bill", "--config", site, "--period", "2026-11"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL 14.44 SBU" in out and "rate table" in out
    assert main(["bill", "--config", site, "--period", "2026-11", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# rate table") and lines[1].startswith("key,")


def test_partial_hours_split_each_process_by_its_seconds(site, capsys):
    # A window not on whole hours: its edges are billed from the records, exactly.
    # P2 (Fri 17:30-18:30) half prime: 200 x 0.007 = 1.4; 10 x 0.02 = 0.2;
    # 2 MiB x 1 h x 0.5 x 0.001 = 0.001; 1.601 -> 1.60.
    assert main(["bill", "--config", site, "--json", "--by", "job",
                 "--since", "2026-11-27T17:15+00:00", "--until", "2026-11-27T18:45+00:00"]) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["rows"]
    assert row["key"] is None and row["charge"] == "1.60" and row["processes"] == 1
    assert (row["prime_s"], row["nonprime_s"]) == (1800, 1800)
    # Whole hours in the middle come from the rollup, the edges from the records.
    assert main(["bill", "--config", site, "--json", "--since",
                 "2026-11-27T17:59:59+00:00", "--until", "2026-11-28T12:05+00:00"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == "1.00"  # P2 1.0 (its hour), P1 (ends 12:10) not in the window


def test_rounding_is_half_even():
    b = Biller(rates.BillingConfig(decimals=2))
    assert b.round(Decimal("0.125")) == Decimal("0.12")
    assert b.round(Decimal("0.135")) == Decimal("0.14")


def test_holidays_file_schedule():
    hy = parse_holidays(HOLIDAYS, "h")
    assert hy.year == 2026 and hy.windows["weekday"] == (8 * 3600, 18 * 3600)
    import zoneinfo

    from elsa.billing.schedule import Schedule

    s = Schedule({"weekday": (0, 86400), "saturday": (0, 86400), "sunday": (0, 86400)}, [hy],
                 zoneinfo.ZoneInfo("UTC"))
    assert s.prime_seconds(ts("2026-11-25T07:00"), ts("2026-11-25T19:00")) == 10 * 3600
    assert s.prime_seconds(ts("2026-11-26T07:00"), ts("2026-11-26T19:00")) == 0
    # A Monday 2027 has no file: the [billing.schedule] table (here: all prime) applies.
    assert s.prime_seconds(ts("2027-01-04T00:00"), ts("2027-01-04T01:00")) == 3600


@pytest.mark.parametrize("text,where", [
    ("HOLIDAYFILE_VERSION1\nYEAR 2026\nweekday 0800\n", "h:3: weekday"),
    ("HOLIDAYFILE_VERSION1\nYEAR 2026\nweekday 1800 0800\n", "h:3"),
    ("HOLIDAYFILE_VERSION1\nYEAR 26\n", "h:2: expected 'YEAR yyyy'"),
    ("HOLIDAYFILE_VERSION1\nYEAR 2026\nweekday 0800 1800\nsaturday none all\n"
     "sunday none all\n331 Nov 26 Thanksgiving\n", "h:6: day-of-year 331 is not Nov 26"),
    ("HOLIDAYFILE_VERSION1\nYEAR 2026\nmonday 0800 1800\n", "h:3: unknown line"),
    ("YEAR 2026\n", "HOLIDAYFILE_VERSION1 is missing"),
])
def test_malformed_holidays_name_file_and_line(text, where):
    with pytest.raises(ConfigError) as err:
        parse_holidays(text, "h")
    assert where in err.value.message


@pytest.mark.parametrize("body,msg", [
    ("[billing.rates]\ngpu = 1\n", "unknown key 'billing.rates.gpu'"),
    ("[billing.rates]\ncpu_user = -1\n", "key 'billing.rates.cpu_user' must be 0 or more"),
    ("[billing.nonprime]\njob = \"x\"\n", "must be a decimal number"),
    ("[billing.multipliers.queue]\ndebug = -0.5\n", "'queue.debug' must be 0 or more"),
    # the bad entry's value, not the whole table
    ("[billing.multipliers.queue]\ndebug = \"x\"\nlong = 2\n",
     "key 'billing.multipliers' entry 'queue.debug' must be a decimal number; got 'x'"),
    ("[billing.multipliers]\nqueue = 3\n", "'queue' is 3"),
    ("[billing.schedule]\nweekday = \"7:30 17:30\"\n", "billing.schedule.weekday"),
    # one "got": the value's, after what is wrong in it
    ("[billing.schedule]\nweekday = \"2500 2600\"\n",
     "'2500' is not a time of day; got '2500 2600'"),
    ("[billing]\nholidays = \"/nonexistent/csa.holidays\"\n", "cannot read holidays file"),
    ("[billing]\nrate = 1\n", "unknown key 'billing.rate'"),
])
def test_bad_billing_config_refused_at_load(tmp_path, body, msg):
    f = tmp_path / "elsa.toml"
    f.write_text(body)
    with pytest.raises(ConfigError) as err:
        config.load(str(f))
    assert str(f) in err.value.message and msg in err.value.message


@pytest.mark.parametrize("body", ["[billing]\nrate = 1\n",
                                  # a misspelt sub-table reaches [billing] as a key
                                  "[billing.rate]\ncpu_user = 1\n"])
def test_unknown_billing_key_lists_sub_tables(tmp_path, body):
    f = tmp_path / "elsa.toml"
    f.write_text(body)
    with pytest.raises(ConfigError) as err:
        config.load(str(f))
    assert err.value.message.endswith(
        "unknown key 'billing.rate'; known keys here: decimals, holidays, multipliers, "
        "timezone, unit; sub-tables: [billing.nonprime], [billing.rates], [billing.schedule]")


def test_bad_holidays_line_refused_at_config_load(tmp_path):
    hol = tmp_path / "csa.holidays"
    hol.write_text(HOLIDAYS.replace("330  Nov 26", "330  Nov"))
    f = tmp_path / "elsa.toml"
    f.write_text(f'[billing]\nholidays = "{hol}"\n')
    with pytest.raises(ConfigError) as err:
        config.load(str(f))
    assert f"{hol}:8: expected a holiday line" in err.value.message


@pytest.mark.parametrize("body,msg", [
    ("[billing.rates]\ncpu_user = -0.5\n", "key 'billing.rates.cpu_user' must be 0 or more"),
    ("[billing]\nholidays = \"{hol}\"\n", ":8: expected a holiday line"),
])
def test_elsad_and_elsa_refuse_a_bad_rate_table(tmp_path, body, msg):
    import subprocess
    import sys

    hol = tmp_path / "csa.holidays"
    hol.write_text(HOLIDAYS.replace("330  Nov 26", "330  Nov"))
    sock, state = tmp_path / "s.sock", tmp_path / "st"
    cfg = tmp_path / "elsa.toml"
    cfg.write_text(f'socket = "{sock}"\nstate_dir = "{state}"\n' + body.format(hol=hol))
    res = subprocess.run([sys.executable, "-m", "elsa.elsad", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and msg in res.stderr and str(cfg) in res.stderr
    assert not sock.exists() and not state.exists()
    res = subprocess.run([sys.executable, "-m", "elsa.report.cli", "bill", "--config",
                          str(cfg), "--period", "2026-11"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and msg in res.stderr and res.stdout == ""


def test_folded_job_records_are_not_billed_twice(site, capsys):
    # [thresholds] folded small records of job 1 (into proc_folded): they reach the hourly
    # rollup and job 1's totals, and are not billed again as processes outside jobs.
    cfg = config.load(site)
    db = sqlite3.connect(f"{cfg.state_dir}/elsa.db", isolation_level=None)
    end = ts("2026-11-25T18:30")
    db.execute("INSERT INTO proc_folded(source, jid, uid, comm, start_time, end_time, folded, "
               "mem_kb_sum, cpu_user_us, cpu_system_us, elapsed_us) VALUES ('taskstats', 1, "
               "1000, 'sh', ?, ?, 50, 0, 100000000, 0, 1000000)", (end - 60, end))
    db.close()
    data = _bill(capsys, site, "--by", "job")
    rows = {r["key"]: r for r in data["rows"]}
    from elsa.core.model import format_jid

    # Job 1 now has 100 s more user CPU: 100 x 0.007 = 0.7 more (10.774 + 0.7 = 11.474).
    assert rows[format_jid(1)]["charge"] == "11.47"
    assert rows[None]["charge"] == "1.40"  # outside jobs: as before


def test_folded_records_outside_jobs_are_billed_in_a_partial_hour(site, capsys):
    # [thresholds] folded small records outside jobs at a window's edges count as the
    # hourly rollup counts them in whole hours: A, 30 records of Friday 17:40-17:41 (all
    # prime): 50 s user x 0.01 = 0.5; B, 10 records of 17:59:30-18:00:30 (across the
    # 18:00 boundary): their 20 s at half prime, 10 s user x 0.007 = 0.07. With P2's
    # 1.601: 2.171.
    cfg = config.load(site)
    db = sqlite3.connect(f"{cfg.state_dir}/elsa.db", isolation_level=None)
    for start, end, n, cu, el in (("17:40", "17:41", 30, 50_000_000, 30_000_000),
                                  ("17:59:30", "18:00:30", 10, 10_000_000, 20_000_000)):
        db.execute("INSERT INTO proc_folded(source, uid, comm, start_time, end_time, folded, "
                   "mem_kb_sum, cpu_user_us, cpu_system_us, elapsed_us) VALUES ('taskstats', "
                   "1001, 'sh', ?, ?, ?, 0, ?, 0, ?)",
                   (ts(f"2026-11-27T{start}"), ts(f"2026-11-27T{end}"), n, cu, el))
    db.close()
    assert main(["bill", "--config", site, "--json", "--by", "job",
                 "--since", "2026-11-27T17:15+00:00", "--until", "2026-11-27T18:45+00:00"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["key"] is None and row["processes"] == 41, row
    assert row["charge"] == "2.17", row
    assert (row["prime_s"], row["nonprime_s"]) == (1840, 1810), row


def test_a_quantity_no_record_measured_is_unpriced_in_whole_hours_too(site, capsys):
    # The site's processes outside jobs have no I/O figures. With a rate for reading,
    # the whole hours (from the hourly rollup) and the partial hours (from the records)
    # alike list `read` as unpriced instead of charging 0 bytes for it.
    with_read = site.replace("elsa.toml", "read.toml")
    with open(site) as fh, open(with_read, "w") as out:
        out.write(fh.read().replace("[billing.rates]\n", "[billing.rates]\nread = 1\n"))
    for window in (["--period", "2026-11"],
                   ["--since", "2026-11-27T17:15+00:00", "--until", "2026-11-27T18:45+00:00"]):
        assert main(["bill", "--config", with_read, "--json", "--by", "job", *window]) == 0
        nojob = [r for r in json.loads(capsys.readouterr().out)["rows"] if r["key"] is None]
        assert "read" in nojob[0]["unpriced"], (window, nojob)
        assert "read" not in nojob[0]["charges"]


@pytest.fixture
def utc_host(host_zone):
    """The host's zone is UTC, whatever this machine's is (the billing zone differs)."""
    host_zone("UTC")


def test_bill_header_shows_a_window_cut_within_a_minute(site, capsys, utc_host):
    # The window printed is the one billed: 17:15:30 is not 17:15.
    assert main(["bill", "--config", site, "--since", "2026-11-27T17:15:30Z",
                 "--until", "2026-11-27T18:45Z"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith("bill 2026-11-27 17:15:30 +00:00 .. 2026-11-27 18:45 +00:00 ")


def test_bill_reads_and_prints_times_in_the_billing_zone(site, capsys, utc_host):
    paris = site.replace("elsa.toml", "paris.toml")
    with open(site) as fh, open(paris, "w") as out:
        out.write(fh.read().replace('timezone = "UTC"', 'timezone = "Europe/Paris"'))
    # 29 March 2026 in Paris: 23 hours (the clocks go forward at 02:00).
    day = (ts("2026-03-28T23:00"), ts("2026-03-29T22:00"))
    assert main(["bill", "--config", paris, "--period", "2026-03-29"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith("bill 2026-03-29 00:00 +01:00 .. 2026-03-30 00:00 +02:00 by user")
    data = _json_of_bill(capsys, paris, "--period", "2026-03-29")
    assert (data["since"], data["until"]) == day
    # --since/--until without an offset are in the same zone as --period.
    data = _json_of_bill(capsys, paris, "--since", "2026-03-29", "--until", "2026-03-30")
    assert (data["since"], data["until"]) == day
    data = _json_of_bill(capsys, paris, "--since", "2026-03-29T00:00+00:00",
                         "--until", str(day[1]))
    assert (data["since"], data["until"]) == (ts("2026-03-29T00:00"), day[1])


def _json_of_bill(capsys, cfg, *argv):
    assert main(["bill", "--config", cfg, "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_bill_refuses_a_bad_time_with_the_option(site, capsys):
    assert main(["bill", "--config", site, "--since", "yesterdayish", "--until", "1d"]) == 2
    assert "--since: not a time: 'yesterdayish'" in capsys.readouterr().err


def test_core_hours_take_the_cores_a_cpu_limit_allows(site, capsys):
    """core_hours = wall time x cores allowed: a cgroup2 job's CPU limit (cpu.max
    quota / period, kept as its cpu_limit parameter), the smaller of it and a
    cpuset; a job with neither has no figure (unpriced, not 0)."""
    cfg = site.replace("elsa.toml", "core.toml")
    with open(site) as fh:
        text = fh.read()
    with open(cfg, "w") as fh:
        fh.write(text.replace("job = 1\n", "job = 1\ncore_hours = 2\n", 1))
    state = text.split('state_dir = "', 1)[1].split('"', 1)[0]
    db = sqlite3.connect(os.path.join(state, "elsa.db"), isolation_level=None)
    f0, f1 = ts("2026-11-27T09:00"), ts("2026-11-27T11:00")  # Friday, all prime
    for jid, params in ((5, {"cgroup_path": "/x", "cpu_limit": "1.5"}),
                        (6, {"cpus": "0-3", "cpu_limit": "1.5"}), (7, {"cpus": "0-3"})):
        db.execute("INSERT INTO jobs VALUES (?, 'j', 1000, '{}', ?, ?, 'ended', 'cgroup2', ?)",
                   (jid, f0, f1, json.dumps(params)))
    db.close()
    from elsa.core.model import format_jid

    rows = {r["key"]: r for r in _bill(capsys, cfg, "--by", "job")["rows"]}
    for jid, hours in ((5, "3"), (6, "3"), (7, "8")):
        assert Decimal(rows[format_jid(jid)]["quantities"]["core_hours"]) == Decimal(hours)
        assert Decimal(rows[format_jid(jid)]["charges"]["core_hours"]) == 2 * Decimal(hours)
    assert rows[format_jid(1)]["quantities"]["core_hours"] is None
    assert "core_hours" in rows[format_jid(1)]["unpriced"]


def test_a_bad_multiplier_error_quotes_its_value_not_the_table(tmp_path):
    f = tmp_path / "elsa.toml"
    f.write_text("[billing.multipliers.queue]\ndebug = -1\nlong = 2\n")
    with pytest.raises(ConfigError) as err:
        config.load(str(f))
    assert err.value.message.endswith("; got -1"), err.value.message
    assert "'long'" not in err.value.message


def test_bill_by_job_csv_tells_the_users_outside_jobs_apart(site, capsys):
    """--by job --csv had no user column: the "(no job)" rows of two users both read
    ',0,...' with an empty key. It has the table's USER and NAME, and the account."""
    import csv
    from pathlib import Path

    db = sqlite3.connect(str(Path(site).parent / "state" / "elsa.db"), isolation_level=None)
    t0 = ts("2026-11-28T13:00")
    _proc(db, None, "taskstats", 300, t0, t0 + 600, 50_000_000, 0, None, uid=1000)
    db.close()
    assert main(["bill", "--config", site, "--period", "2026-11", "--by", "job",
                 "--csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()[1:]))
    nojob = sorted((r["user"], r["name"], r["charge"]) for r in rows if not r["key"])
    assert nojob == sorted([(user_name(1000), "(no job)", "0.20"),
                            (user_name(1001), "(no job)", "1.40")]), rows
    chem = [r for r in rows if r["key"] == "0x0000000000000001"]
    assert chem[0]["account"] == "chem" and chem[0]["user"] == user_name(1000)
    # The table has them too.
    assert main(["bill", "--config", site, "--period", "2026-11", "--by", "job"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len([ln for ln in table if "(no job)" in ln]) == 2
    assert any(user_name(1000) in ln and "(no job)" in ln for ln in table), table
