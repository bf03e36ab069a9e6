"""The `hdqt run` sub-command: flags and TOML in, runs, tables out.

Precedence: dataset defaults < --config file < flags. The highest-precedence
layer that names a recipe or compare decides between one run and a comparison;
when neither is named, the command compares fp32 against hdqt. With no
arguments at all it runs the embedded default (digits, iCaRL, fp32 against
hdqt) in runs/default. Rerunning a command with the same --out resumes it after
its last finished task. See docs/cli.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hdqt.experiments.config import (
    CONFIG_KEYS, DEFAULT_COMPARE, ConfigError, RunConfig, load_toml, parse_name_list,
    resolve_config,
)

DEFAULT_OUT = Path("runs/default")

# (flag, config key, type, help). Every flag defaults to None so that "not given"
# can be told apart from "given the default", which the precedence rules need.
_FLAGS = [
    ("--dataset", "dataset", str, "dataset name (default: digits)"),
    ("--backbone", "backbone", str, "network (default: the dataset's)"),
    ("--method", "method", str, "class-incremental learner (default: icarl)"),
    ("--recipe", "recipe", str, "quantization recipe for a single run, e.g. fp32, hdqt, int"),
    ("--bits", "bits", int, "weight/activation/gradient bits, 2..16 (default: the recipe's, 4)"),
    ("--acc-bits", "acc_bits", int,
     "accumulator bits, 2..32, or 0 = unlimited (default: the recipe's, 8). It limits the "
     "FORWARD product only, unless --saturate-backward: each tile of --tile products is "
     "summed and saturated once, at the end of the tile, to +-(2^(acc_bits-1)-1); the sum "
     "across tiles is not saturated"),
    ("--tile", "tile", int,
     "products summed into one accumulator before it saturates, >= 1, or 0 = the whole "
     "reduction, clamped once (default: the recipe's, 32)"),
    ("--hadamard-rule", "hadamard_rule", str,
     "Hadamard blocks of the backward pass. paper: one block size, the largest "
     "power of two dividing the width (an odd width is not transformed); binary: blocks of "
     "the binary expansion of the width, e.g. 405 = 256+128+16+4+1 (default: the recipe's, "
     "paper)"),
    ("--hadamard-select", "hadamard_select", str,
     "which backward products run in the Hadamard domain. always: every one (the paper); "
     "noise: a product only when its operands' expected rounding error is smaller there, "
     "decided at every step (default: the recipe's, always; see docs/quantization.md)"),
    ("--backward-scales", "backward_scales", str,
     "scales of the backward's gradient and input operands. tensor: one per tensor; sample: "
     "one per sample, as the official code's conv backward (its products then run on "
     "dequantized values: needs unlimited backward accumulators) (default: tensor)"),
    ("--weight-scales", "weight_scales", str,
     "scales of the forward weight. tensor: one per tensor (the paper); channel: one per "
     "output feature or channel, so that one large row does not round small rows to zero "
     "(default: tensor)"),
    ("--group", "group", int,
     "hadanet: values per beta along the reduction, a power of two >= 2, or 0 = one beta "
     "per row (default: the recipe's, one per row)"),
    ("--input-clip", "input_clip", str,
     "bound of the normalised feature inputs, in standard deviations, or none (default: 3; "
     "images are not clipped)"),
    ("--train-per-class", "train_per_class", int,
     "keep at most N training samples of each class (a seeded choice), for quick runs on "
     "big datasets; the test set stays whole (default: all)"),
    ("--seed", "seed", int, "seed for class order, data split, init and rounding (default: 0)"),
    ("--epochs", "epochs", int, "epochs per task (default: the dataset's); with --schedule, "
     "the task's total, split over the schedule's steps"),
    ("--lr", "lr", float, "learning rate (default: the dataset's)"),
    ("--batch-size", "batch_size", int, "batch size (default: the dataset's)"),
    ("--milestones", "milestones", str, "comma-separated epochs where lr decays by gamma"),
    ("--memory", "memory", int, "total exemplar budget (default: the dataset's)"),
    ("--init-classes", "init_classes", int, "classes in the first task"),
    ("--increment", "increment", int, "classes in each later task"),
    ("--data-root", "data_root", str, "directory with the datasets (default: HDQT_DATA)"),
    ("--device", "device", str, "torch device, e.g. cpu, cuda or cuda:1; must exist on this "
     "machine (default: cpu)"),
    ("--schedule", "schedule", str,
     "schedule of each task's training. none: one stage under the recipe (default); ctmq: "
     "CTMQ's chain from --ctmq-start-bits down to the run's width (--bits, or hadanet's 1), "
     "one bit a step, each step starting from the weights of the one before, repeated "
     "--ctmq-cycles times; --epochs is split evenly over the steps (the remainder to the "
     "last ones), so a run with and without the schedule trains as many epochs"),
    ("--ctmq-start-bits", "ctmq_start_bits", int,
     "width of CTMQ's first step, wider than the target, up to 16 (default 8)"),
    ("--ctmq-cycles", "ctmq_cycles", int,
     "descents from --ctmq-start-bits to the target, >= 1 (default 2)"),
    ("--ctmq-recipe", "ctmq_recipe", str,
     "integer recipe of the steps wider than the target (default: --recipe; give one, e.g. "
     "int, with --recipe hadanet). Their accumulator is --acc-bits plus 2 bits per extra bit"),
    ("--diagnose-every", "diagnose_every", int, "gradient diagnostics every N training steps "
     "into diagnostics.jsonl; they do not change the results (default: 0, off)"),
]

_METAVARS = {"schedule": "{none,ctmq}", "hadamard_rule": "{paper,binary}", "hadamard_select": "{always,noise}", "backward_scales": "{tensor,sample}", "weight_scales": "{tensor,channel}", "input_clip": "{STD,none}"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run", help="run a class-incremental experiment (the default command)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="TOML file; flags override its values")
    for flag, key, kind, help_text in _FLAGS:
        parser.add_argument(flag, dest=key, type=kind, default=None, help=help_text,
                            metavar=_METAVARS.get(key))
    parser.add_argument("--saturate-backward", dest="saturate_backward", default=None,
                        action=argparse.BooleanOptionalAction,
                        help="also tile and saturate the two backward products (dX, dW) like "
                             "the forward one (default: the recipe's, off)")
    parser.add_argument("--forward-hadamard", dest="forward_hadamard", default=None,
                        action=argparse.BooleanOptionalAction,
                        help="rotate both operands of the forward product along its reduction "
                             "(Hadamard blocks of --hadamard-rule) before quantizing (default: "
                             "the recipe's, off)")
    parser.add_argument("--compare", metavar="A,B,...", default=None,
                        help="run each recipe with the same seed and class order and print "
                             "them side by side (default when no --recipe: fp32,hdqt)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory; rerunning with the same one resumes "
                             "(default: runs/default with no arguments, else runs/<name>-<hash>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a run with another configuration or made by other code "
                             "in --out instead of failing")
    parser.add_argument("--force", action="store_true",
                        help="resume (or report) a run in --out made by other code instead "
                             "of failing; its results then mix code versions")
    parser.set_defaults(func=run_command)
    return parser


@dataclass(frozen=True)
class PlannedRun:
    label: str
    config: RunConfig
    out_dir: Path


def plan_runs(args: argparse.Namespace) -> tuple[list[PlannedRun], bool]:
    """Resolve flags and file into validated runs; returns (runs, is_comparison)."""
    file_values: dict[str, Any] = load_toml(args.config) if args.config else {}
    source = str(args.config) if args.config else "the config file"
    flags = {key: getattr(args, key) for key in CONFIG_KEYS if getattr(args, key, None) is not None}
    recipes = _choose_recipes(file_values, flags, args.compare, source)
    comparison = recipes is not None
    configs = ([resolve_config(file_values, {**flags, "recipe": r}, source=source) for r in recipes]
               if comparison else [resolve_config(file_values, flags, source=source)])
    out = args.out or file_values.get("out")
    if out is None:
        given_anything = bool(flags) or args.config is not None or args.compare is not None
        out = _default_out(configs, comparison) if given_anything else DEFAULT_OUT
    out = Path(out)
    if comparison:
        return [PlannedRun(c.recipe, c, out / c.recipe) for c in configs], True
    return [PlannedRun(configs[0].recipe, configs[0], out)], False


def _choose_recipes(file_values: Mapping[str, Any], flags: Mapping[str, Any],
                    compare_flag: str | None, source: str) -> tuple[str, ...] | None:
    """The recipes to compare, or None for a single run (see the module docstring)."""
    layers = [("flags", flags.get("recipe"), compare_flag),
              (source, file_values.get("recipe"), file_values.get("compare"))]
    for where, recipe, compare in layers:
        if recipe is not None and compare is not None:
            raise ConfigError(f"{where}: give either recipe or compare, not both "
                              f"(recipe={recipe!r}, compare={compare!r})")
        if compare is not None:
            return parse_name_list(compare, f"compare (from {where})")
        if recipe is not None:
            return None
    return DEFAULT_COMPARE


def _default_out(configs: list[RunConfig], comparison: bool) -> Path:
    # The hash makes the same command find (and resume) the same directory while a
    # changed option starts a new one instead of clashing with the old run.
    identity = json.dumps([c.identity() for c in configs], sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    first = configs[0]
    mode = "-vs-".join(c.recipe for c in configs) if comparison else first.recipe
    return Path("runs") / f"{first.dataset}-{first.method}-{mode}-seed{first.seed}-{digest}"


def run_command(args: argparse.Namespace) -> int:
    # Imported here so that `hdqt --help` does not load torch and the learners.
    from hdqt.data import DatasetFormatError, DatasetNotFoundError
    from hdqt.experiments.progress import ConsoleProgress
    from hdqt.experiments.runner import build_policy, build_train_config, run_experiment
    from hdqt.experiments.tables import compare_table, outputs_note, run_table

    try:
        runs, comparison = plan_runs(args)
        for run in runs:  # fail on any recipe's options before the first run starts
            build_policy(run.config)
            build_train_config(run.config)
    except ConfigError as error:
        print(f"hdqt run: error: {error}", file=sys.stderr)
        return 2
    results = []
    for run in runs:
        print(f"== {run.label}: output in {run.out_dir}", flush=True)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                results.append(run_experiment(run.config, run.out_dir, overwrite=args.overwrite,
                                              force=args.force,
                                              progress=ConsoleProgress(run.label)))
        except (ConfigError, DatasetNotFoundError, DatasetFormatError) as error:
            print(f"hdqt run: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\nhdqt run: interrupted; rerun the same command to resume from the "
                  f"last finished task in {run.out_dir}", file=sys.stderr)
            return 130
        print(flush=True)
        print(run_table(results[-1].metrics, results[-1].history), flush=True)
        print(flush=True)
    if comparison:
        print(f"Comparison (same seed {runs[0].config.seed}, same class order; "
              f"differences to {runs[0].label}):")
        print(compare_table([r.label for r in runs], [r.metrics for r in results]), flush=True)
        print(flush=True)
    print(outputs_note([run.out_dir for run in runs]), flush=True)
    return 0


def _show_warning(message, category, *args, **kwargs) -> None:
    print(f"hdqt run: warning: {message}", file=sys.stderr, flush=True)
