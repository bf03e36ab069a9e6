"""Optional native CPU kernels (``kernels.c``), compiled on first use with the
system C compiler and loaded with ctypes.

Where no compiler is found, the compile fails, or ``HDQT_NATIVE=0`` is set,
``load()`` returns None and the engine uses its pure-torch path, which computes
the same quantities (stochastic rounding draws its noise from torch instead).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("kernels.c")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hdqt" / "native"


def enabled() -> bool:
    return os.environ.get("HDQT_NATIVE", "1") != "0"


@functools.lru_cache(maxsize=1)  # the compiled library is immutable once loaded
def _compiled() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or not _SOURCE.exists():
        return None
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]
    # Preferred build first: OpenMP (whose libgomp.so.1 resolves to the copy torch has
    # loaded, so kernels share torch's threads instead of competing with them) and
    # per-ISA clones; then without whichever the compiler lacks.
    variants = (["-fopenmp"], [], ["-fopenmp", "-DHDQT_NO_CLONES"], ["-DHDQT_NO_CLONES"])
    sources = [_SOURCE, *sorted(_SOURCE.with_name("csrc").glob("*"))]  # kernels.c includes csrc/*
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + repr((flags, variants)).encode())
    digest = digest.hexdigest()[:16]
    target = _cache_dir() / f"hdqt_kernels_{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                tmp_out = Path(tmp) / target.name
                cmd = [compiler, *flags, str(_SOURCE), "-o", str(tmp_out), "-lm"]
                if not any(subprocess.run(cmd + extra, capture_output=True).returncode == 0 for extra in variants):
                    return None
                os.replace(tmp_out, target)  # atomic: concurrent first uses never see half a file
        lib = ctypes.CDLL(str(target))  # ctypes releases the GIL during each call
    except OSError:  # an unwritable cache folder or a library that does not load: use the torch path
        return None
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.hdqt_sr_quantize_f32.argtypes = [ptr, ptr, i64, f32, f32, f32, ctypes.c_uint64, i32]
    lib.hdqt_sr_quantize_f32.restype = None
    lib.hdqt_rtn_quantize_f32.argtypes = [ptr, ptr, i64, f32, f32, f32, i32]
    lib.hdqt_rtn_quantize_f32.restype = None
    lib.hdqt_quantize_f32.argtypes = [ptr, ptr, i64, i32, i32, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                                      ctypes.c_uint64, ctypes.POINTER(ctypes.c_double), i32]
    lib.hdqt_quantize_f32.restype = i32
    lib.hdqt_fwht_rows_f32.argtypes = [ptr, i64, i64, i64, i32]
    lib.hdqt_fwht_rows_f32.restype = f32
    lib.hdqt_im2col_fwht_f32.argtypes = [ptr, ptr] + [i64] * 16 + [i32]
    lib.hdqt_im2col_fwht_f32.restype = f32
    lib.hdqt_tiled_matmul_f32.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, f32, i32]
    lib.hdqt_tiled_matmul_f32.restype = None
    lib.hdqt_tiled_matmul_i8.argtypes = [ptr, i64, i64, ptr, i32, ptr, i64, i64, i64, i64, f32, i32]
    lib.hdqt_tiled_matmul_i8.restype = i32
    lib.hdqt_int8_dot_available.argtypes = []
    lib.hdqt_int8_dot_available.restype = i32
    lib.hdqt_conv_tiled_f32.argtypes = [ptr, ptr, ptr] + [i64] * 16 + [f32, i32]
    lib.hdqt_conv_tiled_f32.restype = i32
    lib.hdqt_conv_tiled_i8.argtypes = [ptr, ptr, ptr] + [i64] * 16 + [f32, i32]
    lib.hdqt_conv_tiled_i8.restype = i32
    lib.hdqt_conv_cols_amax_f32.argtypes = [ptr] + [i64] * 15 + [i32]
    lib.hdqt_conv_cols_amax_f32.restype = f32
    lib.hdqt_conv_dw_sr_f32.argtypes = [ptr, ptr, ptr] + [i64] * 16 + [f32, f32, f32, ctypes.c_uint64, i32, i32]
    lib.hdqt_conv_dw_sr_f32.restype = i32
    return lib


def load() -> ctypes.CDLL | None:
    return _compiled() if enabled() else None


def int8_dot(lib: ctypes.CDLL) -> bool:
    """Whether the tiled product may run on 8-bit integer dot products (AVX512-VNNI on
    this CPU, and not switched off with ``HDQT_INT8=0``)."""
    return os.environ.get("HDQT_INT8", "1") != "0" and _int8_available(lib)


@functools.lru_cache(maxsize=4)  # a property of the loaded library on this CPU
def _int8_available(lib: ctypes.CDLL) -> bool:
    return bool(lib.hdqt_int8_dot_available())


def threads() -> int:
    """Threads for one kernel call: torch's intra-op setting, so both follow the user's choice."""
    return torch.get_num_threads()


def usable(tensor: torch.Tensor) -> bool:
    """True when the kernels can work on ``tensor`` directly (CPU float32)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32


def dense_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation under which ``tensor`` is contiguous (for example (1, 0) for the
    transpose of a contiguous matrix), or None. An elementwise kernel can then run
    over its memory in order, with no copy."""
    order = tuple(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    return order if tensor.permute(order).is_contiguous() else None
