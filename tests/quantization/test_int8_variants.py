"""Every int8 dot-product variant this CPU runs (AVX512-VNNI, AVX-VNNI, AVX2, ARM sdot)
against the float32 kernels, bit for bit: the tiled product (both layouts of B, signed
and unsigned B, odd sizes, tiles, saturation at small accumulators and its counts) and
the conv forward. Each test's id names the variant (forced with ``HDQT_INT8``); a
variant this CPU lacks skips, saying so."""
import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import hdqt
from hdqt.quantization import int_quantizer, native
from hdqt.quantization.im2col import ConvGeometry

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler: only the torch path exists here")

KERNEL_BITS = {"avx512vnni": 4, "avxvnni": 64, "avx2": 128, "sdot": 256}


@pytest.fixture(params=list(native.INT8_VARIANTS))
def variant(request, monkeypatch):
    """The variant under test, forced; skips where this build or CPU cannot run it."""
    name = request.param
    lib = native.load()
    if name not in native.int8_variants(lib):
        pytest.skip(f"int8 variant {name}: needs {native._INT8_NEEDS[name]}, which this machine is not "
                    f"(it runs: {', '.join(native.int8_variants(lib)) or 'none'})")
    monkeypatch.setenv("HDQT_INT8", name)
    # the kernels run the forced variant (not a fallback), and say so
    assert lib.hdqt_int8_variant() == native.INT8_VARIANTS[name], name
    assert lib.hdqt_kernel_variant() & KERNEL_BITS[name], name
    return name


def _declines(variant: str, a_top: int, b_byte_top: int) -> bool:
    """Whether the variant must decline (status 1) operands with max|A| = a_top and
    largest packed byte of B b_byte_top: AVX2's 16-bit pair sums could saturate."""
    return variant == "avx2" and 2 * a_top * b_byte_top > 32767


def _products(a, b, tile, limit, threads):
    """(status, Y, counts) of the int8 kernel for B as (K, J) and as (J, K), and (Y,
    counts) of the float32 kernel; the int8 kernel's outputs start at -1."""
    lib = native.load()
    m, k = a.shape
    j = b.shape[1]
    results = []
    for transposed, dense in ((0, b.contiguous()), (1, b.T.contiguous())):
        y, counts = torch.full((m, j), -1.0), (ctypes.c_double * 2)(-1.0, -1.0)
        status = lib.hdqt_tiled_matmul_i8(a.data_ptr(), a.stride(0), a.stride(1), dense.data_ptr(), transposed,
                                          y.data_ptr(), m, k, j, tile, limit, counts, threads)
        results.append((status, y, tuple(counts)))
    y, counts = torch.empty(m, j), (ctypes.c_double * 2)()
    b = b.contiguous()
    lib.hdqt_tiled_matmul_f32(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), y.data_ptr(), m, k, j, tile,
                              limit, counts, threads)
    return results, (y, tuple(counts))


# (A range, B range): 4-bit codes as the recipes make them, and full bytes
# ((-30, 31), (0, 256)) and ((-8, 9), (-128, 128)): AVX2 adds 2 and 8 groups' pair sums
# in int16 before widening (32767 // (2 * 30 * 255), 32767 // (2 * 8 * 255)).
RANGES = [((-7, 8), (0, 16)), ((-8, 8), (-7, 8)), ((-128, 128), (0, 256)), ((-128, 128), (-128, 128)),
          ((-64, 65), (-128, 128)), ((-30, 31), (0, 256)), ((-8, 9), (-128, 128))]
SHAPES = [(33, 130, 47, 32, 8), (8, 37, 16, 7, 12), (1, 5, 1, 3, 8), (17, 64, 100, 1, 8), (9, 405, 20, 32, 16),
          (5, 3, 21, 32, 4), (130, 405, 19, 32, 8), (6, 300, 18, 256, 16)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("a_range,b_range", RANGES, ids=lambda r: f"{r[0]}..{r[1] - 1}")
@pytest.mark.parametrize("m,k,j,tile,acc_bits", SHAPES, ids=lambda v: str(v))
def test_product_equals_float_kernel_bit_for_bit(variant, a_range, b_range, m, k, j, tile, acc_bits, threads):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randint(*a_range, (m, k), generator=gen).float()
    b = torch.randint(*b_range, (k, j), generator=gen).float()
    a[0, 0], b[0, 0] = a_range[0], b_range[1] - 1  # the extremes, for the bound checks
    b[-1, -1] = b_range[0]
    limit = float(2 ** (acc_bits - 1) - 1)
    a_top = max(-a_range[0], a_range[1] - 1)
    # the x86 packing: a signed B offset by -min(B) on AVX2, by +128 on the others
    b_byte_top = b_range[1] - 1 + ((-b_range[0] if variant == "avx2" else 128) if b_range[0] < 0 else 0)
    for operand in (a, a.T.contiguous().T):  # rows of A contiguous, or read through strides
        int8_runs, (y_f32, counts_f32) = _products(operand, b, tile, limit, threads)
        for layout, (status, y, counts) in zip(("B (K, J)", "B (J, K)"), int8_runs):
            if _declines(variant, a_top, b_byte_top):
                assert status == 1, f"{variant}, {layout}: pair sums could saturate int16, yet it ran"
                assert (y == -1).all(), f"{variant}, {layout}: declined but wrote"
                continue
            assert status == 0, f"{variant}, {layout}: bytes that fit, yet status {status}"
            assert torch.equal(y, y_f32), f"{variant}, {layout}: differs from the float32 kernel"
            assert counts == counts_f32, f"{variant}, {layout}: saturation counts {counts} != {counts_f32}"
    assert acc_bits > 8 or tile == 1 or k < 8 or counts_f32[0] > 0 or a_top < 8  # small accumulators saturate


def test_avx2_is_exact_at_the_edge_of_int16(variant):
    """The largest pair sums AVX2 accepts (2 * 64 * 255 = 32640) are still exact, and one
    step beyond (|A| = 65) is declined: the bound is where the arithmetic says. (With
    one pair sum at the bound, AVX2 widens every group on its own: pair_groups = 1.)"""
    lib = native.load()
    k, j = 96, 17
    for a_value, b_value in ((-64.0, 127.0), (64.0, 127.0), (-64.0, -128.0), (64.0, -128.0)):
        a, b = torch.full((3, k), a_value), torch.full((k, j), b_value)
        b[0, 0] = -128.0 if b_value > 0 else 127.0  # signed B from -128: 127 is the byte 255
        (runs, (y_f32, counts_f32)) = _products(a, b, 32, float(2**31 - 1), 1)
        for status, y, counts in runs:
            assert status == 0 and torch.equal(y, y_f32) and counts == counts_f32, (variant, a_value, b_value)
    a, b = torch.full((3, k), 65.0), torch.full((k, j), 127.0)
    b[0, 0] = -128.0
    status = _products(a, b, 32, float(2**31 - 1), 1)[0][0][0]
    assert status == (1 if variant == "avx2" else 0), variant
    assert lib.hdqt_int8_variant() == native.INT8_VARIANTS[variant]


# (batch, channels, H, W, out channels, kernel, stride, padding, dilation, tile)
CONV_CASES = [
    (3, 16, 32, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1), 32),
    (2, 3, 7, 11, 20, (3, 2), (1, 1), (2, 0), (1, 2), 7),
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), 32),
    (4, 64, 8, 8, 9, (3, 3), (1, 1), (1, 1), (1, 1), 32),
    (2, 3, 17, 17, 9, (5, 5), (1, 1), (2, 2), (1, 1), 10),
    (2, 4, 6, 40, 3, (1, 3), (1, 1), (0, 1), (1, 1), 5),  # runs of 16 positions cross output rows
    (2, 3, 13, 21, 5, (3, 3), (2, 1), (1, 2), (2, 2), 9),  # row stride 2 and dilation
    (1, 2, 5, 6, 3, (3, 3), (1, 1), (3, 3), (1, 1), 4),  # padding wider than the kernel
    (2, 5, 9, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), 32),  # width stride 2: every variant declines
]


@pytest.mark.parametrize("x_range", [(0, 16), (-7, 8), (0, 256), (-128, 128)], ids=lambda r: f"x{r[0]}..{r[1] - 1}")
@pytest.mark.parametrize("acc_bits", [8, 16])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5]}s{c[6]}")
def test_conv_equals_float_kernel_bit_for_bit(variant, case, x_range, acc_bits):
    b, c, h, w, n, kernel, stride, padding, dilation, tile = case
    gen = torch.Generator().manual_seed(b * 100 + c)
    x = torch.randint(*x_range, (b, c, h, w), generator=gen).float()
    weight = torch.randint(-7, 8, (n, c, *kernel), generator=gen).float()
    geo = ConvGeometry.of(x, kernel, stride, padding, dilation)
    wt = weight.reshape(n, -1).T.contiguous()
    lib, limit = native.load(), float(2 ** (acc_bits - 1) - 1)
    outs, counts = {}, {}
    for kernel_fn in ("hdqt_conv_tiled_i8", "hdqt_conv_tiled_f32"):
        outs[kernel_fn] = torch.full((b, n, geo.out_h, geo.out_w), -1.0)
        counts[kernel_fn] = (ctypes.c_double * 2)(-1.0, -1.0)
        status = getattr(lib, kernel_fn)(x.data_ptr(), wt.data_ptr(), outs[kernel_fn].data_ptr(),
                                         *geo.native_args(), n, tile, limit, counts[kernel_fn], 2)
        if kernel_fn.endswith("f32"):
            assert status == 0
        elif stride[1] != 1:
            assert status == 1 and (outs[kernel_fn] == -1).all(), f"{variant}: width stride 2 must decline"
        else:  # 4-bit weights times bytes: every variant runs (AVX2: 2 * 7 * 255 < 32767)
            assert status == 0, f"{variant}: status {status}"
    if stride[1] == 1:
        assert torch.equal(outs["hdqt_conv_tiled_i8"], outs["hdqt_conv_tiled_f32"]), variant
        assert tuple(counts["hdqt_conv_tiled_i8"]) == tuple(counts["hdqt_conv_tiled_f32"]), variant


@pytest.mark.parametrize("g_range", [(-7, 8), (-128, 128)], ids=lambda r: f"g{r[0]}..{r[1] - 1}")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CONV_CASES[:3] + CONV_CASES[4:6] + CONV_CASES[-1:],
                         ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5]}s{c[6]}")
def test_conv_weight_gradient_multiply_equals_float_kernel(variant, case, bits, g_range):
    """The fused conv dW multiplies bytes on the x86 variants (AVX2: columns of up to 7
    bits, so that its pair sums cannot saturate) with the float32 kernel's result, also
    with the gradient's byte extremes."""
    b, c, h, w, n, kernel, stride, padding, dilation, _ = case
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 16, (b, c, h, w), generator=gen).float()
    geo = ConvGeometry.of(x, kernel, stride, padding, dilation)
    g = torch.randint(*g_range, (n, b, geo.out_h * geo.out_w), generator=gen).float()
    g.view(-1)[0], g.view(-1)[-1] = g_range[0], g_range[1] - 1
    lib, block = native.load(), 1
    amax = lib.hdqt_conv_cols_amax_f32(x.data_ptr(), *geo.native_args(), block, 1, 2)
    scale, qmin, qmax = int_quantizer(bits, rounding="stochastic").grid(amax, -amax)
    results, samples = [], []
    for use_int8 in (1, 0):
        dw = torch.empty(n, geo.k)
        samples.append(lib.hdqt_conv_dw_sr_f32(x.data_ptr(), g.data_ptr(), dw.data_ptr(), n, *geo.native_args(),
                                               block, scale, qmin, qmax, 1234, use_int8, 1, 2))
        results.append(dw)
    kernel_rows = 4 * kernel[0] * kernel[1] // math.gcd(4, kernel[0] * kernel[1])
    on_bytes = kernel_rows <= 128 and (variant in ("avx512vnni", "avxvnni") or
                                       (variant == "avx2" and 2 * 255 * max(-qmin, qmax) <= 32767))
    assert samples == [b if on_bytes else 0, 0], (variant, qmin, qmax)
    assert torch.equal(results[0], results[1]), variant


def test_training_step_on_the_variant_equals_float_kernels(variant, monkeypatch):
    """A whole hdqt step (forward products, their backward products, the conv weight
    gradient) gives the same loss and gradients on the forced variant as with
    HDQT_INT8=0."""
    def step(int8: str):
        monkeypatch.setenv("HDQT_INT8", int8)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10, bias=False))
        model = hdqt.quantize_model(model, hdqt.recipe("hdqt"))
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_int8, grads_int8 = step(variant)
    loss_f32, grads_f32 = step("0")
    assert torch.equal(loss_int8, loss_f32), variant
    assert all(torch.equal(g, h) for g, h in zip(grads_int8, grads_f32)), variant


def test_a_variant_this_cpu_lacks_is_never_forced(monkeypatch, capsys):
    lib = native.load()
    runs = native.int8_variants(lib)
    missing = [name for name in native.INT8_VARIANTS if name not in runs]
    if not missing or not runs:
        pytest.skip(f"this machine runs every int8 variant or none ({', '.join(runs) or 'none'})")
    monkeypatch.setenv("HDQT_INT8", missing[0])
    native._check_forced.cache_clear()
    assert native.int8_dot(lib)
    assert native.int8_variant(lib) == runs[0]  # the preferred one runs instead
    err = capsys.readouterr().err
    assert f"HDQT_INT8={missing[0]} needs" in err and f"use {runs[0]} instead" in err


def test_int8_switch_and_names(monkeypatch):
    lib = native.load()
    monkeypatch.setenv("HDQT_INT8", "0")
    assert not native.int8_dot(lib) and native.int8_variant(lib) is None
    assert lib.hdqt_kernel_variant() & (4 | 64 | 128 | 256) == 0
    a, b = torch.ones(2, 8), torch.ones(8, 3)
    y = torch.full((2, 3), -1.0)
    assert lib.hdqt_tiled_matmul_i8(a.data_ptr(), 8, 1, b.data_ptr(), 0, y.data_ptr(), 2, 8, 3, 4, 127.0,
                                    None, 1) == 2  # switched off: the kernel declines, writes nothing
    assert (y == -1).all()
    monkeypatch.setenv("HDQT_INT8", "avx3")
    with pytest.raises(ValueError, match="HDQT_INT8='avx3': expected 0, 1, auto or one of avx512vnni"):
        native.int8_dot(lib)
    monkeypatch.setenv("HDQT_INT8", "auto")
    runs = native.int8_variants(lib)
    assert native.int8_variant(lib) == (runs[0] if runs else None)


def test_each_int8_variant_is_named():
    assert native.describe_variant(2 | 8 | 128) == \
        "x86-64-v3 (AVX2, FMA), int8 dot products (AVX2 vpmaddubsw), narrow register blocks"
    assert native.describe_variant(2 | 64) == "x86-64-v3 (AVX2, FMA), int8 dot products (AVX-VNNI)"
    assert native.describe_variant(32 | 256) == "aarch64 (NEON), int8 dot products (ARM sdot)"


HARNESS = Path(__file__).with_name("native") / "int8_check.c"


@pytest.mark.slow  # a cross build of the kernels and an emulated run (about 10 s)
def test_sdot_variant_under_aarch64_emulation(tmp_path):
    """The ARM sdot variant against the float32 kernels, bit for bit, where this x86
    machine has a cross compiler and an emulator (Debian: gcc-aarch64-linux-gnu,
    qemu-user); the emulated CPU ("max") has the dot product."""
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("int8 variant sdot under emulation: needs aarch64-linux-gnu-gcc and qemu-aarch64 "
                    "(Debian: gcc-aarch64-linux-gnu, qemu-user)")
    binary = tmp_path / "int8_check"
    subprocess.run([cc, "-O2", "-fopenmp", "-pthread", str(HARNESS), "-o", str(binary), "-lm"], check=True)
    env = {**os.environ, "HDQT_INT8": "sdot", "QEMU_LD_PREFIX": "/usr/aarch64-linux-gnu"}
    done = subprocess.run([qemu, "-cpu", "max", str(binary)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "int8 variant: sdot" in done.stdout and "88 of 88 cases agree" in done.stdout, done.stdout
