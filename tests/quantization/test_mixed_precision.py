"""Quantized layers under torch.autocast (AMP) compute what they compute without it
(precision.py): their products of integer codes run in float32 with autocast off, in the
forward and in a backward called inside the autocast region, on the native kernels and
on torch's path (the one a GPU takes). Float layers around them still autocast."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt
from hdqt.models import create_model

LOW = {"cpu": torch.bfloat16, "cuda": torch.float16}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device on this machine"))]
RECIPES = [("hdqt", {}), ("int", {}), ("hdqt", {"acc_bits": None}), ("int", {"bits": 8, "acc_bits": 24}),
           ("luq", {}), ("fp134", {}), ("fp8_e4m3", {}), ("hadanet", {})]


def convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 5))


def step(model, x, y, autocast_dtype=None):
    """Output and every gradient of one forward + backward (the backward inside the
    autocast region when there is one, the harder case)."""
    x = x.clone().requires_grad_(True)
    if autocast_dtype is None:
        out = model(x)
        F.cross_entropy(out, y).backward()
    else:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            out = model(x)
            F.cross_entropy(out, y).backward()
    return [out.detach()] + [p.grad for p in model.parameters()] + [x.grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("name,overrides", RECIPES, ids=lambda v: str(v))
def test_quantized_layers_ignore_autocast(monkeypatch, device, native, name, overrides):
    if device != "cpu" and native == "1":
        pytest.skip("the native kernels are CPU-only")
    monkeypatch.setenv("HDQT_NATIVE", native)
    torch.manual_seed(0)
    # every layer quantized (hadanet keeps the first and last in float otherwise, and float layers do autocast)
    policy = dataclasses.replace(hdqt.recipe(name, seed=3, **overrides), float_first_last=False)
    model = hdqt.quantize_model(convnet().to(device), policy)
    twin = copy.deepcopy(model)  # the same weights and generator states
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=gen).to(device)
    y = torch.randint(0, 5, (8,), generator=gen).to(device)
    plain = step(model, x, y)
    mixed = step(twin, x, y, LOW[device])
    assert mixed[0].dtype == torch.float32  # the last layer is quantized: float32 out
    for i, (a, b) in enumerate(zip(plain, mixed)):
        assert torch.equal(a, b), f"tensor {i} differs under autocast: max |diff| {(a - b).abs().max().item()}"


def test_low_precision_input_is_cast_to_float32():
    """An input that arrives in bfloat16 (from a float op under autocast) is taken as
    its float32 value, as torch.amp.custom_fwd(cast_inputs=torch.float32) would."""
    torch.manual_seed(0)
    model = hdqt.quantize_model(nn.Sequential(nn.Linear(40, 12)), hdqt.recipe("hdqt", seed=3))
    twin = copy.deepcopy(model)
    x = torch.randn(6, 40).bfloat16()
    expected = model(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = twin(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_float_layers_around_still_autocast():
    """Only the quantized layers leave autocast: an unquantized float head after them
    (here fp32's policy, a float layer) still runs in bfloat16."""
    torch.manual_seed(0)
    body = hdqt.quantize_model(nn.Linear(20, 16), hdqt.recipe("hdqt", seed=3))
    model = nn.Sequential(body, nn.Linear(16, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = body(torch.randn(3, 20))
        out = model(torch.randn(3, 20))
    assert hidden.dtype == torch.float32 and out.dtype == torch.bfloat16


@pytest.mark.slow
def test_resnet_trains_alike_under_autocast(monkeypatch):
    """Three SGD steps of a quantized ResNet-20 (BatchNorm, packed activations) on the
    torch path: the weights after them are the same with and without autocast."""
    monkeypatch.setenv("HDQT_NATIVE", "0")
    torch.manual_seed(0)
    model = hdqt.quantize_model(nn.Sequential(create_model("resnet20", (3, 16, 16)), nn.Linear(64, 10)),
                                hdqt.recipe("hdqt", seed=5))
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    for net, dtype in ((model, None), (twin, torch.bfloat16)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            step(net, x, y, dtype)
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_wide_integer_codes_leave_tf32_on_a_gpu():
    """TF32 reads 11 significant bits: on CUDA a float32 product of integer codes above
    2^11 (13+ bit formats) takes float64; 12-bit and narrower codes, float formats and
    the CPU keep float32 (exact there); sums past 2^24 take float64 anywhere."""
    from hdqt.quantization.accumulate import FloatBounds
    from hdqt.quantization.matmul import exact_dtype

    cuda, cpu, f32, f64 = torch.device("cuda"), torch.device("cpu"), torch.float32, torch.float64
    assert exact_dtype(1e6, f32, operands=(2047, 2047), device=cuda) == f32  # 12-bit signed codes
    assert exact_dtype(1e6, f32, operands=(2048, 7), device=cuda) == f32
    assert exact_dtype(1e6, f32, operands=(2049, 7), device=cuda) == f64
    assert exact_dtype(1e6, f32, operands=(7, 32767), device=cuda) == f64  # 16-bit codes
    assert exact_dtype(1e6, f32, operands=(32767, 32767), device=cpu) == f32
    assert exact_dtype(1e6, f32, operands=FloatBounds((448.0, 57344.0)), device=cuda) == f32
    assert exact_dtype(2.0**24, f32, operands=(7, 7), device=cpu) == f64
    assert exact_dtype(1e6, f32) == f32 and exact_dtype(1e9, f64, operands=(9999, 9999), device=cuda) == f64


@pytest.mark.parametrize("device", DEVICES)
def test_sixteen_bit_codes_are_exact_on_the_device(monkeypatch, device):
    """A 16-bit integer recipe (codes up to 32767, no Hadamard) on torch's path with
    nearest rounding everywhere: output and gradients on ``device`` are the CPU's (whose
    float32 products are exact), with cuDNN's TF32 left at torch's default (on)."""
    monkeypatch.setenv("HDQT_NATIVE", "0")
    policy = hdqt.recipe("int", bits=16, acc_bits=None, seed=3)
    policy = dataclasses.replace(policy, **{f: dataclasses.replace(getattr(policy, f), rounding="nearest")
                                             for f in ("grad_output_dx", "grad_output_dw", "backward_weight",
                                                       "backward_input") if getattr(policy, f) is not None})
    torch.manual_seed(0)
    model = hdqt.quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 36, 5)),
                                policy)
    on_device = copy.deepcopy(model).to(device)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    expected = step(model, x, y)
    got = step(on_device, x.to(device), y.to(device))
    for i, (a, b) in enumerate(zip(expected, got)):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=0, msg=f"tensor {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("name,overrides", [("int", {"bits": 8, "acc_bits": None}), ("hdqt", {}), ("luq", {}),
                                            ("hadanet", {})], ids=str)
def test_half_layer_computes_as_float32(monkeypatch, dtype, native, name, overrides):
    """A quantized layer converted with .half() / .bfloat16() computes what the float32
    layer with the same (half-rounded) weights computes, rounded once to the half dtype,
    and given the same output gradient its parameters' gradients are that layer's in
    the half dtype (before, float16 sums of 8-bit codes over 2048 inputs were inf)."""
    monkeypatch.setenv("HDQT_NATIVE", native)
    torch.manual_seed(0)
    policy = dataclasses.replace(hdqt.recipe(name, seed=3, **overrides), float_first_last=False)
    layer = hdqt.quantize_model(nn.Sequential(nn.Linear(2048, 16)), policy)
    half = copy.deepcopy(layer).to(dtype)
    reference = copy.deepcopy(half).float()  # the half-rounded weights, as float32
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(4, 2048, generator=gen).to(dtype), torch.randn(4, 16, generator=gen).to(dtype)
    out_half, out_ref = half(x), reference(x.float())
    assert out_half.dtype == dtype and torch.isfinite(out_half).all()
    assert torch.equal(out_half, out_ref.to(dtype))
    out_half.backward(g)
    out_ref.backward(g.float())
    for (param, p_half), p_ref in zip(half.named_parameters(), reference.parameters()):
        assert p_half.grad.dtype == dtype, param
        assert torch.equal(p_half.grad, p_ref.grad.to(dtype)), param
