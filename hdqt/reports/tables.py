"""The report's tables, each rendered as Markdown and as HTML from one set of cells."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

from hdqt.reports.runs import METRICS, Group, Stat, varying_keys

METRIC_LABELS = {"avg_incremental_accuracy": "avg. incremental acc. %", "last_accuracy": "last acc. %",
                 "forgetting": "forgetting (points)", "backward_transfer": "backward transfer"}
OPERAND_LABELS = {"grad_output_dx": "G (dX)", "backward_weight": "W (dX)",
                  "grad_output_dw": "G (dW)", "backward_input": "X (dW)"}


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
        rule = ["---:" if i in self.right else "---" for i in range(len(self.header))]
        return "\n".join([line(self.header), line(rule), *(line(r) for r in self.rows)])

    def html(self) -> str:
        def cell(tag: str, i: int, text: str) -> str:
            cls = ' class="num"' if i in self.right else ""
            return f"<{tag}{cls}>{html.escape(str(text))}</{tag}>"
        head = "".join(cell("th", i, c) for i, c in enumerate(self.header))
        body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _setting_columns(groups: Sequence[Group]) -> list[str]:
    return [k for k in varying_keys(groups) if k not in ("dataset", "method", "recipe")]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def summary_table(groups: Sequence[Group], classifier: str | None) -> Table:
    """One row per group: its settings that vary, the seeds, the metrics and the energy."""
    extra = _setting_columns(groups)
    header = ["method", "recipe", *extra, "classifier", "seeds", *(METRIC_LABELS[m] for m in METRICS),
              "energy µJ/step"]
    rows = []
    for g in groups:
        settings = g.settings
        energy = g.energy_uj().text(3)
        if g.energy_estimated and energy != "-":
            energy += " *"
        rows.append([_cell(settings.get("method")), _cell(settings.get("recipe")),
                     *(_cell(settings.get(k)) for k in extra), _cell(g.classifier(classifier)),
                     f"{len(g.complete_runs)}", *(g.stat(m, classifier).text() for m in METRICS), energy])
    first = 3 + len(extra)
    return Table(header, rows, set(range(first, len(header))))


def per_task_table(groups: Sequence[Group], classifier: str | None) -> Table:
    """Accuracy on the classes seen after each task, per group (mean ± std over seeds)."""
    curves = [g.per_task(classifier) for g in groups]
    tasks = max((len(c) for c in curves), default=0)
    header = ["group", *(f"task {t + 1}" for t in range(tasks))]
    rows = [[g.label, *(c[t].text() if t < len(c) else "-" for t in range(tasks))] for g, c in zip(groups, curves)]
    return Table(header, rows, set(range(1, len(header))))


def diagnostics_rows(group: Group) -> dict[str, dict[str, Stat]]:
    """Per layer of a group's diagnostics (every record of every complete run): the
    statistics of the cosines, bias and variance, and of G (dW)'s level use."""
    values: dict[str, dict[str, list]] = {}
    for run in group.complete_runs:
        for record in run.diagnostics:
            for layer in record.get("layers", []):
                entry = values.setdefault(str(layer.get("name")), {})
                for part in ("dx", "dw"):
                    stats = layer.get(part) or {}
                    for name in ("cosine", "rel_bias", "rel_variance"):
                        entry.setdefault(f"{part}_{name}", []).append(stats.get(name))
                for op, uses in (layer.get("levels") or {}).items():
                    for variant, use in uses.items():
                        entry.setdefault(f"{op}_{variant}_hit", []).append(use.get("hit"))
                        entry.setdefault(f"{op}_{variant}_entropy", []).append(use.get("entropy_bits"))
                        entry.setdefault(f"{op}_levels", []).append(use.get("levels"))
                entry.setdefault("records", []).append(1)
    return {layer: {k: Stat.of(v) for k, v in stats.items()} for layer, stats in values.items()}


def diagnostics_table(groups: Sequence[Group]) -> Table | None:
    rows = []
    for g in groups:
        for layer, s in diagnostics_rows(g).items():
            def get(key, digits=3):
                return s[key].text(digits) if key in s else "-"
            rows.append([g.label, layer, get("dx_cosine"), get("dw_cosine"), get("dw_rel_bias"),
                         get("dw_rel_variance", 4), get("grad_output_dw_hadamard_hit", 1),
                         get("grad_output_dw_plain_hit", 1), get("grad_output_dw_hadamard_entropy", 2),
                         get("grad_output_dw_plain_entropy", 2), str(s["records"].n)])
    if not rows:
        return None
    header = ["group", "layer", "dX cos", "dW cos", "dW rel. bias", "dW rel. var",
              "G (dW) levels hit, Hadamard", "plain", "G (dW) entropy bits, Hadamard", "plain", "records"]
    return Table(header, rows, set(range(2, len(header))))


def saturation_table(groups: Sequence[Group]) -> Table | None:
    """Per group with accumulator counts: the share of forward tile sums that saturated in
    each task's training (%, mean ± std over seeds), and the layer that saturated most."""
    data = [(g, g.saturation_per_task(), g.most_saturated_layer()) for g in groups]
    data = [(g, per_task, worst) for g, per_task, worst in data if per_task and worst is not None]
    if not data:
        return None
    tasks = max(len(per_task) for _, per_task, _ in data)
    header = ["group", *(f"task {t + 1} %" for t in range(tasks)), "most saturated layer",
              "its share %"]
    rows = [[g.label, *(per_task[t].text(3) if t < len(per_task) else "-" for t in range(tasks)),
             worst[0], worst[1].text(3)] for g, per_task, worst in data]
    return Table(header, rows, set(range(1, tasks + 1)) | {tasks + 2})
