"""The driver the benchmark scripts share (``benchmarks/bench_cl.py``, ``bench_ctmq.py``,
``bench_baselines.py``): run a grid of points on worker processes, resuming what is
finished, rerunning what other code made, printing one line per finished run, and
stopping cleanly on Ctrl-C. Each script keeps its own points and its own report."""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Sequence

from hdqt.experiments.fingerprint import describe, loaded_code_fingerprint, same_code
from hdqt.experiments.grid import (GridInterrupted, GridOutcome, GridPoint, finished_outcome, has_results,
                                   run_grid, stored_code)


def run_benchmark_grid(points: Sequence[GridPoint], *, script: str, out: str, jobs: int, threads: int | None,
                       report_only: bool = False, notes: Sequence[str] = ()) -> list[GridOutcome] | None:
    """The outcome of every point, in order; None when interrupted (the script exits 130).

    ``report_only`` trains nothing: each point's stored result, if it was made by this
    code and configuration. Otherwise a point whose directory holds results made by other
    code is rerun from scratch, and the others resume after their last finished task."""
    code = loaded_code_fingerprint()
    if report_only:
        return [finished_outcome(point, code) for point in points]
    stale = [has_results(p.out_dir) and not same_code(stored_code(p.out_dir), code) for p in points]
    points = [replace(p, overwrite=True) if s else p for p, s in zip(points, stale)]
    print(f"{len(points)} runs under {out}, {jobs} at a time; code {describe(code)}; "
          f"{sum(stale)} made by other code will be rerun", flush=True)
    for note in notes:
        print(note, flush=True)

    def report(outcome: GridOutcome, done: int, total: int) -> None:
        acc = (outcome.metrics or {}).get("avg_incremental_accuracy")
        score = f"avg inc acc {acc:.2f}" if acc is not None else f"FAILED {(outcome.error or '').strip()[-300:]}"
        print(f"[{done}/{total}] {outcome.point.name}: {score} ({outcome.seconds:.0f} s)", flush=True)

    try:
        return run_grid(points, jobs=jobs, threads=threads, on_done=report)
    except GridInterrupted as stop:
        print(f"\n{script}: interrupted after {len(stop.outcomes)} of {len(points)} runs; finished runs are "
              f"kept and stopped ones resume after their last finished task: rerun the same command to go on",
              file=sys.stderr)
        return None
