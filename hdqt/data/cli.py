"""``hdqt data``: list every dataset, whether it was found, and where it was looked for."""
from __future__ import annotations

import argparse
import sys

from hdqt.data import cache_dir, data_roots, dataset_info, list_datasets
from hdqt.data.base import Located


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "data",
        help="list the datasets, whether each was found, and where they were looked for",
        description="List every dataset, whether its files were found, and the folders searched. "
        "Roots: --root if given, else $HDQT_DATA, then the per-user cache.",
    )
    parser.add_argument("--root", default=None, help="folder holding the <dataset>/ sub-folders")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    print(f"roots searched: {', '.join(str(r) for r in data_roots(args.root))}", file=out)
    print(f"parsed-data cache: {cache_dir() / 'parsed'}", file=out)
    for name in list_datasets():
        source = dataset_info(name).source
        if source is None:
            print(f"\n{name}: available (bundled with scikit-learn, no files needed)", file=out)
            continue
        results = source.search(args.root)
        located = [r for _, r in results if isinstance(r, Located)]
        hit = next((r for r in located if not r.partial), located[0] if located else None)
        problems = [r for _, r in results if isinstance(r, str)]
        if hit:
            status = f"found in {hit.folder} ({hit.layout})" + (f", PARTIAL: {hit.partial}" if hit.partial else "")
        elif any(p.startswith("malformed:") for p in problems):
            status = "FOUND BUT MALFORMED (see below)"
        else:
            status = "INCOMPLETE (see below)" if problems else "NOT FOUND"
        print(f"\n{name}: {status}", file=out)
        for folder, result in results:
            if isinstance(result, Located):
                note = f"found ({result.layout})" + (f", partial: {result.partial}" if result.partial else "")
            elif isinstance(result, str):  # "malformed: ..." for a copy that fails the probe's checks
                why = result.removeprefix("malformed: ")
                note = f"{'malformed' if why != result else 'incomplete'}, skipped: {why}"
            else:
                note = "no files" if folder.is_dir() else "no such folder"
            print(f"  {folder}: {note}", file=out)
        if not hit:
            print(f"  expected: {source.expected}", file=out)
            print(f"  download: {source.url}", file=out)
    return 0
