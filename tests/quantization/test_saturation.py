"""Saturation counts of the tiled forward product: how many tile sums exceeded the
accumulator's limit and by how much, on every path that computes the product (the
native float32 kernels with wide and narrow register blocks, the int8 kernels, the
torch path), against an int64 reference computed tile by tile.

The shapes put rows past M in the kernels' last register block (M not a multiple
of 8 or 4: those rows repeat a real row and must not be counted) and, for the
convolutions at width stride 1, output widths that are not a multiple of 16 (the
kernels compute the extra lanes of the last run from real input values, and must
not count them either).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt
from hdqt.quantization import (
    QuantConv2d, QuantLinear, SaturationStats, native, reset_saturation, saturation_report,
)
from hdqt.quantization.im2col import tiled_conv2d
from hdqt.quantization.matmul import accumulator_limit, tiled_matmul_batched, tiled_matmul_kj


def _int8_available() -> bool:
    lib = native.load()
    return lib is not None and native.int8_dot(lib)


PATHS = ["float32", "float32-narrow", "int8", "torch"]


def use_path(monkeypatch, path: str) -> None:
    """Route the products to one path; the int8 path makes the float32 kernels fail,
    so that a silent fallback cannot pass for the int8 kernel."""
    if path == "torch":
        monkeypatch.setenv("HDQT_NATIVE", "0")
        assert native.load() is None
        return
    monkeypatch.setenv("HDQT_NATIVE", "1")
    lib = native.load()
    if lib is None:
        pytest.skip("no native kernels here (no C compiler): only the torch path exists")
    if path == "int8":
        monkeypatch.setenv("HDQT_INT8", "1")
        if not native.int8_dot(lib):
            pytest.skip("no AVX512-VNNI on this CPU: the int8 kernels do not run here")

        def refuse(*args):
            raise AssertionError("the float32 kernel ran where the int8 kernel should have")

        monkeypatch.setattr(lib, "hdqt_tiled_matmul_f32", refuse)
        monkeypatch.setattr(lib, "hdqt_conv_tiled_f32", refuse)
    else:
        monkeypatch.setenv("HDQT_INT8", "0")
        monkeypatch.setenv("HDQT_VECTORS", "narrow" if path == "float32-narrow" else "wide")


def reference_counts(a: torch.Tensor, b: torch.Tensor, tile: int, limit: int) -> tuple[int, int, int]:
    """(tile sums, saturated, excess) of a (..., M, K) @ b (..., K, J), in int64, tile by tile."""
    a64, b64 = a.round().long(), b.round().long()
    k = a.shape[-1]
    saturated = excess = tiles = 0
    for k0 in range(0, k, tile):
        part = torch.matmul(a64[..., k0 : k0 + tile], b64[..., k0 : k0 + tile, :])
        over = (part.abs() - limit).clamp(min=0)
        tiles += part.numel()
        saturated += int((over > 0).sum())
        excess += int(over.sum())
    return tiles, saturated, excess


def conv_reference(x, w, stride, padding, tile, limit):
    n = w.shape[0]
    cols = F.unfold(x.double(), w.shape[2:], padding=padding, stride=stride)  # (B, K, L), exact integers
    return reference_counts(w.reshape(n, -1).double(), cols, tile, limit)


def counts_of(stats: SaturationStats) -> tuple[int, int, float]:
    return stats.tiles, stats.saturated, stats.excess


# (M, K, J, tile): M = 13 and 5 leave rows past M in the last block of 8 (and of 4),
# J = 37 and 20 a partial strip of 16 columns, K = 70 and 45 a short last tile
MATMUL_SHAPES = [(13, 70, 37, 32), (5, 45, 20, 7), (9, 64, 16, 32)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", MATMUL_SHAPES)
@pytest.mark.parametrize("b_signed", [False, True])
def test_matmul_counts_equal_int64_reference(monkeypatch, path, shape, b_signed):
    m, k, j, tile = shape
    gen = torch.Generator().manual_seed(m * k + j)
    a = torch.randint(-7, 8, (m, k), generator=gen).float()
    b = (torch.randint(-7, 8, (k, j), generator=gen) if b_signed else torch.randint(0, 16, (k, j), generator=gen))
    b = b.float()
    use_path(monkeypatch, path)
    # many tile sums saturate, a few, none (|sum| <= 32 * 7 * 15 < 2^15)
    for acc_bits in ((7, 8, 16) if b_signed else (8, 9, 16)):
        limit = accumulator_limit(acc_bits)
        expected = reference_counts(a, b, tile, limit)
        assert expected[0] == m * j * math.ceil(k / tile)
        stats = SaturationStats()
        y = tiled_matmul_kj(a, b, tile, acc_bits, saturation=stats)
        assert counts_of(stats) == expected, (acc_bits, counts_of(stats), expected)
        assert torch.equal(y, tiled_matmul_kj(a, b, tile, acc_bits))  # counting changes nothing
        if acc_bits == 16:
            assert expected[1] == 0
        else:
            assert 0 < expected[1] < expected[0]  # a mix: which sums count matters


@pytest.mark.parametrize("path", ["float32", "float32-narrow", "int8"])
def test_matmul_counts_with_a_read_through_strides(monkeypatch, path):
    # A read through its strides (the linear forward's W X^T reads X^T's transpose)
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(-7, 8, (70, 13), generator=gen).float().T
    b = torch.randint(0, 16, (70, 21), generator=gen).float()
    use_path(monkeypatch, path)
    stats = SaturationStats()
    tiled_matmul_kj(a, b, 32, 8, saturation=stats)
    assert counts_of(stats) == reference_counts(a, b, 32, 127)


def test_unlimited_accumulators_count_nothing():
    stats = SaturationStats()
    a, b = torch.randint(-7, 8, (5, 70)).float(), torch.randint(0, 16, (70, 9)).float()
    tiled_matmul_kj(a, b, 32, None, saturation=stats)
    tiled_matmul_kj(a, b, 32, None, bounds=(7, 15), saturation=stats)
    assert counts_of(stats) == (0, 0, 0.0)


def test_exact_float64_path_counts(monkeypatch):
    # 12-bit codes: partial sums can pass 2^24, so the product runs in float64 on the torch path
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(-2047, 2048, (6, 40), generator=gen).float()
    b = torch.randint(0, 4096, (40, 10), generator=gen).float()
    stats = SaturationStats()
    tiled_matmul_kj(a, b, 32, 24, bounds=(2047, 4095), saturation=stats)
    assert counts_of(stats) == reference_counts(a, b, 32, accumulator_limit(24))
    assert stats.saturated > 0


@pytest.mark.parametrize("path", ["float32", "torch"])
def test_batched_product_counts(monkeypatch, path):
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-7, 8, (5, 45), generator=gen).float()
    x = torch.randint(0, 16, (3, 45, 19), generator=gen).float()
    use_path(monkeypatch, path)
    stats = SaturationStats()
    tiled_matmul_batched(w, x, 32, 11, saturation=stats)
    assert counts_of(stats) == reference_counts(w, x, 32, accumulator_limit(11))


# (B, C, H, W, N, kernel, stride, padding, tile): output widths 20, 18, 35 (not multiples of 16:
# extra lanes in the last run), N = 13, 5, 9 (rows past M), C*kh*kw = 45, 27, 36
CONV_CASES = [
    (2, 5, 9, 20, 13, (3, 3), (1, 1), (1, 1), 32),    # width stride 1: the direct (int8 and float32) kernels
    (2, 3, 11, 35, 5, (3, 3), (2, 2), (1, 1), 32),    # width stride 2: the panel kernel (float32)
    (1, 3, 12, 35, 9, (3, 3), (2, 1), (1, 1), 7),     # row stride 2, width stride 1
    (2, 4, 6, 37, 9, (1, 3), (1, 1), (0, 0), 5),      # runs of 16 positions that cross output rows
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_counts_equal_int64_reference(monkeypatch, path, case):
    b, c, h, w, n, kernel, stride, padding, tile = case
    if path == "int8" and stride[1] != 1:
        pytest.skip("the int8 conv runs at width stride 1 only (the float32 kernel takes the others)")
    gen = torch.Generator().manual_seed(b * c * h * w)
    x = torch.randint(0, 16, (b, c, h, w), generator=gen).float()
    weight = torch.randint(-7, 8, (n, c, *kernel), generator=gen).float()
    use_path(monkeypatch, path)
    for acc_bits in (8, 9, 16):
        limit = accumulator_limit(acc_bits)
        expected = conv_reference(x, weight, stride, padding, tile, limit)
        stats = SaturationStats()
        y = tiled_conv2d(x, weight, stride, padding, (1, 1), tile, acc_bits, stats)
        assert expected[0] == b * n * y.shape[2] * y.shape[3] * math.ceil(c * kernel[0] * kernel[1] / tile)
        assert counts_of(stats) == expected, (acc_bits, counts_of(stats), expected)
        if acc_bits == 16:
            assert expected[1] == 0
        else:
            assert 0 < expected[1] < expected[0]


def test_conv_extra_lanes_would_saturate():
    """The test above can see counted extra lanes: in the first case, the 12 positions
    past the output width that the kernels compute in the last run of 16 would add
    saturated sums (computed here as the convolution of a wider input)."""
    b, c, h, w, n, kernel, stride, padding, tile = CONV_CASES[0]
    gen = torch.Generator().manual_seed(b * c * h * w)
    x = torch.randint(0, 16, (b, c, h, w), generator=gen).float()
    weight = torch.randint(-7, 8, (n, c, *kernel), generator=gen).float()
    wider = F.pad(x, (0, 12))  # columns of zeros: what the extra lanes read past the image
    extra = conv_reference(wider, weight, stride, padding, tile, 127)[1] - conv_reference(
        x, weight, stride, padding, tile, 127)[1]
    assert extra > 0


def _layer_reference(layer, x):
    """The int64 counts of a layer's forward product, from its quantized operands."""
    policy = layer.policy
    xq = policy.forward_input.quantize(x).values
    wq = policy.forward_weight.quantize(layer.weight.detach()).values
    limit = accumulator_limit(policy.acc_bits)
    if isinstance(layer, nn.Linear):
        return reference_counts(wq, xq.T, policy.tile, limit)
    return conv_reference(xq, wq, layer.stride, layer.padding, policy.tile, limit)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_layers_report_their_forward_counts(monkeypatch, path):
    if path == "torch":
        use_path(monkeypatch, "torch")
    torch.manual_seed(0)
    policy = hdqt.recipe("hdqt", bits=4, acc_bits=8)
    model = nn.Sequential(QuantConv2d(5, 13, 3, padding=1, policy=policy), nn.ReLU(), nn.Flatten(),
                          QuantLinear(13 * 9 * 20, 11, policy=policy))
    x = torch.randn(3, 5, 9, 20)
    reset_saturation(model, every=1)  # count every forward call
    inputs = {}
    model[3].register_forward_pre_hook(lambda module, args: inputs.setdefault("3", args[0].detach()))
    y = model(x)
    y.sum().backward()  # the backward products are not counted (not the forward's)
    conv_in, linear_in = x, inputs["3"]
    report = saturation_report(model)
    assert list(report) == ["0", "3"]
    for name, layer, inp in (("0", model[0], conv_in), ("3", model[3], linear_in)):
        tiles, saturated, excess = _layer_reference(layer, inp)
        entry = report[name]
        assert (entry["tiles"], entry["saturated"], entry["excess"], entry["steps"], entry["counted"]) == (
            tiles, saturated, excess, 1, 1)
        assert saturated > 0
        assert entry["share"] == pytest.approx(saturated / tiles)
        assert entry["mean_excess"] == pytest.approx(excess / saturated)
    model(x)
    again = saturation_report(model, reset=True)
    assert again["0"]["steps"] == 2 and again["0"]["tiles"] == 2 * report["0"]["tiles"]
    assert again["3"]["saturated"] == 2 * report["3"]["saturated"]
    assert all(entry["tiles"] == 0 and entry["steps"] == 0 for entry in saturation_report(model).values())
    model(x)
    reset_saturation(model)
    assert all(e == {"tiles": 0, "saturated": 0, "excess": 0.0, "steps": 0, "counted": 0, "every": 1, "share": 0.0,
                     "mean_excess": 0.0} for e in saturation_report(model).values())


def test_one_forward_call_in_every_is_counted():
    torch.manual_seed(4)
    layer = QuantLinear(70, 9, policy=hdqt.recipe("hdqt"))
    model = nn.Sequential(layer)
    x = torch.randn(5, 70)
    assert layer._rt.saturation.every == hdqt.quantization.runtime.SATURATION_EVERY  # the default
    model(x)
    one = saturation_report(model)["0"]
    assert one["steps"] == one["counted"] == 1 and one["tiles"] == 9 * 5 * 3  # the first call counts
    reset_saturation(model, every=3)
    for _ in range(7):
        model(x)
    entry = saturation_report(model)["0"]
    assert entry["steps"] == 7 and entry["counted"] == 3 and entry["every"] == 3  # calls 1, 4 and 7
    assert entry["tiles"] == 3 * one["tiles"] and entry["saturated"] == 3 * one["saturated"]
    with pytest.raises(ValueError, match="every"):
        reset_saturation(model, every=0)


def test_wide_accumulators_count_tiles_but_no_saturation():
    torch.manual_seed(1)
    model = nn.Sequential(QuantLinear(70, 9, policy=hdqt.recipe("hdqt", bits=4, acc_bits=16)))
    model(torch.randn(5, 70))  # the first call counts
    entry = saturation_report(model)["0"]
    assert entry["tiles"] == 9 * 5 * 3 and entry["saturated"] == 0 and entry["excess"] == 0.0
    assert entry["share"] == 0.0 and entry["mean_excess"] == 0.0 and entry["steps"] == 1


def test_unlimited_and_float_layers_count_nothing():
    torch.manual_seed(2)
    model = nn.Sequential(QuantLinear(70, 9, policy=hdqt.recipe("hdqt", acc_bits=None)),
                          QuantLinear(9, 4, policy=hdqt.recipe("fp32")))
    model(torch.randn(5, 70))
    assert all(entry["tiles"] == 0 and entry["steps"] == 0 for entry in saturation_report(model).values())


def test_counts_stay_out_of_the_state_dict():
    torch.manual_seed(3)
    policy = hdqt.recipe("hdqt")
    model = nn.Sequential(QuantLinear(70, 9, policy=policy))
    keys = set(model.state_dict())
    extra = set(model[0].get_extra_state())
    model(torch.randn(5, 70))
    assert saturation_report(model)["0"]["steps"] == 1
    assert set(model.state_dict()) == keys and set(model[0].get_extra_state()) == extra
    fresh = nn.Sequential(QuantLinear(70, 9, policy=policy))
    fresh.load_state_dict(model.state_dict())
    assert saturation_report(fresh)["0"]["steps"] == 0  # counts belong to the live layer, not its state
