"""Build a report from run directories: Markdown, PNG plots, one self-contained HTML page.

    from hdqt.reports import build_report
    result = build_report(["runs/bench_cl"], "runs/bench_cl/report")

writes into the output folder:

* ``report.md``: the tables, with the figures linked (PNG files beside it);
* ``report.html``: the same page with every figure embedded (base64 PNG) and no
  external asset, readable offline;
* ``summary.json``: the groups' statistics for machines;
* one PNG per figure (``accuracy-<dataset>.png``, ``forgetting-...``, ``sweep-acc_bits-...``,
  ``sweep-bits-...``, ``pareto-...``, ``diagnostics-...``).

Without matplotlib (``plots=False``, or not installed) only ``report.md`` and
``summary.json`` are written.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hdqt.reports.runs import METRICS, Group, Run, find_runs, group_runs
from hdqt.reports.tables import Table, diagnostics_table, per_task_table, saturation_table, summary_table

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"


class NoRunsError(ValueError):
    """No run directory was found under the given paths."""


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ReportResult:
    out_dir: Path
    runs: list[Run]
    groups: list[Group]
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    plots: bool = True


# ---------------------------------------------------------------- energy
def _estimate_energy(run: Run, cache: dict) -> float | None:
    """Total pJ of one training step by the cost model, for a run whose metrics.json has
    none (written before runs recorded it): the dataset's backbone with a head over all
    of its classes, the run's policy (config.json) and batch. None if it cannot be built."""
    try:
        policy = json.dumps(run.policy, sort_keys=True)
        key = (run.config.get("dataset"), run.config.get("backbone"), policy, run.config.get("batch_size"))
        if key not in cache:
            import torch.nn as nn

            from hdqt.cost import estimate
            from hdqt.data import dataset_info
            from hdqt.models import create_model
            from hdqt.quantization import QuantPolicy

            info = dataset_info(key[0])
            backbone = create_model(key[1] or info.default_backbone, info.input_shape)
            model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, info.classes))
            qpolicy = QuantPolicy.from_dict(run.policy) if run.policy else QuantPolicy(name="fp32")
            cache[key] = estimate(model, info.input_shape, qpolicy, batch=int(key[3] or 128)).total_pj
        return cache[key]
    except Exception:  # noqa: BLE001 - an estimate that cannot be made is left out, and said so
        return None


def fill_energy(groups: Sequence[Group]) -> None:
    """Each group's energy per step: metrics.json's ``energy_per_step``, else estimated here."""
    cache: dict = {}
    for group in groups:
        group.energies, group.energy_estimated = [], False
        for run in group.complete_runs:
            total = (run.metrics.get("energy_per_step") or {}).get("total_pj")
            if total is None:
                total = _estimate_energy(run, cache)
                group.energy_estimated |= total is not None
            group.energies.append(total)


# ---------------------------------------------------------------- page blocks
@dataclass
class _Block:
    kind: str  # "h1", "h2", "h3", "p", "table", "figure"
    text: str = ""
    table: Table | None = None
    png: bytes | None = None
    name: str = ""  # figure file name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _markdown(blocks: Sequence[_Block]) -> str:
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            parts.append(b.text)
        elif b.kind == "table":
            parts.append(b.table.markdown())
        elif b.kind == "figure":
            parts.append(f"![{b.text}]({b.name})")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.86em}
th,td{border:1px solid #ccc;padding:0.25em 0.55em;text-align:left}
th{background:#f3f3f3}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:1em 0}
h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
p.note{color:#555;font-size:0.9em}"""


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** as HTML, the rest escaped."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _html(blocks: Sequence[_Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "table":
            body.append(b.table.html())
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ---------------------------------------------------------------- the report
def _classifier_note(classifier: str | None) -> str:
    chosen = (f"the `{classifier}` classifier where a run has it, else the method's own"
              if classifier else "each method's own classifier (NME for iCaRL, the network's head otherwise)")
    return (f"Accuracy is {chosen}, in %; forgetting in points. Numbers are the mean ± the sample standard "
            "deviation over seeds (a single seed shows its value alone); `seeds` counts the complete runs "
            "of the group. Energy is the cost model's estimate of one training step (`hdqt energy`, "
            "docs/cost.md), from each run's metrics.json; `*` marks groups whose runs did not record one, "
            "estimated here for the dataset's backbone with a head over all of its classes. acc_bits 0 is "
            "an unlimited accumulator.")


def _dataset_blocks(dataset: str, groups: list[Group], classifier: str | None, plots: bool) -> list[_Block]:
    from hdqt.reports import plots as P

    blocks = [_Block("h2", f"Dataset: {dataset}")]
    blocks += [_Block("h3", "Summary"), _Block("table", table=summary_table(groups, classifier))]

    def figure(name: str, alt: str, make) -> None:
        if not plots:
            return
        png = make()
        if png is not None:
            blocks.append(_Block("figure", alt, png=png, name=f"{name}-{_slug(dataset)}.png"))

    blocks.append(_Block("h3", "Accuracy on the classes seen after each task"))
    blocks.append(_Block("p", "One line per method and recipe (and any other setting that varies), "
                              "the band is ± one standard deviation over seeds."))
    figure("accuracy", f"{dataset}: accuracy on seen classes after each task",
           lambda: P.accuracy_plot(groups, classifier, f"{dataset}: accuracy on seen classes"))
    blocks.append(_Block("table", table=per_task_table(groups, classifier)))

    blocks.append(_Block("h3", "Forgetting"))
    figure("forgetting", f"{dataset}: average forgetting",
           lambda: P.forgetting_plot(groups, classifier, f"{dataset}: average forgetting"))
    for key, what in (("acc_bits", "Accumulator"), ("bits", "Bit-width")):
        if len({g.settings.get(key) for g in groups if g.settings.get(key) is not None}) > 1:
            blocks.append(_Block("h3", f"{what} sweep"))
            blocks.append(_Block("p", f"Average incremental accuracy against `{key}`; recipes that do not "
                                      f"quantize (fp32) as a dashed line with its band."))
            figure(f"sweep-{key}", f"{dataset}: accuracy against {key}",
                   lambda key=key: P.sweep_plot(groups, key, classifier, f"{dataset}: {what.lower()} sweep"))
    if any(e is not None for g in groups for e in g.energies):
        blocks.append(_Block("h3", "Accuracy against estimated energy per step"))
        blocks.append(_Block("p", "Each group at its mean energy per training step (log scale) and mean "
                                  "average incremental accuracy; the dotted line is the Pareto front."))
        figure("pareto", f"{dataset}: accuracy against energy",
               lambda: P.pareto_plot(groups, classifier, f"{dataset}: accuracy against energy per step"))
    table = saturation_table(groups)
    if table is not None:
        blocks.append(_Block("h3", "Accumulator saturation"))
        blocks.append(_Block("p", "The share of the forward products' tile sums that saturated the "
                                  "accumulator during each task's training (counted in one forward call "
                                  "of a few, `hdqt.quantization.saturation_report`), and the layer that "
                                  "saturated most, averaged over tasks and seeds."))
        blocks.append(_Block("table", table=table))
    table = diagnostics_table(groups)
    if table is not None:
        blocks.append(_Block("h3", "Gradient diagnostics"))
        blocks.append(_Block("p", "From the runs' diagnostics.jsonl (`hdqt run --diagnose-every N`), averaged "
                                  "over every record and seed: per layer, the cosine of the quantized dX and dW "
                                  "with float32 autograd on the same weights and batch, dW's relative bias and "
                                  "variance over stochastic-rounding draws, and how many levels of its grid "
                                  "G (dW) (dW's output-gradient operand) hits and the entropy of their histogram, "
                                  "with the Hadamard transform and without it (plain)."))
        figure("diagnostics", f"{dataset}: gradient alignment and level use per layer",
               lambda: P.diagnostics_plot(groups, f"{dataset}: gradient alignment and level use"))
        blocks.append(_Block("table", table=table))
    return blocks


def _summary(groups: Sequence[Group], classifier: str | None, out_dir: Path) -> dict[str, Any]:
    return {"groups": [{
        "label": g.label, "settings": g.settings, "classifier": g.classifier(classifier),
        "seeds": g.seeds, "runs": [os.path.relpath(r.path, out_dir) for r in g.runs],
        "complete_runs": len(g.complete_runs),
        "metrics": {m: g.stat(m, classifier).to_dict() for m in METRICS},
        "incremental_accuracy": [s.to_dict() for s in g.per_task(classifier)],
        "energy_uj": g.energy_uj().to_dict(), "energy_estimated": g.energy_estimated,
    } for g in groups]}


def build_report(paths: Sequence[str | Path], out_dir: str | Path | None = None, *,
                 classifier: str | None = None, plots: bool | None = None,
                 title: str = "hdqt report") -> ReportResult:
    """Find the runs under ``paths``, group them and write the report into ``out_dir``
    (default: ``<first path>/report``). ``plots`` None: when matplotlib is installed."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise NoRunsError("give at least one run directory or folder of runs")
    out_dir = Path(out_dir) if out_dir is not None else paths[0] / "report"
    runs, problems = find_runs(paths)
    if not runs:
        raise NoRunsError(f"no run directory (config.json and metrics.json) under {', '.join(map(str, paths))}"
                          + (f" ({'; '.join(problems)})" if problems else ""))
    plots = matplotlib_available() if plots is None else plots
    groups = group_runs(runs)
    fill_energy(groups)
    complete = sum(r.complete for r in runs)
    blocks = [_Block("h1", title),
              _Block("p", f"{len(runs)} runs ({complete} complete) in {len(groups)} groups (runs alike but for "
                          f"the seed), from {', '.join(f'`{p}`' for p in paths)}."),
              _Block("p", _classifier_note(classifier))]
    datasets: dict[str, list[Group]] = {}
    for g in groups:
        datasets.setdefault(g.dataset, []).append(g)
    for dataset, members in datasets.items():
        blocks += _dataset_blocks(dataset, members, classifier, plots)
    unfinished = [r for r in runs if not r.complete]
    if unfinished or problems:
        blocks.append(_Block("h2", "Left out"))
        rows = [[os.path.relpath(r.path, out_dir),
                 f"{r.metrics.get('finished_tasks', '?')}/{r.metrics.get('num_tasks', '?')} tasks"]
                for r in unfinished]
        rows += [[p, "unreadable"] for p in problems]
        blocks.append(_Block("table", table=Table(["run", "why"], rows)))

    out_dir.mkdir(parents=True, exist_ok=True)
    result = ReportResult(out_dir, runs, groups, problems=problems, plots=plots)
    for b in blocks:
        if b.kind == "figure":
            (out_dir / b.name).write_bytes(b.png)
            result.files.append(out_dir / b.name)
    (out_dir / REPORT_MD).write_text(_markdown(blocks), encoding="utf-8")
    (out_dir / SUMMARY_JSON).write_text(json.dumps(_summary(groups, classifier, out_dir), indent=2) + "\n",
                                        encoding="utf-8")
    result.files += [out_dir / REPORT_MD, out_dir / SUMMARY_JSON]
    if plots:
        (out_dir / REPORT_HTML).write_text(_html(blocks, title), encoding="utf-8")
        result.files.append(out_dir / REPORT_HTML)
    return result
