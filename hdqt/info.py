"""The `hdqt info` sub-command: what this installation runs on.

Versions, the kernel variant this CPU uses (AVX-512, AVX2 or baseline clones; which
int8 dot products (AVX512-VNNI, AVX-VNNI, AVX2, ARM sdot) or float32 products; or the
pure-torch path and why) and the int8 variants it could run, whether a linear layer
runs as one native call a direction (``fused_linear.py``), torch's threads
and devices, and where datasets are looked for. A slow training step usually has its
reason here.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("info", help="versions, kernel variant, threads and data roots of this machine",
                                   description=__doc__)
    parser.set_defaults(func=info_command)
    return parser


def info_command(args: argparse.Namespace) -> int:
    import platform

    import torch

    import hdqt
    from hdqt.data import data_roots
    from hdqt.quantization import native

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    print(f"hdqt {hdqt.__version__}, torch {torch.__version__}, Python {platform.python_version()} "
          f"on {platform.machine()}")
    print(f"kernels: {native.kernel_variant()}")
    lib = native.load()
    if lib is not None:
        runs = native.int8_variants(lib)
        print(f"int8 variants this CPU runs: {', '.join(runs) or 'none'} (preferred first; "
              f"HDQT_INT8=0, auto or a name chooses)")
    from hdqt.quantization import binary_kernel

    try:
        binary = binary_kernel.variant()
    except (RuntimeError, ValueError) as error:
        binary = f"none ({error})"
    print(f"binary (hadanet) product: {binary}; this CPU runs: {', '.join(binary_kernel.available())} "
          "(HDQT_BINARY=auto or a name chooses)")
    print(f"linear layers: {_linear_calls(lib)}")
    print(f"torch threads: {torch.get_num_threads()}; devices: {', '.join(devices)}")
    from hdqt.allocator import keep_freed_memory_requested

    print("freed memory: " + ("kept for reuse by the training commands (run, sweep, diagnose; "
                              "HDQT_KEEP_FREED_MEMORY=0 opts out)" if keep_freed_memory_requested() else
                              "handed back to the OS as the C library decides (HDQT_KEEP_FREED_MEMORY=0)"))
    print("data roots: " + ", ".join(str(root) for root in data_roots()))
    return 0


def _linear_calls(lib) -> str:
    """How a quantized linear layer's forward and backward run here (fused_linear.py)."""
    from hdqt.quantization import fused_linear

    if lib is None:
        return "torch operations (no native kernels)"
    if not fused_linear.enabled():
        return "separate native calls from Python (HDQT_FUSED=0)"
    return ("one native call a direction for integer codes of <= 8 bits with per-tensor scales, separate "
            "calls otherwise (HDQT_FUSED=0: always separate)")
