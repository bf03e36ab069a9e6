"""HadaNets: binarization semantics, gradients, the recipe, quantize_model's first/last rule
and a tiny model that learns (the bit-packed kernel itself: test_binary_kernel.py)."""
import json

import pytest
import torch
import torch.nn as nn

import hdqt
from hdqt.quantization import binarize, binary_kernel
from hdqt.quantization.binary import model_size_bits
from hdqt.quantization.boundary import boundary_layers
from hdqt.quantization.formats import BinaryFormat, format_from_dict
from hdqt.quantization.quantizer import Quantizer
from hdqt.quantization.scaling import GroupMeanScaling, scaling_from_dict

GROUPS = [None, 2, 4, 16, 64]


class _SteSign(torch.autograd.Function):
    """The float reference's sign: +-1 forward (sign(0) = -1), clipped STE backward."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return torch.where(t > 0, 1.0, -1.0).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * (t.abs() <= 1)


def reference_binarized(t: torch.Tensor, group):
    """sign(t) * mean|t| per group, written from the definition, for autograd."""
    k = t.shape[-1]
    size = k if group is None else min(group, k)
    parts = []
    for start in range(0, k, size):
        chunk = t[..., start:start + size]
        parts.append(_SteSign.apply(chunk) * chunk.abs().mean(-1, keepdim=True))
    return torch.cat(parts, -1)


@pytest.mark.parametrize("group", GROUPS)
def test_beta_is_the_mean_magnitude_of_each_group(group):
    t = torch.randn(5, 37)  # 37: no group divides it
    betas = binarize.group_betas(t, group)
    size = 37 if group is None else group
    for g in range(betas.shape[1]):
        assert torch.allclose(betas[:, g], t[:, g * size:(g + 1) * size].abs().mean(1))
    assert betas.shape[1] == (1 if group is None else -(-37 // group))
    assert torch.allclose(binarize.binarized(t, group), reference_binarized(t, group))


def test_sign_of_zero_is_minus_one_and_the_quantizer_binarizes_rows():
    t = torch.tensor([[0.0, -0.0, -2.0, 3.0], [1.0, -1.0, 0.5, -0.5]])
    assert binarize.signs(t).tolist() == [[-1.0, -1.0, -1.0, 1.0], [1.0, -1.0, 1.0, -1.0]]
    q = Quantizer(BinaryFormat(), GroupMeanScaling(2))
    qt = q.quantize(t)
    assert qt.values.tolist() == [[-1.0, -1.0, -1.0, 1.0], [1.0, -1.0, 1.0, -1.0]]
    assert qt.dequantize().tolist() == [[0.0, 0.0, -2.5, 2.5], [1.0, -1.0, 0.5, -0.5]]
    conv_weight = torch.randn(3, 2, 3, 3)  # rows: output channels, K = 18
    qw = Quantizer(BinaryFormat(), GroupMeanScaling(None)).quantize(conv_weight)
    assert torch.allclose(qw.scale[:, 0, 0, 0], conv_weight.reshape(3, -1).abs().mean(1))


@pytest.mark.parametrize("group", GROUPS)
def test_gradient_equals_autograd_of_the_reference_formula(group):
    torch.manual_seed(1)
    t = (torch.randn(6, 37, dtype=torch.float64) * 1.2).requires_grad_()
    upstream = torch.randn(6, 37, dtype=torch.float64)
    reference_binarized(t, group).backward(upstream)
    betas = binarize.group_betas(t.detach(), group)
    ours = binarize.binarized_grad(t.detach(), upstream, betas, group)
    assert torch.allclose(ours, t.grad, atol=1e-12)


def test_ste_is_clipped_at_one():
    t = torch.tensor([[-3.0, -1.0, 0.5, 2.0]])
    betas = binarize.group_betas(t, None)
    grad = binarize.binarized_grad(t, torch.ones_like(t), betas, None)
    beta_part = torch.sign(t) * (binarize.signs(t).sum() / 4)  # the gradient through beta alone
    direct = grad - beta_part
    assert direct[0].tolist() == pytest.approx([0.0, betas.item(), betas.item(), 0.0])


@pytest.mark.parametrize("group", [None, 4, 16])
def test_layers_match_the_float_reference_forward_and_backward(group, monkeypatch):
    torch.manual_seed(2)
    policy = hdqt.recipe("hadanet", group=group)
    for native in ("auto", "torch"):
        monkeypatch.setenv("HDQT_BINARY", native)
        linear = hdqt.QuantLinear(37, 5, policy=policy)
        x = torch.randn(8, 37, requires_grad=True)
        y = linear(x)
        xr = x.detach().clone().requires_grad_()
        wr = linear.weight.detach().clone().requires_grad_()
        yr = reference_binarized(xr, group) @ reference_binarized(wr, group).T + linear.bias
        assert torch.allclose(y, yr, atol=1e-4), native
        upstream = torch.randn_like(y)
        y.backward(upstream), yr.backward(upstream)
        assert torch.allclose(x.grad, xr.grad, atol=1e-5) and torch.allclose(linear.weight.grad, wr.grad, atol=1e-5)

        conv = hdqt.QuantConv2d(3, 4, 3, stride=2, padding=1, policy=policy)
        xc = torch.randn(2, 3, 9, 9, requires_grad=True)
        yc = conv(xc)
        xcr = xc.detach().clone().requires_grad_()
        wcr = conv.weight.detach().clone().requires_grad_()
        cols = nn.functional.unfold(xcr, 3, padding=1, stride=2).transpose(1, 2)  # (B, L, K): padded zeros count
        ycr = (reference_binarized(cols, group) @ reference_binarized(wcr.reshape(4, -1), group).T)
        ycr = ycr.transpose(1, 2).reshape(2, 4, 5, 5) + conv.bias.view(1, -1, 1, 1)
        assert torch.allclose(yc, ycr, atol=1e-4), native
        upstream = torch.randn_like(yc)
        yc.backward(upstream), ycr.backward(upstream)
        assert torch.allclose(xc.grad, xcr.grad, atol=1e-4) and torch.allclose(conv.weight.grad, wcr.grad, atol=1e-4)


def test_recipe_round_trips_and_validates():
    policy = hdqt.recipe("hadanet", group=16)
    assert policy.is_binary and policy.binary_group == 16 and policy.float_first_last
    assert hdqt.QuantPolicy.from_json(policy.to_json()) == policy
    assert hdqt.QuantPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert format_from_dict(BinaryFormat().to_dict()) == BinaryFormat()
    assert scaling_from_dict(GroupMeanScaling(8).to_dict()) == GroupMeanScaling(8)
    assert hdqt.recipe("hadanet").binary_group is None
    assert "float_first_last" not in hdqt.recipe("hdqt").to_dict()  # older policies read the same
    assert hdqt.recipe("hadanet", float_first_last=False).name == "hadanet[float_first_last=False]"
    for bad, message in [(dict(group=12), "power of two"), (dict(bits=4), "takes no bits"),
                         (dict(acc_bits=8), "acc_bits must be None"), (dict(hadamard=True), "hadamard does not apply")]:
        with pytest.raises(ValueError, match=message):
            hdqt.recipe("hadanet", **bad)
    binary = policy.forward_weight
    with pytest.raises(ValueError, match="binarizes both forward operands"):
        hdqt.QuantPolicy(forward_weight=binary)
    with pytest.raises(ValueError, match="float gradients"):
        hdqt.QuantPolicy(forward_input=binary, forward_weight=binary, grad_output_dx=hdqt.quantization.int_quantizer(4))
    with pytest.raises(ValueError, match="go together"):
        Quantizer(BinaryFormat(), hdqt.quantization.DynamicScaling())


def test_checkpoint_keeps_the_policy():
    model = hdqt.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                                hdqt.recipe("hadanet", group=4))
    state = model.state_dict()
    assert hdqt.quantization.policy_from_state_dict(state) == hdqt.recipe("hadanet", group=4)
    again = hdqt.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                                hdqt.recipe("hadanet"))
    again.load_state_dict(state)
    assert again[2].policy == hdqt.recipe("hadanet", group=4)
    x = torch.randn(3, 8)
    assert torch.equal(again(x), model(x))


class _TwoBranches(nn.Module):
    """DER-like: two extractors read the input; a head on their concatenation; an aux head not in forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(16, 3)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


def test_quantize_model_keeps_the_first_and_last_layers_float():
    model = _TwoBranches()
    first, last, how = boundary_layers(model)
    assert (first, last, how) == ({"a.0", "b.0"}, {"head"}, "data flow")
    hdqt.quantize_model(model, hdqt.recipe("hadanet"))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {"a.0": "Linear", "a.2": "QuantLinear", "b.0": "Linear", "b.2": "QuantLinear",
                     "head": "Linear", "aux": "QuantLinear"}
    plan = hdqt.quantization.plan_quantization(model, hdqt.recipe("hadanet"))
    assert [d.action for d in plan.decisions if d.name == "head"] == ["float"]
    everything = hdqt.quantize_model(_TwoBranches(), hdqt.recipe("hadanet", float_first_last=False))
    assert all(isinstance(m, hdqt.QuantLinear) for m in everything.children() if isinstance(m, nn.Linear))
    # a model fx cannot trace falls back to module order
    class Dynamic(_TwoBranches):
        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], 1)) if x.sum() > 0 else self.aux(self.a(x))
    assert boundary_layers(Dynamic())[:2] == ({"a.0"}, {"aux"})


def test_model_size_counts_bits_betas_and_float_layers():
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32),
                          nn.ReLU(), nn.Linear(32, 4, bias=False))
    per_row = model_size_bits(model, hdqt.recipe("hadanet"))
    assert per_row["binary_weights"] == 32 * 32 and per_row["betas"] == 32 * 32  # 32 rows, one beta each
    assert per_row["float"] == 32 * (64 * 32 + 32 * 4 + 4 * 32)  # first, last, BN weight, bias, mean, var
    grouped = model_size_bits(model, hdqt.recipe("hadanet", group=8))
    assert grouped["betas"] == 32 * 32 * 4
    assert model_size_bits(model)["total"] == 32 * sum(p.numel() for p in model.parameters()) + 32 * 64
    hdqt.quantize_model(model, hdqt.recipe("hadanet"))
    assert model_size_bits(model) == per_row


def test_a_tiny_binarized_model_learns_a_separable_problem():
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    y = (x[:, :16].sum(1) > x[:, 16:].sum(1)).long()
    model = hdqt.quantize_model(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64),
                                              nn.ReLU(), nn.Linear(64, 2)),
                                hdqt.recipe("hadanet", group=16, float_first_last=False))
    assert all(isinstance(m, hdqt.QuantLinear) for m in model if isinstance(m, nn.Linear))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, accuracy


def test_hdqt_run_group_flag_is_validated_and_reaches_the_recipe():
    from hdqt.experiments.config import ConfigError, policy_overrides, resolve_config

    config = resolve_config(None, {"recipe": "hadanet", "group": 16})
    assert hdqt.recipe(config.recipe, **policy_overrides(config)).binary_group == 16
    per_row = resolve_config(None, {"recipe": "hadanet", "group": 0})
    assert hdqt.recipe(per_row.recipe, **policy_overrides(per_row)).binary_group is None
    with pytest.raises(ConfigError, match="--group must be 0 .one group per row. or a power of two >= 2, got 3"):
        resolve_config(None, {"recipe": "hadanet", "group": 3})
    with pytest.raises(ConfigError, match="the hdqt recipe takes no group"):
        resolve_config(None, {"recipe": "hdqt", "group": 16})


def test_a_relu_output_binarizes_to_the_relu_pattern():
    """sign(relu(z)) must carry z's pattern: with sign(0) = +1 every input of a layer that
    follows a ReLU binarized to +1, all its output channels were multiples of one map, and
    BatchNorm's division by their (tiny) spreads blew the gradients up (1e20 at ResNet-32's stem)."""
    z = torch.randn(4, 64)
    z[z == 0] = 1.0
    x = torch.relu(z)
    assert torch.equal(binarize.signs(x), torch.sign(z))
    assert torch.equal(Quantizer(BinaryFormat(), GroupMeanScaling(16)).quantize(x).values, torch.sign(z))
    if binary_kernel._lib() is not None:
        assert torch.equal(binary_kernel.pack(x), binary_kernel.pack(z))


def _reference_model(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` whose binarized layers compute the reference formula with autograd."""
    import copy

    class Reference(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            layer, group = self.layer, self.layer.policy.binary_group
            w = reference_binarized(layer.weight.reshape(layer.weight.shape[0], -1), group)
            if isinstance(layer, nn.Linear):
                return reference_binarized(x, group) @ w.T + (0 if layer.bias is None else layer.bias)
            cols = nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            y = (reference_binarized(cols.transpose(1, 2), group) @ w.T).transpose(1, 2)
            oh = (x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
            y = y.reshape(x.shape[0], -1, oh, y.shape[-1] // oh)
            return y if layer.bias is None else y + layer.bias.view(1, -1, 1, 1)

    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, (hdqt.QuantLinear, hdqt.QuantConv2d)) and module.policy.is_binary:
            parent = reference.get_submodule(name.rpartition(".")[0]) if "." in name else reference
            setattr(parent, name.rpartition(".")[2], Reference(module))
    return reference


@pytest.mark.parametrize("group", [None, 16])
def test_a_binarized_resnet_trains_like_the_reference_formula_and_its_gradients_stay_bounded(group):
    from hdqt.models.resnet import CifarResNet

    torch.manual_seed(3)
    model = nn.Sequential(CifarResNet(3, blocks_per_stage=2), nn.Linear(64, 10))
    fp32_model = __import__("copy").deepcopy(model)
    hdqt.quantize_model(model, hdqt.recipe("hadanet", group=group))
    reference = _reference_model(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    norms = {}
    for name, net in (("hadanet", model), ("reference", reference), ("fp32", fp32_model)):
        nn.functional.cross_entropy(net(x), y).backward()
        norms[name] = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters())).item()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-4 * q.grad.abs().max().item()), name
    # binarizing costs some gradient fidelity, not orders of magnitude (it was 1e8x with sign(0) = +1)
    assert norms["hadanet"] < 30 * norms["fp32"], norms


@pytest.mark.parametrize("group", GROUPS)
def test_the_grouped_backward_computes_the_expanded_formula(group):
    """binarize.py works on (..., G, size) views with broadcast betas: the same values as the
    formula written with a beta per element (for strided rows, the float32 sum of each group
    may run in another order: equal up to its rounding)."""
    torch.manual_seed(4)
    x = torch.randn(2, 5, 9, 9) * 1.3
    strided = nn.functional.unfold(x, 3, padding=1).transpose(1, 2)  # (B, L, K), K = 45
    for t in (strided, strided.contiguous(), torch.randn(6, 37)):
        t = t.clone() if t.dim() == 2 else t
        grad = torch.randn(t.shape)
        betas = binarize.group_betas(t, group)
        k = t.shape[-1]
        e = binarize.expand(betas, group, k)
        signs = torch.where(t > 0, 1.0, -1.0)
        mean = binarize._grouped(grad * signs, group).sum(-1) / binarize.group_lengths(k, group)
        expected = grad * e * (t.abs() <= 1) + torch.sign(t) * binarize.expand(mean, group, k)
        ours = binarize.binarized_grad(t, grad, betas, group)
        if t.is_contiguous():
            assert torch.equal(ours, expected)
        else:
            assert torch.allclose(ours, expected, rtol=0, atol=1e-6)
        assert torch.equal(binarize.binarized(t, group, betas), signs * e)
