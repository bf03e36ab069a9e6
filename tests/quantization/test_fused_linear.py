"""A linear layer's forward and backward in one native call each (fused_linear.py,
csrc/linear.c) against the separate calls from Python (HDQT_FUSED=0): the same
outputs, gradients, weights after SGD, saved bytes, saturation counts and generator
states, bit for bit; which cases take the fused calls; and their errors."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import hdqt
from hdqt.quantization import fused_linear, int_quantizer, native
from hdqt.quantization.quantizer import NonFiniteError
from hdqt.quantization.runtime import saturation_report

pytestmark = pytest.mark.skipif(native.load() is None, reason="the native kernels are not available here")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the forward and backward calls that the fused path computed."""
    calls = {"forward": 0, "backward": 0}
    forward, backward = fused_linear.forward, fused_linear.backward

    def counted_forward(*args):
        out = forward(*args)
        calls["forward"] += out is not None
        return out

    def counted_backward(*args):
        out = backward(*args)
        calls["backward"] += out is not None
        return out

    monkeypatch.setattr(fused_linear, "forward", counted_forward)
    monkeypatch.setattr(fused_linear, "backward", counted_backward)
    return calls


def mlp(widths) -> nn.Module:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def train(monkeypatch, policy, widths, batch, *, fused, steps=2, input_grad=False, frozen=(), seed=0):
    """Outputs, gradients (input's too), weights, saved bytes, saturation counts and
    generator states of ``steps`` SGD steps."""
    monkeypatch.setenv("HDQT_FUSED", "1" if fused else "0")
    torch.manual_seed(seed)
    model = hdqt.quantize_model(mlp(widths), policy)
    for index in frozen:
        model[2 * index].weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=0.1) if trained else None
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (batch,), generator=gen)
    record, saved = [], []
    for _ in range(steps):
        model.zero_grad()
        xi = x.clone().requires_grad_(input_grad)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
            out = model(xi)
        nn.functional.cross_entropy(out, y).backward()
        record.append(out.detach().clone())
        record += [p.grad.clone() for p in model.parameters() if p.grad is not None]
        if input_grad:
            record.append(xi.grad.clone())
        if opt is not None:
            opt.step()
    record += [p.detach().clone() for p in model.parameters()]
    states = [m._rt.generator_states() for m in model if hasattr(m, "_rt")]
    return record, saved, saturation_report(model), states


def assert_same_training(monkeypatch, policy, widths, batch, **kwargs):
    fused = train(monkeypatch, policy, widths, batch, fused=True, **kwargs)
    separate = train(monkeypatch, policy, widths, batch, fused=False, **kwargs)
    assert len(fused[0]) == len(separate[0])
    for a, b in zip(fused[0], separate[0]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    assert fused[1] == separate[1]  # the same tensors saved, packed alike
    assert fused[2] == separate[2]  # saturation counts
    for states_a, states_b in zip(fused[3], separate[3]):
        assert states_a.keys() == states_b.keys()
        assert all(torch.equal(states_a[k], states_b[k]) for k in states_a)
    return fused


SR_FORWARD = dataclasses.replace(hdqt.recipe("hdqt"), forward_input=int_quantizer(4, signed="auto", rounding="stochastic"),
                                 forward_weight=int_quantizer(3, rounding="stochastic"))

CASES = [  # (policy, widths, batch): each takes the fused calls in both directions
    (hdqt.recipe("hdqt"), (405, 405, 405, 19), 128),  # FCNet's shape
    (hdqt.recipe("hdqt"), (32, 32, 32, 19), 8),
    (hdqt.recipe("int"), (64, 48, 10), 16),  # no Hadamard transform
    (hdqt.recipe("hdqt", bits=3), (40, 24, 7), 12),
    (hdqt.recipe("hdqt", tile=None), (70, 33, 5), 6),  # one tile: the whole reduction
    (hdqt.recipe("hdqt", acc_bits=12, tile=16), (48, 64, 3), 32),
    (SR_FORWARD, (33, 17, 4), 9),  # odd sizes: an odd number of nibbles
    (hdqt.recipe("hdqt"), (5, 7, 3), 1),  # batch 1
    (hdqt.recipe("hdqt"), (1, 8, 1), 4),  # width 1
    (hdqt.recipe("hdqt", acc_bits=None), (40, 24, 7), 12),  # an unlimited forward accumulator
    (hdqt.recipe("hdqt", bits=8, acc_bits=20), (40, 24, 7), 12),  # codes kept as bytes
    (hdqt.recipe("int", bits=6, acc_bits=16), (33, 17, 4), 9),  # 6-bit bytes: unsigned inputs in int8
    (dataclasses.replace(hdqt.recipe("hdqt", bits=8, acc_bits=20), forward_weight=int_quantizer(4)),
     (24, 16, 5), 8),  # input bytes, weight nibbles
]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("policy, widths, batch", CASES, ids=[f"{p.name}-{w}-{b}" for p, w, b in CASES])
def test_fused_calls_train_bit_identically(monkeypatch, threads, fused_calls, n_threads, policy, widths, batch):
    threads(n_threads)
    assert_same_training(monkeypatch, policy, widths, batch, steps=2)
    layers = len(widths) - 1
    assert fused_calls == {"forward": 2 * layers, "backward": 2 * layers}


@pytest.mark.parametrize("input_grad, frozen", [(True, ()), (False, (0,)), (True, (1,)), (True, (0, 1))])
def test_fused_calls_compute_only_the_gradients_asked_for(monkeypatch, fused_calls, input_grad, frozen):
    """An input that needs its gradient (dX of the first layer too) and frozen weights
    (no dW, and W's codes alone are kept)."""
    assert_same_training(monkeypatch, hdqt.recipe("hdqt"), (24, 16, 5), 8, input_grad=input_grad, frozen=frozen)
    assert fused_calls["forward"] == 4 and fused_calls["backward"] == 4 - 2 * (frozen == (0,) and not input_grad)


def test_fused_calls_without_int8_products(monkeypatch, fused_calls):
    """HDQT_INT8=0: the float32 kernel computes every product of the fused calls (a
    transposed copy of the operand it reads as (K, J) included), with the same values."""
    monkeypatch.setenv("HDQT_INT8", "0")
    assert_same_training(monkeypatch, hdqt.recipe("hdqt"), (64, 48, 10), 16)
    assert fused_calls["backward"] == 4


def test_a_gradient_in_no_dense_layout_is_copied_as_the_separate_calls_do(monkeypatch):
    results = []
    for fused in (True, False):
        monkeypatch.setenv("HDQT_FUSED", "1" if fused else "0")
        torch.manual_seed(0)
        layer = hdqt.quantize_model(nn.Linear(16, 12, bias=False), hdqt.recipe("hdqt"))
        x = torch.randn(8, 16, requires_grad=True)
        wide = torch.randn(8, 24, generator=torch.Generator().manual_seed(3))
        layer(x).backward(wide[:, ::2])  # every second column: no dense layout
        results.append((x.grad, layer.weight.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("policy, reason", [
    (hdqt.recipe("luq"), "a forward quantizer is not an integer grid"),
    (hdqt.recipe("hdqt", bits=10, acc_bits=24), "a forward quantizer is not an integer grid of <= 8 bits"),
    (hdqt.recipe("hdqt", nonfinite="propagate"), "nonfinite='propagate'"),
])
def test_forward_cases_the_fused_call_declines(policy, reason):
    layer = hdqt.quantize_model(nn.Linear(8, 4, bias=False), policy)
    assert reason in fused_linear.forward_case(torch.randn(2, 8), layer.weight, layer._rt)


def test_the_forward_declines_unpacked_saving_and_odd_layouts(monkeypatch):
    layer = hdqt.quantize_model(nn.Linear(8, 4, bias=False), hdqt.recipe("hdqt"))
    rt = layer._rt
    assert fused_linear.forward_case(torch.randn(2, 8), layer.weight, rt) is None
    assert fused_linear.forward_case(torch.randn(8, 2).T, layer.weight, rt) is None  # a previous layer's Y^T
    assert "neither contiguous" in fused_linear.forward_case(torch.randn(2, 16)[:, ::2], layer.weight, rt)
    assert "CPU float32" in fused_linear.forward_case(torch.randn(2, 8, dtype=torch.float64), layer.weight, rt)
    monkeypatch.setenv("HDQT_PACK", "0")
    assert "HDQT_PACK=0" in fused_linear.forward_case(torch.randn(2, 8), layer.weight, rt)


@pytest.mark.parametrize("overrides, reason", [
    ({"hadamard_select": "noise"}, "hadamard_select='noise'"),
    ({"saturate_backward": True}, "limited backward accumulators"),
])
def test_backward_cases_the_fused_call_declines_train_alike(monkeypatch, fused_calls, overrides, reason):
    """The forward fuses, the backward takes the separate calls from the fused forward's
    saved state: still bit for bit the separate path's training."""
    policy = hdqt.recipe("hdqt", **overrides)
    assert reason == fused_linear.Plan(policy).backward_reason
    assert_same_training(monkeypatch, policy, (32, 24, 6), 16)
    assert fused_calls == {"forward": 4, "backward": 0}


def test_a_policy_change_makes_a_new_plan():
    layer = hdqt.quantize_model(nn.Linear(8, 4, bias=False), hdqt.recipe("hdqt"))
    rt = layer._rt
    assert fused_linear.plan_for(rt).policy is rt.policy
    rt.policy = hdqt.recipe("hdqt", nonfinite="propagate")
    assert fused_linear.forward_case(torch.randn(2, 8), layer.weight, rt) == "nonfinite='propagate'"


def test_nonfinite_values_raise_naming_the_operand_and_layer():
    model = hdqt.quantize_model(mlp((8, 6, 3)), hdqt.recipe("hdqt"))
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="forward input of layer '0'"):
        model(x)
    out = model(torch.randn(4, 8))
    grad = torch.ones_like(out)
    grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"output gradient \(dX\) of layer '2'"):
        out.backward(grad)


def test_a_frozen_first_layer_with_nonfinite_gradient_names_the_weight_gradient_operand():
    """Only dW wanted (the input needs no gradient): the error names dW's operand."""
    layer = hdqt.quantize_model(nn.Linear(8, 4, bias=False), hdqt.recipe("hdqt"))
    out = layer(torch.randn(4, 8))
    with pytest.raises(NonFiniteError, match=r"output gradient \(dW\)"):
        out.backward(torch.full_like(out, float("nan")))
