"""benchmarks/bench_baselines.py: recipe tokens (rule and suffixes) become run options."""
from __future__ import annotations

import pytest

from hdqt.experiments.config import ConfigError


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_baselines")


def test_recipe_tokens_give_the_rule_and_the_suffixes_options(bench):
    assert bench.recipe_spec("hdqt") == ("hdqt", None, {})
    assert bench.recipe_spec("hdqt:binary+ps") == ("hdqt", "binary", {"backward_scales": "sample"})
    assert bench.recipe_spec("luq+fh+ps") == ("luq", None, {"forward_hadamard": True, "backward_scales": "sample"})
    assert bench.recipe_spec("luq+t0") == ("luq", None, {"tile": 0})
    with pytest.raises(ConfigError, match=r"'hdqt\+xx': the suffixes are \+fh .*, \+ps .* and \+t0"):
        bench.recipe_spec("hdqt+xx")
    with pytest.raises(ConfigError, match="the rule must be paper or binary"):
        bench.recipe_spec("hdqt:odd")


def test_points_carry_the_suffixes_into_the_run_configs(bench, tmp_path):
    args = bench.parse_args(["--datasets", "digits", "--methods", "icarl", "--recipes", "fp32,hdqt,hdqt+ps,luq+t0",
                             "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)])
    points, refused = bench.build_points(args)
    assert refused == {}
    configs = {label: point.config for _, label, point in points}
    assert configs["hdqt+ps"].backward_scales == "sample" and configs["hdqt"].backward_scales is None
    assert configs["hdqt+ps"].identity() != configs["hdqt"].identity()
    # +t0 is the command line's --tile 0: the whole reduction is one tile (the engine's None)
    assert configs["luq+t0"].tile == 0 and configs["hdqt"].tile is None


def test_an_accumulator_the_engine_refuses_is_reported_not_fatal(bench, tmp_path):
    # 4-bit codes on a 4-bit integer accumulator: one product (15 x 7) is above its largest value (7)
    args = bench.parse_args(["--datasets", "digits", "--methods", "icarl", "--recipes", "fp32,int,fp134",
                             "--acc-bits", "4,8", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)])
    points, refused = bench.build_points(args)
    assert list(refused) == [("digits", "icarl", 4, "int")]
    assert "acc_bits=4 cannot hold one product" in refused[("digits", "icarl", 4, "int")]
    assert [(acc, label) for acc, label, _ in points] == [(None, "fp32"), (8, "int"), (4, "fp134"), (8, "fp134")]
    text = bench.render(args, "cmd", points, [], 0.0, refused)
    assert "| int | - | refused by the engine: " in text and "acc_bits=4 cannot hold one product" in text
    assert "- 1 epoch(s) per task." in text
    # a setting wrong for every accumulator is still an error
    bad = bench.parse_args(["--datasets", "digits", "--methods", "icarl", "--recipes", "fp32,int",
                            "--bits", "99", "--acc-bits", "8", "--out", str(tmp_path)])
    with pytest.raises(ConfigError):
        bench.build_points(bad)


def test_bits_and_tile_off_their_defaults_get_their_own_folders(bench, tmp_path):
    def folders(*extra):
        args = bench.parse_args(["--datasets", "digits", "--methods", "icarl", "--recipes", "fp32,int,fp134",
                                 "--seeds", "0", "--out", str(tmp_path), *extra])
        return {label: point.out_dir.relative_to(tmp_path).parts[2] for _, label, point in bench.build_points(args)[0]}

    assert folders() == {"fp32": "shared", "int": "acc8", "fp134": "acc8"}
    # fp32 and the float recipes take no --bits: their runs are shared with the 4-bit grid
    assert folders("--bits", "3") == {"fp32": "shared", "int": "acc8-bits3", "fp134": "acc8"}
    assert folders("--tile", "0") == {"fp32": "shared", "int": "acc8-tile0", "fp134": "acc8-tile0"}


def test_report_only_trains_nothing_and_reports_the_finished_runs(bench, tmp_path):
    common = ["--datasets", "digits", "--methods", "icarl", "--seeds", "0", "--epochs", "1", "--out",
              str(tmp_path / "runs")]
    # one finished run (fp32), made by the grid
    assert bench.main([*common, "--recipes", "fp32", "--results", str(tmp_path / "fp32.md")]) == 0
    report = tmp_path / "report.md"
    assert bench.main([*common, "--recipes", "fp32,int", "--results", str(report), "--report-only"]) == 1
    text = report.read_text()
    assert "--report-only" not in text  # the command that makes the runs
    fp32_rows = [line for line in text.splitlines() if line.startswith("| fp32 |")]
    int_rows = [line for line in text.splitlines() if line.startswith("| int |")]
    assert fp32_rows and all(line.rstrip().endswith("| 1 |") for line in fp32_rows)
    assert int_rows and all(line.rstrip().endswith("| 0 |") for line in int_rows)
    assert "## Runs not included" in text and "int/seed0" in text
    assert not any((tmp_path / "runs").rglob("int/seed0/metrics.json"))  # nothing was trained
