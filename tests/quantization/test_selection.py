"""hadamard_select="noise": each backward product runs in the domain where its operands'
estimated rounding error is smaller (hdqt/quantization/selection.py)."""
import pytest
import torch
import torch.nn as nn

import hdqt
from hdqt.quantization import int_quantizer
from hdqt.quantization.functional import backward_operands
from hdqt.quantization.runtime import LayerRuntime
from hdqt.quantization.selection import relative_rounding_error


def test_the_estimate_is_the_expected_stochastic_rounding_error():
    t = torch.randn(4000) * torch.rand(4000) ** 3  # many values below one grid step
    q = int_quantizer(4, rounding="stochastic")
    estimate = relative_rounding_error(t, q)
    draws = torch.stack([q.quantize(t, torch.Generator().manual_seed(s)).dequantize() for s in range(300)])
    measured = float(((draws - t) ** 2).sum(1).mean() / (t**2).sum())
    assert estimate == pytest.approx(measured, rel=0.05)


def test_the_estimate_is_exact_for_rounding_to_nearest():
    t = torch.randn(1000)
    q = int_quantizer(4)
    exact = float(((q.quantize(t).dequantize() - t) ** 2).sum() / (t**2).sum())
    assert relative_rounding_error(t, q) == pytest.approx(exact, rel=1e-4)
    assert relative_rounding_error(torch.zeros(5), q) == 0.0 and relative_rounding_error(t, None) == 0.0


def _runtime(select):
    return LayerRuntime(hdqt.recipe("hdqt", hadamard_select=select), "layer", 0)


def _domain(select, a, b):
    """1/p when the product ran in the Hadamard domain, 1.0 in the raw one."""
    policy = _runtime(select).policy
    *_, extra = backward_operands(_runtime(select), a, 1, policy.grad_output_dw, "a", b, 1,
                                  policy.backward_input, "b")
    return extra


def test_outliers_choose_the_hadamard_domain_and_sparse_offset_operands_the_raw_one():
    gen = torch.Generator().manual_seed(0)
    heavy = torch.randn(64, 128, generator=gen)
    heavy.view(-1)[torch.randint(0, heavy.numel(), (20,), generator=gen)] *= 50  # gradient outliers
    dense = torch.randn(32, 128, generator=gen)
    assert _domain("noise", heavy, dense) == 1 / 128  # the paper's case: the transform helps
    sparse = torch.randn(64, 128, generator=gen) * (torch.rand(64, 128, generator=gen) < 0.05)
    offset = torch.rand(32, 128, generator=gen) + 3.0  # non-negative with a common offset
    assert _domain("noise", sparse, offset) == 1.0  # the transform would make them worse: raw
    assert _domain("always", sparse, offset) == 1 / 128  # the paper's rule transforms regardless


def _conv_dw_error(select, draws=24):
    """Mean relative error of a conv's dW against float32 on the same quantized forward,
    for a non-negative, offset input and a sparse gradient (a convnet after ReLU and max-pool)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 4, 16, 16, generator=gen) + 0.5
    grad = torch.randn(8, 8, 16, 16, generator=gen) * (torch.rand(8, 8, 16, 16, generator=gen) < 0.1)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    fp = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    errors = []
    for seed in range(draws):
        layer = hdqt.quantize_model(nn.Conv2d(4, 8, 3, padding=1, bias=False),
                                    hdqt.recipe("hdqt", acc_bits=None, hadamard_select=select, seed=seed))
        layer.weight.data.copy_(conv.weight.data)
        layer(x).backward(grad)
        xq = layer.policy.forward_input.quantize(x).dequantize()  # the same forward operand in float32
        fp.weight.grad = None
        fp.weight.data.copy_(conv.weight.data)
        fp(xq).backward(grad)
        errors.append(float((layer.weight.grad - fp.weight.grad).norm() ** 2 / fp.weight.grad.norm() ** 2))
    return sum(errors) / len(errors)


def test_noise_selection_lowers_the_conv_weight_gradients_error_where_the_transform_hurts():
    always, noise = _conv_dw_error("always"), _conv_dw_error("noise")
    assert noise < 0.5 * always, (noise, always)


def test_noise_selection_needs_integer_operands():
    with pytest.raises(ValueError, match="hadamard_select='noise' estimates rounding error on an integer grid"):
        hdqt.recipe("luq", hadamard_select="noise")
    with pytest.raises(ValueError, match="hadamard_select must be one of"):
        hdqt.recipe("hdqt", hadamard_select="sometimes")
