"""The `hdqt diagnose` sub-command: per-layer gradient alignment with float32 and level use.

    hdqt diagnose --dataset dsads --recipe hdqt --compare int   # a fresh model, a data batch
    hdqt diagnose --run runs/dsads/hdqt                         # a run's checkpoint and data
    hdqt diagnose --synthetic --bits 8 --json                   # random batch, no data needed

Per quantized layer: the cosine of the quantized dX and dW with float32 autograd on
the same weights and batch (mean over --draws stochastic-rounding draws), their
relative bias and variance over the draws, and how many levels of the grid the four
backward operands hit, and the entropy of their histogram, with the Hadamard
transform and without it. See docs/reports.md.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "diagnose", help="per-layer gradient alignment with float32, bias, variance and level use",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", metavar="DIR", default=None,
                        help="a run directory: its network after its last finished task, its data "
                             "and (unless --recipe or a knob is given) its policy")
    parser.add_argument("--dataset", default=None, help="dataset (default: digits, or the run's)")
    parser.add_argument("--backbone", default=None, help="network (default: the dataset's)")
    parser.add_argument("--recipe", default=None, help="recipe (default: hdqt, or the run's policy)")
    parser.add_argument("--compare", metavar="A,B,...", default=None,
                        help="further recipes, diagnosed on the same model and batch")
    parser.add_argument("--bits", type=int, default=None, help="operand bits (default: the recipe's)")
    parser.add_argument("--acc-bits", type=int, default=None,
                        help="forward accumulator bits; 0 = unlimited (default: the recipe's)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile length, or 0 = the whole reduction (default: the recipe's)")
    parser.add_argument("--hadamard-rule", default=None, choices=("paper", "binary"),
                        help="Hadamard blocks (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples in the batch (default: the dataset's or the run's)")
    parser.add_argument("--draws", type=int, default=8, help="stochastic-rounding draws (default: 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model's initialisation, the batch and the draws (default: 0)")
    parser.add_argument("--synthetic", action="store_true",
                        help="a random normal batch of the dataset's input shape with random labels "
                             "(needs no data)")
    parser.add_argument("--data-root", default=None, help="directory with the datasets (default: HDQT_DATA)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=diagnose_command)
    return parser


class _UsageError(ValueError):
    pass


def _knobs(args) -> dict:
    from hdqt.experiments.config import engine_values

    return engine_values({k: v for k, v in (("bits", args.bits), ("tile", args.tile), ("acc_bits", args.acc_bits),
                                            ("hadamard_rule", args.hadamard_rule)) if v is not None})


def _policies(args, default_recipe: str | None):
    """[(label, policy or None)]: None keeps the model's own policies (a run's)."""
    import hdqt

    knobs = _knobs(args)
    names = [args.recipe] if args.recipe else []
    names += [n.strip() for n in (args.compare or "").split(",") if n.strip()]
    if not names and default_recipe is None and not knobs:
        return [("run", None)]
    if not names or args.recipe is None:
        names.insert(0, default_recipe or "hdqt")
    policies = []
    for name in names:
        try:
            policies.append((name, hdqt.recipe(name, **knobs)))
        except ValueError as error:
            raise _UsageError(f"--recipe/--compare {name!r}: {error}") from None
    return policies


def _batch(x_all, y_all, size: int, seed: int):
    import numpy as np
    import torch

    if len(y_all) == 0:
        raise _UsageError("no training samples to draw a batch from")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y_all), generator=generator)[:size]
    x = torch.as_tensor(np.ascontiguousarray(np.asarray(x_all)[idx.numpy()]), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y_all)[idx.numpy()], dtype=torch.long)
    return x, y


def _from_run(args):
    """(model, x, y, run policy name, description) from a run directory's checkpoint."""
    import dataclasses
    from pathlib import Path

    import numpy as np

    from hdqt.cl.learners import create_learner
    from hdqt.cl.scenario import ClassIncrementalScenario
    from hdqt.data import prepare
    from hdqt.experiments import outputs
    from hdqt.experiments.config import RunConfig
    from hdqt.experiments.runner import build_policy, build_train_config

    run = Path(args.run)
    try:
        config = RunConfig.from_dict(outputs.read_json(run / outputs.CONFIG_JSON)["config"])
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise _UsageError(f"--run {run}: no readable config.json ({error})") from None
    if not (run / outputs.CHECKPOINT).exists():
        raise _UsageError(f"--run {run}: no checkpoint.pt (no task has finished)")
    data = prepare(config.dataset, root=args.data_root or config.data_root, seed=config.seed,
                   test_fraction=config.test_fraction)
    scenario = ClassIncrementalScenario(data.x_train, data.y_train, data.x_test, data.y_test,
                                        init_classes=config.init_classes, increment=config.increment,
                                        seed=config.seed)
    # diagnose measures on the CPU: a run trained with --device cuda loads there too,
    # also on a machine without a GPU (the checkpoint holds CPU tensors)
    learner = create_learner(config.method, backbone=config.backbone, input_shape=data.input_shape,
                             num_classes=len(data.class_names), policy=build_policy(config),
                             config=dataclasses.replace(build_train_config(config), device="cpu"),
                             seed=config.seed)
    state = outputs.read_checkpoint(run / outputs.CHECKPOINT)
    learner.load_state_dict(state["learner"])
    tasks = scenario.tasks[: learner.finished_tasks]
    x_all = np.concatenate([t.x_train for t in tasks])
    y_all = np.concatenate([np.asarray(t.y_train) for t in tasks])
    x, y = _batch(x_all, y_all, args.batch_size or config.batch_size, args.seed)
    where = (f"run {run} ({config.dataset}, {config.method}, {config.recipe}, seed {config.seed}) after task "
             f"{learner.finished_tasks}, a batch of its training data")
    return learner.network, x, y, config.recipe, where


def _fresh(args):
    """(model, x, y, None, description): the dataset's backbone with a head over all classes."""
    import torch
    import torch.nn as nn

    from hdqt.data import dataset_info, prepare
    from hdqt.experiments.config import DATASET_DEFAULTS
    from hdqt.models import create_model

    info = dataset_info(args.dataset or "digits")
    size = args.batch_size or DATASET_DEFAULTS[info.name].get("batch_size", 128)
    backbone_name = args.backbone or info.default_backbone
    torch.manual_seed(args.seed)
    backbone = create_model(backbone_name, info.input_shape)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, info.classes))
    if args.synthetic:
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(size, *info.input_shape, generator=generator)
        y = torch.randint(0, info.classes, (size,), generator=generator)
        what = "a random normal batch"
    else:
        data = prepare(info.name, root=args.data_root, seed=args.seed)
        x, y = _batch(data.x_train, data.y_train, size, args.seed)
        what = "a batch of its training data"
    where = (f"{info.name} {info.input_shape}, a fresh {backbone_name} (seed {args.seed}) with a "
             f"{info.classes}-class head, {what}")
    return model, x, y, None, where


def diagnose_command(args: argparse.Namespace) -> int:
    from hdqt.data import DatasetFormatError, DatasetNotFoundError
    from hdqt.diagnostics.gradients import diagnose

    try:
        if args.draws < 1:
            raise _UsageError(f"--draws must be a positive integer, got {args.draws}")
        if args.batch_size is not None and args.batch_size < 2:
            raise _UsageError(f"--batch-size must be at least 2, got {args.batch_size}")
        if args.run and (args.dataset or args.backbone or args.synthetic):
            raise _UsageError("--run takes the dataset, backbone and data of the run; "
                              "drop --dataset, --backbone and --synthetic")
        model, x, y, run_recipe, where = _from_run(args) if args.run else _fresh(args)
        policies = _policies(args, None if args.run else "hdqt")
    except (_UsageError, ValueError, DatasetNotFoundError, DatasetFormatError) as error:
        print(f"hdqt diagnose: error: {error}", file=sys.stderr)
        return 2
    results = []
    for label, policy in policies:
        try:
            results.append(diagnose(model, x, y, policy, draws=args.draws, seed=args.seed))
        except ValueError as error:
            print(f"hdqt diagnose: error: {label}: {error}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"model": where, "batch": int(x.shape[0]), "draws": args.draws, "seed": args.seed,
                          "results": [r.to_dict() for r in results]}, indent=2))
        return 0
    print(f"Gradient diagnostics: {where}; batch {x.shape[0]}, {args.draws} draws (seed {args.seed}). "
          "cos: mean cosine of the quantized gradient with float32 autograd; rel. bias: "
          "||mean - fp32|| / ||fp32||; rel. var: spread of one draw, over ||fp32||^2. Level use of the "
          "backward operands with the Hadamard transform and without it (plain).\n")
    for result in results:
        name = result.policy if result.policy != (run_recipe or "") else f"{result.policy} (the run's)"
        print(f"## {name}\n\n{result.table()}\n")
    return 0
