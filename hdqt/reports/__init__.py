"""Reports: tables, plots and one self-contained HTML page from run directories.

    from hdqt.reports import build_report
    build_report(["runs/bench_cl"], "runs/bench_cl/report")   # also: hdqt report DIR...

Runs are grouped by everything but the seed (``runs``), summarised as mean and
sample standard deviation over seeds (``tables``) and drawn with matplotlib
(``plots``; the optional ``report`` extra). See docs/reports.md.
"""
from __future__ import annotations

import importlib

# Public name -> defining module, loaded on first use (PEP 562): `hdqt report --help`
# should answer without torch or matplotlib.
_LAZY_NAMES = {
    **dict.fromkeys(("NoRunsError", "ReportResult", "build_report", "matplotlib_available"), "hdqt.reports.report"),
    **dict.fromkeys(("Group", "Run", "Stat", "find_runs", "group_runs"), "hdqt.reports.runs"),
}
__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'hdqt.reports' has no attribute {name!r}")
