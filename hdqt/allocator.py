"""Keep freed memory in the process instead of handing it back to the OS after every step.

A quantized training step allocates and frees several large temporaries (a conv
layer's quantized input, its Hadamard-domain gradient, their codes: 8 MB each at
batch 128 for 16 channels of 32x32). glibc's malloc returns such blocks to the
kernel when they are freed (through ``munmap``, or by trimming the top of its heap
once more than ``M_TRIM_THRESHOLD`` is free there), so the next step touches fresh
pages and pays a page fault for each 4 KB of them (the README's Performance
section has the measured cost: ``bench_engine.py --keep-freed-memory``).

``keep_freed_memory()`` raises both of glibc's thresholds, which is what
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` do when set before a process
starts, the same remedy as the jemalloc / tcmalloc preload that PyTorch's CPU
performance guide recommends. It changes a setting of the whole process (the
resident size stays at the step's peak instead of falling between steps), so the
library never calls it on its own: the ``hdqt`` command does, once at start
(``HDQT_KEEP_FREED_MEMORY=0`` opts out), and a script that trains through the API
may.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Largest value glibc accepts for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2):
# blocks up to this size come from the heap, larger ones are still mapped on their own.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30  # free memory at the heap's top kept before trimming


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD, mmap_threshold: int = MMAP_THRESHOLD,
                      children: bool = True) -> str:
    """Ask glibc's malloc to keep up to ``trim_threshold`` bytes of freed memory and to
    serve blocks up to ``mmap_threshold`` bytes from its heap. With ``children``, also
    set ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` in ``os.environ``, so that
    worker processes started afterwards (a grid's) behave alike.

    Returns what it did, in words; raises ``ValueError`` for a threshold that is not a
    positive int. On a C library other than glibc nothing changes (the message says so).
    """
    for name, value in (("trim_threshold", trim_threshold), ("mmap_threshold", mmap_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise ValueError(f"keep_freed_memory: {name} must be a positive int below 2**31 bytes, got {value!r}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return "freed memory: the C library's default (not glibc: no mallopt)"
    if not (mallopt(_M_TRIM_THRESHOLD, trim_threshold) and mallopt(_M_MMAP_THRESHOLD, mmap_threshold)):
        return "freed memory: the C library's default (glibc refused the thresholds)"
    if children:
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(trim_threshold)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return (f"freed memory: kept up to {trim_threshold / 2**20:g} MiB, blocks up to "
            f"{mmap_threshold / 2**20:g} MiB from the heap (glibc mallopt)")


def keep_freed_memory_requested() -> bool:
    """Whether the ``hdqt`` command should call ``keep_freed_memory`` (``HDQT_KEEP_FREED_MEMORY``
    unset or not ``0``)."""
    return os.environ.get("HDQT_KEEP_FREED_MEMORY", "1").strip() != "0"


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only (musl lacks it)
            return None
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
