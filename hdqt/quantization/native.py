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
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = _cache_dir() / f"hdqt_kernels_{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tmp_out = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-fPIC", "-shared", str(_SOURCE), "-o", str(tmp_out), "-lm"]
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                return None
            os.replace(tmp_out, target)  # atomic: concurrent first uses never see half a file
    lib = ctypes.CDLL(str(target))
    lib.hdqt_sr_quantize_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                         ctypes.c_float, ctypes.c_float, ctypes.c_uint64]
    lib.hdqt_sr_quantize_f32.restype = None
    lib.hdqt_fwht_rows_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.hdqt_fwht_rows_f32.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    return _compiled() if enabled() else None
