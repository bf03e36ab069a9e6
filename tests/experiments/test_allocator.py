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

# A 24 MB block in a fresh process: glibc's default maps it on its own (mmap), so freeing
# it hands the pages back to the OS and the next step's block faults them in again; with
# freed memory kept (mmap threshold 32 MB) it comes from the heap, whose freed memory
# stays. mallinfo2 (glibc >= 2.33) counts the bytes held in mapped blocks.
_ONE_BLOCK = textwrap.dedent("""
    import ctypes, sys, torch
    from hdqt.allocator import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "keep":
        keep_freed_memory(children=False)
    before = libc.mallinfo2().hblkhd
    block = torch.empty(6 * 2**20)  # 24 MB
    print(libc.mallinfo2().hblkhd - before)
""")


def _mapped_bytes_of_a_block(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _ONE_BLOCK, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def _has_mallinfo2() -> bool:
    import ctypes

    return hasattr(ctypes.CDLL(None), "mallinfo2")


@glibc
@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc before 2.33: no mallinfo2 to read the mapped bytes")
def test_a_steps_large_block_comes_from_the_heap_not_its_own_mapping():
    assert _mapped_bytes_of_a_block("default") >= 24 * 2**20  # the default, for contrast
    assert _mapped_bytes_of_a_block("keep") == 0


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
