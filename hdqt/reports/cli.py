"""The `hdqt report` sub-command: tables, plots and an HTML page from run directories.

    hdqt report runs/bench_cl                     # a benchmark or sweep folder, searched recursively
    hdqt report runs/a runs/b --out reports/ab    # several folders into one report

Runs alike but for the seed are grouped: mean and standard deviation over seeds.
Writes report.md, report.html (figures embedded, readable offline), summary.json
and the PNG figures into --out (default: the first DIR's report/). Without
matplotlib it writes the Markdown tables and summary.json, says how to install
matplotlib, and exits with 2. See docs/reports.md.
"""
from __future__ import annotations

import argparse
import sys

INSTALL_HINT = ("matplotlib is not installed, so the report has its Markdown tables but no plots and no HTML "
                "page; install it with `pip install 'hdqt[report]'` (or `pip install matplotlib`) and rerun")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help="tables, plots and an HTML page from run directories",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="run directories, or folders holding them (searched recursively)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default: the first DIR's report/)")
    parser.add_argument("--classifier", choices=("cnn", "nme"), default=None,
                        help="report this classifier where a run has it (default: each method's own: "
                             "NME for iCaRL, the network's head otherwise)")
    parser.add_argument("--title", default="hdqt report", help="the page's title")
    parser.set_defaults(func=report_command)
    return parser


def report_command(args: argparse.Namespace) -> int:
    from hdqt.reports.report import NoRunsError, build_report

    try:
        result = build_report(args.dirs, args.out, classifier=args.classifier, title=args.title)
    except NoRunsError as error:
        print(f"hdqt report: error: {error}", file=sys.stderr)
        return 2
    for problem in result.problems:
        print(f"hdqt report: warning: skipped {problem}", file=sys.stderr)
    print(f"{len(result.runs)} runs in {len(result.groups)} groups; wrote {len(result.files)} files to "
          f"{result.out_dir}:")
    for path in result.files:
        print(f"  {path.name}")
    if not result.plots:
        print(f"hdqt report: {INSTALL_HINT}", file=sys.stderr)
        return 2
    return 0
