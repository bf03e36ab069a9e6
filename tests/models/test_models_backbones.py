"""Backbones: shapes, feature sizes, parameter counts, registry, MEMO split."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hdqt.models import FCNet, create_model, list_models, register_model, split_backbone
from hdqt.models.resnet import ZeroPadShortcut

CASES = [
    ("fcnet", (405,), 405),
    ("fcnet", (128, 6), 768),  # raw windows are flattened
    ("resnet32", (3, 32, 32), 64),
    ("resnet20", (3, 32, 32), 64),
    ("convnet", (1, 28, 28), 128),
    ("convnet", (3, 28, 28), 128),
]
# Layers the quantization engine converts (Linear, Conv2d) or leaves in float.
ALLOWED_LEAVES = (
    nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Identity, ZeroPadShortcut,
)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, shape, out_dim", CASES)
def test_forward_gives_out_dim_features(name, shape, out_dim):
    torch.manual_seed(0)
    model = create_model(name, shape)
    assert model.out_dim == out_dim
    features = model(torch.randn(3, *shape))
    assert features.shape == (3, out_dim)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name, shape, out_dim", CASES)
def test_backbones_use_only_quantizable_or_float_safe_layers(name, shape, out_dim):
    model = create_model(name, shape)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, ALLOWED_LEAVES) for m in leaves), {type(m).__name__ for m in leaves}


def test_fcnet_is_the_papers_405_405_405_without_bias():
    model = create_model("fcnet", (405,))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(405, 405), (405, 405)]
    assert all(m.bias is None for m in linears)
    assert _n_params(model) == 2 * 405 * 405
    assert create_model("fcnet", (243,), hidden=100).layer1[0].weight.shape == (100, 243)


def test_fcnet_features_are_non_negative_relu_outputs():
    out = create_model("fcnet", (20,))(torch.randn(8, 20))
    assert (out >= 0).all() and (out > 0).any()


def test_resnet32_structure_and_parameter_count():
    model = create_model("resnet32", (3, 32, 32))
    assert [len(s) for s in (model.stage1, model.stage2, model.stage3)] == [5, 5, 5]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31  # + the classifier head = 32 weighted layers
    assert [convs[i].out_channels for i in (0, 1, 11, 21)] == [16, 16, 32, 64]
    # CIFAR ResNet-32 has 0.46M parameters; option-A shortcuts add none
    assert 455_000 < _n_params(model) < 465_000
    assert not any(p for m in model.modules() if isinstance(m, ZeroPadShortcut) for p in m.parameters())


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


@pytest.mark.parametrize("name, shape, out_dim", CASES)
def test_split_backbone_shares_shallow_layers_and_builds_fresh_deep_ones(name, shape, out_dim):
    torch.manual_seed(0)
    model = create_model(name, shape)
    model.eval()
    generalized, make_specialized = split_backbone(model)
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in generalized.parameters()} <= model_params
    first, second = make_specialized(), make_specialized()
    assert first.out_dim == out_dim
    assert not ({id(p) for p in first.parameters()} & model_params)
    assert _n_params(generalized) + _n_params(first) == _n_params(model)
    first.eval()
    x = torch.randn(2, *shape)
    assert first(generalized(x)).shape == (2, out_dim)
    # loading the model's deep weights into a fresh specialised block reproduces the model
    deep = {k: v for k, v in model.state_dict().items() if not any(
        k.startswith(prefix) for prefix in _shallow_prefixes(name))}
    second.load_state_dict(dict(zip(second.state_dict(), deep.values())))
    second.eval()
    torch.testing.assert_close(second(generalized(x)), model(x))


def _shallow_prefixes(name: str) -> tuple[str, ...]:
    return {"fcnet": ("layer1",), "convnet": ("block1",)}.get(name, ("stem", "stage1", "stage2"))


def test_split_backbone_rejects_modules_without_split():
    with pytest.raises(TypeError, match="Linear has no split"):
        split_backbone(nn.Linear(2, 2))


def test_registry_lists_and_rejects_unknown_names():
    assert {"fcnet", "resnet32", "convnet"} <= set(list_models())
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'.*convnet, fcnet"):
        create_model("resnet18", (3, 32, 32))


@pytest.mark.parametrize("shape", ["abc", "405", 10.5, (405.0,), (3, True), ()])
def test_registry_rejects_non_integer_shapes_naming_the_argument(shape):
    with pytest.raises(ValueError, match=r"input_shape must be a positive integer"):
        create_model("fcnet", shape)


@pytest.mark.parametrize("name, argument, value", [
    ("fcnet", "hidden", 2.5), ("fcnet", "hidden", "64"), ("convnet", "out_dim", 1.5),
])
def test_registry_rejects_non_integer_sizes_naming_the_argument(name, argument, value):
    shape = (1, 28, 28) if name == "convnet" else (20,)
    with pytest.raises(ValueError, match=rf"{name}: {argument} must be an integer, got {value!r}"):
        create_model(name, shape, **{argument: value})


def test_registry_accepts_numpy_and_torch_integers():
    import numpy as np

    model = create_model("fcnet", torch.Size([4, 5]), hidden=np.int64(7))
    assert model.out_dim == 20 and model.layer1[0].weight.shape == (7, 20)
    assert create_model("fcnet", np.int64(9), hidden=None).out_dim == 9


def test_registry_checks_shapes_and_duplicates():
    with pytest.raises(ValueError, match=r"resnet32 needs input_shape \(C, H, W\)"):
        create_model("resnet32", (405,))
    with pytest.raises(ValueError, match="positive"):
        create_model("fcnet", (0,))
    with pytest.raises(ValueError, match="already registered"):
        register_model("fcnet")(lambda input_shape: FCNet(4))


def _classifier(name, shape):
    torch.manual_seed(0)
    features = create_model(name, shape)
    return nn.Sequential(features, nn.Linear(features.out_dim, 4))


def _small_batch(shape):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, *shape, generator=gen), torch.arange(16) % 4


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# (model, input shape, least cosine of any parameter's gradient at 12 bits). Measured at
# 1.0000, 0.9992, 0.984 and 0.962: the deeper the BatchNorm stack, the more the forward's
# rounding moves the gradients of the shallowest layers.
GRADIENT_CASES = [("fcnet", (20,), 0.999), ("convnet", (1, 28, 28), 0.995),
                  ("resnet20", (3, 16, 16), 0.97), ("resnet32", (3, 16, 16), 0.94)]


@pytest.mark.parametrize("name, shape, least", GRADIENT_CASES)
def test_backbone_gradients_follow_float32_at_12_bits(name, shape, least):
    import copy

    import hdqt

    model = _classifier(name, shape)
    x, y = _small_batch(shape)
    reference = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    policy = hdqt.recipe("hdqt", bits=12, acc_bits=None, clip_ratio=1.0, seed=0)
    quantized = hdqt.quantize_model(model, policy)
    assert all(isinstance(m, (hdqt.QuantLinear, hdqt.QuantConv2d))
               for m in quantized.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    torch.nn.functional.cross_entropy(quantized(x), y).backward()
    cosines = [_cos(r.grad, q.grad) for r, q in zip(reference.parameters(), quantized.parameters())]
    assert min(cosines) > least and sorted(cosines)[len(cosines) // 2] > 0.99


@pytest.mark.parametrize("name, shape", [(n, s) for n, s, _ in GRADIENT_CASES])
def test_backbones_fit_a_small_batch_under_4bit_hdqt(name, shape):
    import hdqt

    model = hdqt.quantize_model(_classifier(name, shape), hdqt.recipe("hdqt", seed=0))
    x, y = _small_batch(shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # measured: 1.41 -> 0.79 (fcnet), 1.39 -> 0.84 (convnet), to ~0 (the ResNets)
    assert min(losses[-3:]) < 0.75 * losses[0]
