"""The native kernels and the pure-torch path must compute the same quantities."""
import math

import pytest
import torch
import torch.nn.functional as F

import hdqt
from hdqt.quantization import int_quantizer, native
from hdqt.quantization.hadamard import (BlockLayout, block_layout, dense_block_matrix, hadamard_transform,
                                        hadamard_transform_amax)
from hdqt.quantization.im2col import fused_weight_grad, tiled_conv2d, unfold_channel_major
from hdqt.quantization.matmul import tiled_matmul, tiled_matmul_batched, tiled_matmul_kj

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler: only the torch path exists here")

# (batch, channels, H, W, out channels, kernel, stride, padding, dilation, tile)
CONV_CASES = [
    (2, 5, 9, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), 32),
    (3, 16, 32, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1), 32),
    (2, 3, 7, 11, 20, (3, 2), (1, 2), (2, 0), (1, 2), 7),
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), 32),
    (4, 64, 8, 8, 9, (3, 3), (1, 1), (1, 1), (1, 1), 32),
    (2, 3, 17, 17, 9, (5, 5), (1, 1), (2, 2), (1, 1), 10),
    (2, 4, 6, 40, 3, (1, 3), (1, 1), (0, 1), (1, 1), 5),  # runs of 16 positions cross output rows
    (2, 3, 13, 21, 5, (3, 3), (2, 1), (1, 2), (2, 2), 9),  # row stride 2 and dilation, width stride 1
    (1, 2, 5, 6, 3, (3, 3), (1, 1), (3, 3), (1, 1), 4),  # padding wider than the kernel: rows of zeros
    # Hadamard blocks of whole output rows of width 16..64 (the conv dW's shared width transforms)
    (2, 3, 32, 32, 5, (3, 3), (2, 2), (1, 1), (1, 1), 32),
    (1, 2, 64, 16, 3, (3, 3), (1, 1), (2, 2), (2, 2), 8),
    (1, 2, 16, 64, 3, (1, 3), (1, 1), (0, 1), (1, 1), 8),
]


def _torch_only(monkeypatch):
    monkeypatch.setenv("HDQT_NATIVE", "0")
    assert native.load() is None


@pytest.mark.slow  # dense references up to 1024 x 1024
def test_native_fwht_equals_dense_for_every_block_size():
    for p in (2, 4, 8, 16, 32, 128, 256, 512, 1024):
        x = torch.randn(3, 4 * p)
        layout = block_layout(4 * p)  # paper rule: one block of 4p
        fast = hadamard_transform(x, 1, layout)
        dense = x.double() @ dense_block_matrix(4 * p).T
        assert torch.allclose(fast.double(), dense, atol=1e-3), p


def test_native_fwht_equals_torch_path(monkeypatch):
    x = torch.randn(4, 6, 1024)
    layout = block_layout(1024)
    fast = hadamard_transform(x, 2, layout)
    _torch_only(monkeypatch)
    slow = hadamard_transform(x, 2, layout)
    assert torch.allclose(fast, slow, atol=1e-3)


@pytest.mark.parametrize("p", [2, 8, 16, 32, 64, 128, 256, 512, 1024])
def test_narrow_transform_equals_wide_bit_for_bit(p, monkeypatch):
    # fwht_row_narrow (AVX2, NEON) runs the stages in fwht_row's order: the same floats.
    x = torch.randn(5, 2048) * 100
    layout = BlockLayout((p,) * (2048 // p))
    results = {}
    for width in ("wide", "narrow"):
        monkeypatch.setenv("HDQT_VECTORS", width)
        results[width] = hadamard_transform_amax(x, 1, layout)
    assert torch.equal(results["wide"][0], results["narrow"][0]) and results["wide"][1] == results["narrow"][1]


def test_native_nearest_rounding_equals_torch_path(monkeypatch):
    q = int_quantizer(4, signed="auto", clip_ratio=0.975)
    t = torch.cat([torch.randn(10_000), torch.tensor([0.5, 1.5, -2.5, 3.5]) * (0.975 * 3 / 7)])
    fast = q.quantize(t)
    _torch_only(monkeypatch)
    slow = q.quantize(t)
    assert fast.scale == slow.scale and torch.equal(fast.values, slow.values)


@pytest.mark.parametrize("signed", ["signed", "unsigned", "auto"])
@pytest.mark.parametrize("kind", ["normal", "relu", "negative_zero", "zeros", "one"])
def test_native_range_and_grid_equal_torch_path(monkeypatch, signed, kind):
    t = {"normal": torch.randn(3000), "relu": torch.randn(3000).relu(), "negative_zero": -torch.zeros(50),
         "zeros": torch.zeros(7), "one": torch.tensor([-2.5])}[kind]
    q = int_quantizer(5, signed=signed, clip_ratio=0.9)
    fast = q.quantize(t)
    _torch_only(monkeypatch)
    slow = q.quantize(t)
    assert fast.scale == slow.scale and torch.equal(fast.values, slow.values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_native_quantizer_detects_nonfinite(bad):
    t = torch.randn(100_000)
    t[77_777] = bad
    with pytest.raises(hdqt.quantization.NonFiniteError, match="layer input"):
        int_quantizer(4).quantize(t, role="layer input")
    out = int_quantizer(4).quantize(t, nonfinite="propagate")
    assert torch.isnan(out.values).all()


def test_native_stochastic_rounding_unbiased_reproducible_and_in_range():
    q = int_quantizer(4, rounding="stochastic")
    t = torch.tensor([7.0, -2.3, 0.61, 3.5, -6.9, 0.05]).repeat(4000)
    out = q.quantize(t, torch.Generator().manual_seed(0)).values.view(4000, 6)
    assert torch.allclose(out.mean(0), t[:6], atol=0.032)
    assert out.abs().max() <= 7 and torch.equal(out, out.round())
    again = q.quantize(t, torch.Generator().manual_seed(0)).values.view(4000, 6)
    assert torch.equal(out, again)
    other = q.quantize(t, torch.Generator().manual_seed(1)).values.view(4000, 6)
    assert not torch.equal(out, other)


def test_native_results_do_not_depend_on_the_thread_count():
    q = int_quantizer(4, rounding="stochastic")
    t = torch.randn(300_000)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(q.quantize(t, torch.Generator().manual_seed(5)).values)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("acc_bits", [8, 12])
@pytest.mark.parametrize("m,k,n,tile", [(128, 405, 405, 32), (13, 37, 50, 7), (1, 1, 1, 32), (9, 64, 17, 32)])
def test_native_tiled_matmul_equals_torch_path(monkeypatch, m, k, n, tile, acc_bits):
    x = torch.randint(0, 16, (m, k)).float()
    w = torch.randint(-7, 8, (n, k)).float()
    fast = tiled_matmul(x, w, tile, acc_bits)
    _torch_only(monkeypatch)
    assert torch.equal(fast, tiled_matmul(x, w, tile, acc_bits))


def _int8_available() -> bool:
    lib = native.load()
    return lib is not None and native.int8_dot(lib)


def _native_products(a, b, tile, acc_bits):
    """(status, Y) of the int8 kernel and Y of the float32 kernel, called directly."""
    lib = native.load()
    m, k = a.shape
    y_i8, y_f32 = torch.full((m, b.shape[1]), -1.0), torch.empty(m, b.shape[1])
    b = b.contiguous()
    limit = float(2 ** (acc_bits - 1) - 1)
    status = lib.hdqt_tiled_matmul_i8(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), 0, y_i8.data_ptr(),
                                      m, k, b.shape[1], tile, limit, None, 2)
    # B given transposed, (J, K) row-major: the same packing from the other layout
    bt = b.T.contiguous()
    y_t = torch.full_like(y_i8, -1.0)
    status_t = lib.hdqt_tiled_matmul_i8(a.data_ptr(), a.stride(0), a.stride(1), bt.data_ptr(), 1, y_t.data_ptr(),
                                        m, k, b.shape[1], tile, limit, None, 2)
    assert status_t == status and torch.equal(y_t, y_i8)
    lib.hdqt_tiled_matmul_f32(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), y_f32.data_ptr(),
                              m, k, b.shape[1], tile, limit, None, 2)
    return status, y_i8, y_f32


@pytest.mark.skipif(not _int8_available(), reason="no int8 dot products on this CPU (or HDQT_INT8=0)")
@pytest.mark.parametrize("a_range,b_range", [((-7, 8), (0, 16)), ((-7, 8), (-7, 8)), ((-128, 128), (0, 256)),
                                             ((-128, 128), (-128, 128))])
@pytest.mark.parametrize("m,k,j,tile,acc_bits", [(33, 130, 47, 32, 8), (8, 37, 16, 7, 12), (1, 5, 1, 3, 8),
                                                 (17, 64, 100, 1, 8), (9, 405, 20, 32, 16)])
def test_int8_product_equals_float_kernel_bit_for_bit(a_range, b_range, m, k, j, tile, acc_bits):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randint(*a_range, (m, k), generator=gen).float()
    b = torch.randint(*b_range, (k, j), generator=gen).float()
    # the extremes, so that whether AVX2 declines does not depend on the draw (1 x 5
    # values of [-128, 127] all within [-64, 64] did: a flaky failure)
    a[0, 0], b[0, 0] = a_range[0], b_range[1] - 1
    # AVX2 declines full bytes, whose 16-bit pair sums could saturate (test_int8_variants.py)
    declines = native.int8_variant(native.load()) == "avx2" and a_range[0] < -8
    for operand in (a, a.T.contiguous().T):  # rows of A contiguous, or read through strides
        status, y_i8, y_f32 = _native_products(operand, b, tile, acc_bits)
        assert status == (1 if declines else 0)  # bytes that fit: the int8 kernel ran
        assert torch.equal(y_i8, torch.full_like(y_i8, -1.0) if declines else y_f32)


@pytest.mark.skipif(not _int8_available(), reason="no int8 dot products on this CPU (or HDQT_INT8=0)")
def test_int8_product_declines_operands_that_are_not_bytes(monkeypatch):
    a = torch.randint(-7, 8, (6, 50)).float()
    b = torch.randint(0, 16, (50, 20)).float()
    cases = {"fraction": (a, b.index_put((torch.tensor(3), torch.tensor(4)), torch.tensor(0.5))),
             "B above 255": (a, b.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(256.0))),
             "B both signs, above 127": (a, b.index_put((torch.tensor(1), torch.tensor(1)), torch.tensor(-1.0))
                                         .index_put((torch.tensor(2), torch.tensor(2)), torch.tensor(200.0))),
             "A above 127": (a.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(128.0)), b),
             "NaN": (a, b.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(float("nan"))))}
    for name, (x, y) in cases.items():
        status, y_i8, _ = _native_products(x, y, 32, 8)
        assert status == 1, name
        assert torch.equal(y_i8, torch.full_like(y_i8, -1.0)), name  # nothing written
    x, y = cases["fraction"]
    fast = tiled_matmul_kj(x, y, 32, 8)  # the float32 kernel takes over
    _torch_only(monkeypatch)
    assert torch.equal(fast, tiled_matmul_kj(x, y, 32, 8))


@pytest.mark.skipif(not _int8_available(), reason="no int8 dot products on this CPU (or HDQT_INT8=0)")
def test_unlimited_integer_product_runs_on_int8_and_equals_float32(monkeypatch):
    x = torch.randint(-7, 8, (128, 405)).float()
    w = torch.randint(-7, 8, (300, 405)).float()
    calls = []
    lib = native.load()
    monkeypatch.setattr(native, "int8_dot", lambda l: calls.append(1) or True)
    exact = tiled_matmul(x, w, 32, None, bounds=(7, 7))
    assert calls and torch.equal(exact, x @ w.T)  # every sum < 2^24: float32 is exact too
    assert status_of(lib, x[:1], w[:1].T, tile=405, limit=float(2**31 - 1)) == 0
    halves = x + 0.5  # not integers: the hint is wrong, the float product is used
    assert torch.equal(tiled_matmul(halves, w, 32, None, bounds=(7.5, 7)), halves @ w.T)


def status_of(lib, a, b, tile, limit):
    y = torch.empty(a.shape[0], b.shape[1])
    b = b.contiguous()
    return lib.hdqt_tiled_matmul_i8(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), 0, y.data_ptr(),
                                    a.shape[0], a.shape[1], b.shape[1], tile, limit, None, 1)


@pytest.mark.skipif(not _int8_available(), reason="no int8 dot products on this CPU (or HDQT_INT8=0)")
def test_int8_product_declines_tiles_whose_sum_could_leave_int32():
    lib = native.load()
    k = 70_000  # 70000 * 127 * 255 > 2^31
    a, b = torch.full((1, k), 127.0), torch.full((k, 1), 255.0)
    assert status_of(lib, a, b, tile=k, limit=float(2**31 - 1)) == 1
    avx2 = native.int8_variant(lib) == "avx2"  # which declines full bytes anyway (16-bit pair sums)
    assert status_of(lib, a, b, tile=32, limit=127.0) == (1 if avx2 else 0)  # short tiles are safe
    assert status_of(lib, a.clamp(max=7), b.clamp(max=7), tile=k, limit=float(2**31 - 1)) == 0


@pytest.mark.skipif(not _int8_available(), reason="no int8 dot products on this CPU (or HDQT_INT8=0)")
@pytest.mark.parametrize("x_range", [(0, 16), (-7, 8), (-128, 128), (0, 256)])
@pytest.mark.parametrize("case", CONV_CASES)
def test_int8_conv_equals_float_kernel_bit_for_bit(case, x_range):
    from hdqt.quantization.im2col import ConvGeometry

    b, c, h, w, n, kernel, stride, padding, dilation, tile = case
    x = torch.randint(*x_range, (b, c, h, w)).float()
    weight = torch.randint(-7, 8, (n, c, *kernel)).float()
    geo = ConvGeometry.of(x, kernel, stride, padding, dilation)
    wt = weight.reshape(n, -1).T.contiguous()
    lib = native.load()
    outs = {}
    for kernel_fn in ("hdqt_conv_tiled_i8", "hdqt_conv_tiled_f32"):
        outs[kernel_fn] = torch.full((b, n, geo.out_h, geo.out_w), -1.0)
        status = getattr(lib, kernel_fn)(x.data_ptr(), wt.data_ptr(), outs[kernel_fn].data_ptr(), *geo.native_args(),
                                         n, tile, 127.0, None, 2)
        # the int8 kernel runs at width stride 1 and declines (writing nothing) otherwise
        assert status == (0 if kernel_fn.endswith("f32") or stride[1] == 1 else 1)
    if stride[1] == 1:
        assert torch.equal(outs["hdqt_conv_tiled_i8"], outs["hdqt_conv_tiled_f32"])
    else:
        assert (outs["hdqt_conv_tiled_i8"] == -1).all()


@pytest.mark.parametrize("case", CONV_CASES)
def test_narrow_register_blocks_equal_wide_ones(case, monkeypatch):
    # The float32 kernels' register blocks for CPUs whose registers hold fewer than 16
    # floats (AVX2, NEON) compute the same sums in the same order; forced here, where
    # the wide ones would run.
    b, c, h, w, n, kernel, stride, padding, dilation, tile = case
    x = torch.randint(0, 16, (b, c, h, w)).float()
    weight = torch.randint(-7, 8, (n, c, *kernel)).float()
    a, m = torch.randint(-7, 8, (n, 37)).float(), torch.randint(0, 16, (37, b * 9 + 1)).float()
    dw_args, _, _ = _fused_dw_case(case)
    q4 = int_quantizer(4, rounding="stochastic")
    monkeypatch.setenv("HDQT_INT8", "0")
    results = {}
    for width in ("wide", "narrow"):
        monkeypatch.setenv("HDQT_VECTORS", width)
        results[width] = (tiled_conv2d(x, weight, stride, padding, dilation, tile, 8), tiled_matmul_kj(a, m, tile, 8),
                          fused_weight_grad(*dw_args, q4, torch.Generator().manual_seed(0))[0])
    assert all(torch.equal(wide, narrow) for wide, narrow in zip(results["wide"], results["narrow"]))


@pytest.mark.skipif(not _int8_available(), reason="no int8 dot products on this CPU (or HDQT_INT8=0)")
@pytest.mark.parametrize("case", CONV_CASES)
def test_int8_input_gradient_equals_transposed_convolution(case):
    from hdqt.quantization.im2col import ConvGeometry, exact_input_grad

    b, c, h, w, n, kernel, stride, padding, dilation, _ = case
    x_shape = torch.Size((b, c, h, w))
    geo = ConvGeometry.of(torch.empty(x_shape), kernel, stride, padding, dilation)
    g = torch.randint(-7, 8, (b, n, geo.out_h, geo.out_w)).float()
    weight = torch.randint(-7, 8, (n, c, *kernel)).float()
    out = exact_input_grad(g, weight, x_shape, stride, padding, dilation)
    reachable = all(d * (k - 1) >= p for d, k, p in zip(dilation, kernel, padding))
    if tuple(stride) != (1, 1) or not reachable:
        assert out is None  # the float transposed convolution takes these
        return
    ref = torch.nn.grad.conv2d_input(x_shape, weight, g, stride=stride, padding=padding, dilation=dilation)
    assert out is not None and torch.equal(out, ref)
    assert exact_input_grad(g + 0.5, weight, x_shape, stride, padding, dilation) is None  # not bytes


@pytest.mark.parametrize("case", CONV_CASES)
def test_native_tiled_conv_equals_im2col_reference(case):
    b, c, h, w, n, kernel, stride, padding, dilation, tile = case
    x = torch.randint(0, 16, (b, c, h, w)).float()
    weight = torch.randint(-7, 8, (n, c, *kernel)).float()
    out = tiled_conv2d(x, weight, stride, padding, dilation, tile, 8)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    ref = tiled_matmul_batched(weight.reshape(n, -1), cols, tile, 8)
    assert torch.equal(out, ref.reshape(out.shape))


@pytest.mark.parametrize("case", CONV_CASES)
def test_native_unfold_equals_torch_unfold(monkeypatch, case):
    b, c, h, w, _, kernel, stride, padding, dilation, _ = case
    x = torch.randn(b, c, h, w)
    cols, amax = unfold_channel_major(x, kernel, stride, padding, dilation)
    ref = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(0, 1)
    assert amax is None and torch.equal(cols, ref)
    layout = block_layout(cols.shape[-1])
    if not layout.is_identity:
        fast, amax = unfold_channel_major(x, kernel, stride, padding, dilation, layout)
        _torch_only(monkeypatch)
        slow, _ = unfold_channel_major(x, kernel, stride, padding, dilation, layout)
        assert torch.allclose(fast, slow, atol=1e-4) and amax == pytest.approx(float(slow.abs().max()), rel=1e-5)


def _fused_dw_case(case):
    """Inputs of a fused dW and the exact product of the materialised, transformed columns."""
    b, c, h, w, n, kernel, stride, padding, dilation, _ = case
    x = torch.randint(0, 16, (b, c, h, w)).float()
    cols, _ = unfold_channel_major(x, kernel, stride, padding, dilation)
    layout = block_layout(cols.shape[-1])
    layout = None if layout.is_identity else layout
    cols_h, _ = unfold_channel_major(x, kernel, stride, padding, dilation, layout)
    g = torch.randint(-7, 8, (n, b, cols.shape[-1])).float()
    exact = g.reshape(n, -1) @ cols_h.reshape(cols.shape[0], -1).T
    return (x, g, kernel, stride, padding, dilation, layout), cols_h, exact


@pytest.mark.parametrize("case", CONV_CASES)
def test_fused_weight_gradient_matches_materialised_columns(case):
    args, cols_h, exact = _fused_dw_case(case)
    q16 = int_quantizer(16, rounding="stochastic")
    dw, scale = fused_weight_grad(*args, q16, torch.Generator())
    # the first pass's range is exact: the same max as the materialised, transformed columns
    assert scale == q16.grid(float(cols_h.abs().max()), -1.0)[0]
    assert torch.allclose(dw * scale, exact, rtol=0, atol=1e-3 * float(exact.abs().max()))


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("values", ["codes", "some not codes", "too large"])
@pytest.mark.parametrize("int8", ["0", "auto"])
def test_int16_column_build_gives_the_float32_build_bit_for_bit(case, values, int8, monkeypatch):
    # The columns of integer codes are built on int16 where that is exact (shared-width
    # geometries: whole output rows of width 16 or 32 in a Hadamard block); the scale
    # and every stochastically rounded column, so dW, are those of the float32 build.
    # Channels whose values are not small integers take the float32 build in the same call.
    # With int8 dot products an int16 row is rounded straight into bytes (one pass).
    (x, g, kernel, stride, padding, dilation, layout), _, _ = _fused_dw_case(case)
    if values == "some not codes":
        x[:, 0] += 0.5
    elif values == "too large":
        x[0, -1, 0, 0] = 40000.0
    q4 = int_quantizer(4, rounding="stochastic")
    monkeypatch.setenv("HDQT_INT8", int8)
    runs = [fused_weight_grad(x, g, kernel, stride, padding, dilation, layout, q4, torch.Generator().manual_seed(3),
                              allow_int16=allow) for allow in (True, False)]
    assert runs[0][1] == runs[1][1]  # the scale: max|H cols| alike
    assert torch.equal(runs[0][0], runs[1][0])


@pytest.mark.skipif(not _int8_available(), reason="no int8 dot products on this CPU (or HDQT_INT8=0)")
@pytest.mark.parametrize("case", CONV_CASES)
def test_fused_weight_gradient_on_bytes_equals_float32_bit_for_bit(case, monkeypatch):
    (x, g, kernel, stride, padding, dilation, layout), _, _ = _fused_dw_case(case)
    q4 = int_quantizer(4, rounding="stochastic")
    from hdqt.quantization.im2col import ConvGeometry

    geo = ConvGeometry.of(x, kernel, stride, padding, dilation)
    lib = native.load()
    block = 1 if layout is None else layout.blocks[0]
    amax = lib.hdqt_conv_cols_amax_f32(x.data_ptr(), *geo.native_args(), block, 1, 2)
    scale, qmin, qmax = q4.grid(amax, -amax)
    results = []
    for use_int8 in (1, 0):
        dw = torch.empty(g.shape[0], geo.k)
        samples = lib.hdqt_conv_dw_sr_f32(x.data_ptr(), g.data_ptr(), dw.data_ptr(), g.shape[0], *geo.native_args(),
                                          block, scale, qmin, qmax, 1234, use_int8, 1, 2)
        # every sample's gradient rows are bytes: all multiplied as bytes, or none when not asked
        kernel_rows = 4 * kernel[0] * kernel[1] // math.gcd(4, kernel[0] * kernel[1])
        assert samples == (x.shape[0] if use_int8 and kernel_rows <= 128 else 0)
        results.append(dw)
    assert torch.equal(results[0], results[1])
    # gradient rows that are not bytes: those samples take the float32 dot
    g_half = g.clone()
    g_half[:, 0] += 0.5
    dw = torch.empty(g.shape[0], geo.k)
    samples = lib.hdqt_conv_dw_sr_f32(x.data_ptr(), g_half.data_ptr(), dw.data_ptr(), g.shape[0],
                                      *geo.native_args(), block, scale, qmin, qmax, 1234, 1, 1, 2)
    assert samples == x.shape[0] - 1


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_fused_weight_gradient_is_unbiased(case):
    args, _, exact = _fused_dw_case(case)
    q4 = int_quantizer(4, rounding="stochastic")
    draws = [fused_weight_grad(*args, q4, torch.Generator().manual_seed(s)) for s in range(300)]
    mean = torch.stack([d * s for d, s in draws]).mean(0)
    one = draws[0][0] * draws[0][1]
    # the mean of 300 draws is ~17x closer than one draw: unbiased, not merely close
    assert (mean - exact).abs().max() < 0.25 * (one - exact).abs().max()


def _conv_step(weight, x, bits, seed=None):
    # 12-bit codes need a 32-bit accumulator (the policy refuses 8 bits for them)
    policy = hdqt.recipe("hdqt", bits=bits, acc_bits=8 if bits <= 4 else 32, seed=seed)
    layer = hdqt.quantize_model(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), policy)
    layer.weight.data.copy_(weight)
    xi = x.clone().requires_grad_()
    out = layer(xi)
    out.square().mean().backward()
    return out.detach(), xi.grad, layer.weight.grad


def test_conv_training_step_native_and_torch_paths_agree(monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(8, 8, 3, 3) * 0.2
    x = torch.randn(16, 8, 16, 16)
    fast4, fast12 = _conv_step(weight, x, 4), _conv_step(weight, x, 12)
    draws = 48
    fast_draws = [_conv_step(weight, x, 4, seed)[1:] for seed in range(draws)]
    _torch_only(monkeypatch)
    slow4, slow12 = _conv_step(weight, x, 4), _conv_step(weight, x, 12)
    slow_draws = [_conv_step(weight, x, 4, seed)[1:] for seed in range(draws)]
    assert torch.equal(fast4[0], slow4[0])  # the 4-bit forward is exact on both paths
    for a, b in zip(fast12[1:], slow12[1:]):  # the backward differs only by its random draws
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    # The 4-bit backward: both paths are unbiased estimates of the same gradient (their
    # random streams differ), so their means over many draws agree within the noise.
    for which in range(2):  # dX, dW
        a = torch.stack([d[which] for d in fast_draws]).double()
        b = torch.stack([d[which] for d in slow_draws]).double()
        spread = ((a.var(0) + b.var(0)) / draws).sqrt()
        z = (a.mean(0) - b.mean(0)).abs() / (spread + 1e-12 * a.abs().max())
        assert z.max() < 6, (which, z.max())  # 6 sigma over a few thousand elements
        # and the mean really is the quantity: far closer to each other than one draw is
        one_draw = (a[0] - b[0]).norm() / b.mean(0).norm()
        means = (a.mean(0) - b.mean(0)).norm() / b.mean(0).norm()
        assert means < one_draw / 3


def _row_view(shape: tuple[int, ...], view: str) -> torch.Tensor:
    """A tensor of ``shape`` with the memory layout ``view`` names (values * 3)."""
    if view == "transposed":  # the dW operands: the transpose of a batch-major tensor
        return (torch.randn(shape[::-1]) * 3).T
    if view == "strided":  # every other column of a wider tensor: neither layout above
        return (torch.randn(*shape[:-1], 2 * shape[-1]) * 3)[..., ::2]
    if view == "permuted":  # a 3-d view with the rows' dimension last but not contiguous (conv dW's)
        return (torch.randn(shape[1], shape[0], shape[2]) * 3).transpose(0, 1)
    if view == "transposed3":  # a 3-d view whose last two dimensions are transposed
        return (torch.randn(shape[0], shape[2], shape[1]) * 3).transpose(1, 2)
    return torch.randn(shape) * 3


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape,p,view", [
    ((405, 128), 128, "transposed"), ((13, 20), 4, "transposed"), ((8, 16), 16, "transposed"),
    ((7, 24), 8, "strided"), ((3, 5, 16), 16, "permuted"), ((2, 3, 8), 8, "contiguous"),
    ((128, 96), 32, "contiguous"), ((7, 16), 2, "contiguous"), ((3, 256), 256, "contiguous"),
    ((1, 1), 1, "contiguous"), ((16, 8, 32), 32, "permuted"), ((2, 3, 16), 8, "strided"),
    ((2, 13, 24), 8, "transposed3"), ((3, 16, 8), 8, "transposed3"), ((2, 2, 3, 8), 8, "contiguous"),
    ((16,), 16, "contiguous"),
])
def test_fused_row_transform_and_quantizer_equal_the_two_calls(rounding, shape, p, view):
    """Quantizer.quantize_row_transform: transform and quantizer in one native call,
    value for value the transform's result quantized with its max|.|, same seeds, for
    rows read through any layout (a transposed view's 8 x 8 blocks and their edges:
    13 rows of 20 leave 5 rows and 4 columns outside them; 3-d views read in groups of
    rows, whose 8-row blocks may cross a group's end: 13 rows a group; other ranks copied)."""
    q = int_quantizer(4, rounding=rounding)
    t = _row_view(shape, view)
    before = t.clone()
    layout = BlockLayout((p,) * (shape[-1] // p))
    transformed, amax = hadamard_transform_amax(t, -1, layout)
    expected = q.quantize(transformed, torch.Generator().manual_seed(3), amax=amax)
    assert q.fuses_row_transform(t)
    got = q.quantize_row_transform(t, p, torch.Generator().manual_seed(3))
    assert got.scale == expected.scale and torch.equal(got.values, expected.values)
    assert got.values.is_contiguous() and got.values.shape == t.shape and torch.equal(t, before)  # input untouched


def test_fused_row_transform_reports_nonfinite_and_refuses_other_quantizers():
    q = int_quantizer(4)
    t = torch.randn(8, 32)
    t[2, 5] = float("inf")
    with pytest.raises(hdqt.quantization.NonFiniteError, match="grad rows"):
        q.quantize_row_transform(t, 32, role="grad rows")
    assert torch.isnan(q.quantize_row_transform(t, 32, nonfinite="propagate").values).all()
    auto = int_quantizer(4, signed="auto")  # its grid depends on the sign: the two-call path
    assert not auto.fuses_row_transform(t) and not q.fuses_row_transform(t.double())
    with pytest.raises(ValueError, match="check fuses_row_transform first"):
        auto.quantize_row_transform(t, 32)
    for bad in (3, 64, 0):  # not a power of two, not dividing 32, not positive
        with pytest.raises(ValueError, match=r"p must be a power of two dividing the last dimension \(32\)"):
            q.quantize_row_transform(t, bad)


def test_backward_gradients_are_the_same_with_and_without_the_fused_transform(monkeypatch):
    """The fused path (functional._fuses_transform) changes no gradient bit (dX and dW,
    stochastic rounding seeded alike), and runs for every transformed operand here. (The
    separate calls' path: a linear layer's whole backward in one call is
    test_fused_linear.py's.)"""
    from hdqt.quantization import functional
    from hdqt.quantization.quantizer import Quantizer

    monkeypatch.setenv("HDQT_FUSED", "0")

    def train(fuse: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.ReLU(),
                                  torch.nn.Linear(96, 10, bias=False))
        model = hdqt.quantize_model(net, hdqt.recipe("hdqt"))
        x = torch.randn(128, 64)
        with monkeypatch.context() as patch:
            if not fuse:
                patch.setattr(functional, "_fuses_transform", lambda *args: False)
            for _ in range(3):
                model.zero_grad()
                model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    calls = []
    fused_call = Quantizer.quantize_row_transform
    monkeypatch.setattr(Quantizer, "quantize_row_transform",
                        lambda self, *a, **k: calls.append(1) or fused_call(self, *a, **k))
    fused = train(True)
    # per step: both dW products (along the batch, 128) and the second layer's dX (along 10 = 5 x 2)
    assert len(calls) == 3 * 6
    assert all(torch.equal(a, b) for a, b in zip(fused, train(False)))
    assert len(calls) == 3 * 6  # the reference made no fused call


def test_conv_weight_gradient_is_the_same_with_and_without_the_fused_transform(monkeypatch):
    """A conv's dW gradient operand takes the fused call too (copy to (N, B, L), transform
    along the positions and rounding in one): no gradient bit changes (three steps, the
    stochastic rounding seeded alike), and the input gradient neither."""
    from hdqt.quantization import functional
    from hdqt.quantization.quantizer import Quantizer

    def train(fuse: bool) -> list[torch.Tensor]:
        torch.manual_seed(2)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 4, 3, padding=1, bias=False))
        model = hdqt.quantize_model(net, hdqt.recipe("hdqt"))
        x = torch.randn(16, 3, 16, 16, requires_grad=True)
        with monkeypatch.context() as patch:
            if not fuse:
                patch.setattr(functional, "_fuses_transform", lambda *args: False)
            for _ in range(3):
                model.zero_grad()
                x.grad = None
                model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]

    calls = []
    fused_call = Quantizer.quantize_row_transform
    monkeypatch.setattr(Quantizer, "quantize_row_transform",
                        lambda self, *a, **k: calls.append(a[0].shape) or fused_call(self, *a, **k))
    fused = train(True)
    # per step, each conv's dW gradient operand: (N, B, L) = (8 or 4, 16, 256), along the positions
    assert sorted(calls) == sorted([(4, 16, 256), (8, 16, 256)] * 3)
    reference = train(False)
    assert len(calls) == 6  # the reference made no fused call
    assert all(torch.equal(a, b) for a, b in zip(fused, reference))


def _fmix32(h):
    import numpy as np

    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def test_stochastic_rounding_stream_is_the_documented_hash():
    """The native stochastic rounding, value for value, from its definition (rounding.c):
    u = fmix32(((i ^ k1) * 0x9e3779b9 + k0)) >> 8 over 2^24, k0 / k1 from the seed's low /
    high half (k1 re-keyed by the index's high half), then floor(clamp(x / scale) + u),
    at most qmax. Kernel rewrites (vector selects, fused passes) must keep every bit."""
    import numpy as np

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(100_003, generator=gen) * 3
    x[:8] = torch.tensor([0.0, -0.0, 2.59, -2.59, 2.5900002, -1e-30, 1e-30, 100.0])
    seed, scale, qmax = 0x0123456789ABCDEF, 0.37, 7.0
    out = torch.empty_like(x)
    native.load().hdqt_sr_quantize_f32(x.data_ptr(), out.data_ptr(), x.numel(), scale, -qmax, qmax, seed, 2)
    k0, seed_hi = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    with np.errstate(over="ignore"):
        k1 = seed_hi ^ _fmix32(np.uint32(0) + np.uint32(0x68E31DA4))  # indices below 2^32: high half 0
        h = _fmix32(((np.arange(x.numel(), dtype=np.uint32) ^ k1) * np.uint32(0x9E3779B9)) + k0)
    u = (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    v = np.clip(x.numpy() * (np.float32(1.0) / np.float32(scale)), -qmax, qmax).astype(np.float32)
    expected = np.minimum(np.floor(v + u), np.float32(qmax))
    assert np.array_equal(out.numpy().view(np.int32), expected.astype(np.float32).view(np.int32))
