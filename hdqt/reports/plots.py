"""The report's figures, drawn with matplotlib's Agg backend into PNG bytes.

Every figure has a fixed size and dpi, matplotlib's default style (whatever the
user's matplotlibrc says) and no metadata that changes between renders (no
``Software`` entry, no time), so the same inputs give byte-identical PNGs.
Each function returns None when its figure has nothing to show.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

from hdqt.reports.runs import Group, Stat, varying_keys
from hdqt.reports.tables import diagnostics_rows

DPI = 100
SIZE = (7.0, 4.2)  # inches
_RC = {"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 7, "legend.frameon": False,
       "svg.hashsalt": "hdqt", "path.simplify": False}


def _figure(size=SIZE, rows: int = 1, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _render(draw) -> bytes:
    """Run ``draw()`` (which returns a Figure or None) under the default style; PNG bytes."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        fig = draw()
        if fig is None:
            return None
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _color(i: int):
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def _band(ax, xs, stats: Sequence[Stat], color, label):
    points = [(x, s) for x, s in zip(xs, stats) if s.mean is not None]
    if not points:
        return
    x = [p[0] for p in points]
    mean = [p[1].mean for p in points]
    ax.plot(x, mean, marker="o", markersize=3, color=color, label=label)
    std = [p[1].std or 0.0 for p in points]
    if any(std):
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.18, linewidth=0)


def accuracy_plot(groups: Sequence[Group], classifier: str | None, title: str) -> bytes | None:
    """Accuracy on the classes seen after each task, a line per group, ± std band over seeds."""
    curves = [g.per_task(classifier) for g in groups]
    if not any(any(s.mean is not None for s in c) for c in curves):
        return None

    def draw():
        fig, axes = _figure()
        ax = axes[0][0]
        for i, (g, curve) in enumerate(zip(groups, curves)):
            _band(ax, range(1, len(curve) + 1), curve, _color(i), f"{g.label} (n={len(g.complete_runs)})")
        ax.set_xlabel("task")
        ax.set_ylabel("accuracy on seen classes (%)")
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="best")
        return fig
    return _render(draw)


def forgetting_plot(groups: Sequence[Group], classifier: str | None, title: str) -> bytes | None:
    """Average forgetting per group, mean with a ± std bar over seeds."""
    stats = [g.stat("forgetting", classifier) for g in groups]
    if not any(s.mean is not None for s in stats):
        return None

    def draw():
        fig, axes = _figure((SIZE[0], max(2.0, 0.9 + 0.35 * len(groups))))
        ax = axes[0][0]
        y = list(range(len(groups)))
        ax.barh(y, [s.mean or 0.0 for s in stats], xerr=[s.std or 0.0 for s in stats],
                color=[_color(i) for i in y], alpha=0.85, capsize=3)
        ax.set_yticks(y, [g.label for g in groups])
        ax.invert_yaxis()
        ax.set_xlabel("average forgetting (points)")
        ax.set_title(title)
        return fig
    return _render(draw)


def sweep_plot(groups: Sequence[Group], key: str, classifier: str | None, title: str) -> bytes | None:
    """Average incremental accuracy against ``key`` (acc_bits or bits), a line per set of
    the other settings; recipes without ``key`` (fp32) as a dashed line with its band.
    acc_bits 0 (unlimited) is drawn to the right of the widest accumulator."""
    swept = [g for g in groups if g.settings.get(key) is not None]
    values = sorted({g.settings[key] for g in swept})
    if len(values) < 2:
        return None
    finite = [v for v in values if not (key == "acc_bits" and v == 0)]
    unlimited = max(finite, default=0) + max(2, (max(finite) - min(finite)) // 4 if finite else 2)

    def position(v):
        return unlimited if key == "acc_bits" and v == 0 else v

    others = ["method", "recipe"] + [k for k in varying_keys(swept) if k not in (key, "method", "recipe")]
    lines: dict[tuple, list[Group]] = {}
    for g in swept:
        lines.setdefault(tuple((k, g.settings.get(k)) for k in others), []).append(g)

    def draw():
        fig, axes = _figure()
        ax = axes[0][0]
        i = 0
        for line_key, members in lines.items():
            members = sorted(members, key=lambda g: position(g.settings[key]))
            label = " ".join(f"{v}" if k in ("method", "recipe") else f"{k}={v}" for k, v in line_key)
            stats = [g.stat("avg_incremental_accuracy", classifier) for g in members]
            _band(ax, [position(g.settings[key]) for g in members], stats, _color(i), label)
            i += 1
        for g in groups:
            if g.settings.get(key) is None:
                s = g.stat("avg_incremental_accuracy", classifier)
                if s.mean is None:
                    continue
                ax.axhline(s.mean, color=_color(i), linestyle="--", linewidth=1, label=g.label)
                if s.std:
                    ax.axhspan(s.mean - s.std, s.mean + s.std, color=_color(i), alpha=0.12, linewidth=0)
                i += 1
        ticks = [position(v) for v in values]
        ax.set_xticks(ticks, ["unlimited" if key == "acc_bits" and v == 0 else str(v) for v in values])
        ax.set_xlabel({"acc_bits": "accumulator bits", "bits": "operand bits"}.get(key, key))
        ax.set_ylabel("avg. incremental accuracy (%)")
        ax.set_title(title)
        ax.legend(loc="best")
        return fig
    return _render(draw)


def pareto_plot(groups: Sequence[Group], classifier: str | None, title: str) -> bytes | None:
    """Average incremental accuracy against the estimated energy of one training step,
    with ± std bars, and the Pareto front (no other group is both cheaper and better)."""
    points = []
    for i, g in enumerate(groups):
        acc, energy = g.stat("avg_incremental_accuracy", classifier), g.energy_uj()
        if acc.mean is not None and energy.mean is not None and energy.mean > 0:
            points.append((energy.mean, acc, i, g))
    if not points:
        return None
    front, best = [], -math.inf
    for energy, acc, i, g in sorted(points, key=lambda p: (p[0], -p[1].mean)):
        if acc.mean > best:
            front.append((energy, acc.mean))
            best = acc.mean

    def draw():
        fig, axes = _figure()
        ax = axes[0][0]
        for energy, acc, i, g in points:
            ax.errorbar([energy], [acc.mean], yerr=[acc.std or 0.0], fmt="o", color=_color(i), capsize=3,
                        label=g.label + (" (energy estimated here)" if g.energy_estimated else ""))
        if len(front) > 1:
            ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="0.4", linewidth=1,
                    linestyle=":", label="Pareto front")
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.08)
        ax.set_xlabel("estimated energy per training step (µJ, log scale)")
        ax.set_ylabel("avg. incremental accuracy (%)")
        ax.set_title(title)
        ax.legend(loc="best")
        return fig
    return _render(draw)


def diagnostics_plot(groups: Sequence[Group], title: str) -> bytes | None:
    """Per layer: the mean cosine of dW and of dX with float32 (bars per group), and the
    entropy of G (dW)'s level histogram with the Hadamard transform (solid) and without (hatched)."""
    rows = [(g, diagnostics_rows(g)) for g in groups]
    rows = [(g, r) for g, r in rows if r]
    if not rows:
        return None
    layers: list[str] = []
    for _, r in rows:
        layers += [name for name in r if name not in layers]

    def bars(ax, keys, ylabel, hatches=("",)):
        width = 0.8 / (len(rows) * len(keys))
        for gi, (g, r) in enumerate(rows):
            for ki, key in enumerate(keys):
                offset = (gi * len(keys) + ki) * width - 0.4 + width / 2
                xs, ys, es = [], [], []
                for li, layer in enumerate(layers):
                    s = r.get(layer, {}).get(key)
                    if s is not None and s.mean is not None:
                        xs.append(li + offset)
                        ys.append(s.mean)
                        es.append(s.std or 0.0)
                if xs:
                    ax.bar(xs, ys, width, yerr=es, color=_color(groups.index(g)), hatch=hatches[ki],
                           edgecolor="white" if not hatches[ki] else "0.25", linewidth=0.4, capsize=2,
                           label=g.label if ki == 0 else None)
        ax.set_xticks(range(len(layers)), layers, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)

    def draw():
        fig, axes = _figure((SIZE[0], 7.2), rows=3)
        bars(axes[0][0], ["dw_cosine"], "dW cosine with fp32")
        bars(axes[1][0], ["dx_cosine"], "dX cosine with fp32")
        bars(axes[2][0], ["grad_output_dw_hadamard_entropy", "grad_output_dw_plain_entropy"],
             "G (dW) entropy (bits)", hatches=("", "///"))
        axes[0][0].set_title(title)
        axes[0][0].legend(loc="lower left")
        axes[2][0].text(0.99, 0.97, "solid: Hadamard, hatched: plain", transform=axes[2][0].transAxes,
                        ha="right", va="top", fontsize=7)
        return fig
    return _render(draw)
