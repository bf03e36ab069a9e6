"""packing.py: lossless compact storage of saved operands (nibbles, int and float
containers) and bit masks; every round trip compared bit for bit."""
from __future__ import annotations

import pytest
import torch

from hdqt.quantization import native
from hdqt.quantization.formats import FP4_E2M1, FP8_E4M3, FP8_E5M2, FP134, FloatFormat, IntFormat, LogFormat
from hdqt.quantization.packing import (
    compact_float_dtype, holds_codes, pack_bits, pack_nibbles, pack_operand, unpack_bits, unpack_nibbles,
    unpack_operand,
)
from hdqt.quantization.quantizer import QTensor, Quantizer, int_quantizer
from hdqt.quantization.scaling import DynamicScaling

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device on this machine"))]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, dtype and sign of zero (torch.equal treats -0 and +0 as equal)."""
    return a.dtype == b.dtype and torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 1001])
@pytest.mark.parametrize("signed", [True, False])
def test_nibbles_round_trip_odd_lengths_and_edge_codes(device, n, signed):
    lo, hi = (-8, 7) if signed else (0, 15)
    edges = torch.tensor([lo, hi, 0, lo + 1, hi - 1], dtype=torch.int8)
    codes = torch.cat([edges, torch.randint(lo, hi + 1, (n,), dtype=torch.int8)])[:n].to(device)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert same_bits(unpack_nibbles(packed, n, signed), codes.float())
    assert same_bits(unpack_nibbles(packed, n, signed, torch.float64), codes.double())


def test_nibbles_hold_the_first_half_low_and_the_second_half_high():
    signed = pack_nibbles(torch.tensor([1, 2, -3, -1, 7, -8], dtype=torch.int8))
    # byte i = code i + 16 * code i+3 (mod 256): the low nibble is code i in two's complement
    assert signed.tolist() == [(1 - 16) % 256, (2 + 112) % 256, (-3 - 128) % 256]
    assert unpack_nibbles(signed, 6, signed=True).tolist() == [1, 2, -3, -1, 7, -8]
    unsigned = pack_nibbles(torch.tensor([1, 15, 0, 15, 4, 9], dtype=torch.int8).to(torch.int8))
    assert unsigned.tolist() == [0xF1, 0x4F, 0x90]
    assert unpack_nibbles(unsigned, 6, signed=False).tolist() == [1, 15, 0, 15, 4, 9]


@pytest.mark.parametrize("device", DEVICES)
def test_bits_of_every_byte_value(device):
    mask = torch.tensor([[(b >> j) & 1 for j in range(8)] for b in range(256)], dtype=torch.bool, device=device)
    packed = pack_bits(mask)
    assert torch.equal(packed.cpu(), torch.arange(256, dtype=torch.uint8))  # element 8i+j in bit j of byte i
    back = unpack_bits(packed, mask.numel())
    assert back.dtype == torch.uint8 and torch.equal(back.view(256, 8) != 0, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1000])
def test_bits_round_trip_any_length(device, n):
    mask = torch.rand(n, device=device) > 0.5
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n) != 0, mask)
    assert torch.equal(unpack_bits(pack_bits(mask[1:]), n - 1) != 0, mask[1:])  # a view at an odd offset


def test_compact_float_dtypes_hold_every_value():
    assert compact_float_dtype(FP8_E5M2) == torch.float8_e5m2
    assert compact_float_dtype(FP4_E2M1) == torch.float8_e5m2
    assert compact_float_dtype(LogFormat(4)) == torch.float8_e5m2
    assert compact_float_dtype(FP8_E4M3) == torch.bfloat16  # e4m3fn would hold it, but decodes ~40x slower
    assert compact_float_dtype(FP134) == torch.bfloat16
    assert compact_float_dtype(FloatFormat(5, 10)) is None  # half's mantissa: no narrower exact dtype
    for fmt in (FP8_E5M2, FP4_E2M1, LogFormat(4), FP8_E4M3, FP134, LogFormat(8)):
        values = fmt.values()
        assert torch.equal(values.to(compact_float_dtype(fmt)).double(), values)


def quantize(quantizer: Quantizer, t: torch.Tensor) -> QTensor:
    return quantizer.quantize(t, torch.Generator().manual_seed(0))


def layouts(device):
    base = torch.randn(12, 10, device=device)
    image = torch.randn(3, 5, 4, 6, device=device)
    return [base, base.T, image, image.to(memory_format=torch.channels_last), torch.randn(7, device=device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantizer, kind, bytes_per_value", [
    (int_quantizer(4, signed="signed"), "nibbles", 0.5),
    (int_quantizer(4, signed="unsigned"), "nibbles", 0.5),
    (int_quantizer(4, signed="auto"), "nibbles", 0.5),
    (int_quantizer(3, signed="auto"), "nibbles", 0.5),
    (int_quantizer(6, signed="auto"), "int", 1),
    (int_quantizer(8, signed="signed"), "int", 1),
    (int_quantizer(8, signed="auto"), "int", 1),
    (int_quantizer(12, signed="signed"), "int", 2),
    (Quantizer(FP8_E5M2, DynamicScaling()), "float", 1),
    (Quantizer(FP8_E4M3, DynamicScaling()), "float", 2),
    (Quantizer(FP4_E2M1, DynamicScaling(), "stochastic"), "float", 1),
    (Quantizer(LogFormat(4), DynamicScaling(), "stochastic"), "float", 1),
])
def test_operands_round_trip_with_their_layout(device, quantizer, kind, bytes_per_value):
    for t in layouts(device):
        for tensor in (t, t.abs()):  # with negatives, and without ("auto" then takes the unsigned range)
            q = quantize(quantizer, tensor)
            stored, layout = pack_operand(q, quantizer)
            assert layout.kind == kind
            assert sum(s.numel() * s.element_size() for s in stored) == pytest.approx(
                q.values.numel() * bytes_per_value, abs=1)
            back = unpack_operand(stored, layout)
            assert same_bits(back, q.values) and back.stride() == q.values.stride()


def test_what_packing_cannot_shrink_is_kept_as_it_is():
    t = torch.randn(6, 5)
    per_sample = Quantizer(IntFormat(4), DynamicScaling(), granularity="sample")
    q = quantize(per_sample, t)
    assert not holds_codes(per_sample) and not holds_codes(None)
    cases = [
        (QTensor(q.values * q.scale, 1.0), per_sample),  # per-sample scales: dequantized values
        (QTensor(t * float("nan"), float("nan")), int_quantizer(4)),  # nonfinite="propagate"
        (QTensor(t, 1.0), None),  # an operand that stays float
        (quantize(Quantizer(FloatFormat(5, 10), DynamicScaling()), t), Quantizer(FloatFormat(5, 10))),
    ]
    for qt, quantizer in cases:
        stored, layout = pack_operand(qt, quantizer)
        assert layout.kind == "raw" and stored[0] is qt.values
        assert unpack_operand(stored, layout) is qt.values


def test_an_auto_tensor_keeps_its_range():
    quantizer = int_quantizer(4, signed="auto")
    for t, signed in ((torch.tensor([0.0, 1.0, 2.0, 3.0]), False), (torch.tensor([-1.0, 1.0, 2.0, 3.0]), True)):
        q = quantize(quantizer, t)
        _, layout = pack_operand(q, quantizer)
        assert layout.signed is signed
        assert q.values.max() == (7 if signed else 15)  # the grid's top code survives the round trip
        assert same_bits(unpack_operand(*pack_operand(q, quantizer)), q.values)


# ---- native kernels (csrc/packing.c) against the torch reference above, bit for bit

needs_native = pytest.mark.skipif(native.load() is None, reason="the native kernels are not available here")


@needs_native
@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 1001, 200_001])  # the last one splits over threads
@pytest.mark.parametrize("signed", [True, False])
def test_native_nibbles_are_torch_s_bytes_and_codes(monkeypatch, n, signed):
    lo, hi = (-8, 7) if signed else (0, 15)
    edges = torch.tensor([lo, hi, 0, lo + 1, hi - 1], dtype=torch.float32)
    codes = torch.cat([edges, torch.randint(lo, hi + 1, (n,)).float()])[:n]
    quantizer = int_quantizer(4, signed="auto")
    native_stored, native_layout = pack_operand(QTensor(codes, 1.0), quantizer)
    torch_bytes = pack_nibbles(codes.to(torch.int8))
    assert torch.equal(native_stored[0], torch_bytes)
    assert native_layout.signed is bool(n and codes.min() < 0)  # "auto": read from the codes in the same pass
    assert same_bits(unpack_operand(native_stored, native_layout), codes)
    assert same_bits(unpack_nibbles(torch_bytes, n, native_layout.signed), codes)
    monkeypatch.setattr(native, "load", lambda: None)  # the torch path stores the same
    torch_stored, torch_layout = pack_operand(QTensor(codes, 1.0), quantizer)
    assert torch.equal(torch_stored[0], native_stored[0]) and torch_layout == native_layout


@needs_native
@pytest.mark.parametrize("bits, signed, lo, hi", [(8, "signed", -127, 127), (8, "unsigned", 0, 255),
                                                  (8, "auto", -127, 127), (8, "auto", 0, 255), (6, "auto", 0, 63)])
@pytest.mark.parametrize("n", [1, 5, 70_001])
def test_native_bytes_are_torch_s_containers(monkeypatch, bits, signed, lo, hi, n):
    codes = torch.cat([torch.tensor([lo, hi, 0.0]), torch.randint(lo, hi + 1, (n,)).float()])[:n]
    quantizer = int_quantizer(bits, signed=signed)
    stored, layout = pack_operand(QTensor(codes, 1.0), quantizer)
    back = unpack_operand(stored, layout)
    monkeypatch.setattr(native, "load", lambda: None)
    reference, reference_layout = pack_operand(QTensor(codes, 1.0), quantizer)
    assert stored[0].dtype == reference[0].dtype and torch.equal(stored[0], reference[0])
    assert layout == reference_layout
    assert same_bits(back, codes) and same_bits(unpack_operand(reference, reference_layout), codes)


def same_float32_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (NaN, its payload and the sign of zero included)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.contiguous().view(torch.int32),
                                                                 b.contiguous().view(torch.int32))


EDGE_VALUES = [0.0, -0.0, 1.5, -1.5, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45]


@needs_native
@pytest.mark.parametrize("shape, transpose", [((1,), False), ((7,), False), ((9,), False), ((13, 21), False),
                                              ((13, 21), True), ((3, 5, 4, 6), False), ((64, 1031), False)])
def test_native_mask_relu_is_torch_s_relu_and_threshold_backward(monkeypatch, shape, transpose):
    from hdqt.quantization.mask_relu import PackedMaskReLUFunction

    x = torch.randn(shape)
    x.view(-1)[: len(EDGE_VALUES)] = torch.tensor(EDGE_VALUES)[: x.numel()]
    x = x.T if transpose else x  # a transposed view: packed in memory order
    grad = torch.randn(x.shape)
    grad.view(-1)[:3] = torch.tensor([float("nan"), -0.0, -2.0])[: grad.numel()]
    grad = grad.T.contiguous().T if transpose else grad

    def run():
        leaf = x.clone().requires_grad_()
        leaf = leaf.T.contiguous().T if transpose else leaf  # the same layout as x
        y = PackedMaskReLUFunction.apply(leaf)
        bits = y.grad_fn.saved_tensors[0]
        (g,) = torch.autograd.grad(y, leaf, grad)
        return y, g, bits

    y, g, bits = run()
    assert same_float32_bits(y, torch.relu(x)) and y.stride() == x.stride()
    assert same_float32_bits(g, torch.ops.aten.threshold_backward(grad, torch.relu(x), 0))
    monkeypatch.setattr(native, "load", lambda: None)
    y_ref, g_ref, bits_ref = run()
    assert torch.equal(bits, bits_ref) and same_float32_bits(y, y_ref) and same_float32_bits(g, g_ref)
