"""Formats, scalings and the baseline recipes (issue 9, stage 1).

Each format's value set is enumerated and checked against its definition; rounding
onto every format is checked against a brute-force nearest search over ``values()``
and for unbiasedness; FP134's tracked exponent follows a tensor over 10^6 and
survives a state_dict round trip; every recipe trains digits well above chance."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import hdqt
from hdqt.quantization.formats import (
    FP4_E2M1, FP8_E4M3, FP8_E5M2, FP134, FloatFormat, IntFormat, LogFormat, format_from_dict,
)
from hdqt.quantization.policy import QuantPolicy
from hdqt.quantization.quantizer import Quantizer
from hdqt.quantization.scaling import (
    DynamicScaling, ExponentBiasScaling, SAWBScaling, sawb_coefficients, scaling_from_dict,
)

ALL_FORMATS = [FP8_E4M3, FP8_E5M2, FP4_E2M1, FP134, LogFormat(4), LogFormat(3), IntFormat(4),
               FloatFormat(3, 2, subnormals=False), FloatFormat(5, 2, specials="ieee", saturate=False)]


# ---------------------------------------------------------------- value sets
@pytest.mark.parametrize("fmt, count, largest, smallest_normal, smallest", [
    # 256 codes - 2 NaN patterns (S.1111.111), +-0 counted once
    (FP8_E4M3, 253, 448.0, 2.0**-6, 2.0**-9),
    # 256 codes - 2 x (inf + 3 NaN), +-0 once
    (FP8_E5M2, 247, 57344.0, 2.0**-14, 2.0**-16),
    (FP4_E2M1, 15, 6.0, 1.0, 0.5),
    # lptorch's '555555543210': 7 normal binades of 16 + subnormals 8+4+2+1, no specials
    (FP134, 255, 31.0, 0.25, 2.0**-6),
])
def test_float_value_sets(fmt, count, largest, smallest_normal, smallest):
    v = fmt.values()
    assert v.numel() == count
    assert v.max().item() == largest == fmt.max_value() == fmt.max_magnitude() == -v.min().item()
    assert fmt.min_normal() == smallest_normal and fmt.min_subnormal() == smallest
    pos = v[v > 0]
    assert pos.min().item() == smallest
    subnormals = pos[pos < smallest_normal]
    assert subnormals.numel() == 2**fmt.man_bits - 1  # m * 2^(emin - man), m = 1 .. 2^man - 1
    assert torch.equal(subnormals, torch.arange(1, 2**fmt.man_bits, dtype=torch.float64) * smallest)
    assert torch.equal(v, torch.sort(v).values) and v.unique().numel() == count
    # every normal binade holds 2^man values, spaced 2^(e - man)
    for e in range(fmt.emin, fmt.emax):
        binade = pos[(pos >= 2.0**e) & (pos < 2.0 ** (e + 1))]
        assert binade.numel() == 2**fmt.man_bits
        assert torch.all(binade.diff() == 2.0 ** (e - fmt.man_bits))


def test_fp4_e2m1_values_exactly():
    assert FP4_E2M1.values()[7:].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_fp134_matches_lptorch_digit_string():
    """Each digit d of '555555543210' is the resolution of one binade below the top
    (mantissa in [0.5, 1) rounded to multiples of 2^-d): 2^(d-1) values per binade for
    d >= 1, none new for the last (it rounds to 0 or the smallest subnormal)."""
    digits = [5, 5, 5, 5, 5, 5, 5, 4, 3, 2, 1, 0]
    top = FP134.emax
    expected = set()
    for i, d in enumerate(digits):
        e = top - i  # binade [2^e, 2^(e+1))
        for k in range(2 ** (d - 1) if d else 0):
            expected.add(math.ldexp(0.5 + k / 2**d, e + 1))
    pos = FP134.values()
    assert sorted(expected) == pos[pos > 0].tolist()


def test_log_format_values():
    v = LogFormat(4).values()
    assert v[v > 0].tolist() == [1, 2, 4, 8, 16, 32, 64] and v.numel() == 15  # 2^4 - 1: one zero
    assert LogFormat(3).values()[LogFormat(3).values() > 0].tolist() == [1, 2, 4]


def test_float_format_saturation_specials_and_signed_zero():
    x = torch.tensor([1000.0, -1000.0, 470.0, 464.0, 1e-9, -1e-9, -0.0, 0.0])
    r = FP8_E4M3.round_(x.clone(), "nearest")
    assert r[:3].tolist() == [448.0, -448.0, 448.0]  # saturated (480 would be the NaN code)
    assert r[3].item() == 448.0  # 464 = 14.5 * 32: ties to even
    assert r[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert [math.copysign(1, z) for z in r[4:].tolist()] == [1, -1, -1, 1]  # signed zero kept
    s = FP8_E4M3.round_(torch.full((1000,), -1e-9), "stochastic", torch.Generator().manual_seed(0))
    assert torch.all(torch.signbit(s))
    inf = FloatFormat(5, 2, specials="ieee", saturate=False).round_(torch.tensor([61440.0, 61439.0, -1e6]), "nearest")
    assert inf.tolist() == [math.inf, 57344.0, -math.inf]  # IEEE: the midpoint above max rounds to inf
    nan = FloatFormat(4, 3, specials="fn", saturate=False).round_(torch.tensor([480.0]), "nearest")
    assert math.isnan(nan.item())
    flush = FloatFormat(3, 2, subnormals=False)
    assert flush.values()[flush.values() > 0].min().item() == flush.min_normal() == 0.25
    assert flush.round_(torch.tensor([0.1, 0.13, 0.2]), "nearest").tolist() == [0.0, 0.25, 0.25]
    with pytest.raises(ValueError, match="saturate=False needs"):
        FloatFormat(2, 1, saturate=False)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_round_to_nearest_is_the_nearest_value(fmt):
    grid = fmt.values().float() if not isinstance(fmt, IntFormat) else fmt.values(signed=True).float()
    top = grid.max().item()
    x = torch.cat([torch.randn(4000, generator=torch.Generator().manual_seed(1)) * top / 3, grid,
                   (grid[1:] + grid[:-1]) / 2 + 1e-3 * grid[1:].abs().clamp(min=1e-3)])
    x = x.clamp(-top, top)
    r = fmt.round_(x.clone(), "nearest")
    nearest_dist = (x[:, None] - grid[None, :]).abs().min(1).values
    assert torch.all((r - x).abs() <= nearest_dist * (1 + 1e-6) + 1e-12)
    assert torch.all(torch.isin(r, grid))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_stochastic_rounding_lands_on_neighbours_and_is_unbiased(fmt):
    """Each of 40 inputs (spread over the range, under the smallest level too) is
    rounded 20000 times: every result is one of its two neighbours in values(), and
    the mean is within 5 standard errors of the input (the draws' own spread, bounded
    by the gap between the neighbours: sd <= gap / 2)."""
    grid = fmt.values().float() if not isinstance(fmt, IntFormat) else fmt.values(signed=True).float()
    top = grid.max().item()
    pos = grid[grid > 0]
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.rand(20, generator=gen) * pos.min() * 1.0,  # below the smallest level
                   torch.rand(20, generator=gen) * top]) * torch.where(torch.rand(40, generator=gen) < 0.5, -1, 1)
    draws = 20000
    rep = x.repeat(draws, 1)
    r = fmt.round_(rep.clone(), "stochastic", gen)
    assert torch.all(torch.isin(r, grid))
    idx = torch.searchsorted(grid, x)
    lo, hi = grid[(idx - 1).clamp(min=0)], grid[idx.clamp(max=grid.numel() - 1)]
    lo = torch.where(grid[idx.clamp(max=grid.numel() - 1)] == x, x, lo)
    assert torch.all((r >= lo) & (r <= hi))
    gap = (hi - lo).double()
    bound = 5 * (gap / 2) / math.sqrt(draws) + 1e-7
    assert torch.all((r.double().mean(0) - x.double()).abs() <= bound), (r.double().mean(0) - x.double()).abs().max()


def test_luq_log_rounding_probabilities():
    """LUQ: x in [2^k, 2^(k+1)) goes up with probability (x - 2^k)/2^k; below 1 it becomes 1
    with probability x, else 0 (stochastic underflow)."""
    fmt, gen, n = LogFormat(4), torch.Generator().manual_seed(3), 200000
    for x, up_value, p_up in [(0.3, 1.0, 0.3), (0.05, 1.0, 0.05), (3.0, 4.0, 0.5), (5.0, 8.0, 0.25), (40.0, 64.0, 0.25)]:
        r = fmt.round_(torch.full((n,), x), "stochastic", gen)
        share = (r == up_value).double().mean().item()
        assert abs(share - p_up) < 5 * math.sqrt(p_up * (1 - p_up) / n)
        assert set(r.unique().tolist()) <= {up_value, up_value / 2 if x >= 1 else 0.0}


def test_formats_and_scalings_round_trip():
    for fmt in ALL_FORMATS:
        assert format_from_dict(fmt.to_dict()) == fmt
    for sc in (DynamicScaling(0.9), SAWBScaling(1.0, 2.0), ExponentBiasScaling(0)):
        assert scaling_from_dict(sc.to_dict()) == sc
    with pytest.raises(ValueError, match="format kind"):
        format_from_dict({"kind": "posit"})
    with pytest.raises(ValueError, match="unknown float format field"):
        format_from_dict({"kind": "float", "exp_bits": 4, "man_bits": 3, "bias": 3})
    q = Quantizer(FP134, ExponentBiasScaling(), "stochastic")
    assert Quantizer.from_dict(q.to_dict()) == q
    qs = Quantizer(IntFormat(4), granularity="sample")
    assert Quantizer.from_dict(qs.to_dict()) == qs and "granularity" not in Quantizer().to_dict()
    for name in hdqt.list_recipes():
        policy = hdqt.recipe(name)
        assert QuantPolicy.from_json(policy.to_json()) == policy


# ---------------------------------------------------------------- scalings
def test_sawb_clip():
    x = torch.randn(100000, generator=torch.Generator().manual_seed(4))
    x[0] = 50.0  # an outlier: max scaling would waste the grid on it
    q = Quantizer(IntFormat(4), SAWBScaling(12.1, 12.2))
    out = q.quantize(x)
    clip = 12.1 * x.square().mean().sqrt() - 12.2 * x.abs().mean()
    assert out.scale == pytest.approx(clip.item() / 7, rel=1e-5)
    assert out.values.abs().max() == 7 and out.values[0] == 7  # the outlier is clipped
    assert sawb_coefficients(4) == (12.1, 12.2)
    const = Quantizer(IntFormat(4), SAWBScaling()).quantize(torch.full((10,), 2.0))  # clip < 0: max instead
    assert torch.equal(const.dequantize(), torch.full((10,), 2.0))


def test_per_sample_scales():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 30, generator=gen) * torch.logspace(-3, 3, 8)[:, None]
    q = Quantizer(IntFormat(4), DynamicScaling(), "nearest", granularity="sample")
    out = q.quantize(x)
    assert out.scale.shape == (8, 1)
    assert torch.allclose(out.scale.squeeze(), x.abs().amax(1) / 7)
    assert torch.all(out.values.abs().amax(1) == 7)  # every sample uses the whole grid
    per_tensor = Quantizer(IntFormat(4)).quantize(x)
    err_s = ((out.dequantize() - x).abs().amax(1) / x.abs().amax(1))
    err_t = ((per_tensor.dequantize() - x).abs().amax(1) / x.abs().amax(1))
    assert err_s.max() <= 0.5 / 7 + 1e-6 and err_t[:4].min() > 0.5  # small samples vanish per tensor
    cols = Quantizer(FP8_E4M3, granularity="sample").quantize(x.T.contiguous(), sample_dim=1)
    assert cols.scale.shape == (1, 8)
    with pytest.raises(ValueError, match="no sample dimension"):
        QuantPolicy(forward_weight=q)
    with pytest.raises(ValueError, match="per-sample"):
        QuantPolicy(forward_input=q, forward_weight=Quantizer(IntFormat(4)), acc_bits=8)


def test_fp134_exponent_tracks_a_tensor_over_1e6_and_survives_state_dict():
    """The tensor's scale rises by 10^6 over 60 steps and falls back: at every step its
    maximum is represented within FP134's relative precision (no overflow: nothing
    clipped) and most values stay nonzero (no flush)."""
    layer = hdqt.quantize_model(nn.Sequential(nn.Linear(16, 4, bias=False)), hdqt.recipe("fp134", seed=0))[0]
    rt = layer._rt
    q = rt.policy.forward_input
    gen = torch.Generator().manual_seed(6)
    scales = [10 ** (6 * i / 60) for i in range(61)] + [10 ** (6 - 6 * i / 60) for i in range(1, 61)]
    exps = []
    for s in scales:
        x = torch.randn(256, 16, generator=gen) * s
        out = rt.quantize(q, x, "forward input")
        deq = out.dequantize()
        assert (deq.abs().max() - x.abs().max()).abs() <= x.abs().max() / 32  # half a mantissa step: not clipped
        assert (deq != 0).float().mean() > 0.95
        exps.append(rt.scaling_state["forward input"]["exponent"])
    assert max(exps) - min(exps) >= 19  # it moved ~log2(10^6) binades
    state = layer.state_dict()
    fresh = hdqt.quantize_model(nn.Sequential(nn.Linear(16, 4, bias=False)), hdqt.recipe("fp134", seed=0))[0]
    fresh.load_state_dict(state)
    assert fresh._rt.scaling_state == rt.scaling_state
    # a fresh layer without the state would pick its exponent from the tensor instead
    x = torch.randn(256, 16, generator=gen)
    a = rt.quantize(q, x * 1.9, "forward input")
    b = fresh._rt.quantize(q, x * 1.9, "forward input")
    assert a.scale == b.scale and torch.equal(a.values, b.values)


def test_fp134_without_tracking_state_uses_the_tensor_max():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(7)) * 1e-4
    out = Quantizer(FP134, ExponentBiasScaling(room=0)).quantize(x)
    e = math.frexp(x.abs().max().item())[1] - 1
    assert out.scale == math.ldexp(1.0, e - FP134.emax)


# ---------------------------------------------------------------- policies and recipes
def test_accumulator_check_is_format_aware():
    assert hdqt.recipe("luq").acc_bits == 8  # integer SAWB forward: 7 x 15 fits 8 bits
    assert hdqt.recipe("fp134").acc_bits == 8  # the paper's comparison: 8-bit accumulators
    for name in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"):
        assert hdqt.recipe(name).acc_bits == 16  # FP16 chunk accumulation
        assert hdqt.recipe(name, acc_bits=None).acc_bits is None
    with pytest.raises(ValueError, match="float accumulator of at least 4 bits"):
        hdqt.recipe("fp134", acc_bits=3)
    with pytest.raises(ValueError, match="unquantized operand"):
        hdqt.recipe("luq", saturate_backward=True)  # log gradients x the forward's (unquantized) weights
    with pytest.raises(ValueError, match="4 bits"):
        hdqt.recipe("fp4_e2m1", bits=8)
    assert hdqt.recipe("fp4_e2m1", bits=4) == hdqt.recipe("fp4_e2m1")


def test_recipes_assign_the_documented_operands():
    luq = hdqt.recipe("luq", bits=4)
    assert isinstance(luq.forward_weight.scaling, SAWBScaling) and luq.forward_weight.format == IntFormat(4)
    assert luq.grad_output_dx == luq.grad_output_dw == Quantizer(LogFormat(4), DynamicScaling(), "stochastic")
    assert luq.backward_weight is None and luq.backward_input is None
    fp = hdqt.recipe("fp134")
    assert fp.forward_input.format == FP134 and fp.forward_input.rounding == "nearest"
    assert fp.grad_output_dw.rounding == "stochastic" and isinstance(fp.grad_output_dw.scaling, ExponentBiasScaling)


def test_float_formats_run_a_conv_layer():
    """The torch path (float formats, per-sample scales) through a conv layer's three products."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    ref = conv(x)
    ref.square().sum().backward()
    gx, gw = x.grad.clone(), conv.weight.grad.clone()
    for policy in (hdqt.recipe("fp8_e4m3", seed=0),
                   hdqt.recipe("fp8_e5m2", seed=0,
                               grad_output_dw=Quantizer(FP8_E5M2, rounding="stochastic", granularity="sample"),
                               grad_output_dx=Quantizer(FP8_E5M2, rounding="stochastic", granularity="sample"))):
        q = hdqt.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), policy)[0]
        q.weight.data.copy_(conv.weight.data)
        q.bias.data.copy_(conv.bias.data)
        x.grad = None
        y = q(x)
        y.square().sum().backward()
        assert torch.allclose(y, ref, rtol=0.1, atol=0.1)
        assert (x.grad - gx).norm() / gx.norm() < 0.1 and (q.weight.grad - gw).norm() / gw.norm() < 0.1


def _train_digits(policy, epochs=4):
    torch.manual_seed(0)
    data = hdqt.data.prepare("digits")
    model = hdqt.models.create_model("fcnet", data.input_shape)
    model = hdqt.quantize_model(model, policy)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (model(torch.from_numpy(data.x_test)).argmax(1) == torch.from_numpy(data.y_test)).float().mean().item()


@pytest.mark.parametrize("name", ["luq", "fp134", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_recipe_trains_digits(name):
    """Wiring only: 4 epochs of FCNet on digits (10 classes, chance 0.1) reach >= 0.8."""
    assert _train_digits(hdqt.recipe(name, seed=0)) >= 0.8


def test_backward_scales_sample_scales_the_backward_gradients_and_inputs_per_sample():
    policy = hdqt.recipe("hdqt", backward_scales="sample", seed=0)
    assert policy.name == "hdqt[backward_scales='sample']"
    for operand in ("grad_output_dx", "grad_output_dw", "backward_input"):
        assert getattr(policy, operand).granularity == "sample", operand
    for operand in ("forward_input", "forward_weight", "backward_weight"):  # no sample dimension
        assert getattr(policy, operand).granularity == "tensor", operand
    assert hdqt.recipe("hdqt", backward_scales="tensor") == hdqt.recipe("hdqt")
    assert hdqt.recipe("fp32", backward_scales="sample") == hdqt.recipe("fp32")  # nothing to scale
    with pytest.raises(ValueError, match="backward_scales must be one of tensor, sample, got 'row'"):
        hdqt.recipe("hdqt", backward_scales="row")
    with pytest.raises(ValueError, match="per-sample scales"):  # dequantized products: no accumulator units
        hdqt.recipe("hdqt", backward_scales="sample", saturate_backward=True)
    # dX of the quiet samples when one sample's output gradient is 10^4 times theirs: per
    # tensor, the loud sample's scale rounds theirs (stochastically) to almost nothing
    errors = {}
    for scales in ("tensor", "sample"):
        torch.manual_seed(0)
        base = nn.Linear(32, 8, bias=False)
        layer = hdqt.quantize_model(nn.Sequential(base), hdqt.recipe("hdqt", backward_scales=scales, seed=0))[0]
        x = torch.randn(16, 32, requires_grad=True)
        weights = torch.ones(16, 8)
        weights[0] *= 1e4
        (layer(x) * weights).sum().backward()
        exact = weights @ base.weight.detach()
        errors[scales] = ((x.grad[1:] - exact[1:]).norm() / exact[1:].norm()).item()
    assert errors["sample"] < 0.3 < 0.9 < errors["tensor"], errors


def test_backward_scales_sample_trains_digits():
    """Wiring only, as test_recipe_trains_digits."""
    assert _train_digits(hdqt.recipe("hdqt", backward_scales="sample", seed=0)) >= 0.8


# ---------------------------------------------------------------- forward Hadamard
def _layer_pair(kind, policy):
    torch.manual_seed(0)
    base = nn.Linear(64, 8, bias=False) if kind == "linear" else nn.Conv2d(16, 4, 3, padding=1, bias=False)
    return base, hdqt.quantize_model(nn.Sequential(base), policy)[0]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rule", ["paper", "binary"])
def test_forward_hadamard_computes_the_same_product_and_gradients(kind, rule):
    """At 16 bits with unlimited accumulators quantization is nearly exact: the rotated
    forward must give the float layer's output and input/weight gradients."""
    policy = hdqt.recipe("int", bits=16, acc_bits=None, clip_ratio=1.0, forward_hadamard=True, hadamard_rule=rule,
                         seed=0)
    assert policy.name.startswith("int[") and "forward_hadamard" in policy.name
    base, layer = _layer_pair(kind, policy)
    x = torch.randn(6, 64) if kind == "linear" else torch.randn(2, 16, 5, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = base(x1)
    ref.square().sum().backward()
    gw = base.weight.grad.clone()
    base.weight.grad = None
    out = layer(x2)
    out.square().sum().backward()
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3)
    assert torch.allclose(x2.grad, x1.grad, rtol=1e-3, atol=1e-2)
    assert torch.allclose(layer.weight.grad, gw, rtol=1e-3, atol=1e-2)


def test_forward_hadamard_spreads_an_input_outlier():
    """Four samples carry one feature 100x the others: per-tensor 8-bit quantization then
    has a step near the other samples' whole range. Rotated first, the outlier is spread
    over the block and the other samples' outputs are far more accurate."""
    torch.manual_seed(1)
    x = torch.randn(32, 64)
    x[:4, 5] = 100.0
    errors = {}
    for rotate in (False, True):
        policy = hdqt.recipe("int", bits=8, acc_bits=None, clip_ratio=1.0, forward_hadamard=rotate, seed=0)
        base, layer = _layer_pair("linear", policy)
        with torch.no_grad():
            ref = base(x)[4:]
            errors[rotate] = ((layer(x)[4:] - ref).norm() / ref.norm()).item()
    assert errors[True] < errors[False] / 3, errors
    assert QuantPolicy.from_json(hdqt.recipe("luq", forward_hadamard=True).to_json()).forward_hadamard


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_luq_with_a_tile_as_long_as_the_reduction_clamps_the_whole_sum(kind):
    """The official code's LUQ limit: one clamp of the whole sum (any tile >= K)."""
    torch.manual_seed(0)
    policy = hdqt.recipe("luq", tile=2**30, seed=0)
    base = nn.Linear(300, 8, bias=False) if kind == "linear" else nn.Conv2d(16, 8, 3, padding=1, bias=False)
    layer = hdqt.quantize_model(nn.Sequential(base), policy)[0]
    x = torch.randn(4, 300) if kind == "linear" else torch.randn(2, 16, 8, 8)
    rt = layer._rt
    xq = rt.quantize(policy.forward_input, x, "forward input")
    wq = rt.quantize(policy.forward_weight, layer.weight, "forward weight")
    full = xq.values @ wq.values.T if kind == "linear" else nn.functional.conv2d(xq.values, wq.values, None, 1, 1)
    assert (full.abs() > 127).any()  # the clamp matters here
    assert torch.allclose(layer(x), full.clamp(-127, 127) * (xq.scale * wq.scale), atol=1e-5)
