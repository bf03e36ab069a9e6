"""The code version a run was made with: a hash of the hdqt package's source files,
plus the git commit when the package lives in a git checkout.

Results depend on the code as much as on the configuration, so a run directory
records both: a resume or a reuse of finished results is only safe when the
source hash matches. The commit is informational (it says where to look); the
hash alone decides, since it also covers uncommitted edits and ignores commits
that did not touch the package.
"""
from __future__ import annotations

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
    return {"source_sha256": source_hash(root), "git_commit": git_commit(root)}


def same_code(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> bool:
    """True when ``stored`` (None for runs that predate fingerprints) has the same source."""
    return bool(stored) and stored.get("source_sha256") == current["source_sha256"]


def describe(code: Mapping[str, Any] | None) -> str:
    if not code:
        return "unrecorded code (a run from before code fingerprints)"
    commit = code.get("git_commit")
    where = f" at commit {commit[:10]}" if commit else ""
    return f"source {code['source_sha256'][:12]}{where}"
