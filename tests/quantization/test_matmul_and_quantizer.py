import math

import pytest
import torch

from hdqt.quantization import IntFormat, NonFiniteError, int_quantizer
from hdqt.quantization.matmul import tiled_matmul, tiled_matmul_batched


def int64_reference(x: torch.Tensor, w: torch.Tensor, tile: int, acc_bits: int | None) -> torch.Tensor:
    """Tile by tile in int64, saturating each tile's partial sum."""
    x, w = x.long(), w.long()
    k = x.shape[1]
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.long)
    for start in range(0, k, tile):
        part = x[:, start:start + tile] @ w[:, start:start + tile].T
        if acc_bits is not None:
            lim = 2 ** (acc_bits - 1) - 1
            part = part.clamp(-lim, lim)
        out += part
    return out


@pytest.mark.parametrize("acc_bits", [8, 12, 16, None])
@pytest.mark.parametrize("k", [7, 32, 70, 405])
@pytest.mark.parametrize("signed_input", [True, False])
def test_tiled_matmul_equals_int64_reference(acc_bits, k, signed_input):
    g = torch.Generator().manual_seed(k)
    lo = -7 if signed_input else 0
    hi = 8 if signed_input else 16
    x = torch.randint(lo, hi, (9, k), generator=g)
    w = torch.randint(-7, 8, (5, k), generator=g)
    ref = int64_reference(x, w, 32, acc_bits if acc_bits is not None else None)
    out = tiled_matmul(x.float(), w.float(), 32, acc_bits)
    assert torch.equal(out.long(), ref)
    if acc_bits == 8 and k >= 70:
        # the saturating path must actually have saturated something here
        assert not torch.equal(ref, int64_reference(x, w, 32, None))


@pytest.mark.parametrize("acc_bits", [8, 12, None])
def test_batched_tiled_matmul_equals_reference(acc_bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-7, 8, (6, 75), generator=g)
    x = torch.randint(0, 16, (3, 75, 11), generator=g)
    out = tiled_matmul_batched(w.float(), x.float(), 32, acc_bits)
    for b in range(3):
        ref = int64_reference(x[b].T, w, 32, acc_bits).T
        assert torch.equal(out[b].long(), ref)


def test_forward_quantizer_signed_and_unsigned_ranges():
    q = int_quantizer(4, signed="auto", clip_ratio=0.975)
    t = torch.tensor([-2.0, -1.0, 0.0, 0.5, 4.0])
    qt = q.quantize(t)
    assert qt.values.min() >= -7 and qt.values.max() <= 7
    assert math.isclose(qt.scale, 0.975 * 4.0 / 7)
    relu = torch.tensor([0.0, 0.1, 1.0, 2.0])
    qr = q.quantize(relu)
    assert qr.values.max() == 15 and qr.values.min() == 0  # unsigned path uses all 16 levels
    assert math.isclose(qr.scale, 0.975 * 2.0 / 15)
    # values beyond the clip are clamped to the clip
    assert qt.dequantize()[-1].item() == pytest.approx(0.975 * 4.0)


def test_all_zero_tensor_quantizes_to_zero():
    for rounding in ("nearest", "stochastic"):
        qt = int_quantizer(4, rounding=rounding).quantize(torch.zeros(3, 4), torch.Generator().manual_seed(0))
        assert torch.equal(qt.values, torch.zeros(3, 4)) and math.isfinite(qt.scale)


def test_nonfinite_raises_or_propagates():
    q = int_quantizer(4)
    bad = torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteError, match="my operand"):
        q.quantize(bad, role="my operand")
    out = q.quantize(bad, nonfinite="propagate")
    assert torch.isnan(out.dequantize()).all()


def test_stochastic_rounding_is_reproducible():
    # unbiasedness: test_stochastic_rounding_is_unbiased_on_a_fractional_scale
    q = int_quantizer(4, rounding="stochastic")
    t = torch.tensor([7.0, -2.3, 0.61, 3.5, -6.9, 0.05])
    draws = torch.stack([q.quantize(t, torch.Generator().manual_seed(s)).values for s in range(200)])
    assert set(torch.unique(draws[:, 2]).tolist()) == {0.0, 1.0}
    a = q.quantize(t, torch.Generator().manual_seed(5)).values
    b = q.quantize(t, torch.Generator().manual_seed(5)).values
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [1, 17, 4.5])
def test_invalid_bits_raise(bad):
    with pytest.raises(ValueError, match="bits must be an integer in 2..16"):
        IntFormat(bad)


@pytest.mark.parametrize("native_path", ["1", "0"])
def test_stochastic_rounding_never_leaves_the_format(monkeypatch, native_path):
    # max|t| / scale comes out as 7.0000005 in float32 for this magnitude: without a clamp
    # after rounding, the torch path gave codes of +-8 for a signed 4-bit format.
    monkeypatch.setenv("HDQT_NATIVE", native_path)
    t = torch.full((20_000_000,), 4.656279)
    t[::2] = -4.656279
    q = int_quantizer(4, rounding="stochastic")
    values = q.quantize(t, torch.Generator().manual_seed(0)).values
    assert values.max().item() == 7 and values.min().item() == -7


@pytest.mark.parametrize("native_path", ["1", "0"])
def test_stochastic_rounding_is_unbiased_on_a_fractional_scale(monkeypatch, native_path):
    # max|t| = 4.656279 makes the scale fractional (not 1), so every code is a rounded
    # quotient; the mean of many draws must still equal t / scale.
    monkeypatch.setenv("HDQT_NATIVE", native_path)
    t = torch.tensor([4.656279, -2.3, 0.61, 3.5, -4.1, 0.05, -4.656279])
    q = int_quantizer(4, rounding="stochastic")
    draws = torch.stack([q.quantize(t, torch.Generator().manual_seed(s)).values for s in range(4000)])
    scale = q.quantize(t, torch.Generator().manual_seed(0)).scale
    assert scale == pytest.approx(4.656279 / 7)
    # std of a Bernoulli mean over 4000 draws <= 0.5/sqrt(4000) ~ 0.008; allow 4 sigma
    assert torch.allclose(draws.mean(0), t / scale, atol=0.032)
    assert draws.abs().max().item() <= 7


def _rounded_once(exact: torch.Tensor) -> torch.Tensor:
    """An exact int64 result rounded once to float32, as the engine promises."""
    return exact.double().float()


@pytest.mark.parametrize("acc_bits", [None, 32])
def test_products_of_wide_integers_are_exact_beyond_float32(acc_bits):
    # 12-bit operands with K = 4096: partial sums reach ~2^34, far beyond float32's 2^24.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2047, 2048, (6, 4096), generator=g)
    w = torch.randint(-2047, 2048, (5, 4096), generator=g)
    ref = _rounded_once(int64_reference(x, w, 32, acc_bits))
    out = tiled_matmul(x.float(), w.float(), 32, acc_bits, bounds=(2047, 2047))
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    batched = tiled_matmul_batched(w.float(), x.float().T.unsqueeze(0), 32, acc_bits, bounds=(2047, 2047))
    assert torch.equal(batched[0], ref.T)


def test_sum_bound_covers_the_running_sum_of_saturated_tiles():
    from hdqt.quantization.matmul import sum_bound

    # 8-bit operands, tile 32: a tile is below 2^24 but 128 tiles of a 32-bit accumulator are not
    assert sum_bound(4096, (127, 127), 32, 32) == 4096 * 127 * 127
    # an 8-bit accumulator bounds every tile at 127, so the running sum is 128 * 127
    assert sum_bound(4096, (127, 127), 32, 8) == 32 * 127 * 127
    assert sum_bound(4096, (7, 7), None, None) == 4096 * 49


def test_linear_backward_products_of_wide_integers_are_exact():
    from hdqt.quantization import QuantLinear, QuantPolicy

    near = int_quantizer(12)  # round to nearest everywhere: the reference can redo each step
    policy = QuantPolicy(forward_input=near, forward_weight=near, backward_input=near, backward_weight=near,
                         grad_output_dx=near, grad_output_dw=near, acc_bits=None)
    gen = torch.Generator().manual_seed(0)
    # dX reduces over the 4096 output features, dW over the batch of 2048
    layer = QuantLinear(8, 4096, bias=False, policy=policy)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4096, 8, generator=gen))
    x = torch.randn(2048, 8, generator=gen, requires_grad=True)
    grad_out = torch.randn(2048, 4096, generator=gen)
    layer(x).backward(grad_out)

    xq, wq = near.quantize(x.detach()), near.quantize(layer.weight.detach())
    gq = near.quantize(grad_out)
    # the backward operands are the quantized forward operands, quantized again
    wb, xb = near.quantize(wq.values), near.quantize(xq.values)
    ref_dx = (gq.values.long() @ wb.values.long()).double() * (gq.scale * wb.scale * wq.scale)
    ref_dw = (gq.values.long().T @ xb.values.long()).double() * (gq.scale * xb.scale * xq.scale)
    # one rounding of the exact sum to float32 and one of the scale product: within 3e-7 relative
    for got, ref in ((x.grad, ref_dx), (layer.weight.grad, ref_dw)):
        assert torch.all((got.double() - ref).abs() <= 3e-7 * ref.abs() + 1e-30)
