"""The `hdqt energy` sub-command: the estimated cost of one training step per recipe.

    hdqt energy --dataset dsads --backbone fcnet --recipe hdqt --compare fp32,int
    hdqt energy --dataset cifar100 --compare fp32,hdqt --json

The model is the dataset's backbone with a head over all of its classes (the widest
the head grows to); the batch is the dataset's training batch. The first recipe is
the reference of the ratios. See docs/cost.md for what is counted and priced.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "energy", help="estimate operations, bytes and energy of one training step per recipe",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="dataset whose input shape and classes to use "
                        "(default: digits)")
    parser.add_argument("--backbone", default=None, help="network (default: the dataset's)")
    parser.add_argument("--recipe", default="hdqt", help="recipe to estimate (default: hdqt)")
    parser.add_argument("--compare", metavar="A,B,...", default=None,
                        help="further recipes, priced beside --recipe; ratios are to --recipe")
    parser.add_argument("--bits", type=int, default=None, help="operand bits (default: each recipe's)")
    parser.add_argument("--acc-bits", type=int, default=None,
                        help="forward accumulator bits; 0 = unlimited (default: each recipe's)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile length, or 0 = the whole reduction (default: each recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch (default: the dataset's)")
    parser.add_argument("--table", metavar="TOML", default=None,
                        help="energy table replacing the default (Horowitz, ISSCC 2014, 45 nm); see docs/cost.md")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=energy_command)
    return parser


def energy_command(args: argparse.Namespace) -> int:
    import torch.nn as nn

    import hdqt
    from hdqt.cost import EnergyTable, estimate
    from hdqt.data import dataset_info
    from hdqt.experiments.config import DATASET_DEFAULTS, engine_values
    from hdqt.models import create_model

    try:
        info = dataset_info(args.dataset)
        batch = args.batch_size if args.batch_size is not None else \
            DATASET_DEFAULTS[info.name].get("batch_size", 128)
        if batch < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {batch}")
        table = EnergyTable.from_toml(args.table) if args.table else EnergyTable()
        names = [args.recipe] + [n.strip() for n in (args.compare or "").split(",") if n.strip()]
        names = list(dict.fromkeys(names))  # --recipe hdqt --compare fp32,hdqt: hdqt once
        knobs = engine_values({k: v for k, v in (("bits", args.bits), ("tile", args.tile),
                                                 ("acc_bits", args.acc_bits)) if v is not None})
        policies = []
        for name in names:
            try:
                policies.append(hdqt.recipe(name, **knobs))
            except ValueError as error:
                raise ValueError(f"--recipe/--compare {name!r}: {error}") from None
        backbone = create_model(args.backbone or info.default_backbone, info.input_shape)
        model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, info.classes))
    except ValueError as error:
        print(f"hdqt energy: error: {error}", file=sys.stderr)
        return 2
    steps = [estimate(model, info.input_shape, policy, batch=batch, table=table) for policy in policies]
    if args.json:
        print(json.dumps({"dataset": info.name, "input_shape": list(info.input_shape), "batch": batch,
                          "steps": [s.to_dict() for s in steps]}, indent=2))
        return 0
    print(f"One training step: {info.name} {info.input_shape}, backbone {args.backbone or info.default_backbone} "
          f"with a {info.classes}-class head, batch {batch}. Energy table: {table.source}; bytes priced as "
          f"{table.memory.upper()} at {table.memory_access():g} pJ per 64 bits.\n")
    for step in steps:
        print(f"## {step.policy}\n\n{step.table()}\n")
    ref = steps[0]
    print(f"| recipe | MACs | compute µJ | memory µJ | total µJ | total / {ref.policy} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for step in steps:
        print(f"| {step.policy} | {step.macs:,} | {step.compute_pj / 1e6:,.3f} | {step.memory_pj / 1e6:,.3f} | "
              f"{step.total_pj / 1e6:,.3f} | {step.total_pj / ref.total_pj:.3f} |")
    return 0
