"""hdqt.allocator: glibc keeps freed memory for reuse; the hdqt command applies it, a
caller of cli.main(argv) is left alone."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import hdqt.allocator as allocator
from hdqt import cli

glibc = pytest.mark.skipif(allocator._glibc_mallopt() is None, reason="not glibc: mallopt is not there")

# Three 8 MB tensors at once, freed together, ten times: the freed 24 MB at the top of
# the heap is more than glibc's default trim threshold (twice the largest block freed),
# so by default it goes back to the OS and every round faults fresh pages in again.
_BURSTS = textwrap.dedent("""
    import resource, sys, torch
    from hdqt.allocator import keep_freed_memory
    if sys.argv[1] == "keep":
        print(keep_freed_memory(children=False), file=sys.stderr)
    def burst():
        for t in [torch.empty(2 * 2**20) for _ in range(3)]:
            t.fill_(1.0)
    burst()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        burst()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_burst(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", _BURSTS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip())


@glibc
def test_kept_memory_is_reused_without_fresh_page_faults():
    pages = 3 * 8 * 2**20 // 4096  # one burst's pages
    kept = _faults_per_burst("keep")
    assert kept < pages / 3, f"{kept:.0f} page faults a burst with freed memory kept ({pages} pages a burst)"


@pytest.mark.parametrize("name, value", [("trim_threshold", 0), ("trim_threshold", 2**31), ("mmap_threshold", -1),
                                         ("mmap_threshold", 1.5), ("trim_threshold", True)])
def test_bad_thresholds_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        allocator.keep_freed_memory(**{name: value}, children=False)


@glibc
def test_children_inherit_the_thresholds_through_the_environment():
    # in a child process: mallopt changes the whole process, not for pytest's to keep
    script = textwrap.dedent("""
        import os
        from hdqt.allocator import keep_freed_memory
        print(keep_freed_memory(trim_threshold=2**29, mmap_threshold=2**24))
        print(os.environ["MALLOC_TRIM_THRESHOLD_"], os.environ["MALLOC_MMAP_THRESHOLD_"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    said, env = done.stdout.strip().splitlines()
    assert "512 MiB" in said and "16 MiB" in said
    assert env.split() == [str(2**29), str(2**24)]


def test_only_the_command_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda *a, **k: calls.append(1) or "")
    monkeypatch.setattr(cli, "_TRAINING_COMMANDS", ("info",))  # a cheap command stands in for a training one
    monkeypatch.delenv("HDQT_KEEP_FREED_MEMORY", raising=False)
    assert cli.main(["info"]) == 0  # called from Python: the caller's allocator
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["hdqt", "info"])
    assert cli.main() == 0  # the console script
    assert calls == [1]
    monkeypatch.setenv("HDQT_KEEP_FREED_MEMORY", "0")
    assert cli.main() == 0
    assert calls == [1]
    assert "HDQT_KEEP_FREED_MEMORY=0" in capsys.readouterr().out  # hdqt info says how it stands
