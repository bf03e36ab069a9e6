"""The bit-packed binary product (HadaNets) against torch's float32 matmul, in one process.

For each shape (M rows of activations, K the reduction, J rows of weights), one beta
per row and groups of 16, 1 thread and all threads:

* float32: ``a @ b.T`` (torch, its BLAS)
* binary, end to end: what a hadanet layer's forward does (``binary._forward``): one
  native pass over each operand that packs its signs and computes its betas, then the
  popcount product
* binary, unfused: the betas in torch, then packing, then the product (the layers'
  forward before the betas moved into the packing pass; ``binary.binary_product``)
* binary, product only: the popcount product on operands packed beforehand (the
  packing overhead is the difference; a deployed model packs its weights once)

Then a ResNet-32 convolution layer's forward (``QuantConv2d``, batch 128, its rows
packed straight from the input) against ``nn.Conv2d`` (torch's float32 convolution).

The shapes: 4096^3; the FCNet layer (batch 128, 405 -> 405); the im2col products of
ResNet-32's 3x3 convolutions at batch 128 (16, 32 and 64 channels on 32x32, 16x16 and
8x8 maps). Then the stored size of binarized FCNet (DSADS) and ResNet-32 (CIFAR-100)
against float32 (``binary.model_size_bits``).

    python benchmarks/bench_binary.py                       # every shape
    python benchmarks/bench_binary.py --sizes 2048 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from hdqt.quantization import binarize, binary_kernel, native
from hdqt.quantization.binary import _forward, binary_product, model_size_bits

SHAPES = {
    "4096^3": (4096, 4096, 4096),
    "fcnet 405x405, batch 128": (128, 405, 405),
    "resnet32 conv 16ch 32x32 (im2col)": (128 * 32 * 32, 16 * 9, 16),
    "resnet32 conv 32ch 16x16 (im2col)": (128 * 16 * 16, 32 * 9, 32),
    "resnet32 conv 64ch 8x8 (im2col)": (128 * 8 * 8, 64 * 9, 64),
}


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bench_shape(m: int, k: int, j: int, group, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(j, k, generator=gen)
    t_float = timed(lambda: a @ b.T, repeat)

    import types

    import hdqt

    rt = types.SimpleNamespace(policy=hdqt.recipe("hadanet", group=group), name="bench")

    def end_to_end():
        _forward(a, b, group, rt)

    def unfused():
        binary_product(a, binarize.group_betas(a, group), b, binarize.group_betas(b, group), group)

    ba, bb = binarize.group_betas(a, group), binarize.group_betas(b, group)
    a_bits, b_bits = binary_kernel.pack(a), binary_kernel.pack(b)
    lib = binary_kernel._lib()
    y = torch.empty(m, j)
    g = 0 if group is None or group >= k else group
    variant = binary_kernel.variant()
    code = {"portable": 1, "avx2": 2, "avx512": 3, "neon": 4}[variant]
    if g and variant in ("avx512", "avx2"):  # the grouped kernels (b transposed), as product_packed runs
        bt, bbt, jp = binary_kernel._transposed(b_bits, bb)

        def product_only():
            lib.hdqt_binary_matmul_groups_f32(a_bits.data_ptr(), ba.data_ptr(), m, 2 * a_bits.shape[1], bt.data_ptr(),
                                              bbt.data_ptr(), j, jp, k, g, y.data_ptr(), code, native.threads())
    else:
        def product_only():
            lib.hdqt_binary_matmul_f32(a_bits.data_ptr(), ba.data_ptr(), m, b_bits.data_ptr(), bb.data_ptr(), j, k,
                                       a_bits.shape[1], g, y.data_ptr(), code, native.threads())
    return {"float": t_float, "end_to_end": timed(end_to_end, repeat), "unfused": timed(unfused, repeat),
            "product": timed(product_only, repeat)}


CONVS = {"resnet32 conv 16ch 32x32": (16, 32), "resnet32 conv 32ch 16x16": (32, 16),
         "resnet32 conv 64ch 8x8": (64, 8)}


def bench_conv(channels: int, size: int, group, repeat: int) -> dict:
    import hdqt

    x = torch.randn(128, channels, size, size, generator=torch.Generator().manual_seed(0))
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    binary = hdqt.QuantConv2d.from_float(conv, hdqt.recipe("hadanet", group=group))
    with torch.no_grad():
        return {"float": timed(lambda: conv(x), repeat), "binary": timed(lambda: binary(x), repeat)}


def model_sizes() -> list[tuple[str, dict, dict, dict]]:
    import hdqt
    from hdqt.cl.learners.networks import IncrementalNet
    from hdqt.models import create_model

    rows = []
    for label, name, shape, classes in (("FCNet 405-405-405-19 (DSADS)", "fcnet", (405,), 19),
                                        ("ResNet-32 (CIFAR-100)", "resnet32", (3, 32, 32), 100)):
        net = IncrementalNet(create_model(name, shape))
        net.add_classes(classes)
        rows.append((label, model_size_bits(net), model_size_bits(net, hdqt.recipe("hadanet")),
                     model_size_bits(net, hdqt.recipe("hadanet", group=16))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None,
                        help="comma-separated cubes (e.g. 1024,2048) or MxKxJ shapes instead of the default shapes")
    parser.add_argument("--threads", default="1,all", help="thread counts, 'all' = every core (default: 1,all)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case, median reported (default: 3)")
    parser.add_argument("--convs-only", action="store_true", help="only the convolution layers' forward")
    args = parser.parse_args()
    shapes = dict(SHAPES)
    if args.sizes:
        shapes = {}
        for item in args.sizes.split(","):
            dims = [int(v) for v in item.lower().split("x")]
            shapes[item] = tuple(dims * 3 if len(dims) == 1 else dims)
    cores = torch.get_num_threads()
    threads = [cores if t == "all" else int(t) for t in args.threads.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit or '?'}; binary variant {binary_kernel.variant()}; {native.kernel_variant()}; "
          f"torch {torch.__version__}, {cores} threads available")
    print(f"{'shape (M x K x J)':<44} {'group':>5} {'thr':>3} {'float32 ms':>10} {'binary ms':>10} "
          f"{'unfused ms':>10} {'product ms':>10} {'speed-up':>8} {'unfused':>8} {'product':>8}")
    for label, (m, k, j) in shapes.items() if not args.convs_only else ():
        for group in (None, 16):
            for t in threads:
                torch.set_num_threads(t)
                r = bench_shape(m, k, j, group, args.repeat)
                print(f"{label + f' ({m}x{k}x{j})':<44} {group or 'row':>5} {t:>3} {1e3 * r['float']:>10.2f} "
                      f"{1e3 * r['end_to_end']:>10.2f} {1e3 * r['unfused']:>10.2f} {1e3 * r['product']:>10.2f} "
                      f"{r['float'] / r['end_to_end']:>7.2f}x {r['float'] / r['unfused']:>7.2f}x "
                      f"{r['float'] / r['product']:>7.2f}x", flush=True)
    print(f"\n{'convolution layer forward, batch 128':<44} {'group':>5} {'thr':>3} {'float32 ms':>10} "
          f"{'binary ms':>10} {'speed-up':>8}")
    for label, (channels, size) in CONVS.items() if not args.sizes else ():
        for group in (None, 16):
            for t in threads:
                torch.set_num_threads(t)
                r = bench_conv(channels, size, group, args.repeat)
                print(f"{label:<44} {group or 'row':>5} {t:>3} {1e3 * r['float']:>10.2f} {1e3 * r['binary']:>10.2f} "
                      f"{r['float'] / r['binary']:>7.2f}x", flush=True)
    torch.set_num_threads(cores)
    if args.convs_only:
        return
    print("\nstored size for inference (bits; float32 = every parameter and BN buffer at 32 bits)")
    print(f"{'model':<30} {'float32':>10} {'hadanet row':>12} {'ratio':>6} {'hadanet g16':>12} {'ratio':>6}")
    for label, fp, row, g16 in model_sizes():
        print(f"{label:<30} {fp['total']:>10} {row['total']:>12} {fp['total'] / row['total']:>5.2f}x "
              f"{g16['total']:>12} {fp['total'] / g16['total']:>5.2f}x")
        print(f"{'':<30} hadanet row: {row['binary_weights']} binary weight bits, {row['betas']} beta bits, "
              f"{row['float']} float bits (first/last layers, biases, BN)")


if __name__ == "__main__":
    main()
