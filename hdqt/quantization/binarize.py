"""HadaNets binarization as tensor functions: t ~ sign(t) * beta, beta per group.

Every function works along the LAST dimension of its tensor (the reduction
dimension: a weight's row, an input's row, an im2col column read as a row), in
groups of ``group`` consecutive values (None: the whole row is one group; a last
group holds what is left when ``group`` does not divide the row). Leading
dimensions are rows.

* ``signs(t)``: +1 where t > 0, -1 elsewhere (sign(0) = -1: a bit has two states, and
  this way the signs of a ReLU's output are the signs of its input, the pre-activation
  pattern that XNOR-Net binarizes; with sign(0) = +1 every input of a layer after a
  ReLU binarized to +1, see ``binary.py``).
* ``group_betas(t, group)``: beta = mean |t| over each group, shape (..., G).
* ``expand(betas, group, k)``: beta per element, shape (..., k).
* ``binarized(t, group)``: sign(t) * beta, the float tensor the products see.
* ``binarized_grad(t, grad, betas, group)``: the backward of ``binarized``: the
  straight-through estimator clipped to |t| <= 1, plus the gradient through beta,
  ``d beta / d t_i = sgn(t_i) / n_group`` with torch's sgn (0 at 0, as autograd
  differentiates |t|). So it equals autograd of ``ste_sign(t) * mean|t|``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_count(k: int, group: int | None) -> int:
    return 1 if group is None or group >= k else math.ceil(k / group)


def _size(k: int, group: int | None) -> int:
    return k if group is None or group >= k else group


def group_lengths(k: int, group: int | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """The number of values of each group of a row of ``k``: (G,)."""
    size, count = _size(k, group), group_count(k, group)
    lengths = torch.full((count,), float(size), device=device, dtype=dtype)
    lengths[-1] = k - size * (count - 1)
    return lengths


def _grouped(t: torch.Tensor, group: int | None) -> torch.Tensor:
    """(..., k) -> (..., G, size), zero-padded at the end of the row."""
    k = t.shape[-1]
    size, count = _size(k, group), group_count(k, group)
    pad = size * count - k
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], count, size)


def signs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, 1.0, -1.0).to(t.dtype)


def group_betas(t: torch.Tensor, group: int | None) -> torch.Tensor:
    """mean |t| over each group of the last dimension: (..., G)."""
    k = t.shape[-1]
    return _grouped(t.abs(), group).sum(-1) / group_lengths(k, group, t.device, t.dtype)


def expand(betas: torch.Tensor, group: int | None, k: int) -> torch.Tensor:
    """Each group's value repeated over its members: (..., G) -> (..., k)."""
    size = _size(k, group)
    full = betas.unsqueeze(-1).expand(*betas.shape, size).reshape(*betas.shape[:-1], -1)
    return full[..., :k]


def _ungrouped(t: torch.Tensor, k: int) -> torch.Tensor:
    """(..., G, size) -> (..., k): the inverse of ``_grouped``."""
    full = t.reshape(*t.shape[:-2], -1)
    return full if full.shape[-1] == k else full[..., :k]


def binarized(t: torch.Tensor, group: int | None, betas: torch.Tensor | None = None) -> torch.Tensor:
    """sign(t) * beta (the dequantized binary tensor)."""
    if betas is None:
        betas = group_betas(t, group)
    beta = betas.unsqueeze(-1)  # (..., G, 1), broadcast over each group: no copy of beta per element
    return _ungrouped(torch.where(_grouped(t, group) > 0, beta, -beta), t.shape[-1])


def binarized_grad(t: torch.Tensor, grad: torch.Tensor, betas: torch.Tensor, group: int | None) -> torch.Tensor:
    """d loss / d t from d loss / d binarized(t) (module docstring).

    Computed on the (..., G, size) views of ``t`` and ``grad``, each beta broadcast
    over its group, and ``grad * signs(t)`` as a select: the same values, in the same
    order of operations, as ``grad * expand(betas) * (|t| <= 1) + sgn(t) *
    expand(mean(grad * signs(t)))``, with fewer passes over the (B, L, K) rows of a
    convolution."""
    k = t.shape[-1]
    tg, gg = _grouped(t, group), _grouped(grad, group)
    direct = gg * betas.unsqueeze(-1) * (tg.abs() <= 1)
    through_beta = torch.where(tg > 0, gg, -gg).sum(-1) / group_lengths(k, group, t.device, t.dtype)
    return _ungrouped(direct + torch.sign(tg) * through_beta.unsqueeze(-1), k)
