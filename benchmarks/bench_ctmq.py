"""CTMQ against direct low-bit training, at the same number of epochs per task.

For every dataset, target width and seed, two ordinary `hdqt run`s with iCaRL:

* direct: the recipe at the target width for --epochs epochs per task;
* ctmq: `--schedule ctmq` from --start-bits down to the target, --cycles times, the
  same --epochs split over its steps (the last step of each descent runs the direct
  run's own policy).

Targets are integer widths (`2,3`) and `binary`: the `hadanet` recipe, whose wider
CTMQ steps run --recipe (skipped, and said so, where hadanet is not installed).
DSADS trains FCNet, Fashion-MNIST the convnet (their defaults). Same seed, same class
order and data split, so the table gives the paired per-seed difference CTMQ minus
direct (mean ± std over seeds) next to each side's mean ± std.

Runs live under --out and resume like `hdqt run` (rerun the same command); runs made
by other code are rerun from scratch. The section printed (and written to --results)
is the one in docs/results-ctmq.md (its own page: bench_cl.py rewrites docs/results.md whole).

    python benchmarks/bench_ctmq.py --datasets dsads --epochs 28 --jobs 2
    python benchmarks/bench_ctmq.py --datasets fashion_mnist --epochs 16 --jobs 2
"""
from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from hdqt.experiments import outputs
from hdqt.experiments.benchmark_grid import run_benchmark_grid
from hdqt.experiments.config import ConfigError, parse_int_list, parse_name_list, resolve_config
from hdqt.experiments.fingerprint import describe, loaded_code_fingerprint
from hdqt.experiments.grid import (GridOutcome, GridPoint, classifiers_of, fmt_delta, fmt_stat, md_row,
                                   paired_differences, stat)

NAMES = {"dsads": "DSADS (FCNet)", "fashion_mnist": "Fashion-MNIST (convnet)"}
BINARY = "binary"
SCHEDULES = ("direct", "ctmq")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="dsads,fashion_mnist")
    parser.add_argument("--method", default="icarl")
    parser.add_argument("--targets", default="2,3,binary",
                        help="target widths: integers, and binary (the hadanet recipe)")
    parser.add_argument("--recipe", default="hdqt",
                        help="integer recipe of the integer targets and of CTMQ's wider steps")
    parser.add_argument("--binary-recipe", default="hadanet")
    parser.add_argument("--acc-bits", type=int, default=None,
                        help="accumulator of the integer targets (default: the recipe's; "
                             "CTMQ's wider steps add 2 bits per extra bit)")
    parser.add_argument("--weight-scales", default=None, choices=["tensor", "channel"],
                        help="forward weight scales of the integer targets and of CTMQ's integer steps "
                             "(default: the recipe's, per tensor); binary targets keep their betas "
                             "(a beta per row already)")
    parser.add_argument("--start-bits", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per task of both runs (default: the dataset's)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="keep at most N training samples of each class (seeded, the "
                             "same for both runs of a seed; the test set stays whole)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per job (default: cores / jobs)")
    parser.add_argument("--out", default="runs/bench_ctmq", help="root of the run directories")
    parser.add_argument("--results", default=None,
                        help="markdown file for the section (default: OUT/results.md)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: report the runs already finished under --out")
    return parser.parse_args(argv)


def targets(args) -> tuple[list[str], list[str]]:
    """(targets to run, notes on those skipped)."""
    import hdqt

    wanted = parse_name_list(args.targets, "--targets")
    kept, notes = [], []
    for target in wanted:
        if target == BINARY and args.binary_recipe not in hdqt.list_recipes():
            notes.append(f"binary: skipped, the {args.binary_recipe} recipe is not installed "
                         f"here (recipes: {', '.join(hdqt.list_recipes())})")
            continue
        if target != BINARY:
            parse_int_list(target, "--targets")
        kept.append(target)
    return kept, notes


def build_points(args) -> tuple[list[GridPoint], list[str]]:
    kept, notes = targets(args)
    points = []
    for dataset in parse_name_list(args.datasets, "--datasets"):
        for target in kept:
            for schedule in SCHEDULES:
                for seed in parse_int_list(args.seeds, "--seeds"):
                    flags = {"dataset": dataset, "method": args.method, "seed": seed,
                             "epochs": args.epochs, "data_root": args.data_root,
                             "train_per_class": args.train_per_class}
                    if target == BINARY:
                        flags.update(recipe=args.binary_recipe, weight_scales=args.weight_scales)
                    else:
                        flags.update(recipe=args.recipe, bits=int(target),
                                     acc_bits=args.acc_bits, weight_scales=args.weight_scales)
                    if schedule == "ctmq":
                        flags.update(schedule="ctmq", ctmq_start_bits=args.start_bits,
                                     ctmq_cycles=args.cycles, ctmq_recipe=args.recipe)
                    config = resolve_config(None, flags, source="bench_ctmq.py")
                    out = Path(args.out) / dataset / f"target{target}" / schedule / f"seed{seed}"
                    points.append(GridPoint(config, out,
                                            label=f"{dataset}/{target}/{schedule}/seed{seed}"))
    return points, notes


def render(args, command: str, points: list[GridPoint], outcomes: list[GridOutcome],
           notes: list[str], wall_seconds: float) -> str:
    code = loaded_code_fingerprint()
    epochs = sorted({p.config.epochs for p in points})
    lines = ["## CTMQ against direct low-bit training", "",
             f"Written by `benchmarks/bench_ctmq.py`. Reproduce with:", "", "```",
             command, "```", "",
             f"- {args.method} on each dataset's default backbone; {', '.join(map(str, epochs))} "
             f"epochs per task for both runs. CTMQ: {args.start_bits} bits down to the target, "
             f"one bit a step, {args.cycles} cycles, the epochs split over the steps (the "
             f"remainder to the last ones); every step a fresh SGD run. Direct: the target's "
             f"policy for all the epochs.",
             f"- Integer targets: `{args.recipe}` (acc_bits "
             f"{'the recipe default' if args.acc_bits is None else args.acc_bits}; CTMQ's wider "
             f"steps 2 bits more per extra bit"
             f"{'; forward weights scaled per output channel (--weight-scales channel)' if args.weight_scales == 'channel' else ''}"
             f"). Binary: `{args.binary_recipe}`, its wider "
             f"CTMQ steps `{args.recipe}`.",
             *([f"- Training data: at most {args.train_per_class} samples of each class (a "
                f"seeded choice per seed, the same for both runs); the test set whole."]
               if args.train_per_class else []),
             f"- Seeds {args.seeds}. Accuracy: average incremental accuracy (%), forgetting "
             f"(points), mean ± sample std over seeds; Δ: CTMQ minus direct per seed (same "
             f"class order and split), mean ± std. `*`: the method's own classifier.",
             f"- Code: {describe(code)}. Kernel variant: {_kernel_variant()}. Machine: "
             f"{platform.machine()}, {args.jobs} job(s) in parallel. Wall time of this "
             f"invocation {wall_seconds / 60:.1f} min (finished runs are read back).", ""]
    lines += [f"- {note}" for note in notes]
    if notes:
        lines.append("")
    by_key: dict[tuple, dict[int, dict]] = {}
    for point, outcome in zip(points, outcomes):
        if outcome.metrics is None:
            continue
        c = point.config
        target = BINARY if c.recipe == args.binary_recipe else str(c.bits)
        by_key.setdefault((c.dataset, target, c.schedule), {})[c.seed] = outcome.metrics
    for dataset in parse_name_list(args.datasets, "--datasets"):
        lines += [f"### {NAMES.get(dataset, dataset)}", "",
                  md_row(["target", "classifier", "accuracy direct", "accuracy CTMQ", "Δ",
                          "forgetting direct", "forgetting CTMQ", "Δ forg.", "seeds"]),
                  md_row(["---"] * 9)]
        for target in targets(args)[0]:
            direct = by_key.get((dataset, target, "none"), {})
            ctmq = by_key.get((dataset, target, "ctmq"), {})
            for classifier, primary in classifiers_of(direct or ctmq):
                cells = [target if target == BINARY else f"{target} bits",
                         classifier + ("*" if primary else "")]
                for key in ("avg_incremental_accuracy", "forgetting"):
                    cells += [fmt_stat(stat((m.get(classifier) or {}).get(key)
                                            for m in runs.values())) for runs in (direct, ctmq)]
                    cells.append(fmt_delta(stat(paired_differences(direct, ctmq, classifier, key))))
                cells.append(f"{len(direct)}/{len(ctmq)}")
                lines.append(md_row(cells))
        lines.append("")
    failed = [o for o in outcomes if o.metrics is None]
    if failed:
        lines += ["Not finished:", ""] + [f"- {o.point.name}: {o.error}" for o in failed] + [""]
    return "\n".join(lines)


def _kernel_variant() -> str:
    """The kernel line of `hdqt info`."""
    try:
        info = subprocess.run([sys.executable, "-m", "hdqt", "info"], capture_output=True,
                              text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [line.strip() for line in info.splitlines() if "kernel" in line.lower()]
    return "; ".join(lines) or "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_ctmq.py", *argv])
    try:
        points, notes = build_points(args)
    except ConfigError as error:
        print(f"bench_ctmq.py: error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    outcomes = run_benchmark_grid(points, script="bench_ctmq.py", out=args.out, jobs=args.jobs,
                                  threads=args.threads, report_only=args.report_only, notes=notes)
    if outcomes is None:
        return 130
    text = render(args, command, points, outcomes, notes, time.perf_counter() - started)
    results = Path(args.results or Path(args.out) / "results.md")
    outputs.write_text(results, text + "\n")
    print(text)
    print(f"written to {results}")
    return 0 if all(o.metrics is not None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
