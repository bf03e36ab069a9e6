"""The native kernels and the pure-torch path must compute the same quantities."""
import pytest
import torch

from hdqt.quantization import int_quantizer, native
from hdqt.quantization.hadamard import block_layout, hadamard_transform

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler: only the torch path exists here")


def test_native_fwht_equals_torch_path(monkeypatch):
    x = torch.randn(4, 6, 1024)
    layout = block_layout(1024)
    fast = hadamard_transform(x, 2, layout)
    monkeypatch.setenv("HDQT_NATIVE", "0")
    assert native.load() is None
    slow = hadamard_transform(x, 2, layout)
    assert torch.allclose(fast, slow, atol=1e-3)


def test_native_stochastic_rounding_unbiased_reproducible_and_in_range():
    q = int_quantizer(4, rounding="stochastic")
    t = torch.tensor([7.0, -2.3, 0.61, 3.5, -6.9, 0.05]).repeat(4000)
    out = q.quantize(t, torch.Generator().manual_seed(0)).values.view(4000, 6)
    assert torch.allclose(out.mean(0), t[:6], atol=0.032)
    assert out.abs().max() <= 7 and torch.equal(out, out.round())
    again = q.quantize(t, torch.Generator().manual_seed(0)).values.view(4000, 6)
    assert torch.equal(out, again)
    other = q.quantize(t, torch.Generator().manual_seed(1)).values.view(4000, 6)
    assert not torch.equal(out, other)
