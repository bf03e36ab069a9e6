"""The ``hdqt`` console script: a thin dispatcher over sub-commands.

Each sub-command lives in the package that owns it and exposes
``add_parser(subparsers)``, which registers its arguments and sets
``func`` (a callable taking the parsed namespace and returning an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module providing add_parser(subparsers)
_SUBCOMMANDS = {
    "run": "hdqt.experiments.cli",
    "data": "hdqt.data.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdqt",
        description="Fully quantized training for class-incremental learning. "
        "With no sub-command, runs `hdqt run` on the embedded default.",
    )
    subparsers = parser.add_subparsers(dest="command")
    for module_name in _SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
