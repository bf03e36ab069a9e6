"""A quantized linear layer's forward in one native call, and its backward in another
(``csrc/linear.c``), for the common case: what ``QuantLinearFunction`` otherwise does
as ~10 calls from Python a direction (quantizers, transforms, products, scales,
packing), each paying 7-23 us of Python, ctypes and buffers around kernels of a few
microseconds at small sizes (``benchmarks/bench_overhead.py``), and, at two threads,
most of what separates a small layer's step from fp32's.

The native calls make the same quantizer, transform and packing calls in the same
order with the same arguments, and the seeds of stochastic rounding are drawn from
the layer's generator in the same order, so the results are the same bit for bit,
the generator's state after the step included (``tests/quantization/test_fused_linear.py``
compares the two paths). The products run on the int8 kernel, else the float32 one,
as ``matmul.tiled_matmul_kj`` runs them; the backward's small exact products, which
the separate calls give to torch's float32 GEMM, run there too (exact integer sums:
the same values whichever kernel adds them). One difference: a layer that meets NaN or Inf raises the same
``NonFiniteError``, but the seeds of the operands after the one that failed have
been drawn already.

The common case (``forward_case`` / ``backward_case`` say why not, for tests):
integer formats of at most 8 bits with per-tensor dynamic scales (the saved codes are
nibbles up to 4 bits, bytes above), forward sums exact in float32 (any accumulator,
limited or not), unlimited backward accumulators with exact float32 sums, signed
backward grids, the Hadamard transform always applied in
uniform blocks (or not at all), ``nonfinite="raise"``, CPU float32 tensors with a
dense input and a contiguous weight, and the native kernels loaded. Everything else,
and every call under ``HDQT_FUSED=0``, takes the separate calls.
"""
from __future__ import annotations

import ctypes
import os

import torch

from hdqt.quantization import native
from hdqt.quantization.matmul import _FLOAT32_EXACT, accumulator_limit, reduction_tile, sum_bound, tile_sums
from hdqt.quantization.packing import PackedLayout, kept_codes
from hdqt.quantization.quantizer import Quantizer, _nonfinite
from hdqt.quantization.runtime import LayerRuntime

_BACKWARD_OPERANDS = ("output gradient (dX)", "backward weight", "output gradient (dW)", "backward input")


def enabled() -> bool:
    """``HDQT_FUSED`` is not "0" (read once per forward call: a test or benchmark may switch it)."""
    return os.environ.get("HDQT_FUSED", "1") != "0"


class Plan:
    """What the native calls need from one policy, worked out once per policy (a layer
    keeps its plan in ``LayerRuntime.fused_plan`` and makes a new one when its policy
    changes): why the fused calls cannot take it, if so, and the quantizers' arguments."""

    def __init__(self, policy) -> None:
        self.policy = policy
        qx, qw = policy.forward_input, policy.forward_weight
        self.forward_reason = _forward_policy_reason(policy)
        if self.forward_reason is None:
            self.x_stochastic, self.w_stochastic = qx.rounding == "stochastic", qw.rounding == "stochastic"
            self.forward_bounds = (qx.format.max_magnitude(), qw.format.max_magnitude())
            # an unlimited accumulator: one tile as long as the reduction, which never saturates
            self.limit = float(2**31 - 1 if policy.acc_bits is None else accumulator_limit(policy.acc_bits))
            self.x_nibbles, self.w_nibbles = qx.format.bits <= 4, qw.format.bits <= 4
            self.x_args = (qx.format.sign_mode, qx.scaling.clip_ratio, qx.format.signed_max, qx.format.unsigned_max)
            self.w_args = (qw.format.sign_mode, qw.scaling.clip_ratio, qw.format.signed_max, qw.format.unsigned_max)
        self.backward_quantizers = (policy.grad_output_dx, policy.backward_weight, policy.grad_output_dw,
                                    policy.backward_input)
        self.backward_reason = _backward_policy_reason(policy, self.backward_quantizers)
        if self.backward_reason is None:
            self.stochastic = tuple(q.rounding == "stochastic" for q in self.backward_quantizers)
            self.quant_args = tuple((q.scaling.clip_ratio, float(q.format.signed_max))
                                    for q in self.backward_quantizers)
            self.backward_bounds = tuple(q.format.max_magnitude() for q in self.backward_quantizers)
        self._blocks: dict[tuple[int, int], tuple[int, float] | None] = {}

    def blocks(self, rt: LayerRuntime, size: int, product: int) -> tuple[int, float] | None:
        """(p, the factor undoing H H) along a backward reduction of ``size`` (product 0:
        dX's, 1: dW's), or None where the blocks are not uniform (p = 1: no transform)."""
        key = (size, product)
        if key not in self._blocks:
            from hdqt.quantization.functional import backward_layout  # functional imports this module

            qa, qb = self.backward_quantizers[2 * product: 2 * product + 2]
            layout = backward_layout(rt, size, qa, qb)
            self._blocks[key] = (1, 1.0) if layout is None else \
                (layout.blocks[0], layout.product_scale) if layout.uniform else None
        return self._blocks[key]


def plan_for(rt: LayerRuntime) -> Plan:
    plan = rt.fused_plan
    if plan is None or plan.policy is not rt.policy:
        plan = rt.fused_plan = Plan(rt.policy)
    return plan


def _byte_quantizer(q: Quantizer | None) -> bool:
    """An integer grid of at most 8 bits with a dynamic per-tensor scale: one native
    quantizer call, and codes that the forward keeps in nibbles or bytes."""
    return q is not None and q.native_fast and q.format.bits <= 8


def _forward_policy_reason(policy) -> str | None:
    if not (_byte_quantizer(policy.forward_input) and _byte_quantizer(policy.forward_weight)):
        return "a forward quantizer is not an integer grid of <= 8 bits with a per-tensor dynamic scale"
    if policy.nonfinite != "raise":
        return f"nonfinite={policy.nonfinite!r}"
    return None


def _backward_policy_reason(policy, quantizers) -> str | None:
    if policy.saturate_backward and policy.acc_bits is not None:
        return "limited backward accumulators"
    if not all(q is not None and q.native_fast and q.format.signed == "signed" for q in quantizers):
        return "a backward quantizer is not a signed integer grid with a per-tensor dynamic scale"
    if policy.hadamard and policy.hadamard_select != "always":
        return f"hadamard_select={policy.hadamard_select!r}"
    if policy.nonfinite != "raise":
        return f"nonfinite={policy.nonfinite!r}"
    return None


def forward_case(x: torch.Tensor, weight: torch.Tensor, rt: LayerRuntime) -> str | None:
    """Why the forward of these tensors takes the separate calls, or None."""
    plan = plan_for(rt)
    if plan.forward_reason is not None:
        return plan.forward_reason
    if x.dim() != 2 or weight.dim() != 2:
        return "not a matrix input and weight"
    if sum_bound(x.shape[1], plan.forward_bounds, rt.policy.tile, rt.policy.acc_bits) >= _FLOAT32_EXACT:
        return "forward sums that float32 could round"
    if not (native.usable(x) and native.usable(weight) and weight.is_contiguous()):
        return "not CPU float32 with a contiguous weight"
    if not (x.is_contiguous() or x.T.is_contiguous()):
        return "an input that is neither contiguous nor a transposed contiguous tensor"
    if os.environ.get("HDQT_PACK", "1") == "0":
        return "HDQT_PACK=0 (the backward keeps float codes)"
    return None


def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rt: LayerRuntime):
    """``QuantLinearFunction.forward`` in one native call, with the same saved state
    (``functional.save_operands``), or None where it does not apply (nothing drawn or
    counted then)."""
    if not enabled() or forward_case(x, weight, rt) is not None:
        return None
    lib = native.load()
    if lib is None:
        return None
    plan, policy = rt.fused_plan, rt.policy
    use_int8 = native.int8_dot(lib)
    x = x.detach()
    (batch, k), n = x.shape, weight.shape[0]
    transposed = not x.is_contiguous()  # then x.T is (forward_case)
    x_seed = w_seed = 0
    if plan.x_stochastic or plan.w_stochastic:  # drawn in the separate calls' order: x, then w
        gen = rt.generator(x.device)
        x_seed = Quantizer.stream_seed(gen) if plan.x_stochastic else 0
        w_seed = Quantizer.stream_seed(gen) if plan.w_stochastic else 0
    limited = policy.acc_bits is not None  # an unlimited accumulator counts nothing (as the separate calls)
    counts = (ctypes.c_double * 2)() if limited and rt.saturation.sample() else None  # one call in `every`
    input_needs_grad, weight_needs_grad = ctx.needs_input_grad[:2]
    x_packed = _code_buffer(batch * k, plan.x_nibbles) if weight_needs_grad else None
    w_packed = _code_buffer(n * k, plan.w_nibbles) if input_needs_grad else None
    # Y^T = W X^T, returned as Y's transposed view, as the separate calls' tiled product does;
    # their plain product (an unlimited accumulator) gives Y itself
    y = torch.empty(n, batch, dtype=torch.float32) if limited else torch.empty(batch, n, dtype=torch.float32)
    scales, negative = (ctypes.c_double * 2)(), (ctypes.c_int * 2)()
    tile = reduction_tile(policy.tile, k) if limited else k
    status = lib.hdqt_linear_forward_f32(
        x.data_ptr(), transposed, weight.data_ptr(), batch, k, n, plan.x_stochastic, *plan.x_args, x_seed,
        plan.w_stochastic, *plan.w_args, w_seed, tile, plan.limit, counts, use_int8, y.data_ptr(), not limited,
        None if x_packed is None else x_packed.data_ptr(), plan.x_nibbles,
        None if w_packed is None else w_packed.data_ptr(), plan.w_nibbles, scales, negative, native.threads(),
    )
    if status < 0:
        raise MemoryError(f"hdqt fused linear forward of layer {rt.name!r}: out of memory")
    if status > 0:
        _nonfinite(x, "raise", f"{'forward input' if status == 1 else 'forward weight'} of layer {rt.name!r}")
    if counts is not None:
        rt.saturation.add(tile_sums(n * batch, k, tile), counts[0], counts[1])
    x_tensors, x_layout = _kept(x_packed, (batch, k), (1, 0) if transposed else (0, 1), policy.forward_input,
                                negative[0])
    w_tensors, w_layout = _kept(w_packed, (n, k), (0, 1), policy.forward_weight, negative[1])
    ctx.save_for_backward(*x_tensors, *w_tensors)
    ctx.layouts = (x_layout, len(x_tensors), w_layout)
    ctx.scales = (scales[0], scales[1])
    ctx.input_transposed = transposed
    ctx.fused_lib, ctx.fused_int8 = lib, use_int8  # the backward uses the forward's settings
    return y.T if limited else y


def _code_buffer(n: int, nibbles: bool) -> torch.Tensor:
    """The bytes that keep ``n`` codes: two a byte, or one."""
    return torch.empty((n + 1) // 2 if nibbles else n, dtype=torch.uint8)


def _kept(packed: torch.Tensor | None, shape, order, q: Quantizer, negative: int):
    """``packing.pack_operand``'s (tensors, layout) for codes the native call packed, or
    ((), None) for an operand not kept."""
    return ((), None) if packed is None else kept_codes(packed, q.format, negative, shape, order, torch.float32)


def backward_case(ctx, grad: torch.Tensor) -> str | None:
    """Why ``backward`` declines this call (the separate calls compute it), or None."""
    rt: LayerRuntime = ctx.rt
    if getattr(ctx, "fused_lib", None) is None:
        return "the forward took the separate calls"
    plan = plan_for(rt)
    if plan.backward_reason is not None:
        return plan.backward_reason
    if not (native.usable(grad) and grad.dim() == 2):
        return "not a CPU float32 gradient"
    batch, n = grad.shape
    for product, size in enumerate((n, batch)):
        if plan.blocks(rt, size, product) is None:
            return "Hadamard blocks of different sizes"
        a, b = plan.backward_bounds[2 * product: 2 * product + 2]
        if sum_bound(size, (a, b)) >= _FLOAT32_EXACT:
            return "backward sums that float32 could round"
    return None


def backward(ctx, grad: torch.Tensor):
    """``QuantLinearFunction.backward`` in one native call: (grad_x, grad_w, None), or
    None where ``backward_case`` declines (nothing drawn then)."""
    if backward_case(ctx, grad) is not None:
        return None
    rt: LayerRuntime = ctx.rt
    plan = rt.fused_plan
    x_layout, x_count, w_layout = ctx.layouts
    want_x, want_w = ctx.needs_input_grad[:2]
    if (want_x and w_layout is None) or (want_w and x_layout is None):
        return None  # a gradient asked for whose operand was not kept (autograd never does this)
    saved = ctx.saved_tensors
    x_saved, w_saved = saved[0] if want_w else None, saved[x_count] if want_x else None
    grad = grad.detach()
    if not (grad.is_contiguous() or grad.T.is_contiguous()):
        grad = grad.contiguous()  # the separate calls' quantizer copies such a gradient the same way
    batch, n = grad.shape
    k = (w_layout or x_layout).shape[1]
    p_out, extra_dx = plan.blocks(rt, n, 0)
    p_batch, extra_dw = plan.blocks(rt, batch, 1)
    # the seeds, in the order the separate calls draw them (dX's operands, then dW's);
    # one draw of several values is the same stream as one draw each
    wanted = [s and want for s, want in zip(plan.stochastic, (want_x, want_x, want_w, want_w))]
    drawn = iter(torch.randint(0, 2**63 - 1, (sum(wanted),), generator=rt.generator(grad.device)).tolist()
                 if any(wanted) else ())
    seeds = [next(drawn) if w else 0 for w in wanted]
    args = []
    for stochastic, (clip, qmax), seed in zip(plan.stochastic, plan.quant_args, seeds):
        args += (stochastic, clip, qmax, seed)
    grad_x = (torch.empty(k, batch, dtype=torch.float32) if ctx.input_transposed else
              torch.empty(batch, k, dtype=torch.float32)) if want_x else None
    grad_w = torch.empty(n, k, dtype=torch.float32) if want_w else None
    x_scale, w_scale = ctx.scales
    status = ctx.fused_lib.hdqt_linear_backward_f32(
        grad.data_ptr(), grad.stride(0), grad.stride(1), batch, k, n,
        *_codes_args(x_saved, x_layout), ctx.input_transposed, x_scale, *_codes_args(w_saved, w_layout), w_scale,
        p_out, p_batch, extra_dx, extra_dw, *args, ctx.fused_int8,
        None if grad_x is None else grad_x.data_ptr(), None if grad_w is None else grad_w.data_ptr(), native.threads(),
    )
    if status < 0:
        raise MemoryError(f"hdqt fused linear backward of layer {rt.name!r}: out of memory")
    if status > 0:
        _nonfinite(grad, "raise", f"{_BACKWARD_OPERANDS[status - 1]} of layer {rt.name!r}")
    if grad_x is not None and ctx.input_transposed:
        grad_x = grad_x.T
    return grad_x, grad_w, None


def _codes_args(stored: torch.Tensor | None, layout: PackedLayout | None) -> tuple:
    """(address, nibbles, signed) of kept codes for the native backward; (None, 0, 0) for none."""
    if stored is None:
        return None, 0, 0
    if layout.kind == "nibbles":
        return stored.data_ptr(), 1, int(layout.signed)
    return stored.data_ptr(), 0, int(stored.dtype == torch.int8)  # bytes: int8 or uint8 (packing.py)
