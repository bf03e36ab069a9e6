"""Per-channel forward weight scales (``weight_scales="channel"``): one scale per output
feature of a weight, kept beside its codes; each scale factors out of its feature's sum,
so the forward product stays one of integers (tiled, saturating) and the backward takes
the forward's quantized weight values."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt
from hdqt.quantization.functional import QuantLinearFunction
from hdqt.quantization.formats import IntFormat
from hdqt.quantization.quantizer import Quantizer

SHAPES = [(12, 40), (6, 3, 3, 3)]


def channel(policy):
    return dataclasses.replace(policy, forward_weight=dataclasses.replace(policy.forward_weight,
                                                                          granularity="channel"))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_each_row_maps_its_own_max_to_the_top_code(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 0, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    q = Quantizer(granularity="channel").quantize(w)  # 4-bit signed: codes in [-7, 7]
    assert q.scale.shape == (shape[0],) + (1,) * (len(shape) - 1)
    rows = q.values.reshape(shape[0], -1)
    assert torch.equal(rows.abs().amax(1), torch.full((shape[0],), 7.0))  # no row rounds to zeros
    amax = w.reshape(shape[0], -1).abs().amax(1)
    torch.testing.assert_close(q.scale.flatten(), amax / 7)
    assert torch.equal(q.values, torch.round(w / q.scale).clamp(-7, 7))


def test_small_rows_survive_beside_a_large_one():
    """The CTMQ failure (docs/results-ctmq.md): one large row sets a per-tensor grid that
    rounds every small row to zero; per channel, each row keeps its own grid."""
    w = torch.full((8, 16), 0.01)
    w[0] = 0.3
    assert int((Quantizer(format=IntFormat(bits=3)).quantize(w).values.abs().sum(1) == 0).sum()) == 7
    assert int((Quantizer(format=IntFormat(bits=3), granularity="channel")
                .quantize(w).values.abs().sum(1) == 0).sum()) == 0


def _reference_linear(xq, wq, tile, acc_bits):
    """Tiled, saturating sums of the codes in float64, times the per-row scales."""
    x, w = xq.values.double(), wq.values.double()
    k = x.shape[1]
    total = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    limit = 2 ** (acc_bits - 1) - 1 if acc_bits else math.inf
    step = tile or k
    for start in range(0, k, step):
        total += (x[:, start:start + step] @ w[:, start:start + step].T).clamp(-limit, limit)
    return total * xq.scale * wq.scale.double().reshape(1, -1)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("acc_bits,tile", [(8, 32), (None, None), (12, 8)])
def test_linear_forward_is_the_tiled_integer_product_times_row_scales(monkeypatch, native, acc_bits, tile):
    monkeypatch.setenv("HDQT_NATIVE", native)
    torch.manual_seed(1)
    policy = channel(hdqt.recipe("hdqt", acc_bits=acc_bits, tile=tile, seed=2))
    layer = hdqt.quantize_model(nn.Linear(70, 9, bias=False), policy)
    layer.weight.data *= torch.logspace(-2, 0, 9).reshape(-1, 1)
    x = torch.randn(5, 70)
    y = layer(x)
    xq = policy.forward_input.quantize(x)
    wq = policy.forward_weight.quantize(layer.weight.detach())
    torch.testing.assert_close(y.double(), _reference_linear(xq, wq, tile, acc_bits), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("native", ["1", "0"])
def test_conv_forward_is_the_integer_conv_times_channel_scales(monkeypatch, native):
    monkeypatch.setenv("HDQT_NATIVE", native)
    torch.manual_seed(1)
    policy = channel(hdqt.recipe("int", acc_bits=None, seed=2))
    conv = hdqt.quantize_model(nn.Conv2d(3, 6, 3, padding=1, bias=False), policy)
    conv.weight.data *= torch.logspace(-2, 0, 6).reshape(-1, 1, 1, 1)
    x = torch.randn(2, 3, 7, 7)
    y = conv(x)
    xq = policy.forward_input.quantize(x)
    wq = policy.forward_weight.quantize(conv.weight.detach())
    expected = F.conv2d(xq.values.double(), wq.values.double(), padding=1) * xq.scale \
        * wq.scale.double().reshape(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5)),
                                  lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(),
                                                        nn.Linear(8 * 36, 5))], ids=["linear", "conv"])
def test_equal_row_maxima_train_as_per_tensor(monkeypatch, native, make):
    """Where every row has the same max|w| the two granularities have the same codes and
    scales: outputs and gradients agree to float32 rounding (the scales multiply in
    another order), nearest rounding in the backward so that both draw nothing."""
    monkeypatch.setenv("HDQT_NATIVE", native)
    torch.manual_seed(0)
    model = make()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.data.reshape(module.weight.shape[0], -1)
            w[:, 0] = 0.5  # the largest |value| of every row
            w.clamp_(-0.4, 0.5)
    base = hdqt.recipe("hdqt", seed=4)
    nearest = {op: dataclasses.replace(getattr(base, op), rounding="nearest")
               for op in ("grad_output_dx", "grad_output_dw", "backward_input", "backward_weight")}
    per_tensor = dataclasses.replace(base, **nearest)
    results = []
    for policy in (per_tensor, channel(per_tensor)):
        net = hdqt.quantize_model(copy.deepcopy(model), policy)
        torch.manual_seed(5)
        x = torch.randn(4, 48) if isinstance(model[0], nn.Linear) else torch.randn(4, 3, 8, 8)
        x = x.requires_grad_(True)
        out = net(x)
        F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
        results.append([out.detach(), x.grad] + [p.grad for p in net.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"tensor {i}")


def test_weight_codes_are_kept_packed_with_their_scales():
    """The backward keeps the per-channel weight as 4-bit codes (two a byte), as per tensor."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, requires_grad=True)
    sizes = []
    for policy in (hdqt.recipe("hdqt"), hdqt.recipe("hdqt", weight_scales="channel")):
        layer = hdqt.quantize_model(nn.Linear(64, 32, bias=False), policy)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer(x)
        sizes.append(sum(t.numel() * t.element_size() for t in saved))
    assert sizes[1] == sizes[0]


def test_fused_linear_call_declines_per_channel_weights():
    from hdqt.quantization import fused_linear
    from hdqt.quantization.runtime import LayerRuntime

    rt = LayerRuntime(hdqt.recipe("hdqt", weight_scales="channel"), "layer", 0)
    why = fused_linear.forward_case(torch.randn(4, 8), torch.randn(3, 8), rt)
    assert why is not None


def test_recipe_option_names_and_refusals():
    policy = hdqt.recipe("hdqt", weight_scales="channel")
    assert policy.name == "hdqt[weight_scales='channel']" and policy.forward_weight.granularity == "channel"
    assert hdqt.recipe("luq", weight_scales="channel").forward_weight.granularity == "channel"
    assert hdqt.recipe("hdqt").forward_weight.granularity == "tensor"
    assert hdqt.recipe("fp32", weight_scales="channel") == hdqt.recipe("fp32")
    with pytest.raises(ValueError, match=r"weight_scales must be one of tensor, channel, got 'row'"):
        hdqt.recipe("hdqt", weight_scales="row")
    # hadanet's binarized weights have a beta per row already: the policy as it is
    assert hdqt.recipe("hadanet", weight_scales="channel") == hdqt.recipe("hadanet")
    with pytest.raises(ValueError, match=r"exponent bias is tracked per tensor"):
        hdqt.recipe("fp134", weight_scales="channel")
    base = hdqt.recipe("hdqt")
    with pytest.raises(ValueError, match=r"grad_output_dx: granularity='channel' .* forward_weight only"):
        dataclasses.replace(base, grad_output_dx=dataclasses.replace(base.grad_output_dx, granularity="channel"))
    # round trip: the policy (and the layer's extra state) carries the granularity
    assert type(policy).from_dict(policy.to_dict()) == policy


def test_ctmq_steps_and_the_command_line_take_the_option(tmp_path):
    import json

    from hdqt.cli import main

    out = tmp_path / "run"
    assert main(["run", "--dataset", "digits", "--method", "finetune", "--recipe", "hdqt", "--epochs", "2",
                 "--init-classes", "4", "--increment", "6", "--weight-scales", "channel", "--schedule", "ctmq",
                 "--ctmq-start-bits", "5", "--ctmq-cycles", "1", "--bits", "4", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["weight_scales"] == "channel"
    assert config["quantization"]["weight_scales"] == "channel"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    policies = [v["policy"] for k, v in _extra_states(state)]
    assert policies and all(p["forward_weight"]["granularity"] == "channel" for p in policies)
    assert main(["run", "--dataset", "digits", "--weight-scales", "row", "--out", str(tmp_path / "bad")]) == 2


def _extra_states(state):
    if isinstance(state, dict):
        for key, value in state.items():
            if isinstance(key, str) and key.endswith("_extra_state") and isinstance(value, dict) and "policy" in value:
                yield key, value
            else:
                yield from _extra_states(value)
