"""The `hdqt sweep` sub-command: a grid of `hdqt run` experiments, resumable.

A grid is a TOML file. Any `hdqt run` key may hold a list of values: the runs are
the product of the lists, each taking the single values too. Each `[[point]]`
table adds one run: the file's single values, overridden by the point's keys (a
point gives one value for every key the file lists). Sweep keys (out, jobs,
threads, backend, address, cpus_per_task) set how it runs; flags override them.

    dataset = ["dsads", "hapt"]
    method = ["icarl", "bic"]
    recipe = ["fp32", "hdqt"]
    seed = [0, 1, 2]
    epochs = 100
    out = "runs/sweeps/har"

Each run has its own directory under the sweep's output, named from its
parameters, holding what `hdqt run` writes. Rerunning the sweep skips finished
runs and resumes interrupted ones after their last finished task. A run that
fails, or whose worker dies, is recorded with its error and the others go on; the
exit status is 1 when one failed. At the end the sweep writes sweep.json (every
run, its status and error) and summary.md (mean ± std over seeds, paired
differences to the first recipe). See docs/cli.md, "Sweeps".
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hdqt.experiments.config import (
    CONFIG_KEYS, DATASET_DEFAULTS, DEFAULT_METHOD, DEFAULT_RECIPE, ConfigError, RunConfig,
    scaled_milestones,
)

SWEEP_JSON = "sweep.json"
SUMMARY_MD = "summary.md"
LOGS = "logs"
BACKENDS = ("local", "ray")
# Keys of a grid file that say how the sweep runs rather than what a run computes.
SWEEP_KEYS = ("out", "jobs", "threads", "backend", "address", "cpus_per_task")
# The parameters every run name starts with.
LEAD_KEYS = ("dataset", "method", "recipe", "seed")
NAME_LIMIT = 96  # characters of a run directory's name; longer ones end in a hash
MAX_ERRORS_SHOWN = 10


class SweepError(ConfigError):
    """A grid or sweep the user can fix: the message says how."""


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    """A grid file, read and checked for shape (its values are checked per run)."""

    path: Path
    settings: dict[str, Any]  # sweep keys
    shared: dict[str, Any]  # run keys with one value
    axes: dict[str, list]  # run keys with a list of values, in the file's order
    points: list[dict[str, Any]]  # the [[point]] tables


@dataclass(frozen=True)
class SweepRun:
    name: str  # its directory under the sweep's output
    origin: str  # where the grid defines it: "grid run 3 of 8", "[[point]] 2"
    parameters: dict[str, Any]  # the values the grid gives it (resolved form)
    varying: tuple[str, ...]  # the keys of ``parameters`` not shared by every run
    config: RunConfig


def _is_list_value(key: str, value: Any) -> bool:
    """A list of values (an axis) rather than one value; milestones is itself a list,
    so its axis is a list of lists."""
    if key == "milestones":
        return isinstance(value, list) and bool(value) and all(
            isinstance(v, list) for v in value)
    return isinstance(value, list)


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise SweepError(f"grid file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise SweepError(f"{path} is a directory, not a grid file (TOML)") from None
    except tomllib.TOMLDecodeError as error:
        raise SweepError(f"{path} is not valid TOML: {error}") from None
    valid = ", ".join(sorted({*CONFIG_KEYS, *SWEEP_KEYS, "point"}))
    settings, shared, axes, points = {}, {}, {}, []
    for key, value in values.items():
        if key == "point":
            if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
                raise SweepError(f"{path}: point must be an array of tables, written "
                                 "[[point]] above each one")
            points = [dict(p) for p in value]
        elif key == "compare":
            raise SweepError(f"{path}: compare: each run of a sweep has one recipe; list "
                             f"the recipes instead, e.g. recipe = {_toml(value)}")
        elif key in SWEEP_KEYS:
            if isinstance(value, (list, dict)):
                raise SweepError(f"{path}: {key} is a setting of the whole sweep and takes "
                                 f"one value, got {_toml(value)}")
            settings[key] = value
        elif key in CONFIG_KEYS:
            if isinstance(value, dict):
                raise SweepError(f"{path}: key {key!r} must be a value or a list of values, "
                                 "not a table")
            if _is_list_value(key, value):
                if not value:
                    raise SweepError(f"{path}: {key} is an empty list, which gives no runs")
                axes[key] = list(value)
            else:
                shared[key] = value
        elif isinstance(value, dict):
            raise SweepError(f"{path}: unknown table [{key}]; the only table is [[point]]")
        else:
            raise SweepError(f"{path}: unknown key {key!r}; valid keys: {valid}")
    for number, point in enumerate(points, 1):
        where = f"{path} [[point]] {number}"
        for key, value in point.items():
            if key in SWEEP_KEYS:
                raise SweepError(f"{where}: {key} is a setting of the whole sweep; set it at "
                                 "the top of the file, not in a point")
            if key == "compare":
                raise SweepError(f"{where}: compare: a point is one run with one recipe; "
                                 "give recipe, or add a point per recipe")
            if key not in CONFIG_KEYS:
                raise SweepError(f"{where}: unknown key {key!r}; valid keys: "
                                 f"{', '.join(CONFIG_KEYS)}")
            if _is_list_value(key, value) or isinstance(value, dict):
                raise SweepError(f"{where}: {key} = {_toml(value)}: a point is one run and "
                                 "takes one value per key; put lists at the top of the file")
        missing = [key for key in axes if key not in point]
        if missing:
            raise SweepError(f"{where} does not set {', '.join(missing)}, which the grid "
                             f"lists at the top ({'; '.join(f'{k} = {_toml(axes[k])}' for k in missing)}); "
                             "a point is one run: give it one value of each")
    return Grid(path, settings, shared, axes, points)


def _toml(value: Any) -> str:
    from hdqt.experiments.outputs import toml_value

    try:
        return toml_value(value)
    except TypeError:
        return repr(value)


def expand(grid: Grid) -> list[tuple[str, dict[str, Any]]]:
    """(origin, values) of every run: the product of the lists (the first key listed
    varies slowest), then the points. A grid with points and no list has no product:
    its single values are the points' shared settings."""
    runs = []
    if grid.axes or not grid.points:
        combos = list(itertools.product(*grid.axes.values()))
        for number, combo in enumerate(combos, 1):
            values = {**grid.shared, **dict(zip(grid.axes, combo))}
            shown = ", ".join(f"{k} = {_toml(v)}" for k, v in zip(grid.axes, combo))
            origin = f"grid run {number} of {len(combos)}" + (f": {shown}" if shown else "")
            runs.append((origin, values))
    for number, point in enumerate(grid.points, 1):
        runs.append((f"[[point]] {number}", {**grid.shared, **point}))
    return runs


# ----------------------------------------------------------------------------- run names


def _defaults(config: RunConfig) -> dict[str, Any]:
    """The value each identity key takes when a run does not set it (for its dataset)."""
    values = {f.name: f.default for f in dataclasses.fields(RunConfig)
              if f.default is not dataclasses.MISSING}
    values.update({"method": DEFAULT_METHOD, "recipe": DEFAULT_RECIPE})
    dataset = dict(DATASET_DEFAULTS.get(config.dataset, {}))
    values.update(dataset)
    if dataset.get("milestones"):  # scaled to the run's epochs, as resolve_config does
        values["milestones"] = scaled_milestones(tuple(dataset["milestones"]),
                                                 dataset["epochs"], config.epochs)
    values["milestones"] = list(values.get("milestones", ()))
    return values


def _name_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "_".join(_name_value(v) for v in value) or "none"
    return repr(value) if isinstance(value, float) else str(value)


def identity_hash(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(config.identity(), sort_keys=True).encode()).hexdigest()[:8]


def run_name(config: RunConfig) -> str:
    """``dsads-icarl-hdqt-seed0``, then ``key=value`` for every other parameter that
    differs from the dataset's default (``-epochs=2-bits=8``). A function of the
    run's configuration alone, so a grid that grows finds its earlier runs. Names
    longer than NAME_LIMIT characters, or with characters other than letters, digits
    and ``._=+-``, are cut and end in a hash of the configuration."""
    identity = config.identity()
    defaults = _defaults(config)
    parts = [config.dataset, config.method, config.recipe, f"seed{config.seed}"]
    parts += [f"{key}={_name_value(value)}" for key, value in identity.items()
              if key not in LEAD_KEYS and value != defaults.get(key)]
    name = "-".join(parts)
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", name)
    if safe != name or len(safe) > NAME_LIMIT:
        safe = safe[:NAME_LIMIT - 9].rstrip("-_=") + "-" + identity_hash(config)
    return safe


# ----------------------------------------------------------------------------- planning


def plan_sweep(grid: Grid, choices=None) -> list[SweepRun]:
    """Resolve and validate every run of ``grid`` (errors name the run and the key:
    all of them, in a SweepError); names must not clash."""
    from hdqt.experiments.config import Choices, resolve_config

    choices = choices or Choices.installed()
    expanded = expand(grid)
    varying_keys = set(grid.axes) | {key for point in grid.points for key in point}
    runs, errors = [], []
    for origin, values in expanded:
        try:
            config = resolve_config(values, None, source=f"{grid.path}, {origin}",
                                    choices=choices)
        except ConfigError as error:
            errors.append(str(error))
            continue
        resolved = config.to_dict()
        parameters = {key: resolved[key] for key in values}
        varying = tuple(key for key in values if key in varying_keys)
        runs.append(SweepRun(run_name(config), origin, parameters, varying, config))
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        raise SweepError(f"{len(errors)} of the {len(expanded)} runs of {grid.path} are "
                         "invalid:\n  " + "\n  ".join(shown)
                         + (f"\n  ... and {more} more" if more else ""))
    by_identity: dict[str, SweepRun] = {}
    for run in runs:
        key = json.dumps(run.config.identity(), sort_keys=True)
        if key in by_identity:
            raise SweepError(f"{grid.path}: {by_identity[key].origin} and {run.origin} are the "
                             f"same run ({run.name}); remove one")
        by_identity[key] = run
    # Names are a function of the configuration; two configurations sharing one
    # (only possible through the cut at NAME_LIMIT) both take the hash.
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    return [run if counts[run.name] == 1 else dataclasses.replace(
        run, name=f"{run.name[:NAME_LIMIT - 9]}-{identity_hash(run.config)}") for run in runs]


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    out: Path
    backend: str
    jobs: int | None  # None: local, the cores; ray, as many as the cluster schedules
    threads: int | None  # None: local, cores / jobs; ray, the task's CPUs
    address: str | None
    cpus_per_task: float
    given: dict[str, str]  # setting -> where it came from (for messages)


def _setting_name(key: str, given: Mapping[str, str]) -> str:
    where = given.get(key)
    if where == "flag":
        return "--" + key.replace("_", "-")
    return f"{key} (from {where})" if where else key


def resolve_settings(grid: Grid, args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in grid.settings.items():
        values[key], given[key] = value, str(grid.path)
    for key in SWEEP_KEYS:
        if getattr(args, key, None) is not None:
            values[key], given[key] = getattr(args, key), "flag"

    def positive_int(key: str) -> int | None:
        value = values.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"{_setting_name(key, given)} must be an integer >= 1, got {value!r}")
        return value

    backend = values.get("backend", "local")
    if backend not in BACKENDS:
        raise SweepError(f"{_setting_name('backend', given)} must be one of "
                         f"{', '.join(BACKENDS)}, got {backend!r}")
    cpus = values.get("cpus_per_task", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0:
        raise SweepError(f"{_setting_name('cpus_per_task', given)} must be a number > 0, "
                         f"got {cpus!r}")
    address = values.get("address")
    if address is not None and not isinstance(address, str):
        raise SweepError(f"{_setting_name('address', given)} must be a string, got {address!r}")
    if backend != "ray":
        for key in ("address", "cpus_per_task"):
            if key in given:
                raise SweepError(f"{_setting_name(key, given)} is a setting of the ray "
                                 "backend; add --backend ray (or backend = \"ray\")")
    out = values.get("out")
    if out is None:
        out = Path("runs") / "sweeps" / grid.path.stem
    elif not isinstance(out, str) or not out.strip():
        raise SweepError(f"{_setting_name('out', given)} must be a directory name, got {out!r}")
    return Settings(Path(out), backend, positive_int("jobs"), positive_int("threads"),
                    address, cpus, given)


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RunState:
    kind: str  # "new", "finished", "resume", "redo", "force", "blocked"
    text: str  # what a person reads
    metrics: dict[str, Any] | None = None  # of a finished run


def run_state(run: SweepRun, out_dir: Path, code: dict[str, Any], *, overwrite: bool,
              force: bool) -> RunState:
    """What the sweep will do with ``run`` in ``out_dir``, under the rules of
    ``hdqt run`` (runner.check_out_dir): finished by this code, skip; partly done by
    this code, resume; holding another configuration or results of other code,
    refuse unless overwrite (redo from scratch) or force (go on with them)."""
    from hdqt.experiments import outputs
    from hdqt.experiments.fingerprint import describe, same_code
    from hdqt.experiments.grid import GridPoint, finished_outcome, has_results, stored_code
    from hdqt.experiments.runner import ConfigMismatchError, StaleRunError, check_out_dir

    if not has_results(out_dir):
        return RunState("new", "new")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_out_dir(run.config, out_dir, False, code, force)
    except StaleRunError:
        if overwrite:
            return RunState("redo", "made by other code: rerun from scratch (--overwrite)")
        return RunState("blocked", f"holds results made by {describe(stored_code(out_dir))}")
    except ConfigMismatchError as error:
        if overwrite:
            return RunState("redo", "holds another run: rerun from scratch (--overwrite)")
        message = str(error).removeprefix(f"{out_dir} ").split("; use another --out")[0]
        return RunState("blocked", message)
    finished = finished_outcome(GridPoint(run.config, out_dir), code)
    if finished.metrics is not None:
        return RunState("finished", "finished (skipped)", finished.metrics)
    try:
        metrics = outputs.read_json(out_dir / outputs.METRICS_JSON)
        done, total = metrics.get("finished_tasks"), metrics.get("num_tasks")
    except (OSError, ValueError, AttributeError):
        done, total = None, None
    if force and not same_code(stored_code(out_dir), code):
        return RunState("force", "made by other code: goes on with it (--force)")
    if done is not None:
        return RunState("resume", f"resume after task {done}/{total}")
    return RunState("resume", "resume from its checkpoint")


# ----------------------------------------------------------------------------- the command


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep", help="run a grid of experiments (TOML), resumable, locally or on Ray",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", metavar="GRID.toml", help="the grid file")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="the sweep's directory: a sub-directory per run, sweep.json, "
                             "summary.md (default: the grid's out, else runs/sweeps/<grid "
                             "name>); with a Ray cluster, a shared path every node writes to "
                             "at the same place")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs (name, parameters, what would happen) and stop")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="local: worker processes on this machine (default); ray: one Ray "
                             "task per run (pip install \"hdqt[ray]\")")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs at a time (local default: the cores; ray default: as many "
                             "as the cluster's CPUs allow)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads per run (local default: cores / jobs; ray default: "
                             "--cpus-per-task)")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="ray: the cluster to connect to, e.g. ray://head:10001 or auto "
                             "(default: RAY_ADDRESS, else a local Ray instance)")
    parser.add_argument("--cpus-per-task", dest="cpus_per_task", type=float, default=None,
                        metavar="N", help="ray: CPUs each run reserves (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rerun from scratch the runs whose directory holds another "
                             "configuration or results of other code (finished runs of this "
                             "code are kept)")
    parser.add_argument("--force", action="store_true",
                        help="go on with runs made by other code instead of refusing them; "
                             "their results then mix code versions")
    parser.set_defaults(func=sweep_command)
    return parser


def _error(message: str) -> int:
    print(f"hdqt sweep: error: {message}", file=sys.stderr, flush=True)
    return 2


def sweep_command(args: argparse.Namespace) -> int:
    from hdqt.experiments.fingerprint import describe, loaded_code_fingerprint

    if args.overwrite and args.force:
        return _error("give --overwrite (redo runs made by other code) or --force (go on "
                      "with them), not both")
    try:
        grid = load_grid(args.grid)
        settings = resolve_settings(grid, args)
        runs = plan_sweep(grid)
    except ConfigError as error:
        return _error(str(error))
    out = settings.out
    code = loaded_code_fingerprint()
    states = [run_state(run, out / run.name, code, overwrite=args.overwrite, force=args.force)
              for run in runs]
    if args.dry_run:
        print(dry_run_listing(grid, settings, runs, states))
        return 0
    blocked = [(run, state) for run, state in zip(runs, states) if state.kind == "blocked"]
    if blocked:
        shown = [f"{run.name}: {state.text}" for run, state in blocked[:MAX_ERRORS_SHOWN]]
        more = len(blocked) - len(shown)
        return _error(f"{len(blocked)} of the {len(runs)} runs under {out} hold results this "
                      f"sweep does not reuse (this is {describe(code)}):\n  "
                      + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
                      + "\nrerun with --overwrite to redo them from scratch, or --force to go "
                        "on with runs made by other code (their results then mix code versions)")
    if settings.backend == "ray":
        from hdqt.experiments.grid import RayNotInstalled, import_ray

        try:
            import_ray()
        except RayNotInstalled as error:
            return _error(f"--backend ray: {error}")
    sweep = Sweep(grid, settings, runs, states, code, _command(args, settings))
    return sweep.run()


def _command(args: argparse.Namespace, settings: Settings) -> str:
    """The command that resumes this sweep."""
    words = ["hdqt", "sweep", str(args.grid), "--out", str(settings.out)]
    if settings.backend == "ray":
        words += ["--backend", "ray"]
        if settings.given.get("address") == "flag":
            words += ["--address", settings.address]
        if settings.given.get("cpus_per_task") == "flag":
            words += ["--cpus-per-task", f"{settings.cpus_per_task:g}"]
    for key in ("jobs", "threads"):
        if settings.given.get(key) == "flag":
            words += [f"--{key}", str(getattr(settings, key))]
    return shlex.join(words)


def _parameters_text(run: SweepRun, keys: Sequence[str]) -> str:
    return ", ".join(f"{key} = {_toml(run.parameters[key])}" for key in keys
                     if key in run.parameters)


def dry_run_listing(grid: Grid, settings: Settings, runs: Sequence[SweepRun],
                    states: Sequence[RunState]) -> str:
    counts: dict[str, int] = {}
    for state in states:
        counts[state.kind] = counts.get(state.kind, 0) + 1
    lines = [f"{grid.path}: {len(runs)} runs in {settings.out} ("
             + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")"]
    if grid.shared:
        lines.append("shared by every run: " + ", ".join(
            f"{key} = {_toml(value)}" for key, value in grid.shared.items()))
    width = max((len(run.name) for run in runs), default=0)
    for run, state in zip(runs, states):
        text = state.text if state.kind != "blocked" else "BLOCKED: " + state.text
        lines.append(f"  {run.name.ljust(width)}  {_parameters_text(run, run.varying)}  [{text}]")
    if any(state.kind == "blocked" for state in states):
        lines.append("Blocked runs hold results this sweep cannot reuse; run it with "
                     "--overwrite to redo them, or --force to go on with them.")
    return "\n".join(lines)


class Sweep:
    """Runs the planned runs on a backend, keeps sweep.json up to date and prints a
    line per finished run; writes summary.md at the end (or when interrupted)."""

    def __init__(self, grid: Grid, settings: Settings, runs: Sequence[SweepRun],
                 states: Sequence[RunState], code: dict[str, Any], command: str) -> None:
        self.grid, self.settings, self.runs, self.code = grid, settings, list(runs), code
        self.command = command
        self.out = settings.out
        self.status: dict[str, dict[str, Any]] = {}
        for run, state in zip(runs, states):
            entry: dict[str, Any] = {"status": "skipped" if state.kind == "finished" else "pending",
                                     "state_before": state.text}
            if state.metrics is not None:
                entry["metrics"] = state.metrics
            self.status[run.name] = entry
        self.states = list(states)
        self.started = datetime.datetime.now().astimezone()
        self.bar = None
        self.bar_stream = None  # the progress bar's stream (default: stderr, if a terminal)
        self.done_count = 0
        self.jobs: int | None = settings.jobs
        self.threads: int | None = settings.threads

    # -- output

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _record(self, finished: bool = False, interrupted: bool = False) -> None:
        from hdqt.experiments import outputs

        counts = self.counts()
        runs = []
        for run in self.runs:
            entry = self.status[run.name]
            metrics = entry.get("metrics")
            runs.append({
                "name": run.name, "dir": run.name, "origin": run.origin,
                "parameters": run.parameters, "status": entry["status"],
                "before": entry["state_before"], "seconds": entry.get("seconds"),
                "resumed_after": entry.get("resumed_after"),
                "error": entry.get("error"), "traceback": entry.get("traceback"),
                "log": f"{LOGS}/{run.name}.log",
                "metrics": None if metrics is None else _headline(metrics)})
        payload = {
            "grid": str(self.grid.path), "command": self.command, "code": self.code,
            "backend": self.settings.backend, "jobs": self.jobs,
            "threads": self.threads, "started": self.started.isoformat(timespec="seconds"),
            "finished": (datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                         if finished or interrupted else None),
            "interrupted": interrupted, "counts": counts, "runs": runs}
        outputs.write_json(self.out / SWEEP_JSON, payload)

    def counts(self) -> dict[str, int]:
        counts = {key: 0 for key in ("done", "failed", "skipped", "interrupted", "pending",
                                     "running")}
        for entry in self.status.values():
            counts[entry["status"]] += 1
        return counts

    # -- running

    def run(self) -> int:
        from hdqt.experiments.fingerprint import describe
        from hdqt.experiments.grid import GridPoint, default_threads

        todo = [(run, state) for run, state in zip(self.runs, self.states)
                if state.kind != "finished"]
        self.out.mkdir(parents=True, exist_ok=True)
        lock = _lock(self.out)
        if lock is None:
            print(f"hdqt sweep: error: another hdqt sweep is running in {self.out} (see "
                  f"{self.out / LOCK}); wait for it, or stop it first", file=sys.stderr,
                  flush=True)
            return 2
        absolute = self.out.resolve()  # the workers' cwd may differ (a cluster)
        points = [GridPoint(_absolute_paths(run.config), absolute / run.name,
                            overwrite=state.kind == "redo", label=run.name,
                            force=state.kind == "force", log=absolute / LOGS / f"{run.name}.log")
                  for run, state in todo]
        skipped = len(self.runs) - len(todo)
        resumed = sum(state.kind == "resume" for _, state in todo)
        settings = self.settings
        if settings.backend == "local":
            self.jobs = min(settings.jobs or _cores(), max(1, len(todo)))
            self.threads = settings.threads or default_threads(self.jobs)
            how = f"{self.jobs} worker process(es) x {self.threads} torch thread(s)"
        else:
            self.jobs = settings.jobs
            self.threads = settings.threads or max(1, int(settings.cpus_per_task))
            how = (f"Ray tasks of {settings.cpus_per_task:g} CPU(s) x {self.threads} torch "
                   "thread(s)" + (f", at most {settings.jobs} at a time" if settings.jobs else ""))
        interrupted = False
        previous_term = signal.getsignal(signal.SIGTERM)
        if _main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)  # stop like Ctrl-C
        try:
            self._say(f"hdqt sweep: {len(self.runs)} runs in {self.out} (grid {self.grid.path}): "
                      f"{len(todo)} to run ({resumed} to resume), {skipped} finished earlier "
                      f"(skipped); {how}; code {describe(self.code)}")
            self._record()
            if todo:
                self._execute(points)
        except KeyboardInterrupt as stop:  # GridInterrupted, or Ctrl-C around the grid
            interrupted = True
            for index in getattr(stop, "running", []):
                self.status[points[index].label]["status"] = "interrupted"
            for entry in self.status.values():
                if entry["status"] == "running":
                    entry["status"] = "interrupted"
        finally:
            if _main_thread():
                signal.signal(signal.SIGTERM, previous_term)
            self._close_bar()
        try:
            self._record(finished=not interrupted, interrupted=interrupted)
            summary_written = self._write_summary()
        finally:
            lock.close()
        return self._report(interrupted, summary_written)

    def _execute(self, points: list) -> None:
        settings = self.settings
        self._open_bar(len(points))

        def on_start(point) -> None:
            self._started(point)

        def on_done(outcome, done: int, total: int) -> None:
            self._finished(outcome)

        if settings.backend == "local":
            from hdqt.experiments.grid import run_grid

            run_grid(points, jobs=self.jobs, threads=self.threads, on_done=on_done,
                     on_start=on_start)
            return
        from hdqt.experiments.grid import run_grid_ray

        num_cpus = math.ceil(settings.jobs * settings.cpus_per_task) if settings.jobs else None
        run_grid_ray(points, address=settings.address, cpus_per_task=settings.cpus_per_task,
                     threads=self.threads, max_in_flight=settings.jobs, num_cpus=num_cpus,
                     on_done=on_done, on_start=on_start,
                     on_connect=lambda where: self._say(f"hdqt sweep: running on {where}"))

    def _open_bar(self, total: int) -> None:
        stream = self.bar_stream or sys.stderr
        if self.bar_stream is not None or stream.isatty():
            from tqdm import tqdm

            # No rates ("0.02 runs/s" says nothing about a sweep), the unit spelled out.
            self.bar = tqdm(total=total, desc="sweep", dynamic_ncols=True, file=stream,
                            bar_format="{desc}: {n}/{total} runs |{bar}| {elapsed}<{remaining}")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _started(self, point) -> None:
        self.status[point.label]["status"] = "running"
        self._record()

    def _finished(self, outcome) -> None:
        name = outcome.point.label
        entry = self.status[name]
        entry.update(seconds=round(outcome.seconds, 3))
        self.done_count += 1
        total = sum(1 for state in self.states if state.kind != "finished")
        prefix = f"[{self.done_count}/{total}]"
        if outcome.metrics is not None:
            entry.update(status="done", metrics=outcome.metrics,
                         resumed_after=outcome.resumed_after, error=None, traceback=None)
            metrics = outcome.metrics
            resumed = (f", resumed after task {outcome.resumed_after}/{metrics.get('num_tasks')}"
                       if outcome.resumed_after else "")
            self._say(f"{prefix} done    {name}: {_score(metrics)} | {outcome.seconds:.1f} s"
                      f"{resumed}")
        else:
            entry.update(status="failed", error=outcome.error, traceback=outcome.traceback)
            self._say(f"{prefix} FAILED  {name}: {outcome.error} | log: "
                      f"{self.out / LOGS / (name + '.log')}")
        if self.bar is not None:
            self.bar.update(1)
        self._record()

    def _write_summary(self) -> bool:
        from hdqt.experiments import outputs

        try:
            text = summary_markdown(self.grid, self.runs, self.status, self.command,
                                    self.counts(), self.out)
            outputs.write_text(self.out / SUMMARY_MD, text)
        except Exception as error:  # the runs are safe; say so rather than lose the report
            self._say(f"hdqt sweep: warning: summary.md could not be written: {error}")
            return False
        return True

    def _report(self, interrupted: bool, summary_written: bool) -> int:
        counts = self.counts()
        failed = [(name, entry) for name, entry in self.status.items()
                  if entry["status"] == "failed"]
        print(flush=True)
        print(f"Summary: {counts['done']} done, {counts['failed']} failed, "
              f"{counts['skipped']} skipped (finished earlier)"
              + (f", {counts['interrupted']} interrupted, {counts['pending']} not started"
                 if interrupted else "") + f" of {len(self.runs)} runs", flush=True)
        for name, entry in failed:
            print(f"  failed: {name}: {entry['error']}", flush=True)
        where = f"{self.out / SUMMARY_MD} (tables), " if summary_written else ""
        print(f"Outputs in {self.out}: {where}{self.out / SWEEP_JSON} (every run's status and "
              f"error), a directory per run, logs in {self.out / LOGS}", flush=True)
        if interrupted:
            print(f"hdqt sweep: interrupted; finished runs are kept and stopped ones resume "
                  f"after their last finished task: rerun `{self.command}` to go on",
                  file=sys.stderr, flush=True)
            return 130
        if failed:
            print(f"hdqt sweep: {len(failed)} run(s) failed; rerun `{self.command}` to retry "
                  "them (finished runs are skipped)", file=sys.stderr, flush=True)
            return 1
        return 0


LOCK = ".sweep.lock"


def _lock(out: Path):
    """An exclusive lock on ``out`` (an open file; closing it releases the lock), or None
    when another sweep holds it: two sweeps resuming the same runs would clash."""
    handle = open(out / LOCK, "a+", encoding="utf-8")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()}\n")
    handle.flush()
    return handle


def _absolute_paths(config: RunConfig) -> RunConfig:
    """``data_root`` relative to this directory, made absolute for workers elsewhere."""
    if config.data_root and not Path(config.data_root).expanduser().is_absolute():
        return dataclasses.replace(config, data_root=str(Path(config.data_root).resolve()))
    return config


def _cores() -> int:
    from hdqt.experiments.grid import default_jobs

    return default_jobs()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("complete", "finished_tasks", "num_tasks", "primary_classifier",
            "avg_incremental_accuracy", "last_accuracy", "forgetting")
    return {key: metrics.get(key) for key in keys}


def _score(metrics: Mapping[str, Any]) -> str:
    primary = metrics.get("primary_classifier", "")
    acc, last = metrics.get("avg_incremental_accuracy"), metrics.get("last_accuracy")
    if acc is None:
        return "no metrics"
    return f"{primary} avg incremental accuracy {acc:.2f}%, last {last:.2f}%"


# ----------------------------------------------------------------------------- summary.md


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "-" if value is None else str(value)


def summary_markdown(grid: Grid, runs: Sequence[SweepRun], status: Mapping[str, Mapping],
                     command: str, counts: Mapping[str, int], out: Path) -> str:
    """The sweep's tables: per dataset, one row per combination of the other varying
    parameters and classifier, with mean ± std over seeds per recipe and the paired
    difference of each recipe to the first (the tables of benchmarks/bench_cl.py)."""
    from hdqt.experiments.fingerprint import describe
    from hdqt.experiments.grid import TABLE_LEGEND, comparison_header, comparison_rows, md_row, stored_code

    recipes = list(dict.fromkeys(run.config.recipe for run in runs))
    identities = [run.config.identity() for run in runs]
    varying = [key for key in (identities[0] if identities else {})
               if key not in ("dataset", "recipe", "seed")
               and len({json.dumps(i[key]) for i in identities}) > 1]
    finished = [(run, status[run.name]["metrics"]) for run in runs
                if status[run.name]["status"] in ("done", "skipped")
                and status[run.name].get("metrics")]
    codes = sorted({describe(stored_code(out / run.name)) for run, _ in finished})
    lines = [f"# Sweep {grid.path.stem}", "",
             f"Written by `hdqt sweep` on {datetime.date.today().isoformat()} from "
             f"`{grid.path}`. Resume or reproduce with:", "", "```", command, "```", "",
             f"- Runs: {len(runs)}; {counts.get('done', 0)} done by this invocation, "
             f"{counts.get('skipped', 0)} finished earlier, {counts.get('failed', 0)} failed, "
             f"{counts.get('interrupted', 0) + counts.get('pending', 0) + counts.get('running', 0)}"
             " not finished. The tables use the finished ones.",
             ]
    if grid.shared:
        lines.append("- Shared by every run: " + ", ".join(
            f"`{key} = {_toml(value)}`" for key, value in grid.shared.items()) + ".")
    lines += [f"- {TABLE_LEGEND}",
              f"- Code of the finished runs: {', '.join(codes) or 'no finished run'}"
              + (" (different code versions)" if len(codes) > 1 else "") + ".",
              f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs (of the machine that "
              "wrote this summary).", ""]
    for dataset in dict.fromkeys(run.config.dataset for run in runs):
        lines += [f"## {dataset}", ""]
        groups: dict[tuple, dict[str, dict[int, dict]]] = {}
        for run in runs:
            if run.config.dataset != dataset:
                continue
            label = tuple(_label(getattr(run.config, key)) for key in varying)
            groups.setdefault(label, {})
        for run, metrics in finished:
            if run.config.dataset != dataset:
                continue
            label = tuple(_label(getattr(run.config, key)) for key in varying)
            groups[label].setdefault(run.config.recipe, {})[run.config.seed] = metrics
        present = [r for r in recipes if any(run.config.recipe == r and run.config.dataset
                                             == dataset for run in runs)]
        header = comparison_header(varying, present)
        lines += [md_row(header), md_row(["---"] * len(header))]
        for label, group in groups.items():
            if any(group.values()):  # groups without a finished run are listed below
                lines += [md_row(row) for row in comparison_rows(list(label), group, present)]
        lines.append("")
    failed = [(run, status[run.name]) for run in runs if status[run.name]["status"] == "failed"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- `{run.name}` ({run.origin}): {entry.get('error')} (log: "
                  f"`{LOGS}/{run.name}.log`)" for run, entry in failed]
        lines.append("")
    unfinished = [run for run in runs
                  if status[run.name]["status"] in ("interrupted", "pending", "running")]
    if unfinished:
        lines += ["## Runs not finished", ""]
        lines += [f"- `{run.name}`: {status[run.name]['status']}" for run in unfinished]
        lines.append("")
    return "\n".join(lines)
