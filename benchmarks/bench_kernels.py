"""The engine's kernels against their alternatives, in one process.

Each line times a kernel and a baseline that computes the same thing, taking turns
within every round (median over rounds of each round's ratio), at the shapes of
bench_engine.py (batch 128, FCNet 405 wide, a 16->16 3x3 conv on 32x32 maps):

  * the tiled conv forward on int8 dot products against the float32 kernel,
  * the tiled forward products counting their saturated tile sums against not counting
    (int8 and float32 conv, a linear layer's product; the layers count one call in 8),
  * the float32 kernels' wide register blocks (AVX-512) against the narrow ones that
    CPUs without AVX-512 get (forced with HDQT_VECTORS=narrow),
  * the fused conv weight gradient with its multiply on bytes against floats,
  * a conv's input gradient (unlimited accumulators) on int8 against torch's float32,
  * a linear layer's exact dW product of 4-bit operands on int8 against MKL's float32 GEMM,
  * the fused transform and rounding of a transposed view read through its strides
    against torch's contiguous copy first,
  * ReLU's backward on one layout against mixed strides (why dX takes its input's layout),
  * native stochastic rounding against the torch path.

    python benchmarks/bench_kernels.py [--rounds 15] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

import hdqt
from hdqt.quantization import native
from hdqt.quantization.hadamard import block_layout
from hdqt.quantization.im2col import exact_input_grad, fused_weight_grad, tiled_conv2d
from hdqt.quantization.matmul import tiled_matmul, tiled_matmul_kj
from hdqt.quantization.runtime import SaturationStats


@contextlib.contextmanager
def env(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def median_ms(fn, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def compare(name: str, fast, slow, rounds: int) -> None:
    for _ in range(2):  # warm-up: caches, thread pool, native build
        fast(), slow()
    fast_ms, slow_ms = [], []
    for _ in range(rounds):
        fast_ms.append(median_ms(fast))
        slow_ms.append(median_ms(slow))
    ratios = sorted(f / s for f, s in zip(fast_ms, slow_ms))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    print(f"{name:<52}{statistics.median(fast_ms):>9.3f}{statistics.median(slow_ms):>10.3f}"
          f"{statistics.median(ratios):>8.2f}{f'{q1:.2f}-{q3:.2f}':>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lib = native.load()
    if lib is None:
        raise SystemExit("bench_kernels.py: the native kernels are not available here (no C compiler?)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, int8 dot products: "
          f"{'yes' if native.int8_dot(lib) else 'no (AVX512-VNNI missing or HDQT_INT8=0)'}")
    print(f"{'kernel (fast) against baseline (slow)':<52}{'fast ms':>9}{'slow ms':>10}{'ratio':>8}{'ratio IQR':>12}")
    gen = torch.Generator().manual_seed(0)
    rng_rows = torch.Generator().manual_seed(3)
    policy = hdqt.recipe("hdqt")
    x_conv = torch.randint(-7, 8, (128, 16, 32, 32), generator=gen).float()
    w_conv = torch.randint(-7, 8, (16, 16, 3, 3), generator=gen).float()
    g_conv = torch.randint(-7, 8, (16, 128, 1024), generator=gen).float()
    # a linear layer's dW product as the backward forms it: rows of G^T (N, B) and X^T (K, B)
    g_fc = torch.randint(-7, 8, (405, 128), generator=gen).float()
    x_fc = torch.randint(-7, 8, (405, 128), generator=gen).float()

    def conv_forward():
        return tiled_conv2d(x_conv, w_conv, (1, 1), (1, 1), (1, 1), 32, 8)

    def conv_weight_grad():
        return fused_weight_grad(x_conv, g_conv, (3, 3), (1, 1), (1, 1), (1, 1), block_layout(1024),
                                 policy.backward_input, torch.Generator().manual_seed(1))

    def without_int8(fn):
        def run():
            with env("HDQT_INT8", "0"):
                return fn()
        return run

    def narrow(fn):  # the float32 kernels' register blocks for AVX2 and NEON, forced
        def run():
            with env("HDQT_INT8", "0"), env("HDQT_VECTORS", "narrow"):
                return fn()
        return run

    compare("conv forward: int8 / float32 kernel", conv_forward, without_int8(conv_forward), args.rounds)
    stats = SaturationStats()

    def conv_forward_counted():
        return tiled_conv2d(x_conv, w_conv, (1, 1), (1, 1), (1, 1), 32, 8, stats)

    compare("conv forward, int8: counting saturation / not", conv_forward_counted, conv_forward, args.rounds)
    compare("conv forward, float32: counting saturation / not", without_int8(conv_forward_counted),
            without_int8(conv_forward), args.rounds)
    w_fc = torch.randint(-7, 8, (405, 405), generator=gen).float()
    x_fc_t = torch.randint(0, 16, (405, 128), generator=gen).float()  # a linear forward's W X^T
    compare("linear forward 405x405x128, int8: counting / not",
            lambda: tiled_matmul_kj(w_fc, x_fc_t, 32, 8, saturation=stats),
            lambda: tiled_matmul_kj(w_fc, x_fc_t, 32, 8), args.rounds)
    compare("conv forward, float32: wide / narrow blocks", without_int8(conv_forward), narrow(conv_forward),
            args.rounds)
    compare("conv dW (fused), float32: wide / narrow blocks", without_int8(conv_weight_grad),
            narrow(conv_weight_grad), args.rounds)
    g_out = torch.randint(-7, 8, (128, 16, 32, 32), generator=gen).float()
    compare("conv dX (unlimited acc.): int8 / torch float32",
            lambda: exact_input_grad(g_out, w_conv, x_conv.shape, (1, 1), (1, 1), (1, 1)),
            lambda: torch.nn.grad.conv2d_input(x_conv.shape, w_conv, g_out, stride=1, padding=1), args.rounds)
    compare("conv dW (fused): bytes / float32 multiply", conv_weight_grad, without_int8(conv_weight_grad),
            args.rounds)
    compare("linear dW product 405x128x405: int8 / MKL float32",
            lambda: tiled_matmul(g_fc, x_fc, 32, None, bounds=(7, 7)), lambda: g_fc @ x_fc.T, args.rounds)

    # a linear layer's dW operand: the transposed view of a batch-major (B, N) gradient,
    # transformed along the batch and rounded; the baseline makes torch's copy first
    grad_view = torch.randn(128, 405, generator=gen).T
    sr = policy.grad_output_dw
    compare("transform+SR, 405x128 transposed: strided / copy",
            lambda: sr.quantize_row_transform(grad_view, 128, rng_rows),
            lambda: sr.quantize_row_transform(grad_view.contiguous(), 128, rng_rows), args.rounds)

    # a conv's dW operand: its (B, N, L) = 128x16x1024 gradient as (N, B, L), rows along each
    # sample's positions; the baseline makes torch's copy first
    conv_grad = torch.randn(128, 16, 1024, generator=gen).transpose(0, 1)
    compare("transform+SR, conv grad (N,B,L): strided / copy",
            lambda: sr.quantize_row_transform(conv_grad, 1024, rng_rows),
            lambda: sr.quantize_row_transform(conv_grad.contiguous(), 1024, rng_rows), args.rounds)

    out = torch.randn(405, 128, generator=gen).T  # a layer's output: the transposed view of (N, B)
    grad_same, grad_mixed = torch.randn(405, 128, generator=gen).T, torch.randn(128, 405, generator=gen)
    compare("ReLU backward: one layout / mixed strides",
            lambda: torch.ops.aten.threshold_backward(grad_same, out, 0.0),
            lambda: torch.ops.aten.threshold_backward(grad_mixed, out, 0.0), args.rounds)

    t = torch.randn(16, 128, 1024, generator=gen)
    quantizer = policy.grad_output_dw
    rng = torch.Generator().manual_seed(2)

    def torch_path():
        with env("HDQT_NATIVE", "0"):
            return quantizer.quantize(t, rng)

    compare("stochastic rounding 2M values: native / torch", lambda: quantizer.quantize(t, rng), torch_path,
            args.rounds)


if __name__ == "__main__":
    main()
