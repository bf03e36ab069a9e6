"""benchmarks/bench_cl.py on a tiny digits grid: parallel runs, report, resume."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hdqt.experiments.grid import stat

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stat_is_mean_and_sample_std():
    s = stat([1.0, 2.0, None, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert str(s) == "2.00 ± 1.00"
    assert stat([None]) is None and stat([5.0]).std == 0.0


def test_tiny_grid_runs_in_parallel_and_reports(bench, tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results.md"
    argv = ["--datasets", "digits", "--methods", "icarl,lwf", "--seeds", "0,1", "--epochs", "1",
            "--jobs", "2", "--threads", "1", "--out", str(out), "--results", str(results)]
    assert bench.main(argv) == 0
    text = results.read_text()
    assert "python benchmarks/bench_cl.py --datasets digits" in text  # the exact command
    metrics = json.loads((out / "digits/icarl/hdqt/seed1/metrics.json").read_text())
    assert metrics["complete"] and metrics["recipe"] == "hdqt"
    config = json.loads((out / "digits/icarl/hdqt/seed1/config.json").read_text())["config"]
    assert (config["bits"], config["acc_bits"], config["epochs"]) == (4, 8, 1)

    icarl = {r: stat(json.loads((out / f"digits/icarl/{r}/seed{s}/metrics.json").read_text())
                     ["avg_incremental_accuracy"] for s in (0, 1)) for r in ("fp32", "hdqt")}
    row = next(line for line in text.splitlines() if line.startswith("| iCaRL | nme |"))
    assert f"| {icarl['fp32']} | {icarl['hdqt']} | {icarl['hdqt'].mean - icarl['fp32'].mean:+.2f} |" in row
    assert row.endswith("| 2/2 |")
    assert any(line.startswith("| LwF | cnn |") for line in text.splitlines())
    gap = icarl["fp32"].mean - icarl["hdqt"].mean
    verdict = "met" if gap <= 1.0 else f"missed by {gap - 1.0:.2f}"
    assert f"| digits | iCaRL | {icarl['fp32']} | {icarl['hdqt']} | {gap:.2f} | {verdict} |" in text

    # --report-only reads the finished runs back without training: the same tables.
    def tables(report: str) -> str:
        return report[report.index("## digits"):report.index("Total training time")]

    assert bench.main([*argv, "--report-only"]) == 0
    assert tables(results.read_text()) == tables(text)
