import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt
from hdqt.quantization import QuantConv2d, QuantLinear, policy_from_state_dict
from hdqt.quantization.matmul import tiled_matmul_batched


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _mlp():
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 10))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    )


def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _ste_clip(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """t clipped at ratio * max|t|, with the gradient passed straight through (as the engine does)."""
    clip = ratio * t.detach().abs().max()
    return t + (t.clamp(-clip, clip) - t).detach()


class _ClippedFloat(nn.Module):
    """A float layer whose input and weight are clipped like the quantized forward's operands."""

    def __init__(self, layer, ratio):
        super().__init__()
        self.layer, self.ratio = layer, ratio

    def forward(self, x):
        x, w, layer = _ste_clip(x, self.ratio), _ste_clip(self.layer.weight, self.ratio), self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("build,shape", [(_mlp, (16, 20)), (_cnn, (4, 3, 6, 6))])
@pytest.mark.parametrize("name", ["hdqt", "int"])
def test_12bit_gradients_match_float_on_clipped_operands(build, shape, name):
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(*shape), torch.randint(0, 5, (shape[0],))
    # The recipe as it trains: tiles of 32 and the 0.975 forward clip. A 32-bit accumulator
    # holds any tile of 32 products of 12-bit codes (32 * 2047^2 < 2^31; 16-bit codes would
    # saturate it), so what is left against float32 training on the same clipped operands
    # is 12-bit rounding alone.
    policy = hdqt.recipe(name, bits=12, acc_bits=32)
    assert policy.tile == 32 and policy.forward_input.scaling.clip_ratio == 0.975
    reference = nn.Sequential(*(_ClippedFloat(m, 0.975) if isinstance(m, (nn.Linear, nn.Conv2d)) else m
                                for m in copy.deepcopy(model)))
    ref = _grads(reference, x, y)
    grads = _grads(hdqt.quantize_model(copy.deepcopy(model), policy), x, y)
    for r, g in zip(ref, grads):
        assert _cos(r, g) > 0.9999
    # quantization is really on: 4-bit gradients of the same model are much further away
    q4 = hdqt.quantize_model(copy.deepcopy(model), hdqt.recipe(name, bits=4, acc_bits=32))
    worst12 = min(_cos(r, g) for r, g in zip(ref, grads))
    worst4 = min(_cos(r, g) for r, g in zip(ref, _grads(q4, x, y)))
    assert worst4 < worst12 - 0.01


def test_hadamard_beats_int_on_heavy_tailed_gradients():
    cos = {"hdqt": [], "int": []}
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(128, 256, generator=g).relu()
        w = torch.randn(128, 256, generator=g) * 0.1
        grad = torch.randn(128, 128, generator=g)
        grad.view(-1)[torch.randint(0, grad.numel(), (20,), generator=g)] *= 50  # outliers
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        (xf @ wf.T).backward(grad)
        for name in cos:
            layer = hdqt.quantize_model(nn.Linear(256, 128, bias=False), hdqt.recipe(name, seed=seed))
            layer.weight.data.copy_(w)
            xq = x.clone().requires_grad_()
            layer(xq).backward(grad)
            cos[name].append((_cos(xq.grad, xf.grad), _cos(layer.weight.grad, wf.grad)))
    hd, it = torch.tensor(cos["hdqt"]).mean(0), torch.tensor(cos["int"]).mean(0)
    assert (hd > it + 0.1).all(), (hd, it)


def test_conv_forward_equals_tiled_im2col_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=False)
    q = hdqt.quantize_model(copy.deepcopy(conv), hdqt.recipe("hdqt"))
    x = torch.randn(2, 5, 9, 9).relu()
    out = q(x)
    pol = q.policy
    xq = pol.forward_input.quantize(x)
    wq = pol.forward_weight.quantize(conv.weight)
    cols = F.unfold(xq.values, 3, padding=1, stride=2)
    ref = tiled_matmul_batched(wq.values.reshape(7, -1), cols, 32, 8) * (xq.scale * wq.scale)
    assert torch.allclose(out, ref.reshape(out.shape), atol=1e-5)


def test_fp32_policy_preserves_outputs_and_idempotence():
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    q = hdqt.quantize_model(model, hdqt.recipe("fp32"))
    assert isinstance(q[0], QuantConv2d) and isinstance(q[5], QuantLinear)
    assert torch.equal(before, q(x))
    first = q[0]
    hdqt.quantize_model(q, hdqt.recipe("hdqt"))  # already quantized layers are left alone
    assert q[0] is first and q[0].policy.name == "fp32"


@pytest.mark.parametrize("native_path", ["1", "0"])
@pytest.mark.parametrize("x_value, w_value", [(0.7, -1.3), (-2.0, 0.4), (1.5, 2.5), (-0.3, -0.9)])
def test_batch_of_one_and_unit_dims_has_a_closed_form(monkeypatch, native_path, x_value, w_value):
    # A 1x1 layer on one sample: each forward operand is its own max, so the 0.975
    # clip lands it on the top code and Q(t) = 0.975 t exactly (signed or unsigned).
    # The backward reductions have length 1 (no Hadamard block), the gradient 1 is
    # exactly a top code, so dX = 0.975 w and dW = 0.975 x: no rounding noise at all.
    monkeypatch.setenv("HDQT_NATIVE", native_path)
    layer = hdqt.quantize_model(nn.Linear(1, 1), hdqt.recipe("hdqt"))
    with torch.no_grad():
        layer.weight.fill_(w_value)
        layer.bias.fill_(0.25)
    x = torch.tensor([[x_value]], requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.item() == pytest.approx(0.975**2 * x_value * w_value + 0.25, rel=1e-6)
    assert x.grad.item() == pytest.approx(0.975 * w_value, rel=1e-6)
    assert layer.weight.grad.item() == pytest.approx(0.975 * x_value, rel=1e-6)
    assert layer.bias.grad.item() == 1.0


def test_policy_survives_state_dict_and_two_policies_coexist():
    torch.manual_seed(0)
    a = hdqt.quantize_model(_mlp(), hdqt.recipe("hdqt", bits=3, acc_bits=12, tile=16))
    b = hdqt.quantize_model(_mlp(), hdqt.recipe("int"))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    assert policy_from_state_dict(state) == a[0].policy
    fresh = hdqt.quantize_model(_mlp(), hdqt.recipe("fp32"))
    fresh.load_state_dict(state)
    assert fresh[0].policy == a[0].policy and fresh[0].policy.acc_bits == 12
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))
    for m in (a, b):  # both train in one process with their own policies
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert a[0].policy.hadamard and not b[0].policy.hadamard


def test_generator_state_makes_training_reproducible():
    def run(resume: bool):
        torch.manual_seed(0)
        m = hdqt.quantize_model(_mlp(), hdqt.recipe("hdqt", seed=3))
        x, y = torch.randn(16, 20), torch.randint(0, 10, (16,))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(4):
            if resume and step == 2:
                state = copy.deepcopy(m.state_dict())
                m = hdqt.quantize_model(_mlp(), hdqt.recipe("fp32"))
                m.load_state_dict(state)
                opt = torch.optim.SGD(m.parameters(), lr=0.1)
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_invalid_settings_name_the_argument():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*fp32"):
        hdqt.recipe("nope")
    with pytest.raises(ValueError, match="bits must be an integer in 2..16"):
        hdqt.recipe("hdqt", bits=20)
    with pytest.raises(ValueError, match="tile must be None .the whole reduction. or an integer >= 1"):
        hdqt.recipe("hdqt", tile=0)
    with pytest.raises(ValueError, match="unknown recipe override"):
        hdqt.recipe("hdqt", colour="red")
    with pytest.raises(ValueError, match="unknown QuantPolicy field"):
        hdqt.QuantPolicy.from_dict({"bitz": 4})


def test_policy_json_round_trip():
    p = hdqt.recipe("hdqt", hadamard_rule="binary")
    assert hdqt.QuantPolicy.from_json(p.to_json()) == p
