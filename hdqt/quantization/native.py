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
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("kernels.c")
_API = Path(__file__).with_name("csrc") / "api.h"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hdqt" / "native"


def enabled() -> bool:
    return os.environ.get("HDQT_NATIVE", "1") != "0"


@functools.lru_cache(maxsize=1)  # the compiled library is immutable once loaded
def _compiled() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or not _SOURCE.exists():
        _say("no C compiler found (CC, cc or gcc): the engine runs on its pure-torch path, which computes "
             "the same quantities several times slower on CPU. Install gcc to get the native kernels, or set "
             "HDQT_NATIVE=0 to choose the torch path without this message.")
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
            _say(f"compiling the native CPU kernels with {compiler} (once per version of the kernels; "
                 f"10-30 s) into {target.parent}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                tmp_out = Path(tmp) / target.name
                cmd = [compiler, *flags, str(_SOURCE), "-o", str(tmp_out), "-lm"]
                errors = ""
                for extra in variants:
                    done = subprocess.run(cmd + extra, capture_output=True, text=True)
                    if done.returncode == 0:
                        break
                    errors = done.stderr
                else:
                    tail = "\n".join(errors.strip().splitlines()[-8:])
                    _say(f"the native kernels did not compile; the engine runs on its pure-torch path "
                         f"(slower on CPU). The compiler said:\n{tail}")
                    return None
                os.replace(tmp_out, target)  # atomic: concurrent first uses never see half a file
            lib = _declare(ctypes.CDLL(str(target)))  # ctypes releases the GIL during each call
            _say(f"native kernels ready: {describe_variant(lib.hdqt_kernel_variant())}")
            return lib
        return _declare(ctypes.CDLL(str(target)))
    except OSError as error:  # an unwritable cache folder or a library that does not load: use the torch path
        _say(f"the native kernels could not be built or loaded ({error}); the engine runs on its pure-torch path")
        return None


def _say(message: str) -> None:
    print(f"hdqt: {message}", file=sys.stderr, flush=True)


# C type in api.h -> ctypes type. Pointers to data travel as addresses (tensor.data_ptr()).
_C_TYPES = {
    "void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64,
    "float": ctypes.c_float, "double": ctypes.c_double, "float*": ctypes.c_void_p, "uint64_t*": ctypes.c_void_p,
    "uint32_t*": ctypes.c_void_p, "uint8_t*": ctypes.c_void_p,
    "double*": ctypes.POINTER(ctypes.c_double), "int*": ctypes.POINTER(ctypes.c_int),
}
_DECLARATION = re.compile(r"^([a-z0-9_]+\s*\*?)\s*(hdqt_[a-z0-9_]+)\s*\(([^)]*)\)\s*;", re.M)


def api_declarations(header: Path = _API) -> dict[str, tuple[object, list[object]]]:
    """name -> (ctypes result type, ctypes argument types), read from csrc/api.h, the
    declarations that kernels.c also compiles against (so the two cannot disagree)."""
    text = re.sub(r"/\*.*?\*/", " ", header.read_text(), flags=re.S)
    declarations = {}
    for result, name, params in _DECLARATION.findall(text):
        types = [] if params.strip() == "void" else [_c_type(p, name) for p in params.split(",")]
        declarations[name] = (_c_type(result, name, named=False), types)
    return declarations


def _c_type(declaration: str, function: str, named: bool = True) -> object:
    words = declaration.replace("*", " * ").split()
    if named:
        words = words[:-1]  # the parameter's name
    words = [w for w in words if w != "const"]
    key = words[0] + ("*" if "*" in words else "")
    if key not in _C_TYPES or len([w for w in words if w != "*"]) != 1:
        raise ValueError(f"{_API.name}: {function}: cannot map the C type {declaration.strip()!r} to ctypes")
    return _C_TYPES[key]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (result, arguments) in api_declarations().items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


_VARIANT_BITS = ((1, "x86-64-v4 (AVX-512)"), (2, "x86-64-v3 (AVX2, FMA)"), (32, "aarch64 (NEON)"),
                 (4, "int8 dot products (AVX512-VNNI)"), (64, "int8 dot products (AVX-VNNI)"),
                 (128, "int8 dot products (AVX2 vpmaddubsw)"), (256, "int8 dot products (ARM sdot)"),
                 (8, "narrow register blocks"), (16, "OpenMP threads"))
_INT8_BITS = 4 | 64 | 128 | 256


def describe_variant(bits: int) -> str:
    """The kernel variant bits of ``hdqt_kernel_variant`` in words."""
    names = [name for bit, name in _VARIANT_BITS if bits & bit]
    if not bits & (1 | 2 | 32):
        names.insert(0, "baseline (no vector clones)")
    if not bits & _INT8_BITS:
        names.append("float32 products (no int8 dot products)")
    return ", ".join(names)


def kernel_variant() -> str:
    """Which kernels this process runs, in words: the native variant, or why the torch path."""
    if not enabled():
        return "pure-torch path (HDQT_NATIVE=0)"
    lib = load()
    if lib is None:
        return "pure-torch path (the native kernels are not available: see the message above)"
    return "native: " + describe_variant(lib.hdqt_kernel_variant())


def load() -> ctypes.CDLL | None:
    return _compiled() if enabled() else None


# The int8 dot-product variants, by the id the kernels use (csrc/int8_variant.h), in
# order of preference, with what each needs.
INT8_VARIANTS = {"avx512vnni": 1, "avxvnni": 2, "avx2": 3, "sdot": 4}
_INT8_NEEDS = {"avx512vnni": "an x86-64 CPU with AVX512-VNNI", "avxvnni": "an x86-64 CPU with AVX-VNNI (and AVX2)",
               "avx2": "an x86-64 CPU with AVX2 and FMA", "sdot": "an aarch64 CPU with the dot product (ARMv8.2 sdot)"}


def int8_request() -> str:
    """What ``HDQT_INT8`` asks for: "0" (no int8 dot products), "auto" (unset, "1" or
    "auto": the preferred variant this CPU runs) or a variant's name."""
    value = os.environ.get("HDQT_INT8", "auto").strip().lower() or "auto"
    value = "auto" if value == "1" else value
    if value not in ("0", "auto", *INT8_VARIANTS):
        raise ValueError(f"HDQT_INT8={value!r}: expected 0, 1, auto or one of {', '.join(INT8_VARIANTS)}")
    return value


def int8_dot(lib: ctypes.CDLL) -> bool:
    """Whether the tiled product may run on 8-bit integer dot products (a variant this
    CPU runs, and not switched off with ``HDQT_INT8=0``). A variant forced with
    ``HDQT_INT8=<name>`` that this CPU cannot run is never used: the kernels take the
    preferred one instead, and this says so once."""
    request = int8_request()
    if request == "0" or not _int8_available(lib):
        return False
    if request != "auto":
        _check_forced(lib, request)
    return True


def int8_variants(lib: ctypes.CDLL) -> list[str]:
    """The int8 variants this build runs on this CPU, preferred first."""
    bits = lib.hdqt_int8_variants()
    return [name for name, v in INT8_VARIANTS.items() if bits >> v & 1]


def int8_variant(lib: ctypes.CDLL) -> str | None:
    """The int8 variant a product uses now (``HDQT_INT8`` applied), or None."""
    int8_request()  # a misspelt name is an error here too
    ids = {v: name for name, v in INT8_VARIANTS.items()}
    return ids.get(lib.hdqt_int8_variant())


@functools.lru_cache(maxsize=16)  # once per library and forced name
def _check_forced(lib: ctypes.CDLL, request: str) -> None:
    runs = int8_variants(lib)
    if request not in runs:
        _say(f"HDQT_INT8={request} needs {_INT8_NEEDS[request]}; this machine runs "
             f"{', '.join(runs) or 'no int8 variant'}: the int8 products use {runs[0] if runs else 'none'} instead")


@functools.lru_cache(maxsize=4)  # a property of the loaded library on this CPU
def _int8_available(lib: ctypes.CDLL) -> bool:
    return bool(lib.hdqt_int8_dot_available())


def threads() -> int:
    """Threads for one kernel call: torch's intra-op setting, so both follow the user's choice."""
    return torch.get_num_threads()


def usable(tensor: torch.Tensor) -> bool:
    """True when the kernels can work on ``tensor`` directly (CPU float32)."""
    return tensor.is_cpu and tensor.dtype is torch.float32  # asked at every kernel call: the cheapest spelling


def dense_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation under which ``tensor`` is contiguous (for example (1, 0) for the
    transpose of a contiguous matrix), or None. An elementwise kernel can then run
    over its memory in order, with no copy."""
    if tensor.is_contiguous():  # the common case, without the sort (a few us a call)
        return tuple(range(tensor.dim()))
    order = tuple(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    return order if tensor.permute(order).is_contiguous() else None
