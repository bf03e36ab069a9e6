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


# ---------------------------------------------------------------- wired into the layers
import torch.nn as nn  # noqa: E402

import hdqt  # noqa: E402
from hdqt.quantization.accumulate import float_conv2d  # noqa: E402
from hdqt.quantization.formats import FP8_E4M3  # noqa: E402
from hdqt.quantization.quantizer import Quantizer  # noqa: E402


def _quantized_operands(policy, x, w):
    q = hdqt.quantize_model(nn.Sequential(nn.Linear(1, 1)), policy)[0]._rt
    return q.quantize(policy.forward_input, x, "forward input"), q.quantize(policy.forward_weight, w, "forward weight")


def test_linear_forward_sums_tiles_in_the_float_accumulator():
    torch.manual_seed(2)
    x, w = torch.randn(8, 256), torch.randn(5, 256)
    for acc in (8, 12):
        policy = hdqt.recipe("fp8_e4m3", acc_bits=acc, seed=0)
        layer = hdqt.quantize_model(nn.Sequential(nn.Linear(256, 5, bias=False)), policy)[0]
        layer.weight.data.copy_(w)
        xq, wq = _quantized_operands(policy, x, w)
        expected = float_tiled_matmul(xq.values, wq.values.T, 32, acc, (448.0, 448.0)) * (xq.scale * wq.scale)
        got = layer(x)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
        unlimited = (xq.values @ wq.values.T) * (xq.scale * wq.scale)
        assert not torch.allclose(got, unlimited, rtol=1e-4, atol=1e-4)  # the accumulator rounds


def test_conv_forward_and_backward_with_float_accumulators():
    torch.manual_seed(3)
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
    policy = hdqt.recipe("fp8_e5m2", acc_bits=8, seed=0)
    layer = hdqt.quantize_model(nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, bias=False)), policy)[0]
    layer.weight.data.copy_(w)
    xq, wq = _quantized_operands(policy, x, w)
    m = 57344.0
    expected = float_conv2d(xq.values, wq.values, (1, 1), (1, 1), (1, 1), 32, 8, (m, m)) * (xq.scale * wq.scale)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    # saturate_backward: the backward products are summed in the float accumulator too
    both = hdqt.recipe("fp8_e5m2", acc_bits=8, saturate_backward=True, seed=0,
                       backward_weight=Quantizer(FP8_E4M3), backward_input=Quantizer(FP8_E4M3, rounding="stochastic"))
    grads = []
    for p in (both, hdqt.recipe("fp8_e5m2", acc_bits=None, seed=0, backward_weight=both.backward_weight,
                                backward_input=both.backward_input)):
        layer = hdqt.quantize_model(nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, bias=False)), p)[0]
        layer.weight.data.copy_(w)
        xi = x.clone().requires_grad_()
        layer(xi).square().sum().backward()
        assert torch.isfinite(xi.grad).all() and torch.isfinite(layer.weight.grad).all()
        grads.append((xi.grad, layer.weight.grad))
    cos = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in zip(*grads)]
    assert all(c > 0.9 for c in cos) and not torch.equal(grads[0][0], grads[1][0])
