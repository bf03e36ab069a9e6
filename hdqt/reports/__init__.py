"""Reports: tables, plots and one self-contained HTML page from run directories.

    from hdqt.reports import build_report
    build_report(["runs/bench_cl"], "runs/bench_cl/report")   # also: hdqt report DIR...

Runs are grouped by everything but the seed (``runs``), summarised as mean and
sample standard deviation over seeds (``tables``) and drawn with matplotlib
(``plots``; the optional ``report`` extra). See docs/reports.md.
"""
from __future__ import annotations

from hdqt.reports.report import NoRunsError, ReportResult, build_report, matplotlib_available
from hdqt.reports.runs import Group, Run, Stat, find_runs, group_runs

__all__ = ["Group", "NoRunsError", "ReportResult", "Run", "Stat", "build_report", "find_runs", "group_runs",
           "matplotlib_available"]
