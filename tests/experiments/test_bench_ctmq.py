"""bench_ctmq.py's grid: the runs it asks for (no training here)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_ctmq")


def test_grid_pairs_direct_and_ctmq_runs_per_target_and_seed(bench, tmp_path):
    args = bench.parse_args(["--datasets", "dsads", "--targets", "2,binary", "--seeds", "0,1", "--epochs", "16",
                             "--out", str(tmp_path)])
    points, notes = bench.build_points(args)
    assert not notes and len(points) == 2 * 2 * 2
    ctmq = [p.config for p in points if p.config.schedule == "ctmq"]
    assert {(c.recipe, c.bits, c.ctmq_recipe) for c in ctmq} == {("hdqt", 2, "hdqt"), ("hadanet", None, "hdqt")}
    assert all(p.config.weight_scales is None for p in points)
    assert {p.out_dir.relative_to(tmp_path).parts[1:3] for p in points} == {
        ("target2", "direct"), ("target2", "ctmq"), ("targetbinary", "direct"), ("targetbinary", "ctmq")}


def test_weight_scales_channel_reaches_every_run(bench, tmp_path):
    """The integer targets and CTMQ's integer steps scale their weights per channel; a
    binary target's own policy is hadanet's unchanged (a beta per row already)."""
    args = bench.parse_args(["--datasets", "dsads", "--targets", "3,binary", "--seeds", "0", "--epochs", "16",
                             "--weight-scales", "channel", "--out", str(tmp_path)])
    points, notes = bench.build_points(args)
    assert not notes and [p.config.weight_scales for p in points] == ["channel"] * 4
    assert {(p.config.recipe, p.config.schedule) for p in points} == {
        ("hdqt", "none"), ("hdqt", "ctmq"), ("hadanet", "none"), ("hadanet", "ctmq")}
