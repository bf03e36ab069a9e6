"""Training-step cost of the quantized engine against fp32, in one process.

Measures forward + backward + SGD at batch 128 for
  * FCNet 405-405-405-19 (three Linear layers, no bias), and
  * one 16->16 3x3 conv (padding 1) on 32x32 maps,
with ``--cases resnet32`` ResNet-32 (``hdqt.models``, 3x32x32, 100 classes; the model of the
CIFAR-100 runs, slow on a CPU, the case to time on a GPU),
and, with ``--cases tiny``, an FCNet 32-32-32-19 at batch 8, whose step is almost all
fixed cost (Python, autograd, kernel calls): its hdqt - fp32 difference is what the
engine adds to every step regardless of size, and what does not shrink with threads,
under each recipe, and prints each recipe's time divided by fp32's, and the
activation memory one forward keeps for the backward.
Targets for `hdqt`: issue 13's where the int8 products run on AVX2 (<= 1.5x fp32 for
FCNet, <= 2x for the conv), issue 2's elsewhere (<= 2x, <= 3x). On a GPU (``--device
cuda``) the quantized layers take torch's path (no native kernels) and no target is
printed; every timed step ends with ``torch.cuda.synchronize()``, so a step's time is
the GPU's work, not only its launch.

    python benchmarks/bench_engine.py [--rounds 15] [--steps 5] [--recipes fp32,hdqt,int] [--threads N]
                                      [--cases fcnet,conv,resnet32,tiny] [--keep-freed-memory] [--device cuda]
                                      [--int8 VARIANT] [--vectors narrow] [--emulate-avx2]

``--keep-freed-memory`` runs with ``hdqt.allocator.keep_freed_memory()`` applied (as the
``hdqt`` training commands do): glibc keeps freed blocks for reuse instead of returning
them to the OS, so a step's large temporaries do not fault in fresh pages every step.
It applies to every recipe of the run, fp32 included.

A recipe name with the suffix ``:noint8`` (say ``hdqt:noint8``) runs that recipe with
the 8-bit integer kernels switched off (``HDQT_INT8=0`` during its steps), so the
float32 kernels' time can be compared in the same run; ``:unfused`` with each linear
layer's forward and backward as separate calls from Python instead of one native call
each (``HDQT_FUSED=0``; the same values), so that ``--recipes fp32,hdqt,hdqt:unfused``
times what the fused calls save; ``:channel`` with per-channel forward weight scales
(``hdqt.recipe(name, weight_scales="channel")``: its quantizer on torch operations, the
separate calls). ``--int8`` forces an int8
variant (avx512vnni, avxvnni, avx2, sdot; one this CPU lacks falls back, saying so) and
``--vectors narrow`` the float kernels' AVX2/NEON register blocks. ``--emulate-avx2``
times an AVX2-only x86 CPU on a newer one: hdqt's int8 on avx2 with narrow blocks, and
torch's own kernels (the fp32 baseline) held to AVX2 too (ATEN_CPU_CAPABILITY=avx2,
MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2, set before torch loads). hdqt's
other loops (rounding, transforms) still take the CPU's best clones.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# torch and its libraries read these once, when loaded: before the import below
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "HDQT_INT8": "avx2", "HDQT_VECTORS": "narrow"}
if "--emulate-avx2" in sys.argv[1:]:
    os.environ.update(AVX2_ENV)

import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

import hdqt  # noqa: E402
from hdqt.quantization import native  # noqa: E402


def fcnet() -> nn.Module:
    return nn.Sequential(
        nn.Linear(405, 405, bias=False), nn.ReLU(),
        nn.Linear(405, 405, bias=False), nn.ReLU(),
        nn.Linear(405, 19, bias=False),
    )


def tiny_fcnet() -> nn.Module:
    """FCNet's shape at width 32: a step of almost nothing but fixed costs."""
    return nn.Sequential(
        nn.Linear(32, 32, bias=False), nn.ReLU(),
        nn.Linear(32, 32, bias=False), nn.ReLU(),
        nn.Linear(32, 19, bias=False),
    )


def conv() -> nn.Module:
    return nn.Conv2d(16, 16, 3, padding=1, bias=False)


def resnet32() -> nn.Module:
    from hdqt.models import create_model

    return nn.Sequential(create_model("resnet32", (3, 32, 32)), nn.Linear(64, 100))


# recipe variants: the engine switches each sets during its steps (read at every layer call),
# or the recipe's options
VARIANTS = {"": {}, "noint8": {"HDQT_INT8": "0"}, "unfused": {"HDQT_FUSED": "0"}, "channel": {}}
RECIPE_OPTIONS = {"channel": {"weight_scales": "channel"}}


def make_step(model: nn.Module, x: torch.Tensor, loss_fn, env: dict[str, str] | None = None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    env = env or {}
    # CUDA runs asynchronously: without waiting, a step would time its launches only
    wait = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def step() -> None:
        before = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x)).backward()
            opt.step()
            wait()
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return step


def saved_mb(model: nn.Module, x: torch.Tensor, loss_fn) -> float:
    """Megabytes that one forward keeps for the backward (autograd's saved tensors)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x))
    return total / 2**20


def interleaved_ms(steps: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Per-round median step time of each recipe, the recipes taking turns within
    every round, so that slow drift of a shared machine hits them all alike."""
    for step in steps.values():  # warm-up: allocator, thread pool, caches, native build
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                step()
                samples.append(time.perf_counter() - t0)
            times[name].append(1e3 * statistics.median(samples))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="rounds; the recipes take turns in each")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per recipe and round")
    parser.add_argument("--recipes", default="fp32,hdqt,int")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--int8", default=None, choices=["0", "auto", *native.INT8_VARIANTS],
                        help="HDQT_INT8 for the run: the int8 variant (default: the environment's, else auto)")
    parser.add_argument("--vectors", default=None, choices=["narrow", "wide"],
                        help="HDQT_VECTORS for the run: the float kernels' register blocks")
    parser.add_argument("--cases", default="fcnet,conv", help="which cases to time: fcnet, conv, tiny (comma-separated)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory for reuse (hdqt.allocator.keep_freed_memory), all recipes")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="an AVX2-only x86 CPU: --int8 avx2 --vectors narrow, torch held to AVX2 (see above)")
    args = parser.parse_args()
    if args.int8 is not None:
        os.environ["HDQT_INT8"] = args.int8
    if args.vectors is not None:
        os.environ["HDQT_VECTORS"] = args.vectors
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "freed memory: the C library's default"
    if args.keep_freed_memory:
        from hdqt.allocator import keep_freed_memory

        allocator = keep_freed_memory(children=False)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not chosen or any(c not in ("fcnet", "conv", "resnet32", "tiny") for c in chosen):
        parser.error(f"--cases: expected fcnet, conv, resnet32 and/or tiny (comma-separated), got {args.cases!r}")
    recipes = [r for r in args.recipes.split(",") if r != "fp32"]
    recipes.insert(0, "fp32")
    try:
        dev = torch.device(args.device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        parser.error(f"--device {args.device!r}: not usable here ({err})")
    gen = torch.Generator().manual_seed(0)
    x_fc = torch.randn(128, 405, generator=gen).to(dev)
    y_fc = torch.randint(0, 19, (128,), generator=gen).to(dev)
    x_cv = torch.randn(128, 16, 32, 32, generator=gen).to(dev)
    x_tiny = torch.randn(8, 32, generator=gen).to(dev)
    x_rn = torch.randn(128, 3, 32, 32, generator=gen).to(dev)
    y_rn = torch.randint(0, 100, (128,), generator=gen).to(dev)
    lib = native.load()
    avx2 = lib is not None and native.int8_dot(lib) and native.int8_variant(lib) == "avx2"
    targets = (1.5, 2.0) if avx2 else (2.0, 3.0)  # issue 13 (AVX2 int8) or issue 2
    if dev.type != "cpu":
        targets = (None, None)  # the targets are the CPU kernels'; a GPU runs torch's path
    cases = {
        "fcnet 405-405-405-19": (fcnet, x_fc, lambda out: F.cross_entropy(out, y_fc), targets[0]),
        "conv 16->16 3x3 @32x32": (conv, x_cv, lambda out: out.square().mean(), targets[1]),
        "resnet32 3x32x32, 100 cl.": (resnet32, x_rn, lambda out: F.cross_entropy(out, y_rn), None),
        "tiny 32-32-32-19 batch 8": (tiny_fcnet, x_tiny, lambda out: out.square().mean(), None),
    }
    cases = {name: case for name, case in cases.items() if name.split()[0] in chosen}
    print(f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), "
          f"threads {torch.get_num_threads()}, device {dev}, batch 128 (tiny: 8); "
          f"{args.rounds} rounds x {args.steps} steps, recipes interleaved")
    if dev.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}); "
              f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}")
    print(f"hdqt kernels: {native.kernel_variant()}" +
          (f"; HDQT_VECTORS={os.environ['HDQT_VECTORS']}" if "HDQT_VECTORS" in os.environ else ""))
    print(allocator)
    print(f"{'case':<26}{'recipe':<13}{'ms/step':>9}{'x fp32':>8}{'ratio IQR':>14}{'target':>8}{'saved MB':>10}")
    for case, (build, x, loss_fn, target) in cases.items():
        steps, memory = {}, {}
        for name in recipes:
            torch.manual_seed(0)
            recipe, _, variant = name.partition(":")
            if variant not in VARIANTS:
                parser.error(f"--recipes: unknown variant {variant!r} in {name!r} (known: noint8, unfused, channel)")
            model = hdqt.quantize_model(build().to(dev), hdqt.recipe(recipe, **RECIPE_OPTIONS.get(variant, {})))
            steps[name] = make_step(model, x, loss_fn, VARIANTS[variant])
            memory[name] = saved_mb(model, x, loss_fn)
        times = interleaved_ms(steps, args.rounds, args.steps)
        for name in recipes:
            # the ratio of each round to fp32 in the same round, then its median and spread
            ratios = sorted(t / b for t, b in zip(times[name], times["fp32"]))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            tgt = f"<={target:g}" if name == "hdqt" and target else ""
            print(f"{case:<26}{name:<13}{statistics.median(times[name]):>9.2f}{statistics.median(ratios):>8.2f}"
                  f"{f'{q1:.2f}-{q3:.2f}':>14}{tgt:>8}{memory[name]:>10.1f}")


if __name__ == "__main__":
    main()
