"""benchmarks/bench_cl.py on a tiny digits grid: parallel runs, report, resume."""
from __future__ import annotations

import json

import pytest

from hdqt.experiments.grid import fmt_delta, stat


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_cl")


def test_stat_is_mean_and_sample_std():
    s = stat([1.0, 2.0, None, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert str(s) == "2.00 ± 1.00"
    assert stat([None]) is None and stat([5.0]).std == 0.0
    # one seed has no spread to show: the tables say so instead of "± 0.00"
    assert str(stat([5.0])) == "5.00 (1 seed)" and fmt_delta(stat([-1.5])) == "-1.50 (1 seed)"
    assert fmt_delta(s) == "+2.00 ± 1.00" and fmt_delta(None) == "n/a"


def read(out, run):
    return json.loads((out / run / "metrics.json").read_text())


@pytest.mark.slow  # a grid of runs in worker processes
def test_tiny_grid_runs_in_parallel_and_reports_paired_differences(bench, tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results.md"
    argv = ["--datasets", "digits", "--methods", "icarl,lwf", "--seeds", "0,1", "--epochs", "1",
            "--jobs", "2", "--threads", "1", "--out", str(out), "--results", str(results)]
    assert bench.main(argv) == 0
    text = results.read_text()
    assert "python benchmarks/bench_cl.py --datasets digits" in text  # the exact command
    metrics = read(out, "digits/icarl/hdqt/seed1")
    assert metrics["complete"] and metrics["recipe"] == "hdqt"
    config = json.loads((out / "digits/icarl/hdqt/seed1/config.json").read_text())["config"]
    assert (config["bits"], config["acc_bits"], config["epochs"]) == (4, 8, 1)

    lines = text.splitlines()
    for classifier, label in (("nme", "nme*"), ("cnn", "cnn")):  # both, primary first
        runs = {(r, s): read(out, f"digits/icarl/{r}/seed{s}")[classifier]
                for r in ("fp32", "hdqt") for s in (0, 1)}
        acc = {r: stat(runs[(r, s)]["avg_incremental_accuracy"] for s in (0, 1))
               for r in ("fp32", "hdqt")}
        # paired: per seed hdqt - fp32, then mean ± std over seeds
        paired = stat(runs[("hdqt", s)]["avg_incremental_accuracy"]
                      - runs[("fp32", s)]["avg_incremental_accuracy"] for s in (0, 1))
        row = next(line for line in lines if line.startswith(f"| iCaRL | {label} |"))
        delta = f"{paired.mean:+.2f} ± {paired.std:.2f}"
        assert f"| {acc['fp32']} | {acc['hdqt']} | {delta} |" in row
        assert row.endswith("| 2/2 |")
        verdict = "met" if paired.mean >= -1.0 else f"missed by {-paired.mean - 1.0:.2f}"
        assert (f"| digits | iCaRL | {label} | {acc['fp32']} | {acc['hdqt']} | {delta} | 2 | "
                f"{verdict} |") in text
    assert lines.index(next(x for x in lines if x.startswith("| iCaRL | nme* |"))) + 1 == \
        lines.index(next(x for x in lines if x.startswith("| iCaRL | cnn |")))
    assert any(line.startswith("| LwF | cnn* |") for line in lines)
    assert not any(line.startswith("| LwF | nme") for line in lines)  # no exemplars

    # --report-only reads the finished runs back without training: the same tables.
    def tables(report: str) -> str:
        return report[report.index("## digits"):report.index("Total training time")]

    assert bench.main([*argv, "--report-only"]) == 0
    assert tables(results.read_text()) == tables(text)

    # A run made by other code is not reused: left out of a report, rerun by a run.
    stale = out / "digits/lwf/fp32/seed1"
    payload = json.loads((stale / "config.json").read_text())
    payload["code"] = {"source_sha256": "0" * 64, "git_commit": None}
    (stale / "config.json").write_text(json.dumps(payload))
    # a complete run's reports are rewritten on every pass; its checkpoint only by training
    kept = (out / "digits/lwf/fp32/seed0/checkpoint.pt").stat().st_mtime_ns
    retrained = (stale / "checkpoint.pt").stat().st_mtime_ns
    assert bench.main([*argv, "--report-only"]) == 1
    report = results.read_text()
    assert "## Runs not included" in report
    assert "`digits/lwf/fp32/seed1`: made by source 000000000000" in report
    assert bench.main(argv) == 0
    assert json.loads((stale / "config.json").read_text())["code"] != payload["code"]
    assert (out / "digits/lwf/fp32/seed0/checkpoint.pt").stat().st_mtime_ns == kept
    assert (stale / "checkpoint.pt").stat().st_mtime_ns != retrained
    assert tables(results.read_text()) == tables(text)  # same code, same seed: same result


def test_paired_differences_match_seeds_and_skip_other_class_orders(bench):
    def run(order, acc):
        return {"class_order": order, "cnn": {"avg_incremental_accuracy": acc}}

    base = {0: run([0, 1], 80.0), 1: run([1, 0], 70.0), 2: run([0, 1], 60.0)}
    other = {0: run([0, 1], 79.0), 1: run([0, 1], 90.0), 3: run([0, 1], 10.0)}
    # seed 1: other class order; seeds 2, 3: no pair
    assert bench.paired_differences(base, other, "cnn", "avg_incremental_accuracy") == [-1.0]
    assert bench.paired_differences(base, other, "nme", "avg_incremental_accuracy") == []


def test_default_seeds_are_five(bench):
    assert bench.parse_args([]).seeds == "0,1,2,3,4"


def test_fashion_mnist_targets_judge_average_and_last_accuracy_with_their_own_gaps(bench):
    # issue 15: within 3 points in average incremental accuracy and 5 in last accuracy
    def run(avg, last):
        return {"class_order": [0, 1], "primary_classifier": "cnn",
                "cnn": {"avg_incremental_accuracy": avg, "last_accuracy": last}}

    runs = {("fashion_mnist", "icarl", "fp32"): {0: run(80.0, 80.0), 1: run(70.0, 60.0)},
            ("fashion_mnist", "icarl", "hdqt"): {0: run(78.0, 73.0), 1: run(67.0, 56.0)},
            ("dsads", "icarl", "fp32"): {0: run(90.0, 85.0)},
            ("dsads", "icarl", "hdqt"): {0: run(88.5, 70.0)}}
    args = bench.parse_args(["--datasets", "fashion_mnist,dsads", "--methods", "icarl",
                             "--seeds", "0,1"])
    lines = bench._target_section(args, "fp32", ["hdqt"], runs)
    text = "\n".join(lines)
    last = lines.index(next(x for x in lines if x.startswith("### Last accuracy")))
    average, after = lines[:last], lines[last:]
    # average: Fashion-MNIST -2.50 within 3 (met); DSADS -1.50 misses its 1.0 by 0.50
    assert any(x.startswith("| Fashion-MNIST | iCaRL | cnn* |") and "| -2.50 ± 0.71 | 2 | met |" in x
               for x in average), text
    assert any(x.startswith("| DSADS | iCaRL | cnn* |") and "| missed by 0.50 |" in x
               for x in average), text
    # last: Fashion-MNIST -5.50 misses 5 by 0.50; DSADS has no last-accuracy target
    assert any(x.startswith("| Fashion-MNIST | iCaRL | cnn* |") and "| -5.50 ± 2.12 | 2 | missed by 0.50 |" in x
               for x in after), text
    assert not any(x.startswith("| DSADS") for x in after), text
    assert "Fashion-MNIST 3, DSADS 1" in text and "Fashion-MNIST 5" in text
