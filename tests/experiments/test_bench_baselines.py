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
    with pytest.raises(ConfigError, match=r"'hdqt\+xx': the suffixes are \+fh .* and \+ps"):
        bench.recipe_spec("hdqt+xx")
    with pytest.raises(ConfigError, match="the rule must be paper or binary"):
        bench.recipe_spec("hdqt:odd")


def test_points_carry_the_suffixes_into_the_run_configs(bench, tmp_path):
    args = bench.parse_args(["--datasets", "digits", "--methods", "icarl", "--recipes", "fp32,hdqt,hdqt+ps",
                             "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)])
    configs = {label: point.config for _, label, point in bench.build_points(args)}
    assert configs["hdqt+ps"].backward_scales == "sample" and configs["hdqt"].backward_scales is None
    assert configs["hdqt+ps"].identity() != configs["hdqt"].identity()
