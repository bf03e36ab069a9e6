"""Block-diagonal Sylvester-Hadamard transforms along one dimension of a tensor.

Block rules (how a dimension of size n is covered by Hadamard blocks):

* ``"paper"`` (default, as in HDQT): one block size p, the largest power of two
  dividing n, repeated n/p times. An odd n gets p = 1, the identity, so sizes such
  as 405 (DSADS features) are not mixed at all.
* ``"binary"``: blocks follow the binary expansion of n, largest first, e.g.
  405 = 256 + 128 + 16 + 4 + 1 and 100 = 64 + 32 + 4. All but a few entries sit in
  large blocks, so outliers spread over hundreds of entries instead of none, at
  no extra cost (no padding). For a power of two both rules agree.

Blocks of one size are applied unnormalised (entries ±1): H_p H_p = p I, so a
product of two transformed operands is divided by p afterwards (``product_scale``).
When blocks differ in size, each block is normalised by 1/sqrt(p) instead, which
makes the whole transform orthogonal and the product needs no correction.

The transform is a fast Walsh-Hadamard transform. A block of size p = 2^k is
factored as a Kronecker product H_p = H_r1 ⊗ H_r2 ⊗ ... with radices r <= 32,
and each factor is applied along its own axis as one small batched matmul. This
is O(n log n) like the radix-2 butterfly, but touches memory ceil(k/5) times
instead of k times, which is what costs on CPU.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hdqt.quantization import native

HADAMARD_RULES = ("paper", "binary")
_MAX_RADIX_BITS = 5  # radix 32 per stage


def check_rule(rule: str) -> str:
    if rule not in HADAMARD_RULES:
        raise ValueError(f"hadamard_rule must be one of {HADAMARD_RULES}, got {rule!r}")
    return rule


@dataclass(frozen=True)
class BlockLayout:
    """Sizes of the diagonal Hadamard blocks covering one dimension, in order."""

    blocks: tuple[int, ...]

    # Computed once per layout (cached_property writes the instance's __dict__, which a
    # frozen dataclass allows): the paper rule on an odd width has one block per
    # feature, and the backward asks these at every product.
    @functools.cached_property
    def size(self) -> int:
        return sum(self.blocks)

    @functools.cached_property
    def uniform(self) -> bool:
        return len(set(self.blocks)) == 1

    @functools.cached_property
    def is_identity(self) -> bool:
        return all(p == 1 for p in self.blocks)

    @property
    def product_scale(self) -> float:
        """Factor that undoes H·H in a product of two transformed operands."""
        return 1.0 / self.blocks[0] if self.uniform else 1.0


@functools.lru_cache(maxsize=256)  # a pure function of (n, rule) and the layout is immutable: one per width
def block_layout(n: int, rule: str = "paper") -> BlockLayout:
    check_rule(rule)
    if n < 1:
        raise ValueError(f"dimension size must be >= 1, got {n}")
    if rule == "paper":
        p = n & -n  # largest power of two dividing n
        return BlockLayout((p,) * (n // p))
    return BlockLayout(tuple(1 << b for b in reversed(range(n.bit_length())) if n >> b & 1))


def sylvester(p: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Dense Sylvester matrix H_p, entry (i, j) = (-1)^popcount(i & j). For tests and small radices."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester-Hadamard size must be a power of two, got {p}")
    idx = torch.arange(p, device=device)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def dense_block_matrix(n: int, rule: str = "paper", *, dtype=torch.float64) -> torch.Tensor:
    """The transform as a dense n x n matrix (reference for tests only)."""
    layout = block_layout(n, rule)
    mats = []
    for p in layout.blocks:
        h = sylvester(p, dtype=dtype)
        mats.append(h if layout.uniform else h / math.sqrt(p))
    return torch.block_diag(*mats)


def _radices(p: int) -> list[int]:
    bits = p.bit_length() - 1
    stages = max(1, math.ceil(bits / _MAX_RADIX_BITS))
    base, extra = divmod(bits, stages)
    return [1 << (base + (i < extra)) for i in range(stages)]


def _fwht_uniform(x: torch.Tensor, dim: int, p: int, cache: dict | None) -> tuple[torch.Tensor, float | None]:
    """Unnormalised transform of every length-p block along ``dim`` (x of any strides).

    Returns a new contiguous tensor and max|result| when the native kernel computed it on the way.
    """
    shape = x.shape
    pre = math.prod(shape[:dim])
    post = math.prod(shape[dim + 1 :])
    blocks = shape[dim] // p
    if post == 1 and native.usable(x):
        lib = native.load()
        if lib is not None:  # rows along the last dim: all stages while the row is in cache
            out = x.clone(memory_format=torch.contiguous_format)  # one copy, also of a transposed view
            amax = lib.hdqt_fwht_rows_f32(out.data_ptr(), out.numel() // shape[dim], shape[dim], p,
                                          native.threads())
            return out, amax
    x = x.contiguous()
    radices = _radices(p)
    outer = pre * blocks
    for i, r in enumerate(radices):
        h = _radix_matrix(r, x, cache)
        inner = math.prod(radices[i + 1 :]) * post
        lead = outer * math.prod(radices[:i])
        if inner == 1:
            x = (x.reshape(lead, r) @ h)
        else:
            x = torch.matmul(h, x.reshape(lead, r, inner))
    return x.reshape(shape), None


def _radix_matrix(r: int, like: torch.Tensor, cache: dict | None) -> torch.Tensor:
    # The cache is owned by the caller (a layer), so no state lives at module level.
    key = (r, like.dtype, like.device)
    if cache is not None and key in cache:
        return cache[key]
    h = sylvester(r, dtype=like.dtype, device=like.device)
    if cache is not None:
        cache[key] = h
    return h


def hadamard_transform(
    x: torch.Tensor, dim: int, layout: BlockLayout, cache: dict | None = None
) -> torch.Tensor:
    """Apply the block-diagonal transform ``layout`` along ``dim`` of ``x``.

    Returns a new tensor. Uniform layouts are unnormalised (see ``product_scale``);
    mixed layouts are orthonormal.
    """
    return hadamard_transform_amax(x, dim, layout, cache)[0]


def hadamard_transform_amax(
    x: torch.Tensor, dim: int, layout: BlockLayout, cache: dict | None = None
) -> tuple[torch.Tensor, float | None]:
    """``hadamard_transform`` plus max|result| where it came for free (else None),
    so that a quantizer of the result can skip its own pass over the tensor."""
    dim = dim % x.dim()
    if x.shape[dim] != layout.size:
        raise ValueError(f"dimension {dim} has size {x.shape[dim]} but the layout covers {layout.size}")
    if layout.is_identity:
        return x.clone(), None
    if layout.uniform:
        return _fwht_uniform(x, dim, layout.blocks[0], cache)
    parts = []
    for block in torch.split(x, list(layout.blocks), dim=dim):
        p = block.shape[dim]
        part = _fwht_uniform(block.contiguous(), dim, p, cache)[0] if p > 1 else block.clone()
        parts.append(part.mul_(1.0 / math.sqrt(p)) if p > 1 else part)
    return torch.cat(parts, dim=dim), None
