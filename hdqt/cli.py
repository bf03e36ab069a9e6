"""The ``hdqt`` console script: a thin dispatcher over sub-commands.

Each sub-command lives in the package that owns it and exposes
``add_parser(subparsers)``, which registers its arguments and sets
``func`` (a callable taking the parsed namespace and returning an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> (module providing add_parser(subparsers), one-line help).
# The help is repeated here so that the top-level help and a mistyped sub-command
# are answered without importing any sub-command (and so torch).
_SUBCOMMANDS = {
    "run": ("hdqt.experiments.cli", "run a class-incremental experiment (the default command)"),
    "data": ("hdqt.data.cli",
             "list the datasets, whether each was found, and where they were looked for"),
    "energy": ("hdqt.cost.cli", "estimate operations, bytes and energy of one training step per recipe"),
    "info": ("hdqt.info", "versions, kernel variant, threads and data roots of this machine"),
    "sweep": ("hdqt.experiments.sweep", "run a grid of experiments (TOML), resumable, locally or on Ray"),
    "diagnose": ("hdqt.diagnostics.cli", "per-layer gradient alignment with float32, bias, variance and level use"),
    "report": ("hdqt.reports.cli", "tables, plots and an HTML page from run directories"),
}

# Commands that train: each step frees and reallocates large temporaries, which glibc
# would hand back to the OS every time (hdqt/allocator.py; HDQT_KEEP_FREED_MEMORY=0 opts out).
_TRAINING_COMMANDS = ("run", "sweep", "diagnose")


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The ``hdqt`` parser. ``commands`` names the sub-commands whose own parsers are
    loaded (default: all); the others are listed with their help only. ``main`` loads
    just the one it runs: importing a sub-command can be slow (``hdqt data`` loads
    torch), and help or an argument error should answer at once."""
    parser = argparse.ArgumentParser(
        prog="hdqt",
        description="Fully quantized training for class-incremental learning. "
        "With no sub-command, runs `hdqt run` on the embedded default.",
    )
    subparsers = parser.add_subparsers(dest="command")
    load = set(_SUBCOMMANDS) if commands is None else set(commands)
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        if name in load:
            importlib.import_module(module_name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Called without ``argv`` (the console script: this process is
    the command), a training command first keeps freed memory for reuse
    (``hdqt.allocator``); called from Python with ``argv``, the process's allocator is
    the caller's business and stays as it is."""
    as_command = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    parser = build_parser([argv[0]] if argv[0] in _SUBCOMMANDS else [])
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if as_command and args.command in _TRAINING_COMMANDS:
        from hdqt.allocator import keep_freed_memory, keep_freed_memory_requested

        if keep_freed_memory_requested():
            keep_freed_memory()
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
