"""The bit-packed binary product on the native kernels (``csrc/binary.c``).

``product(a, a_betas, b, b_betas, group)`` packs the signs of a's and b's rows (bit 1 =
negative, 64 a word, rows padded with zero words to a multiple of 8 words so the
vector loops need no tail) and sums, per pair of rows and group,
``beta_a * beta_b * (K_g - 2 * popcount(a XOR b))``. It returns None where the
kernel does not apply (not CPU float32, no native library, HDQT_BINARY=torch): the
caller then multiplies the dequantized operands.

Variants (``HDQT_BINARY``): ``auto`` (default: the best this CPU runs), ``avx512``
(AVX-512 F with VPOPCNTDQ), ``avx2`` (nibble-table popcount with vpshufb), ``neon``
(vcntq_u8, aarch64), ``portable`` (C with __builtin_popcountll), ``torch`` (the
float path). Forcing a variant this CPU or build cannot run is an error, never a
crash. The variants differ in the one-beta-per-row product; with groups, the
product is the portable C loop (compiled for the CPU's popcount instruction) for
every variant, since it spends its time in the per-group float multiply-adds.
"""
from __future__ import annotations

import os

import torch

from hdqt.quantization import native

VARIANTS = ("auto", "portable", "avx2", "avx512", "neon", "torch")
_CODES = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3, "neon": 4}
_NAMES = {code: name for name, code in _CODES.items()}
WORD_BLOCK = 8  # rows are padded to a multiple of 8 words (one AVX-512 register)


def requested() -> str:
    value = os.environ.get("HDQT_BINARY", "auto").strip().lower() or "auto"
    if value not in VARIANTS:
        raise ValueError(f"HDQT_BINARY must be one of {', '.join(VARIANTS)}, got {value!r}")
    return value


def _lib():
    lib = native.load()
    return lib if lib is not None and hasattr(lib, "hdqt_binary_matmul_f32") else None


def available() -> list[str]:
    """The variants this build and CPU run (``portable`` first), torch always last."""
    lib = _lib()
    found = [] if lib is None else [name for name, code in _CODES.items()
                                    if code and lib.hdqt_binary_variant(code) == code]
    return found + ["torch"]


def variant() -> str:
    """The variant that ``product`` runs now (HDQT_BINARY resolved on this CPU)."""
    want = requested()
    if want == "torch":
        return "torch"
    lib = _lib()
    if lib is None:
        if want != "auto":
            raise RuntimeError(f"HDQT_BINARY={want}: the native kernels are not available (see native.kernel_variant())")
        return "torch"
    code = lib.hdqt_binary_variant(_CODES[want])
    if code < 0:
        raise RuntimeError(f"HDQT_BINARY={want}: this CPU or build cannot run it; it runs: "
                           f"{', '.join(available())}")
    return _NAMES[code]


def words_for(k: int) -> int:
    """64-bit words a packed row of ``k`` signs takes, padded to WORD_BLOCK."""
    words = -(-k // 64)
    return -(-words // WORD_BLOCK) * WORD_BLOCK


def pack(t: torch.Tensor) -> torch.Tensor:
    """The signs of ``t``'s rows along its last dimension, packed: (rows, words) int64
    (bit i of word w: element 64 w + i is negative). ``t`` is (R, K) or (B, L, K) with
    any strides (an im2col matrix's transposed view packs without a copy)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("pack needs the native kernels")
    t3 = t.reshape(1, *t.shape) if t.dim() == 2 else t
    if t3.dim() != 3 or t3.dtype != torch.float32 or t3.device.type != "cpu":
        raise ValueError(f"pack takes a CPU float32 tensor (R, K) or (B, L, K), got {tuple(t.shape)} {t.dtype}")
    outer, inner, k = t3.shape
    words = words_for(k)
    bits = torch.empty(outer * inner, words, dtype=torch.int64)
    so, si, sk = t3.stride()
    lib.hdqt_binary_pack_f32(t3.data_ptr(), outer, inner, k, so, si, sk, bits.data_ptr(), words, native.threads())
    return bits


def product(a: torch.Tensor, a_betas: torch.Tensor, b: torch.Tensor, b_betas: torch.Tensor,
            group: int | None) -> torch.Tensor | None:
    """a (M, K) or (B, L, K), b (J, K): the binary product (..., J), or None (module docstring)."""
    if not (native.usable(a) and native.usable(b)) or requested() == "torch":
        return None
    lib = _lib()
    if lib is None:
        return None
    code = lib.hdqt_binary_variant(_CODES[requested()])
    if code < 0:
        variant()  # raises the error that names what this CPU runs
    k = a.shape[-1]
    lead = a.shape[:-1]
    a_bits, b_bits = pack(a), pack(b)
    m, j = a_bits.shape[0], b_bits.shape[0]
    a_betas = a_betas.detach().reshape(m, -1).contiguous()
    b_betas = b_betas.detach().reshape(j, -1).contiguous()
    y = torch.empty(m, j, dtype=torch.float32)
    lib.hdqt_binary_matmul_f32(a_bits.data_ptr(), a_betas.data_ptr(), m, b_bits.data_ptr(), b_betas.data_ptr(), j,
                               k, a_bits.shape[1], 0 if group is None or group >= k else group, y.data_ptr(), code,
                               native.threads())
    return y.reshape(*lead, j)
