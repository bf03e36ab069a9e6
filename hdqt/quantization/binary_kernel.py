"""The bit-packed binary product on the native kernels (``csrc/binary.c``).

``product(a, a_betas, b, b_betas, group)`` packs the signs of a's and b's rows (bit 1 =
not positive, i.e. sign(0) = -1; 64 a word, the last word's unused bits 0) and sums, per
pair of rows and group, ``beta_a * beta_b * (K_g - 2 * popcount(a XOR b))``. It returns
None where the kernel does not apply (not CPU float32, no native library,
HDQT_BINARY=torch): the caller then multiplies the dequantized operands. The layers
call its parts: ``pack_with_betas`` (signs and betas in one read of a float tensor),
``pack_conv_with_betas`` (a convolution's im2col rows read straight from its input) and
``product_packed``.

Variants (``HDQT_BINARY``): ``auto`` (default: the best this CPU runs), ``avx512``
(AVX-512 F with VPOPCNTDQ), ``avx2`` (nibble-table popcount with vpshufb), ``neon``
(vcntq_u8, aarch64), ``portable`` (C with __builtin_popcountll), ``torch`` (the
float path). Forcing a variant this CPU or build cannot run is an error, never a
crash. With groups, the product spends its time in a float multiply-add per group
and pair: ``avx512`` runs 16 pairs a register and ``avx2`` 8 (b's 32-bit words and
betas transposed first, ``_transposed``), the other variants a portable loop per pair.
"""
from __future__ import annotations

import os

import torch

from hdqt.quantization import native

VARIANTS = ("auto", "portable", "avx2", "avx512", "neon", "torch")
_CODES = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3, "neon": 4}
_NAMES = {code: name for name, code in _CODES.items()}


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
    """64-bit words a packed row of ``k`` signs takes."""
    return -(-k // 64)


def _rows3(t: torch.Tensor, what: str) -> torch.Tensor:
    t3 = t.reshape(1, *t.shape) if t.dim() == 2 else t
    if t3.dim() != 3 or t3.dtype != torch.float32 or t3.device.type != "cpu":
        raise ValueError(f"{what} takes a CPU float32 tensor (R, K) or (B, L, K), got {tuple(t.shape)} {t.dtype}")
    return t3


def pack(t: torch.Tensor) -> torch.Tensor:
    """The signs of ``t``'s rows along its last dimension, packed: (rows, words) int64
    (bit i of word w: element 64 w + i is not positive, sign(0) = -1). ``t`` is (R, K) or
    (B, L, K) with any strides (an im2col matrix's transposed view packs without a copy)."""
    return pack_with_betas(t, None, betas=False)[0]


def pack_with_betas(t: torch.Tensor, group: int | None, betas: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(packed signs as ``pack``, betas (..., G) as ``binarize.group_betas``) in one read
    of ``t``. The betas are summed in float64 and rounded once to float32 (the float64
    formula rounded; torch's float32 sums can differ from it in the last bits)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("pack needs the native kernels")
    t3 = _rows3(t, "pack")
    outer, inner, k = t3.shape
    words = words_for(k)
    bits = torch.empty(outer * inner, words, dtype=torch.int64)
    so, si, sk = t3.stride()
    g = 0 if group is None or group >= k else group
    out = torch.empty(*t.shape[:-1], 1 if g == 0 else -(-k // g), dtype=torch.float32) if betas else None
    code = lib.hdqt_binary_variant(_CODES["portable" if requested() == "torch" else requested()])
    lib.hdqt_binary_pack_betas_f32(t3.data_ptr(), outer, inner, k, so, si, sk, g, bits.data_ptr(), words,
                                   0 if out is None else out.data_ptr(), max(code, 1), native.threads())
    return bits, out


def pack_conv_with_betas(x: torch.Tensor, kernel, stride, padding, dilation, group: int | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_with_betas`` of a convolution's im2col rows, (B, L, K) with L = OH * OW and K =
    C * kh * kw in the weight's order, read straight from ``x`` (B, C, H, W) (padding: zeros)
    without the column matrix: bits (B * L, words), betas (B, L, G)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("pack_conv_with_betas needs the native kernels")
    if x.dim() != 4 or not native.usable(x):
        raise ValueError(f"pack_conv_with_betas takes a CPU float32 (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    x = x.contiguous()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    b, c, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    k = c * kh * kw
    g = 0 if group is None or group >= k else group
    words = words_for(k)
    bits = torch.empty(b * oh * ow, words, dtype=torch.int64)
    betas = torch.empty(b, oh * ow, 1 if g == 0 else -(-k // g), dtype=torch.float32)
    lib.hdqt_binary_pack_conv_f32(x.data_ptr(), b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, g, bits.data_ptr(),
                                  words, betas.data_ptr(), native.threads())
    return bits, betas


def _transposed(bits: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """b's packed rows as 32-bit words transposed, (words32, jp), and its betas (G, jp),
    jp = J padded to a multiple of 16 (one AVX-512 register of rows, two of AVX2)."""
    j = bits.shape[0]
    jp = -(-j // 16) * 16
    words32 = bits.view(torch.int32)  # little-endian: word 2w holds elements 64w..64w+31
    bt = torch.zeros(words32.shape[1], jp, dtype=torch.int32)
    bt[:, :j] = words32.T
    bbt = torch.zeros(betas.shape[1], jp, dtype=torch.float32)
    bbt[:, :j] = betas.T
    return bt, bbt, jp


def applies(*tensors: torch.Tensor) -> bool:
    """True when ``product``/``product_packed`` run the kernel on these operands (else the
    caller multiplies the dequantized operands); raises when HDQT_BINARY forces a variant
    this CPU cannot run."""
    if not all(native.usable(t) for t in tensors) or requested() == "torch" or _lib() is None:
        return False
    variant()  # raises the error that names what this CPU runs
    return True


def product(a: torch.Tensor, a_betas: torch.Tensor, b: torch.Tensor, b_betas: torch.Tensor,
            group: int | None) -> torch.Tensor | None:
    """a (M, K) or (B, L, K), b (J, K): the binary product (..., J), or None (module docstring)."""
    if not applies(a, b):
        return None
    y = product_packed(pack(a), a_betas, pack(b), b_betas, a.shape[-1], group)
    return y.reshape(*a.shape[:-1], b.shape[0])


def product_packed(a_bits: torch.Tensor, a_betas: torch.Tensor, b_bits: torch.Tensor, b_betas: torch.Tensor,
                   k: int, group: int | None) -> torch.Tensor:
    """(M, J) from operands packed by ``pack``/``pack_with_betas`` (rows of ``k`` signs)."""
    lib = _lib()
    code = lib.hdqt_binary_variant(_CODES[requested()])
    if code < 0:
        variant()
    m, j = a_bits.shape[0], b_bits.shape[0]
    a_betas = a_betas.detach().reshape(m, -1).contiguous()
    b_betas = b_betas.detach().reshape(j, -1).contiguous()
    y = torch.empty(m, j, dtype=torch.float32)
    group = 0 if group is None or group >= k else group
    if group and code in (_CODES["avx512"], _CODES["avx2"]):
        bt, bbt, jp = _transposed(b_bits, b_betas)
        if lib.hdqt_binary_matmul_groups_f32(a_bits.data_ptr(), a_betas.data_ptr(), m, 2 * a_bits.shape[1],
                                             bt.data_ptr(), bbt.data_ptr(), j, jp, k, group, y.data_ptr(),
                                             code, native.threads()) == 0:
            return y  # else (an AVX2 CPU without FMA) the loop per pair below
    lib.hdqt_binary_matmul_f32(a_bits.data_ptr(), a_betas.data_ptr(), m, b_bits.data_ptr(), b_betas.data_ptr(), j,
                               k, a_bits.shape[1], group, y.data_ptr(), code, native.threads())
    return y
