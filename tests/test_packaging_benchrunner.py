"""benchmarks/run_all.py: discovery, --only, failure isolation, table/JSON output.

Uses stand-in benchmark modules in a temporary directory (the real ones need
root and minutes); the runner is the thing under test here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all_under_test",
                                                  ROOT / "benchmarks/run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", str(tmp_path))
    row = ('{"metric": "%s", "elsa": %s, "peer": 2.0, "peer_name": "peer", "ratio": %s,'
           ' "target": "<= 1.0", "passed": %s, "reproduce": "python3 x", "unit": "s"}')
    (tmp_path / "bench_good.py").write_text(
        "import sys\n"
        "def main(argv=None):\n"
        "    assert argv is None and sys.argv[1:] == [], (argv, sys.argv)\n"
        "    print('noise on stdout')\n"
        f"    return [{row % ('good one', 1.0, 0.5, True)}]\n")
    (tmp_path / "bench_slow.py").write_text(
        "def main(records=10, runs=3):\n"
        "    assert (records, runs) == (10, 3)\n"
        f"    return [{row % ('slow one', 3.0, 1.5, False)}]\n")
    (tmp_path / "bench_broken.py").write_text(
        "def main():\n    raise SystemExit('needs forkstat')\n")
    (tmp_path / "bench_bad_rows.py").write_text(
        "def main():\n    return [{'metric': 'half a row'}]\n")
    (tmp_path / "helper.py").write_text("raise RuntimeError('not a benchmark')\n")
    return module


def test_discovers_only_bench_modules(run_all):
    assert run_all.discover() == ["bad_rows", "broken", "good", "slow"]


def test_only_runs_the_named_benchmark_and_exit_status(run_all, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "good"])
    assert run_all.main(["--only", "good"]) == 0
    out = capsys.readouterr().out
    assert "good one" in out and "slow one" not in out
    assert "noise on stdout" not in out  # a benchmark's own printing goes to stderr
    assert "PASS" in out and "peer: 2 s" in out
    assert run_all.main(["--only", "bench_slow.py"]) == 1
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nonesuch"])


def test_failures_are_rows_and_the_rest_still_run(run_all, capsys):
    assert run_all.main(["--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    rows = {r["benchmark"]: r for r in data["rows"]}
    assert set(rows) == {"bad_rows", "broken", "good", "slow"}
    assert rows["good"]["passed"] is True
    assert rows["slow"]["passed"] is False and rows["slow"]["ratio"] == 1.5
    assert rows["broken"]["passed"] is False and rows["broken"]["error"] == "needs forkstat"
    assert rows["bad_rows"]["passed"] is False and "lacks" in rows["bad_rows"]["error"]
    for r in data["rows"]:
        assert set(run_all.FIELDS) <= set(r)


def test_table_and_markdown(run_all, capsys):
    run_all.main([])
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header == ["metric", "ELSA", "peer", "ratio", "target", "result", "reproduce"]
    assert "1 of 4 rows passed" in table
    run_all.main(["--markdown"])
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| metric |") and md[1].startswith("|---|")
    assert len([line for line in md if line.startswith("|")]) == 2 + 4
    assert any("FAIL [1]" in line for line in md)
    assert any(line.startswith("[1] ") for line in md)  # the error notes follow


def test_a_benchmark_that_overruns_is_stopped_and_cleans_up(run_all, tmp_path, capsys):
    marker = tmp_path / "cleaned-up"
    (tmp_path / "bench_hang.py").write_text(
        "import time\n"
        "def main():\n"
        "    try:\n"
        "        time.sleep(60)\n"
        "    except Exception:\n"
        "        return []  # must not swallow the runner's timeout\n"
        "    finally:\n"
        f"        open({str(marker)!r}, 'w').close()\n")
    t0 = time.monotonic()
    assert run_all.main(["--only", "hang", "--only", "good", "--timeout", "0.5"]) == 1
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert marker.exists()
    assert "[1] hang: timed out after 0.5 s" in out
    assert "good one" in out  # the next benchmark still ran


def _module(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                  ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_default_run_fits_run_alls_per_benchmark_limit():
    """The overhead benchmark starts no round after its budget: with the longest
    round seen on a busy 2-core machine (15 s for three pairs with elsad restarts,
    plus the warm-up and the last round's catch-up) it ends before run_all's
    per-benchmark limit kills it."""
    overhead = _module("bench_overhead")
    run_all = _module("run_all")
    longest_round_s = 15.0
    worst = overhead.BUDGET_S + 2 * longest_round_s  # the round running at the budget + warm-up
    assert worst < run_all.DEFAULT_TIMEOUT_S
    import inspect

    assert inspect.signature(overhead.run).parameters["budget"].default == overhead.BUDGET_S


def test_sustained_default_run_fits_run_alls_limit():
    """Each round of the sustained benchmark runs the build twice and the storm three
    times (no elsad, elsad, the C floor), each about SECONDS long: the default rounds,
    with a minute for the calibration and elsad's starts, end within run_all's limit."""
    sustained = _module("bench_sustained")
    run_all = _module("run_all")
    runs = sustained.REPS * (2 + 3)
    assert runs * sustained.SECONDS + 60 < run_all.TIMEOUTS["sustained"]


@pytest.mark.skipif(shutil.which("stress-ng") is None,
                    reason="needs stress-ng (packaging/ci-apt-packages.txt)")
def test_sustained_reads_the_storms_operations_from_stress_ngs_yaml(tmp_path):
    """The storm's figure is its wall per fork operation: the count comes from the
    real stress-ng's --yaml metrics, which it writes only with a metrics option and
    without -q; a file with no count stops the benchmark rather than divide by it."""
    sustained = _module("bench_sustained")
    path = str(tmp_path / "m.yaml")
    subprocess.run(["stress-ng", "--fork", "1", "--timeout", "1s", "--metrics-brief",
                    "--yaml", path], check=True, capture_output=True)
    assert sustained.bogo_ops(path) > 0
    assert not os.path.exists(path)  # the next run cannot be read in its place
    subprocess.run(["stress-ng", "--fork", "1", "--timeout", "1s", "-q", "--yaml", path],
                   check=True, capture_output=True)
    with pytest.raises(SystemExit, match="no bogo-ops count"):
        sustained.bogo_ops(path)
    with pytest.raises(SystemExit, match="wrote no metrics"):
        sustained.bogo_ops(path)


def test_sustained_charges_elsads_catch_up_after_a_run():
    """The last burst hold leaves a run's accounting to after its end: the run with
    elsad is charged that CPU at the rate its own busy CPUs took wall, so a hold
    cannot make the ratio look better than the CPU elsad spent."""
    run = _module("bench_sustained").Run
    # Two busy CPUs: 28.8 s of the workload's CPU and 1.2 s of elsad's in 15 s.
    caught_up = run(wall=15.0, reader_cpu=1.4, deferred_cpu=0.2, members=1, machine=1,
                    work=28.8)
    assert caught_up.charged_wall() == pytest.approx(15.0 + 0.2 / 2.0)
    assert run(15.0, 1.2, 0.0, 1, 1, 28.8).charged_wall() == 15.0
    # A run that kept less than one CPU busy is charged the CPU itself.
    assert run(10.0, 0.5, 0.5, 1, 1, 5.0).charged_wall() == pytest.approx(10.5)
