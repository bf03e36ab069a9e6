"""quantize_model: what it converts, what it refuses, and the plan it shows."""
import pytest
import torch
import torch.nn as nn

import hdqt
from hdqt.quantization import QuantConv2d, QuantLinear, UnsupportedLayerError, plan_quantization


class PlainSubclass(nn.Linear):
    """Like attention's out_proj (NonDynamicallyQuantizableLinear): a name, nothing else."""


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclass_without_its_own_forward_is_converted_and_quantized():
    model = nn.Sequential(PlainSubclass(8, 4), nn.ReLU(), nn.Linear(4, 2))
    hdqt.quantize_model(model, hdqt.recipe("hdqt"))
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    # it trains under the policy: the forward output lies on the quantized grid
    x = torch.randn(5, 8)
    xq = model[0].policy.forward_input.quantize(x)
    wq = model[0].policy.forward_weight.quantize(model[0].weight.detach())
    expected = (xq.values @ wq.values.T) * (xq.scale * wq.scale) + model[0].bias
    assert torch.allclose(model[0](x), expected, atol=1e-5)


def test_attention_out_proj_is_converted_inside_a_model_that_excludes_the_attention():
    # F.multi_head_attention_forward never calls out_proj's forward: converting out_proj
    # alone would quantize nothing, so the attention module is refused as a whole...
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 3)})
    with pytest.raises(UnsupportedLayerError, match=r"attn \(MultiheadAttention\).*out_proj"):
        hdqt.quantize_model(model, hdqt.recipe("hdqt"))
    assert type(model["head"]) is nn.Linear  # a refused plan changes nothing
    # ...unless excluded on purpose, and then it and its out_proj stay float
    hdqt.quantize_model(model, hdqt.recipe("hdqt"), exclude=["attn"])
    assert isinstance(model["head"], QuantLinear)
    assert type(model["attn"].out_proj) is not QuantLinear


@pytest.mark.parametrize("layer, reason", [
    (ScaledLinear(4, 4), "overrides forward"),
    (nn.Conv2d(4, 4, 3, groups=2), "grouped convolution"),
    (nn.Conv2d(4, 4, 3, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv1d(4, 4, 3), "1-d convolution"),
    (nn.ConvTranspose2d(4, 4, 3), "transposed convolution"),
    (nn.LSTM(4, 4), "recurrent"),
    (nn.Bilinear(4, 4, 2), "bilinear"),
])
def test_unsupported_layers_are_refused_by_name(layer, reason):
    model = nn.Sequential(nn.Linear(4, 4), layer)
    with pytest.raises(UnsupportedLayerError, match=rf"(?s)  1 \(\w+\): [^\n]*{reason}.*exclude=\[.1.\]"):
        hdqt.quantize_model(model, hdqt.recipe("hdqt"))
    assert type(model[0]) is nn.Linear
    hdqt.quantize_model(model, hdqt.recipe("hdqt"), exclude=["1"])
    assert isinstance(model[0], QuantLinear) and model[1] is layer


def test_plan_lists_every_decision_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), PlainSubclass(4, 4), ScaledLinear(4, 2))
    model[0] = hdqt.quantize_model(model[0], hdqt.recipe("int"))
    plan = plan_quantization(model, hdqt.recipe("hdqt"), exclude=["3"],
                             layer_policies={"2": hdqt.recipe("fp32")})
    rows = {d.name: (d.kind, d.action, d.policy) for d in plan.decisions}
    assert rows == {"0": ("QuantConv2d", "keep", "int"), "2": ("PlainSubclass", "convert", "fp32"),
                    "3": ("ScaledLinear", "exclude", None)}
    assert type(model[2]) is PlainSubclass  # planning converts nothing
    text = str(plan)
    assert "PlainSubclass" in text and "(1 convert, 1 keep, 1 exclude)" in text


def test_verbose_prints_the_plan(capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv2d(1, 1, 1))
    hdqt.quantize_model(model, hdqt.recipe("hdqt"), verbose=True)
    out = capsys.readouterr().out
    assert "0 " in out and "Linear" in out and "Conv2d" in out and "(2 convert)" in out
    assert isinstance(model[2], QuantConv2d)


def test_bad_exclude_names_the_argument():
    with pytest.raises(ValueError, match="exclude must be a list of module names"):
        hdqt.quantize_model(nn.Linear(2, 2), hdqt.recipe("hdqt"), exclude="fc")
