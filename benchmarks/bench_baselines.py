"""Baseline FQT recipes compared in one engine (issue 9): where does each one break?

Runs every (dataset, method, accumulator width, recipe, seed) as an ordinary
`hdqt run` in its own directory under --out (through hdqt.experiments.grid, several
at a time with --jobs), then writes a markdown report (--results) with, per
dataset, method and accumulator width, the mean ± std over seeds of the average
incremental accuracy and the forgetting of every recipe, and the paired per-seed
difference of each recipe to the first (fp32 by default: same seed, same class
order and split).

Recipes are names from `hdqt.list_recipes()`, optionally with a Hadamard block rule
(`hdqt:binary`), `+fh` for the forward Hadamard rotation (`luq+fh`, `int:binary+fh`), `+ps`
for per-sample scales of the backward's gradients and inputs (`hdqt+ps`) and `+t0` for one
accumulator tile as long as the whole reduction (`luq+t0`: how the official code limits LUQ's
accumulator; the default tile is the recipe's, 32).
`--input-clip 3|none` bounds the feature inputs (part of every run's identity).
`--acc-bits` is each recipe's accumulator: integer for `int`, `hdqt` and `luq`'s forward,
a float accumulator of that many bits for the float recipes (docs/quantization.md); it
is a list, 0 meaning unlimited. fp32 runs once and is the baseline of every table.

    python benchmarks/bench_baselines.py --datasets digits --methods icarl \
        --recipes fp32,int,hdqt,luq,fp134 --epochs 1 --seeds 0 --results /tmp/baselines.md
    # the issue's first table (days of CPU time):
    python benchmarks/bench_baselines.py --datasets dsads,hapt --methods icarl,bic,der \
        --recipes fp32,int,hdqt,hdqt:binary,luq,fp134 --seeds 0,1,2 --acc-bits 8 --jobs 2

Interrupt it at any time: rerunning the same command reuses finished runs and
resumes unfinished ones after their last finished task (the runner's rule). The same
command with `--report-only` trains nothing and writes the tables from the runs that
finished (those made by this code), listing the others as not included.
Runs live under --out by dataset, method, input clip, accumulator width (with `-bitsN`
and `-tileN` where --bits and --tile are off their defaults), recipe and seed: give
another --epochs its own --out (a folder holding another configuration is refused).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import hdqt
from hdqt.experiments import outputs
from hdqt.experiments.benchmark_grid import run_benchmark_grid
from hdqt.experiments.config import ConfigError, parse_int_list, parse_name_list, resolve_config
from hdqt.experiments.fingerprint import describe
from hdqt.experiments.grid import GridOutcome, GridPoint, fmt_delta, fmt_stat, md_row, stat, stored_code
from hdqt.quantization import native

FLOAT_RECIPES = ("fp134", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="dsads,hapt")
    parser.add_argument("--methods", default="icarl,bic,der")
    parser.add_argument("--recipes", default="fp32,int,hdqt,hdqt:binary,luq,fp134",
                        help="first is the baseline; NAME, NAME:RULE (Hadamard block rule paper|binary), with +fh (forward "
                             "Hadamard), +ps (per-sample backward scales) and +t0 (one tile: the whole reduction)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the dataset's)")
    parser.add_argument("--bits", type=int, default=4, help="operand bits of the integer/log recipes")
    parser.add_argument("--acc-bits", default="8", help="accumulator widths, a list; 0 = unlimited")
    parser.add_argument("--tile", type=int, default=None, help="accumulator tile (default: the recipe's, 32)")
    parser.add_argument("--input-clip", default=None, help="feature bound in std, or none (default 3)")
    parser.add_argument("--backbone", default=None, help="network (default: the dataset's)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="keep at most N training samples of each class (the test set whole)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job")
    parser.add_argument("--out", default="runs/bench_baselines")
    parser.add_argument("--results", default="docs/results_baselines.md")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the runs that finished (a grid of days, "
                             "summarised while it runs); the others are listed as not included")
    return parser.parse_args(argv)


# A recipe's suffixes: the run options they set.
SUFFIXES = {"fh": ("forward_hadamard", True), "ps": ("backward_scales", "sample"), "t0": ("tile", 0)}


def recipe_spec(token: str) -> tuple[str, str | None, dict]:
    """``NAME[:RULE][+fh][+ps][+t0]`` -> (recipe, Hadamard rule or None, the suffixes' options)."""
    base, *extras = token.split("+")
    options = {}
    for extra in extras:
        if extra not in SUFFIXES:
            raise ConfigError(f"--recipes: {token!r}: the suffixes are +fh (forward Hadamard), +ps "
                              "(per-sample backward scales) and +t0 (one tile: the whole reduction)")
        key, value = SUFFIXES[extra]
        options[key] = value
    name, _, rule = base.partition(":")
    if name not in hdqt.list_recipes():
        raise ConfigError(f"--recipes: unknown recipe {name!r}; valid: {', '.join(hdqt.list_recipes())}")
    if rule and rule not in ("paper", "binary"):
        raise ConfigError(f"--recipes: {token!r}: the rule must be paper or binary")
    return name, rule or None, options


def build_points(args) -> tuple[list[tuple[int | None, str, GridPoint]], dict[tuple, str]]:
    """The points to run, as (accumulator width or None for runs shared by every width,
    recipe label, point), and the combinations the engine refuses for their accumulator
    alone, (dataset, method, width, label) -> the engine's reason: a table shows them
    as refused instead of the whole grid stopping (4-bit codes on a 4-bit integer
    accumulator, whose largest value, 7, is below one product of two codes)."""
    points, refused = [], {}
    accs = parse_int_list(args.acc_bits, "--acc-bits")
    for dataset in parse_name_list(args.datasets, "--datasets"):
        for method in parse_name_list(args.methods, "--methods"):
            for token in parse_name_list(args.recipes, "--recipes"):
                name, rule, options = recipe_spec(token)
                shared = name == "fp32"
                for acc in ([None] if shared else accs):
                    for seed in parse_int_list(args.seeds, "--seeds"):
                        values = {"dataset": dataset, "method": method, "recipe": name, "seed": seed,
                                  "epochs": args.epochs, "backbone": args.backbone, "data_root": args.data_root,
                                  "device": args.device, "train_per_class": args.train_per_class}
                        if name != "fp32":
                            values["acc_bits"] = acc
                            if name not in FLOAT_RECIPES:
                                values["bits"] = args.bits
                            if args.tile is not None:
                                values["tile"] = args.tile
                        if rule:
                            values["hadamard_rule"] = rule
                        values.update(options)
                        if args.input_clip is not None:
                            values["input_clip"] = args.input_clip
                        try:
                            config = resolve_config(None, values, source="bench_baselines.py")
                        except ConfigError as error:
                            if not acc or not _resolves(dict(values, acc_bits=None)):
                                raise
                            refused[(dataset, method, acc, token)] = str(error)
                            continue
                        # --bits and --tile off their defaults get their own folder: runs that differ
                        # only there would otherwise claim one directory (the grid refuses that)
                        where = "shared" if acc is None else (
                            f"acc{acc}" + (f"-bits{args.bits}" if "bits" in values and args.bits != 4 else "")
                            + (f"-tile{args.tile}" if args.tile is not None else ""))
                        clip = "" if args.input_clip is None else f"clip-{args.input_clip}"
                        out = (Path(args.out) / dataset / method / clip / where / token.replace(":", "-")
                               / f"seed{seed}")
                        points.append((acc, token, GridPoint(config, out, label=f"{dataset}/{method}/{where}/"
                                                                                 f"{token}/seed{seed}")))
    return points, refused


def _resolves(values: dict) -> bool:
    try:
        resolve_config(None, values, source="bench_baselines.py")
    except ConfigError:
        return False
    return True


def paired(base: dict[int, dict], runs: dict[int, dict], classifier: str, key: str) -> list[float]:
    out = []
    for seed in sorted(set(base) & set(runs)):
        a, b = base[seed], runs[seed]
        if a.get("class_order") != b.get("class_order"):
            continue
        va, vb = (a.get(classifier) or {}).get(key), (b.get(classifier) or {}).get(key)
        if va is not None and vb is not None:
            out.append(vb - va)
    return out


def render(args, command: str, triples, outcomes: list[GridOutcome], wall: float,
           refused: dict[tuple, str] | None = None) -> str:
    refused = refused or {}
    tokens = parse_name_list(args.recipes, "--recipes")
    base = tokens[0]
    accs = parse_int_list(args.acc_bits, "--acc-bits")
    runs: dict[tuple, dict[int, dict]] = {}
    for (acc, token, point), outcome in zip(triples, outcomes):
        c = point.config
        group = runs.setdefault((c.dataset, c.method, acc, token), {})
        if outcome.metrics is not None:
            group[c.seed] = outcome.metrics
    stored = [stored_code(o.point.out_dir) for o in outcomes if o.metrics is not None]
    codes = {describe(code) for code in stored}
    sources = {(code or {}).get("source_sha256") for code in stored}  # what decides: the package's source
    epochs = sorted({point.config.epochs for _, _, point in triples})  # the datasets' defaults resolved
    lines = [
        "# Baseline FQT recipes in one engine", "",
        f"Written by `benchmarks/bench_baselines.py` on {datetime.date.today().isoformat()}; reproduce with:", "",
        "```", command, "```", "",
        f"- {', '.join(map(str, epochs)) or 'n/a'} epoch(s) per task"
        + (" (the datasets' defaults)" if args.epochs is None else "") + ".",
        f"- {args.bits}-bit operands for the integer and log recipes (`int`, `hdqt`, `luq`); the float recipes "
        "use their format's width and a float accumulator of the table's width (marked `float acc`).",
        "- Accuracy: average incremental accuracy (%), forgetting: average forgetting (points), mean ± sample "
        f"std over seeds ({args.seeds}); Δ: per-seed paired difference to `{base}`, mean ± std.",
        ("- Feature inputs not clipped" if str(args.input_clip).lower() == "none" and args.input_clip is not None
         else f"- Feature inputs clipped at {args.input_clip or 3} std (images are never clipped)")
        + " (`--input-clip`); `:binary` is the binary Hadamard block rule, `+fh` the forward Hadamard rotation, `+ps` per-sample scales of the backward's gradients and inputs (`--backward-scales sample`), `+t0` one accumulator tile as long as the whole reduction (`--tile 0`).",
        f"- Code: {', '.join(sorted(codes)) or 'no finished run'}"
        + ((" (the runs were made by different code versions)" if len(sources) > 1 else
            " (one package source, run from checkouts at different commits)") if len(codes) > 1 else "") + ".",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {_torch()}, kernels: "
        f"{native.kernel_variant()}; wall time {wall / 60:.1f} min (runs finished earlier are read back).",
        *([f"- Training set cut to {args.train_per_class} samples a class (a seeded choice; the test set "
           "whole)."] if args.train_per_class else []),
        "",
    ]
    for dataset in parse_name_list(args.datasets, "--datasets"):
        for method in parse_name_list(args.methods, "--methods"):
            for acc in accs:
                lines += [f"## {dataset} / {method} / accumulator {'unlimited' if acc == 0 else f'{acc} bits'}", ""]
                header = ["recipe", "classifier", "accuracy", "Δ accuracy", "forgetting", "Δ forgetting", "seeds"]
                lines += [md_row(header), md_row(["---"] * len(header))]
                group = {}
                for token in tokens:
                    name = token.partition("+")[0].partition(":")[0]
                    shared = name == "fp32"
                    group[token] = runs.get((dataset, method, None if shared else acc, token), {})
                sample = next((r for r in group.values() if r), {})
                first = next(iter(sample.values()), {})
                primary = first.get("primary_classifier", "cnn")
                classifiers = [primary] + sorted(c for c in ("cnn", "nme") if c in first and c != primary)
                for token in tokens:
                    label = token + (" (float acc)" if token.partition("+")[0].partition(":")[0] in FLOAT_RECIPES
                                     else "")
                    reason = refused.get((dataset, method, acc, token))
                    if reason is not None:  # the engine's own words, shortened to their first sentence
                        lines.append(md_row([label, "-", f"refused by the engine: {reason.split(': a single')[0]}",
                                           "-", "-", "-", 0]))
                        continue
                    for classifier in classifiers:
                        values = group[token].values()
                        lines.append(md_row([
                            label, classifier + ("*" if classifier == primary else ""),
                            fmt_stat(stat((m.get(classifier) or {}).get("avg_incremental_accuracy") for m in values)),
                            fmt_delta(stat(paired(group[base], group[token], classifier, "avg_incremental_accuracy"))),
                            fmt_stat(stat((m.get(classifier) or {}).get("forgetting") for m in values)),
                            fmt_delta(stat(paired(group[base], group[token], classifier, "forgetting"))),
                            len(group[token]),
                        ]))
                lines.append("")
    failed = [o for o in outcomes if o.metrics is None]
    if failed:
        lines += ["## Runs not included", ""]
        lines += [f"- `{o.point.name}`: {((o.error or '').strip().splitlines() or ['no result'])[-1]}" for o in failed]
        lines.append("")
    return "\n".join(lines) + "\n"


def _torch() -> str:
    import torch
    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # --report-only rewrites the page from finished runs: the command that makes them is the same
    command = shlex.join(["python", "benchmarks/bench_baselines.py", *(a for a in argv if a != "--report-only")])
    try:
        triples, refused = build_points(args)
    except ConfigError as error:
        print(f"bench_baselines.py: error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    points = [p for _, _, p in triples]
    outcomes = run_benchmark_grid(points, script="bench_baselines.py", out=args.out, jobs=args.jobs,
                                  threads=args.threads, report_only=args.report_only)
    if outcomes is None:
        return 130
    for (dataset, method, acc, token), reason in refused.items():
        print(f"bench_baselines.py: {dataset}/{method}/acc{acc}/{token} not run: {reason}", file=sys.stderr)
    text = render(args, command, triples, outcomes, time.perf_counter() - started, refused)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    outputs.write_text(Path(args.results), text)
    print(text)
    print(f"written to {args.results}")
    return 0 if all(o.metrics is not None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
