"""Training-step cost of the quantized engine against fp32, in one process.

Measures forward + backward + SGD at batch 128 for
  * FCNet 405-405-405-19 (three Linear layers, no bias), and
  * one 16->16 3x3 conv (padding 1) on 32x32 maps,
under each recipe, and prints each recipe's time divided by fp32's.
Targets (issue 2): hdqt <= 2x fp32 for FCNet, <= 3x for the conv.

    python benchmarks/bench_engine.py [--repeats 30] [--recipes fp32,hdqt,int] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import hdqt


def fcnet() -> nn.Module:
    return nn.Sequential(
        nn.Linear(405, 405, bias=False), nn.ReLU(),
        nn.Linear(405, 405, bias=False), nn.ReLU(),
        nn.Linear(405, 19, bias=False),
    )


def conv() -> nn.Module:
    return nn.Conv2d(16, 16, 3, padding=1, bias=False)


def make_step(model: nn.Module, x: torch.Tensor, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        opt.step()

    return step


def median_ms(step, repeats: int) -> float:
    for _ in range(3):  # warm-up: allocator, thread pool, caches
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--recipes", default="fp32,hdqt,int")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = args.recipes.split(",")
    if "fp32" not in recipes:
        recipes.insert(0, "fp32")
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x_fc = torch.randn(128, 405, generator=gen).to(dev)
    y_fc = torch.randint(0, 19, (128,), generator=gen).to(dev)
    x_cv = torch.randn(128, 16, 32, 32, generator=gen).to(dev)
    cases = {
        "fcnet 405-405-405-19": (fcnet, x_fc, lambda out: F.cross_entropy(out, y_fc), 2.0),
        "conv 16->16 3x3 @32x32": (conv, x_cv, lambda out: out.square().mean(), 3.0),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}, batch 128, "
          f"median of {args.repeats} steps")
    print(f"{'case':<26}{'recipe':<8}{'ms/step':>10}{'x fp32':>9}{'target':>9}")
    for case, (build, x, loss_fn, target) in cases.items():
        base = None
        for name in recipes:
            torch.manual_seed(0)
            model = hdqt.quantize_model(build().to(dev), hdqt.recipe(name))
            ms = median_ms(make_step(model, x, loss_fn), args.repeats)
            base = ms if name == "fp32" else base
            ratio = ms / base
            tgt = f"<={target:g}" if name == "hdqt" else ""
            print(f"{case:<26}{name:<8}{ms:>10.2f}{ratio:>9.2f}{tgt:>9}")


if __name__ == "__main__":
    main()
