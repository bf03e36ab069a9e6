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
        hit = next((r for _, r in results if isinstance(r, Located)), None)
        status = f"found in {hit.folder} ({hit.layout})" if hit else "NOT FOUND"
        print(f"\n{name}: {status}", file=out)
        for folder, result in results:
            if isinstance(result, Located):
                note = f"found ({result.layout})"
            elif isinstance(result, str):
                note = f"incomplete: {result}"
            else:
                note = "no files" if folder.is_dir() else "no such folder"
            print(f"  {folder}: {note}", file=out)
        if not hit:
            print(f"  expected: {source.expected}", file=out)
            print(f"  download: {source.url}", file=out)
    return 0
