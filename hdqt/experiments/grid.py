"""Run a grid of experiments in parallel and aggregate over seeds.

Each grid point is an ordinary run in its own output directory, so a grid is
resumable exactly like `hdqt run`: finished runs are read back, interrupted ones
continue after their last finished task.

Two backends run the points: ``run_grid`` (worker processes on this machine) and
``run_grid_ray`` (one Ray task per point, on a local Ray instance or a cluster).
Both isolate failures: a point that raises, or whose worker process dies (killed,
out of memory), is returned as a failed ``GridOutcome`` and the others go on. Both
raise ``GridInterrupted`` on Ctrl-C after stopping their workers, with the outcomes
finished so far; every finished run is on disk already (the runner writes each file
atomically), and an interrupted one resumes after its last finished task.

``hdqt sweep`` (``hdqt.experiments.sweep``) and ``benchmarks/bench_cl.py`` use this
module; the markdown tables of both (mean ± std over seeds, paired differences to a
baseline recipe) are ``comparison_header`` and ``comparison_rows``.
"""
from __future__ import annotations

import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hdqt.experiments.config import RunConfig

# Seconds a stopped worker gets to unwind (and remove its temporary files) before it
# is killed.
STOP_GRACE_SECONDS = 10.0
OWN_STOP_SECONDS = 5.0  # Ray tasks that got the terminal's Ctrl-C themselves: see _cancel_ray


@dataclass(frozen=True)
class GridPoint:
    config: RunConfig
    out_dir: Path
    overwrite: bool = False  # discard what out_dir holds (another config, or other code)
    label: str | None = None  # the name shown (default: dataset/method/recipe/seedN)
    force: bool = False  # go on with a run in out_dir made by other code (see runner)
    log: Path | None = None  # append the run's progress lines (and a failure's traceback)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        c = self.config
        return f"{c.dataset}/{c.method}/{c.recipe}/seed{c.seed}"


@dataclass(frozen=True)
class GridOutcome:
    point: GridPoint
    metrics: dict[str, Any] | None  # None when the run failed
    error: str | None = None  # one line per failure: "ConfigError: ...", "worker ... killed"
    seconds: float = 0.0
    resumed_after: int = 0  # tasks loaded from a checkpoint
    traceback: str | None = None


class GridInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a grid. ``outcomes`` maps the index of each point
    that finished before to its outcome; ``running`` lists the points that were
    stopped mid-run (they resume after their last finished task)."""

    def __init__(self, outcomes: Mapping[int, GridOutcome], running: Sequence[int]) -> None:
        super().__init__("grid interrupted")
        self.outcomes = dict(outcomes)
        self.running = list(running)


# ----------------------------------------------------------------------------- workers


def _run_point(point: GridPoint, threads: int, grid_code: dict[str, Any]) -> GridOutcome:
    """Run one point in a worker (a process of ``run_grid`` or a Ray task); an
    exception becomes a failed outcome, so the other points keep running."""
    # Pin the worker's threads so that N jobs share the cores instead of each
    # grabbing all of them.
    import torch

    from hdqt.experiments.fingerprint import describe, loaded_code_fingerprint

    torch.set_num_threads(max(1, int(threads)))
    started = time.perf_counter()
    worker_code = loaded_code_fingerprint()
    if worker_code["source_sha256"] != grid_code["source_sha256"]:
        # A worker (re)started after hdqt's files were edited, or a cluster node with
        # another installation, runs other code than the grid began with: its runs
        # would mix versions in one table.
        return GridOutcome(point, None, f"this worker runs other code than the grid: it loaded "
                           f"{describe(worker_code)}, the grid started with {describe(grid_code)} "
                           "(hdqt's source changed while the grid ran, or this node has another "
                           "hdqt installed); run the grid again with the same code everywhere")
    log = None
    try:
        if point.log is not None:
            Path(point.log).parent.mkdir(parents=True, exist_ok=True)
            log = open(point.log, "a", encoding="utf-8", buffering=1)
            print(f"--- {_now()}: {point.name} starts in process {os.getpid()} "
                  f"({threads} torch threads)", file=log, flush=True)
        return _run_logged(point, started, log)
    finally:
        if log is not None:
            log.close()


def _run_logged(point: GridPoint, started: float, log) -> GridOutcome:
    from hdqt.experiments.progress import ConsoleProgress, SilentProgress
    from hdqt.experiments.runner import run_experiment

    progress = (ConsoleProgress(point.name, stream=log, bars=False) if log is not None
                else SilentProgress())

    def show_warning(message, category, *args, **kwargs) -> None:
        if log is not None:
            print(f"[{point.name}] warning: {message}", file=log, flush=True)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            result = run_experiment(point.config, point.out_dir, overwrite=point.overwrite,
                                    force=point.force, progress=progress)
    except Exception as error:  # reported per point; the other points keep running
        text = traceback.format_exc(limit=8)
        if log is not None:
            print(f"[{point.name}] failed:\n{text}", file=log, flush=True)
        return GridOutcome(point, None, _one_line(error), time.perf_counter() - started,
                           traceback=text)
    return GridOutcome(point, result.metrics, None, time.perf_counter() - started,
                       result.resumed_after)


def _now() -> str:
    import datetime

    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _log_failure(point: GridPoint, error: str) -> None:
    """Append a failure the grid saw from outside (a dead worker) to the point's log."""
    if point.log is None:
        return
    try:
        with open(point.log, "a", encoding="utf-8") as log:
            print(f"--- {_now()}: {point.name} failed: {error}", file=log)
    except OSError:
        pass


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _worker_main(conn, threads: int, grid_code: dict[str, Any]) -> None:
    """A local worker process: run the points it is sent, one at a time, until told
    to stop (None) or until the grid's end of the pipe closes."""
    # Ctrl-C reaches every process of the terminal's group: the grid stops its
    # workers itself (SIGTERM), so that it knows which runs were cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM unwinds the run (SystemExit), which removes its temporary files.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)  # before numpy or torch load their BLAS
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, point = task
        conn.send((index, _run_point(point, threads, grid_code)))


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads(jobs: int) -> int:
    """Torch threads per worker so that ``jobs`` workers do not oversubscribe the cores."""
    return max(1, default_jobs() // max(jobs, 1))


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


@dataclass
class _Worker:
    process: Any
    conn: Any
    index: int | None = None  # the point it runs
    started: float = field(default_factory=time.perf_counter)


def run_grid(points: Sequence[GridPoint], jobs: int = 1, threads: int | None = None,
             on_done: Callable[[GridOutcome, int, int], None] | None = None,
             on_start: Callable[[GridPoint], None] | None = None) -> list[GridOutcome]:
    """Run every point with ``jobs`` worker processes of ``threads`` torch threads each
    (default: the cores shared out); outcomes in the order of ``points``.

    A worker that dies mid-run (SIGKILL, out of memory) fails its point only: a new
    worker takes the next point. Ctrl-C stops the workers and raises GridInterrupted.
    """
    from hdqt.experiments.fingerprint import loaded_code_fingerprint

    jobs = max(1, int(jobs))
    threads = threads or default_threads(jobs)
    grid_code = loaded_code_fingerprint()
    outcomes: dict[int, GridOutcome] = {}
    pending = deque(range(len(points)))
    idle: list[_Worker] = []
    busy: list[_Worker] = []
    # spawn, not fork: forking a process that already ran torch can deadlock.
    context = get_context("spawn")

    def finish(index: int, outcome: GridOutcome) -> None:
        outcomes[index] = outcome
        if on_done is not None:
            on_done(outcome, len(outcomes), len(points))

    def start_worker() -> _Worker:
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker_main, args=(theirs, threads, grid_code),
                                  daemon=True, name="hdqt-grid-worker")
        process.start()
        theirs.close()
        return _Worker(process, ours)

    try:
        while pending or busy:
            while pending and len(busy) < jobs:
                worker = idle.pop() if idle else start_worker()
                worker.index, worker.started = pending[0], time.perf_counter()
                try:
                    worker.conn.send((worker.index, points[worker.index]))
                except OSError:  # an idle worker that died meanwhile: take another
                    worker.process.join(STOP_GRACE_SECONDS)
                    worker.conn.close()
                    continue
                pending.popleft()
                busy.append(worker)
                if on_start is not None:
                    on_start(points[worker.index])
            ready = set(wait_for([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in list(busy):
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                index, outcome = worker.index, None
                try:
                    if worker.conn.poll():
                        index, outcome = worker.conn.recv()
                except (EOFError, OSError):
                    pass
                busy.remove(worker)
                if outcome is not None:
                    worker.index = None
                    idle.append(worker)
                    finish(index, outcome)
                    continue
                # The worker died mid-run: its point fails, the grid goes on.
                worker.process.join(STOP_GRACE_SECONDS)
                worker.conn.close()
                point = points[index]
                error = (f"its worker process (pid {worker.process.pid}) died with "
                         f"{_exit_reason(worker.process.exitcode)} during the run (killed, or "
                         "out of memory?); the tasks it finished are kept: run the grid again "
                         "to resume")
                _log_failure(point, error)
                finish(index, GridOutcome(point, None, error,
                                          time.perf_counter() - worker.started))
    except KeyboardInterrupt:
        running = [w.index for w in busy if w.index is not None]
        _stop_workers(busy + idle)
        raise GridInterrupted(outcomes, running) from None
    for worker in idle:
        try:
            worker.conn.send(None)
        except OSError:
            pass
    for worker in idle:
        worker.process.join(STOP_GRACE_SECONDS)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    return [outcomes[i] for i in range(len(points))]


def _stop_workers(workers: Sequence[_Worker]) -> None:
    """SIGTERM (the run unwinds: its finished tasks are on disk, its temporary files
    removed), then SIGKILL what is left after STOP_GRACE_SECONDS."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits too
    try:
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- Ray

RAY_INSTALL_HINT = 'pip install "hdqt[ray]"'


class RayNotInstalled(ImportError):
    """``--backend ray`` without Ray installed; the message says how to install it."""


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise RayNotInstalled(f"the ray backend needs Ray, which is not installed here ({error}); "
                              f"install it with: {RAY_INSTALL_HINT}") from None
    return ray


def _ray_point(point: GridPoint, threads: int, grid_code: dict[str, Any]) -> GridOutcome:
    # A Ray task: no SIGINT handling of its own (the driver cancels it).
    return _run_point(point, threads, grid_code)


def run_grid_ray(points: Sequence[GridPoint], *, address: str | None = None,
                 cpus_per_task: float = 1, threads: int | None = None,
                 max_in_flight: int | None = None, num_cpus: int | None = None,
                 on_done: Callable[[GridOutcome, int, int], None] | None = None,
                 on_start: Callable[[GridPoint], None] | None = None,
                 on_connect: Callable[[str], None] | None = None) -> list[GridOutcome]:
    """Run every point as a Ray task needing ``cpus_per_task`` CPUs, with ``threads``
    torch threads (default: the task's CPUs); outcomes in the order of ``points``.

    Uses the Ray instance this process is connected to; otherwise connects to
    ``address`` (or ``RAY_ADDRESS``), or starts a local instance with ``num_cpus``
    CPUs (default: all) and shuts it down at the end. Tasks are not retried: a task
    whose worker dies fails its point, and rerunning the grid resumes it. At most
    ``max_in_flight`` tasks are submitted at a time (default: all).
    """
    from hdqt.experiments.fingerprint import loaded_code_fingerprint

    ray = import_ray()
    threads = threads or max(1, int(cpus_per_task))
    grid_code = loaded_code_fingerprint()
    started_here = False
    if ray.is_initialized():
        where = "the Ray instance this process is connected to"
    else:
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=False)
            where = f"the Ray cluster at {address}"
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False)
            started_here = True
            where = "a local Ray instance"
    if on_connect is not None:
        resources = ray.cluster_resources()
        on_connect(f"{where} ({resources.get('CPU', 0):g} CPUs)")
    task = ray.remote(num_cpus=cpus_per_task, max_retries=0)(_ray_point)
    outcomes: dict[int, GridOutcome] = {}
    pending = deque(range(len(points)))
    in_flight: dict[Any, tuple[int, float]] = {}  # ref -> (index, submitted)
    limit = max_in_flight or len(points)
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                index = pending.popleft()
                in_flight[task.remote(points[index], threads, grid_code)] = (
                    index, time.perf_counter())
                if on_start is not None:
                    on_start(points[index])
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                index, submitted = in_flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as error:  # the worker died, or Ray failed
                    first = next((line for line in str(error).splitlines() if line.strip()), "")
                    message = (f"its Ray task failed: {type(error).__name__}: {first.strip()}; "
                               "the tasks it finished are kept: run the grid again to resume")
                    _log_failure(points[index], message)
                    outcome = GridOutcome(points[index], None, message,
                                          time.perf_counter() - submitted, traceback=str(error))
                outcomes[index] = outcome
                if on_done is not None:
                    on_done(outcome, len(outcomes), len(points))
    except KeyboardInterrupt:
        running = [index for index, _ in in_flight.values()]
        _cancel_ray(ray, list(in_flight))
        raise GridInterrupted(outcomes, running) from None
    finally:
        if started_here:
            _shutdown_local_ray(ray)
    return [outcomes[i] for i in range(len(points))]


def _shutdown_local_ray(ray) -> None:
    """Stop the local instance this grid started and wait until its processes (raylet,
    GCS, workers) have exited: without the wait, ``ray.shutdown`` only signals them, and
    an interrupted sweep would return to the shell while its workers still run."""
    import inspect

    if "wait_for_processes" in inspect.signature(ray.shutdown).parameters:  # newer Ray
        ray.shutdown(wait_for_processes=True)
    else:
        ray.shutdown()


def _cancel_ray(ray, refs: list) -> None:
    """Let the tasks that are ending on their own end (up to OWN_STOP_SECONDS), cancel
    the rest (KeyboardInterrupt in each, so that it unwinds), then force what is left
    after STOP_GRACE_SECONDS.

    From a terminal, Ctrl-C reaches a local instance's workers too (one process group):
    their tasks unwind by themselves, and cancelling a task while its end is on the way
    tripped a check in Ray's core worker ("Tried to complete task that was not pending",
    Ray 2.60), which aborted the sweep with status 1 instead of 130 (one CI run)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if refs:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=OWN_STOP_SECONDS)
        for ref in refs:
            ray.cancel(ref)
        if refs:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_SECONDS)
            for ref in left:
                ray.cancel(ref, force=True)
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- state


def stored_code(out_dir: Path) -> dict | None:
    """The code fingerprint recorded in a run directory's config.json, if any."""
    from hdqt.experiments import outputs

    try:
        return outputs.read_json(Path(out_dir) / outputs.CONFIG_JSON).get("code")
    except (OSError, ValueError, AttributeError):
        return None


def has_results(out_dir: Path) -> bool:
    from hdqt.experiments import outputs

    return any((Path(out_dir) / name).exists()
               for name in (outputs.CHECKPOINT, outputs.METRICS_JSON))


def finished_outcome(point: GridPoint, code: dict) -> GridOutcome:
    """The stored result of a finished run of this point's configuration made by
    ``code``; otherwise an outcome without metrics whose error says why not."""
    from hdqt.experiments import outputs
    from hdqt.experiments.fingerprint import describe, same_code

    try:
        stored = outputs.read_json(point.out_dir / outputs.CONFIG_JSON)
        metrics = outputs.read_json(point.out_dir / outputs.METRICS_JSON)
    except (OSError, ValueError, KeyError):
        return GridOutcome(point, None, "not run yet")
    config = stored.get("config", {}) if isinstance(stored, dict) else {}
    if not all(config.get(k) == v for k, v in point.config.identity().items()):
        return GridOutcome(point, None, "holds a run with another configuration")
    if not same_code(stored.get("code"), code):
        return GridOutcome(point, None, f"made by {describe(stored.get('code'))}, not by "
                                        f"this code ({describe(code)})")
    if not metrics.get("complete"):
        return GridOutcome(point, None, f"unfinished ({metrics.get('finished_tasks')} tasks)")
    return GridOutcome(point, metrics, resumed_after=metrics.get("finished_tasks", 0))


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single seed
    n: int

    def __str__(self) -> str:
        # one seed has no spread: "± 0.00" would claim a measured zero
        return f"{self.mean:.2f} (1 seed)" if self.n == 1 else f"{self.mean:.2f} ± {self.std:.2f}"


def stat(values: Iterable[float | None]) -> Stat | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values))


def paired_differences(base_runs: Mapping[int, Mapping], runs: Mapping[int, Mapping],
                       classifier: str, key: str) -> list[float]:
    """Per seed present in both, ``runs`` minus ``base_runs`` for one classifier's metric.

    Same seed means same class order and data split; a pair whose class orders
    differ anyway (other data) is left out rather than compared.
    """
    diffs = []
    for seed in sorted(set(base_runs) & set(runs)):
        a, b = base_runs[seed], runs[seed]
        if a.get("class_order") != b.get("class_order"):
            continue
        va, vb = (a.get(classifier) or {}).get(key), (b.get(classifier) or {}).get(key)
        if va is not None and vb is not None:
            diffs.append(vb - va)
    return diffs


def classifiers_of(runs: Mapping[int, Mapping]) -> list[tuple[str, bool]]:
    """(classifier, is primary) of the runs: the primary one first."""
    if not runs:
        return [("?", True)]
    sample = next(iter(runs.values()))
    primary = sample.get("primary_classifier", "cnn")
    others = sorted(name for name in ("cnn", "nme") if name in sample and name != primary)
    return [(primary, True), *((name, False) for name in others)]


def fmt_stat(value: Stat | None) -> str:
    return "n/a" if value is None else str(value)


def fmt_delta(value: Stat | None) -> str:
    if value is None:
        return "n/a"
    return f"{value.mean:+.2f} (1 seed)" if value.n == 1 else f"{value.mean:+.2f} ± {value.std:.2f}"


def md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# The legend of the tables (bench_cl.py's report and a sweep's summary.md).
TABLE_LEGEND = (
    "Accuracy is the average incremental accuracy (%), forgetting the average forgetting "
    "(points), as mean ± sample std over seeds, for each classifier: `cnn` the network's "
    "head, `nme` the nearest mean of exemplars (methods with exemplars); `*` marks the "
    "method's own classifier (NME for iCaRL, the head otherwise). Δ is the paired difference "
    "to the first recipe: per seed (same class order and data split) the recipe minus the "
    "first, then mean ± std over seeds.")


def comparison_header(labels: Sequence[str], recipes: Sequence[str]) -> list[str]:
    """Header of a comparison table: ``labels`` (the columns naming a row's group),
    the classifier, then accuracy and forgetting per recipe with the paired Δ of each
    later recipe to the first, and the number of seeds per recipe."""
    others = recipes[1:]
    return [*labels, "classifier", *(f"accuracy {r}" for r in recipes),
            *(f"Δ {r}" for r in others), *(f"forgetting {r}" for r in recipes),
            *(f"Δ forg. {r}" for r in others), "seeds"]


def comparison_rows(labels: Sequence[Any], group: Mapping[str, Mapping[int, Mapping]],
                    recipes: Sequence[str]) -> list[list[str]]:
    """One row per classifier of a group of runs (``group``: recipe -> {seed: metrics}),
    its cells as ``comparison_header`` names them."""
    base, others = recipes[0], recipes[1:]
    group = {r: group.get(r, {}) for r in recipes}
    reference = group[base] or next((runs for runs in group.values() if runs), {})
    seeds = "/".join(str(len(group[r])) for r in recipes)
    rows = []
    for classifier, primary in classifiers_of(reference):
        def cell(recipe: str, key: str) -> str:
            return fmt_stat(stat((m.get(classifier) or {}).get(key)
                                 for m in group[recipe].values()))

        def delta(recipe: str, key: str) -> str:
            return fmt_delta(stat(paired_differences(group[base], group[recipe],
                                                     classifier, key)))

        rows.append([*labels, classifier + ("*" if primary else ""),
                     *(cell(r, "avg_incremental_accuracy") for r in recipes),
                     *(delta(r, "avg_incremental_accuracy") for r in others),
                     *(cell(r, "forgetting") for r in recipes),
                     *(delta(r, "forgetting") for r in others), seeds])
    return rows
