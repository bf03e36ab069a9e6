"""Dead feature units of the convnet during class-incremental training (issue 15).

Runs `hdqt run`'s experiment for each recipe and, with a forward hook on the backbone's
last module, records during training how many of the feature units are zero for every
sample of the batch the optimizer sees (averaged over each task's steps), with the
task's accuracy. `--head relu` puts back the head of the convnet before d782d61
(Linear -> ReLU, no BatchNorm), to measure what the BatchNorm changed.

    python benchmarks/bench_feature_units.py --recipes fp32,int,hdqt --acc-bits 0 \\
        --epochs 4 --milestones 3 --train-per-class 1000
    python benchmarks/bench_feature_units.py --head relu --recipes fp32,int,hdqt ...

The numbers it prints are the same run's metrics as `hdqt run` with the same flags: the
hook reads activations and changes nothing.

`--a2q-bound` tries, as a probe and not a library option, the guarantee of A2Q (Colbert
et al., ICCV 2023) in hdqt's tiled accumulator: before every forward product, each output
row's integer weight codes are shrunk toward zero, tile by tile, until
sum|w| * (largest input code, 15) <= 2^(acc_bits-1) - 1, so that no tile sum can saturate.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from torch import nn

import torch

from hdqt.experiments import runner
from hdqt.quantization import runtime
from hdqt.quantization.quantizer import QTensor
from hdqt.experiments.config import ConfigError, parse_int_list, parse_name_list, resolve_config
from hdqt.models import convnet as convnet_module


def _relu_head(channels: int, height: int, width: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, out_dim), nn.ReLU())


class DeadUnitMeter:
    """A forward hook on the features: per task, the mean share of dead units per step."""

    def __init__(self) -> None:
        self.task = 0
        self.sums: dict[int, list[float]] = {}
        self.hooked = False

    def on_step(self, learner, xb, yb, task_index, stage) -> None:
        if not self.hooked:
            learner.network.backbone.fc[-1].register_forward_hook(self._record)
            self.hooked = True
        self.task = task_index

    def _record(self, module, inputs, output) -> None:
        if module.training:
            dead = float((output.detach().amax(dim=0) == 0).float().mean())
            self.sums.setdefault(self.task, []).append(dead)

    def shares(self) -> list[float]:
        return [100.0 * sum(v) / len(v) for _, v in sorted(self.sums.items())]


class TileL1Bound:
    """Wraps LayerRuntime.quantize: forward weight codes shrunk per (row, tile) so that no
    tile of the forward product can leave the accumulator (see the module docstring)."""

    INPUT_CODE_MAX = 15.0  # unsigned 4-bit inputs (after a ReLU); signed ones reach 8

    def __init__(self) -> None:
        self.tiles = self.shrunk = 0
        self.original = runtime.LayerRuntime.quantize

    def __enter__(self):
        bound = self

        def quantize(rt, quantizer, tensor, operand, amax=None):
            q = bound.original(rt, quantizer, tensor, operand, amax)
            if operand != "forward weight" or quantizer is None or rt.policy.acc_bits is None:
                return q
            return bound.shrink(q, rt.policy.acc_bits, rt.policy.tile)

        runtime.LayerRuntime.quantize = quantize
        return self

    def __exit__(self, *exc) -> None:
        runtime.LayerRuntime.quantize = self.original

    def shrink(self, q: QTensor, acc_bits: int, tile: int | None) -> QTensor:
        limit = (2 ** (acc_bits - 1) - 1) / self.INPUT_CODE_MAX
        codes = q.values.reshape(q.values.shape[0], -1)
        rows, k = codes.shape
        tile = tile or k
        tiles = torch.nn.functional.pad(codes, (0, (-k) % tile)).reshape(rows, -1, tile)
        factor = (limit / tiles.abs().sum(-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        self.tiles += factor.numel()
        self.shrunk += int((factor < 1).sum())
        shrunk = torch.trunc(tiles * factor).reshape(rows, -1)[:, :k]
        return QTensor(shrunk.reshape(q.values.shape).to(q.values.dtype), q.scale)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fp32,int,hdqt")
    parser.add_argument("--head", choices=("bn", "relu"), default="bn",
                        help="bn: the convnet as it is; relu: its head before d782d61")
    parser.add_argument("--method", default="icarl", choices=("icarl", "bic", "lwf", "finetune"),
                        help="a learner with one backbone (network.backbone)")
    parser.add_argument("--acc-bits", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--milestones", default="3")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--a2q-bound", action="store_true",
                        help="probe: shrink the forward weight codes so that no tile saturates")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.head == "relu":
        convnet_module._head = _relu_head
    rows = []
    for recipe in parse_name_list(args.recipes, "--recipes"):
        try:
            config = resolve_config(None, {
                "dataset": "fashion_mnist", "method": args.method, "recipe": recipe,
                "acc_bits": args.acc_bits, "epochs": args.epochs,
                "milestones": parse_int_list(args.milestones, "--milestones"),
                "train_per_class": args.train_per_class, "seed": args.seed,
                "data_root": args.data_root}, source="bench_feature_units.py")
        except ConfigError as error:
            print(f"bench_feature_units.py: error: {error}", file=sys.stderr)
            return 2
        meter = DeadUnitMeter()
        bound = TileL1Bound() if args.a2q_bound else None
        with tempfile.TemporaryDirectory() as out, (bound if bound is not None else contextlib.nullcontext()):
            result = runner.run_experiment(config, Path(out), on_step=meter.on_step)
        if bound is not None:
            print(f"{recipe}: a2q bound shrank {bound.shrunk:,} of {bound.tiles:,} weight tiles")
        metrics = result.metrics
        rows.append((recipe, meter.shares(), metrics["avg_incremental_accuracy"],
                     metrics["last_accuracy"]))
        print(f"{recipe}: dead feature units per task (%) "
              f"{', '.join(f'{s:.1f}' for s in rows[-1][1])}; "
              f"avg incremental accuracy {rows[-1][2]:.2f}, last {rows[-1][3]:.2f}", flush=True)
    print(f"\nhead: {args.head}{'; forward weights under the A2Q-style tile bound' if args.a2q_bound else ''}; command: python benchmarks/bench_feature_units.py "
          + " ".join(sys.argv[1:] if argv is None else argv))
    print("| recipe | dead units, tasks 1-5 (%) | avg inc acc | last acc |")
    print("| --- | --- | ---: | ---: |")
    for recipe, shares, avg, last in rows:
        print(f"| {recipe} | {' / '.join(f'{s:.0f}' for s in shares)} | {avg:.2f} | {last:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
