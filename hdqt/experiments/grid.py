"""Run a grid of experiments in parallel processes and aggregate over seeds.

Each grid point is an ordinary run in its own output directory, so a grid is
resumable exactly like `hdqt run`: finished runs are read back, interrupted ones
continue after their last finished task.
"""
from __future__ import annotations

import os
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from hdqt.experiments.config import RunConfig


@dataclass(frozen=True)
class GridPoint:
    config: RunConfig
    out_dir: Path
    overwrite: bool = False  # discard what out_dir holds (a run made by other code)

    @property
    def name(self) -> str:
        c = self.config
        return f"{c.dataset}/{c.method}/{c.recipe}/seed{c.seed}"


@dataclass(frozen=True)
class GridOutcome:
    point: GridPoint
    metrics: dict[str, Any] | None  # None when the run failed
    error: str | None = None
    seconds: float = 0.0


def _run_point(point: GridPoint, threads: int, grid_code: dict[str, Any]) -> GridOutcome:
    # Runs in a worker process: pin its threads so that N jobs share the cores
    # instead of each grabbing all of them.
    import torch

    from hdqt.experiments.fingerprint import describe, loaded_code_fingerprint
    from hdqt.experiments.runner import run_experiment

    torch.set_num_threads(threads)
    started = time.perf_counter()
    worker_code = loaded_code_fingerprint()
    if worker_code["source_sha256"] != grid_code["source_sha256"]:
        # A worker (re)started after hdqt's files were edited runs other code than
        # the grid began with: its runs would mix versions in one table.
        return GridOutcome(point, None, f"hdqt's source changed while the grid ran: this worker loaded "
                           f"{describe(worker_code)}, the grid started with {describe(grid_code)}; "
                           "run the grid again", 0.0)
    try:
        result = run_experiment(point.config, point.out_dir, overwrite=point.overwrite)
    except Exception:  # reported per point; the other points keep running
        return GridOutcome(point, None, traceback.format_exc(limit=5),
                           time.perf_counter() - started)
    return GridOutcome(point, result.metrics, None, time.perf_counter() - started)


def run_grid(points: Sequence[GridPoint], jobs: int = 1, threads: int | None = None,
             on_done: Callable[[GridOutcome, int, int], None] | None = None) -> list[GridOutcome]:
    """Run every point with ``jobs`` worker processes; outcomes in the order of ``points``."""
    from hdqt.experiments.fingerprint import loaded_code_fingerprint

    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    grid_code = loaded_code_fingerprint()
    outcomes: dict[int, GridOutcome] = {}
    # spawn, not fork: forking a process that already ran torch can deadlock.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_point, point, threads, grid_code): i for i, point in enumerate(points)}
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[futures[future]] = outcome
            if on_done is not None:
                on_done(outcome, len(outcomes), len(points))
    return [outcomes[i] for i in range(len(points))]


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single seed
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


def stat(values: Iterable[float | None]) -> Stat | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values))
