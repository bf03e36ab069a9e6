"""The fixed cost of the engine's calls: each Python entry point of a training step
against the bare native kernel call it wraps, in one process, at tiny shapes (an
8 x 32 activation, a 32 x 32 weight) where the kernels' own work is negligible.

What a step of a small layer costs beyond fp32 is mostly this: a linear layer's
training step makes about a dozen such calls (two quantizations and a product
forward, the saved operands packed and unpacked, two quantizations or transforms and
a product for each backward product), each paying Python, ctypes and a fresh buffer
around a kernel of a few microseconds. `bench_engine.py --cases tiny` times whole
steps; this script says where inside them the time goes.

Each line: microseconds per call of the entry point, of its bare kernel call (the
same arguments through ctypes, the output buffer made once), their difference (the
wrapper's cost), and the ratio; median over rounds, the two taking turns.

A last table times what fusing those calls saves: the forward and backward of a
32 x 32 linear layer at batch 8 (a 32 x 32 weight, an input that needs its gradient)
with one native call a direction (fused_linear.py) against the separate calls
(``HDQT_FUSED=0``), the two taking turns; microseconds per forward + backward.

    python benchmarks/bench_overhead.py [--rounds 15] [--calls 2000]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import torch
import torch.nn as nn

import hdqt
from hdqt.quantization import int_quantizer, native
from hdqt.quantization.matmul import tiled_matmul, tiled_matmul_kj
from hdqt.quantization.packing import pack_operand, unpack_operand


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def compare(name: str, entry, bare, rounds: int, calls: int) -> None:
    for _ in range(200):  # warm-up: native build, caches
        entry(), bare()
    entry_us, bare_us = [], []
    for _ in range(rounds):
        entry_us.append(per_call_us(entry, calls))
        bare_us.append(per_call_us(bare, calls))
    e, b = statistics.median(entry_us), statistics.median(bare_us)
    ratio = statistics.median(x / y for x, y in zip(entry_us, bare_us))
    print(f"{name:<44}{e:>9.1f}{b:>9.1f}{e - b:>10.1f}{ratio:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and side")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the fixed cost, not the threads' start
    lib = native.load()
    if lib is None:
        raise SystemExit("bench_overhead.py: the native kernels are not available here (no C compiler?)")
    print(f"torch {torch.__version__}, 1 thread, hdqt kernels: {native.kernel_variant()}")
    print(f"{'entry point (bare kernel call)':<44}{'us':>9}{'bare us':>9}{'wrapper':>10}{'ratio':>8}")
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-7, 8, (32, 32), generator=gen).float()
    x = torch.randint(-7, 8, (8, 32), generator=gen).float()
    out = torch.empty(32, 8)
    scale = ctypes.c_double()
    rtn, sr = int_quantizer(4), int_quantizer(4, rounding="stochastic")
    rng = torch.Generator().manual_seed(1)

    compare("forward product W X^T, acc 8 (int8 kernel)",
            lambda: tiled_matmul_kj(w, x.T, 32, 8, bounds=(7.0, 7.0)),
            lambda: lib.hdqt_tiled_matmul_i8(w.data_ptr(), 32, 1, x.data_ptr(), 1, out.data_ptr(), 32, 32, 8, 32,
                                             127.0, None, 1), args.rounds, args.calls)
    compare("exact product (torch GEMM below 4M MACs)", lambda: tiled_matmul(x, w, 32, None, bounds=(7.0, 7.0)),
            lambda: torch.mm(x, w.T), args.rounds, args.calls)
    compare("quantize, nearest (hdqt_quantize_f32)", lambda: rtn.quantize(x),
            lambda: lib.hdqt_quantize_f32(x.data_ptr(), out.data_ptr(), x.numel(), 0, 0, 1.0, 7.0, 15.0, 0,
                                          ctypes.byref(scale), 1), args.rounds, args.calls)
    compare("quantize, stochastic (with its seed draw)", lambda: sr.quantize(x, rng),
            lambda: lib.hdqt_quantize_f32(x.data_ptr(), out.data_ptr(), x.numel(), 1, 0, 1.0, 7.0, 15.0, 12345,
                                          ctypes.byref(scale), 1), args.rounds, args.calls)
    compare("transform + stochastic rounding of rows", lambda: sr.quantize_row_transform(x, 32, rng),
            lambda: lib.hdqt_fwht_quantize_f32(x.data_ptr(), 32, 1, 8, 0, out.data_ptr(), 8, 32, 32, 1, 1.0, 7.0, 12345,
                                               ctypes.byref(scale), 1), args.rounds, args.calls)
    codes = rtn.quantize(x)
    packed_bytes = torch.empty(x.numel() // 2, dtype=torch.uint8)
    compare("pack a saved operand (4-bit codes)", lambda: pack_operand(codes, rtn),
            lambda: lib.hdqt_pack_nibbles_f32(codes.values.data_ptr(), x.numel(), packed_bytes.data_ptr(), 1),
            args.rounds, args.calls)
    saved = pack_operand(codes, rtn)
    compare("unpack it", lambda: unpack_operand(*saved),
            lambda: lib.hdqt_unpack_nibbles_f32(packed_bytes.data_ptr(), x.numel(), 1, out.data_ptr(), 1),
            args.rounds, args.calls)
    fused_layer(args.rounds, args.calls)


def fused_layer(rounds: int, calls: int) -> None:
    """A 32 x 32 linear layer's forward + backward at batch 8, fused calls against separate ones."""
    torch.manual_seed(0)
    layer = hdqt.quantize_model(nn.Linear(32, 32, bias=False), hdqt.recipe("hdqt"))
    x = torch.randn(8, 32, requires_grad=True)
    grad = torch.randn(8, 32)

    def step() -> None:
        layer(x).backward(grad)

    def timed(fused: bool) -> float:
        before = os.environ.get("HDQT_FUSED")
        os.environ["HDQT_FUSED"] = "1" if fused else "0"
        try:
            return per_call_us(step, calls)
        finally:
            if before is None:
                os.environ.pop("HDQT_FUSED")
            else:
                os.environ["HDQT_FUSED"] = before

    timed(True), timed(False)  # warm-up
    fused_us, separate_us = [], []
    for _ in range(rounds):
        fused_us.append(timed(True))
        separate_us.append(timed(False))
    f, s = statistics.median(fused_us), statistics.median(separate_us)
    ratio = statistics.median(a / b for a, b in zip(fused_us, separate_us))
    print()
    print(f"{'linear 32x32, batch 8: forward + backward':<44}{'fused':>9}{'separate':>9}{'saved':>10}{'ratio':>8}")
    print(f"{'fused calls / separate ones (HDQT_FUSED=0)':<44}{f:>9.1f}{s:>9.1f}{s - f:>10.1f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
