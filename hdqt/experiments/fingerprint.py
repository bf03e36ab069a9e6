"""The code version a run was made with: a hash of the hdqt package's source files,
plus the git commit when the package lives in a git checkout.

Results depend on the code as much as on the configuration, so a run directory
records both: a resume or a reuse of finished results is only safe when the
source hash matches. The commit is informational (it says where to look); the
hash alone decides, since it also covers uncommitted edits and ignores commits
that did not touch the package.

A process labels its runs with ``loaded_code_fingerprint()``: the files as they
were when it first asked, which is when it loaded them, not as they are on disk
when a later run starts. A grid's workers check theirs against the grid's.
"""
from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any, Mapping

# Everything the package computes with: Python and the native kernels' C source.
SOURCE_SUFFIXES = (".py", ".c", ".h")


def package_root() -> Path:
    import hdqt

    return Path(hdqt.__file__).resolve().parent


def source_hash(root: Path | None = None) -> str:
    """SHA-256 over the relative path and contents of every source file under ``root``."""
    root = Path(root) if root is not None else package_root()
    files = sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()
                   and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        name = path.relative_to(root).as_posix().encode()
        # Lengths first, so that no two different file sets hash the same stream.
        digest.update(f"{len(name)}:{len(data)}:".encode() + name + data)
    return digest.hexdigest()


def git_commit(root: Path | None = None) -> str | None:
    """HEAD of the git checkout holding ``root``, or None (no git, not a checkout)."""
    root = Path(root) if root is not None else package_root()
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def code_fingerprint(root: Path | None = None) -> dict[str, Any]:
    """The fingerprint of the source files on disk now."""
    return {"source_sha256": source_hash(root), "git_commit": git_commit(root)}


@functools.lru_cache(maxsize=1)
def _loaded() -> tuple[tuple[str, Any], ...]:
    # Everything a run executes is loaded first: the learners, models and data code,
    # and the native kernels (compiled from kernels.c as it is now), then hashed.
    import hdqt.cl.learners  # noqa: F401
    import hdqt.data  # noqa: F401
    from hdqt.quantization import native

    native.load()
    return tuple(code_fingerprint().items())


def loaded_code_fingerprint() -> dict[str, Any]:
    """The fingerprint of the code this process runs: hashed once, on the first call,
    right after loading it. Edits made on disk afterwards (say, while a long grid
    runs) do not relabel the runs this process makes with code it did not load."""
    return dict(_loaded())


def same_code(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> bool:
    """True when ``stored`` (None for runs that predate fingerprints) has the same source."""
    return bool(stored) and stored.get("source_sha256") == current["source_sha256"]


def describe(code: Mapping[str, Any] | None) -> str:
    if not code:
        return "unrecorded code (a run from before code fingerprints)"
    commit = code.get("git_commit")
    where = f" at commit {commit[:10]}" if commit else ""
    return f"source {code['source_sha256'][:12]}{where}"
