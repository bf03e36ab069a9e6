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


@pytest.mark.parametrize("build,shape", [(_mlp, (16, 20)), (_cnn, (4, 3, 6, 6))])
@pytest.mark.parametrize("name", ["hdqt", "int"])
def test_16bit_gradients_match_float(build, shape, name):
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(*shape), torch.randint(0, 5, (shape[0],))
    ref = _grads(model, x, y)
    # clip_ratio=1: the 0.975 forward clip is a deliberate bias that does not vanish with bits
    q = hdqt.quantize_model(copy.deepcopy(model), hdqt.recipe(name, bits=16, acc_bits=None, clip_ratio=1.0))
    for r, g in zip(ref, _grads(q, x, y)):
        assert _cos(r, g) > 0.999


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


def test_batch_of_one_and_unit_dims():
    layer = hdqt.quantize_model(nn.Linear(1, 1), hdqt.recipe("hdqt"))
    x = torch.randn(1, 1, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


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
    with pytest.raises(ValueError, match="tile must be an integer >= 1"):
        hdqt.recipe("hdqt", tile=0)
    with pytest.raises(ValueError, match="unknown recipe override"):
        hdqt.recipe("hdqt", colour="red")
    with pytest.raises(ValueError, match="unknown QuantPolicy field"):
        hdqt.QuantPolicy.from_dict({"bitz": 4})


def test_policy_json_round_trip():
    p = hdqt.recipe("hdqt", hadamard_rule="binary")
    assert hdqt.QuantPolicy.from_json(p.to_json()) == p
