"""Float accumulators on hand-made tiles (issue 9, stage 2: the rounding mechanism)."""
from __future__ import annotations

import pytest
import torch

from hdqt.quantization.accumulate import accumulate, accumulator_unit, float_accumulator, float_tiled_matmul
from hdqt.quantization.formats import FloatFormat


def test_accumulator_formats():
    assert float_accumulator(16) == FloatFormat(5, 10, specials="ieee")
    assert float_accumulator(16).max_value() == 65504.0  # IEEE half
    assert float_accumulator(12) == FloatFormat(5, 6, specials="ieee")
    assert float_accumulator(8) == FloatFormat(5, 2, specials="ieee")
    assert float_accumulator(12).max_value() == 2.0**15 * (2 - 2.0**-6)
    assert float_accumulator(4) == FloatFormat(2, 1)
    with pytest.raises(ValueError):
        float_accumulator(3)


def test_half_accumulator_swamps_small_tiles_but_not_one_sum():
    """2048 + 1 is a tie in half (ulp 2 at 2048) and rounds to even, 2048: four tiles of 1
    added one by one are all lost; summed in one tile (tile=None) they are kept."""
    half = float_accumulator(16)
    tiles = torch.tensor([2048.0, 1.0, 1.0, 1.0, 1.0]).reshape(5, 1)
    assert accumulate(tiles, half).item() == 2048.0
    assert accumulate(tiles.sum(0, keepdim=True), half).item() == 2052.0
    # the same with torch's own half arithmetic
    s = torch.tensor(0.0, dtype=torch.float16)
    for t in tiles.flatten():
        s = s + t.half()
    assert s.item() == 2048.0


def test_narrow_accumulators_round_after_every_tile():
    e5m2 = float_accumulator(8)  # values 1, 1.25, 1.5, 1.75 per binade
    tiles = torch.tensor([[1.0], [0.3], [0.3], [0.3]])
    # 1 -> 1.3 rounds to 1.25 -> 1.55 to 1.5 -> 1.8 to 1.75
    assert accumulate(tiles, e5m2).item() == 1.75
    assert accumulate(tiles.sum(0, keepdim=True), e5m2).item() == 2.0  # 1.9 rounds once, to 2
    # saturation instead of overflow
    assert accumulate(torch.tensor([[60000.0], [60000.0]]), e5m2).item() == e5m2.max_value()


def test_units_and_the_tiled_product():
    assert accumulator_unit((448.0, 448.0)) == 2.0**17  # 200704 in [2^17, 2^18)
    torch.manual_seed(0)
    a = torch.randint(-7, 8, (3, 64)).float()
    b = torch.randint(-7, 8, (64, 5)).float()
    exact = a @ b
    wide = float_tiled_matmul(a, b, 32, 32, (7.0, 7.0))
    assert torch.equal(wide, exact)  # float32 accumulator, small integers: exact
    whole = float_tiled_matmul(a, b, None, 8, (7.0, 7.0))
    tiles = torch.stack([a[:, :32] @ b[:32], a[:, 32:] @ b[32:]])
    unit = accumulator_unit((7.0, 7.0))
    assert torch.equal(whole, float_accumulator(8).round_(exact / unit, "nearest") * unit)
    assert torch.equal(float_tiled_matmul(a, b, 32, 8, (7.0, 7.0)), accumulate(tiles, float_accumulator(8), unit))


def test_batched_and_conv_products_round_per_tile():
    from hdqt.quantization.accumulate import float_conv2d, float_tiled_matmul_batched

    torch.manual_seed(1)
    w = torch.randn(4, 40)
    x = torch.randn(3, 40, 6)
    unit = accumulator_unit((3.0, 3.0))
    tiles = torch.stack([torch.matmul(w[:, s:s + 16], x[:, s:s + 16]) for s in (0, 16, 32)])
    got = float_tiled_matmul_batched(w, x, 16, 8, (3.0, 3.0))
    assert torch.equal(got, accumulate(tiles, float_accumulator(8), unit))
    assert torch.allclose(float_tiled_matmul_batched(w, x, 16, 32, (3.0, 3.0)), torch.matmul(w, x), atol=1e-5)
    xi, wi = torch.randn(2, 3, 7, 7), torch.randn(5, 3, 3, 3)
    ref = torch.nn.functional.conv2d(xi, wi, None, (2, 1), (1, 0), (1, 2))
    assert torch.allclose(float_conv2d(xi, wi, (2, 1), (1, 0), (1, 2), 8, 32, (3.0, 3.0)), ref, atol=1e-4)
    half = float_conv2d(xi, wi, (1, 1), (1, 1), (1, 1), 8, 16, (3.0, 3.0))
    assert not torch.equal(half, torch.nn.functional.conv2d(xi, wi, None, 1, 1)) and torch.allclose(
        half, torch.nn.functional.conv2d(xi, wi, None, 1, 1), rtol=1e-2, atol=1e-2)
