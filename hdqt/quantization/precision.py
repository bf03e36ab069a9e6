"""Quantized products stay exact under torch's mixed precision (autocast, AMP).

The engine's products of integer codes are exact in float32 (``matmul.exact_dtype``).
Inside ``torch.autocast`` torch runs matmuls and convolutions in float16 or bfloat16,
whose 11 and 8 significant bits round those sums (a 4-bit product's sum passes 2^8 at a
reduction of 6), so a quantized layer would compute something else on a GPU with AMP
(or on a CPU under ``torch.autocast("cpu")`` wherever torch's path runs) than without.
A quantized layer under autocast therefore runs as ``torch.amp.custom_fwd(cast_inputs=
torch.float32)`` would make it, on whatever device it is on: its input cast to float32
and autocast off in its forward and its backward. It returns float32, and the float
ops around it autocast as before.

A model converted with ``.half()`` or ``.bfloat16()`` (no autocast) is handled alike: each
quantized layer casts its input and parameters to float32 (differentiable casts, so the
half parameters get their gradients in their own dtype), computes as a float32 layer
with those values would, and returns its output in the input's dtype.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is active for ``device_type`` ("cpu", "cuda", ...)."""
    return torch.is_autocast_enabled(device_type)


def needs_float32(*tensors: torch.Tensor) -> bool:
    """Whether a quantized layer's input or weight is float16/bfloat16 (a model
    converted with ``.half()``): its product then runs as float32 too."""
    return any(t.dtype in _LOW_PRECISION for t in tensors)


@contextlib.contextmanager
def autocast_off(device_type: str):
    """Autocast off for ``device_type`` inside (nothing to do where it is off already)."""
    if autocast_on(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def backward_without_autocast(backward):
    """For an ``autograd.Function.backward``: autocast off while it runs. A backward
    called inside an autocast region runs under it (autograd carries the caller's
    thread-local state); the quantized products must not."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        device_type = next((g.device.type for g in grads if g is not None), "cpu")
        with autocast_off(device_type):
            return backward(ctx, *grads)

    return run
