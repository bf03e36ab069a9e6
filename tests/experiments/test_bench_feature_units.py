"""benchmarks/bench_feature_units.py: the A2Q-style tile bound and the dead-unit meter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hdqt.quantization.quantizer import QTensor


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_feature_units")


@pytest.mark.parametrize("acc_bits, tile", [(8, 4), (8, 32), (12, 16), (8, None)])
def test_tile_bound_leaves_no_tile_able_to_saturate(bench, acc_bits, tile):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-7, 8, (6, 3, 3, 5), generator=gen).float()  # a conv weight, K = 45
    bound = bench.TileL1Bound()
    out = bound.shrink(QTensor(codes, 0.25), acc_bits, tile)
    assert out.scale == 0.25 and out.values.shape == codes.shape
    rows = out.values.reshape(6, -1)
    width = tile or rows.shape[1]
    limit = 2 ** (acc_bits - 1) - 1
    for start in range(0, rows.shape[1], width):
        worst = rows[:, start:start + width].abs().sum(dim=1) * bench.TileL1Bound.INPUT_CODE_MAX
        assert (worst <= limit).all()
    # shrunk toward zero, integers, never past the original
    assert torch.equal(out.values, out.values.round())
    assert (out.values.abs() <= codes.abs()).all() and (out.values * codes >= 0).all()
    # an 8-bit accumulator cannot take these tiles whole; a 12-bit one takes 16 codes of 7
    assert (0 < bound.shrunk if acc_bits == 8 else bound.shrunk == 0) and bound.shrunk <= bound.tiles


def test_tile_bound_keeps_tiles_that_fit(bench):
    codes = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])  # 15 * 6 = 90 <= 127
    bound = bench.TileL1Bound()
    assert torch.equal(bound.shrink(QTensor(codes, 1.0), 8, 4).values, codes)
    assert bound.shrunk == 0


def test_meter_counts_units_dead_on_the_whole_batch_in_training_only(bench):
    meter = bench.DeadUnitMeter()
    relu = nn.ReLU()
    relu.register_forward_hook(meter._record)
    relu(torch.tensor([[1.0, -1.0, -1.0, 2.0], [-1.0, -1.0, 3.0, 0.0]]))  # unit 1 dead: 25%
    meter.task = 1
    relu(torch.tensor([[-1.0, -1.0, -1.0, -1.0]]))  # all dead
    relu.eval()
    relu(torch.tensor([[-1.0, -1.0, -1.0, -1.0]]))  # evaluation: not counted
    assert meter.shares() == [25.0, 100.0]
