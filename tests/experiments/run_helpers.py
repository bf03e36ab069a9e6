"""Helpers for the `hdqt run` tests: tiny digits runs through the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hdqt.cli import main

# Small enough for seconds per run, large enough that training changes the results.
TINY = ["--dataset", "digits", "--method", "icarl", "--epochs", "2", "--memory", "40"]


def run_cli(*args: str) -> int:
    return main(list(args))


def read_metrics(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "metrics.json").read_text())


def subprocess_cli(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    """Start `python -m hdqt ...` with its output piped (for killing it mid-run)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hdqt", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


# Runs in a fresh interpreter (``python -c NO_TORCH ARGS...``): the hdqt command line on
# ARGS, then whether torch was imported by it.
NO_TORCH = """
import sys
from hdqt.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    print("exit", done.code)
print("torch loaded:", "torch" in sys.modules)
"""
