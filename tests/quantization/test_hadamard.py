import pytest
import torch

from hdqt.quantization.hadamard import (
    HADAMARD_RULES, block_layout, dense_block_matrix, hadamard_transform, sylvester,
)

# the dense reference of the largest sizes is an n x n product: seconds each
SIZES = [1, 2, 3, 6, 8, 12, 19, 64, 100, 128, 405, 512, 1024,
         pytest.param(2048, marks=pytest.mark.slow), pytest.param(4096, marks=pytest.mark.slow)]


@pytest.mark.parametrize("rule", HADAMARD_RULES)
@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_dense_block_matrix(rule, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    dense = dense_block_matrix(n, rule)
    expected = torch.einsum("ij,ajb->aib", dense, x)
    for dim, xin, exp in ((1, x, expected), (0, x[0], expected[0]), (1, x[0].T.contiguous(), expected[0].T)):
        got = hadamard_transform(xin, dim, block_layout(n, rule))
        assert torch.allclose(got, exp, atol=1e-9)


def test_paper_rule_blocks():
    assert block_layout(405, "paper").blocks == (1,) * 405  # odd size: identity
    assert block_layout(96, "paper").blocks == (32,) * 3
    assert block_layout(128, "paper").blocks == (128,)
    assert block_layout(405, "binary").blocks == (256, 128, 16, 4, 1)
    assert block_layout(100, "binary").blocks == (64, 32, 4)


@pytest.mark.parametrize("rule", HADAMARD_RULES)
@pytest.mark.parametrize("n", [96, 100, 405])
def test_transform_twice_is_identity_up_to_product_scale(rule, n):
    layout = block_layout(n, rule)
    x = torch.randn(5, n, dtype=torch.float64)
    twice = hadamard_transform(hadamard_transform(x, 1, layout), 1, layout)
    assert torch.allclose(twice * layout.product_scale, x, atol=1e-9)


def test_sylvester_is_orthogonal():
    h = sylvester(16)
    assert torch.equal(h @ h, 16 * torch.eye(16))
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)


def test_unknown_rule_raises():
    with pytest.raises(ValueError, match="hadamard_rule must be one of"):
        block_layout(8, "nope")
