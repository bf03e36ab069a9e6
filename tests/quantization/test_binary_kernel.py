"""The bit-packed binary product: every variant this machine runs against the float
product of the binarized operands (the same betas), odd sizes, and forcing rules."""
import pytest
import torch

from hdqt.quantization import binarize, binary_kernel, native

pytestmark = pytest.mark.skipif(binary_kernel._lib() is None, reason="the native kernels are not available here")

RUNNABLE = [v for v in binary_kernel.available() if v != "torch"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        return set()


def test_the_variants_this_cpu_runs_are_found(capsys):
    flags = _cpu_flags()
    if flags:
        assert ("avx512" in RUNNABLE) == ({"avx512f", "avx512_vpopcntdq"} <= flags)
        assert ("avx2" in RUNNABLE) == ("avx2" in flags)
    assert "portable" in RUNNABLE
    with capsys.disabled():
        print(f"\nbinary kernel variants run here: {', '.join(RUNNABLE)}; auto picks {binary_kernel.variant()}")


def _reference(a, ba, b, bb, group):
    return binarize.binarized(a.double(), group, ba.double()) @ binarize.binarized(b.double(), group, bb.double()).T


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("group", [None, 2, 4, 16, 32, 64, 128])
@pytest.mark.parametrize("m, j, k", [(1, 1, 1), (5, 7, 37), (9, 6, 200), (33, 17, 1000), (4, 16, 64), (3, 40, 577)])
def test_product_equals_the_float_reference_up_to_beta_rounding(monkeypatch, variant, group, m, j, k):
    monkeypatch.setenv("HDQT_BINARY", variant)
    gen = torch.Generator().manual_seed(m * 1000 + k)
    a, b = torch.randn(m, k, generator=gen), torch.randn(j, k, generator=gen)
    a[0, :3] = 0.0  # sign(0) = -1 in both
    ba, bb = binarize.group_betas(a, group), binarize.group_betas(b, group)
    y = binary_kernel.product(a, ba, b, bb, group).double()
    ref = _reference(a, ba, b, bb, group)
    # each term ba * bb * (an exact integer) is rounded twice in float32, then summed over groups
    bound = (binarize.expand(ba.double(), group, k) @ binarize.expand(bb.double(), group, k).T) * 4 * 2.0**-23
    assert ((y - ref).abs() <= bound + 1e-30).all(), (y - ref).abs().max()
    if group is None or group >= k:  # one group: (ba * bb) * the exact integer dot, in float32
        dot = binarize.signs(a) @ binarize.signs(b).T  # integers, exact in float32 here
        assert torch.equal(y.float(), (ba * bb.T) * dot)


@pytest.mark.parametrize("variant", RUNNABLE)
def test_strided_im2col_rows_pack_as_contiguous_ones(monkeypatch, variant):
    monkeypatch.setenv("HDQT_BINARY", variant)
    x = torch.randn(2, 3, 11, 11)
    rows = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # (B, L, K) view
    assert torch.equal(binary_kernel.pack(rows), binary_kernel.pack(rows.contiguous()))
    w = torch.randn(5, 27)
    br, bw = binarize.group_betas(rows, 4), binarize.group_betas(w, 4)
    assert torch.allclose(binary_kernel.product(rows, br, w, bw, 4), binary_kernel.product(rows.contiguous(), br, w, bw, 4))


def test_packing_layout():
    t = torch.ones(1, 70)
    t[0, [0, 5, 63, 64, 69]] = -1.0
    t[0, 5] = 0.0  # sign(0) = -1
    bits = binary_kernel.pack(t)
    assert bits.shape == (1, 2)
    assert bits[0, 0].item() == (1 | 1 << 5 | -(1 << 63))  # bit 63: the int64's sign bit
    assert bits[0, 1].item() == (1 | 1 << 5)


def test_forcing(monkeypatch):
    monkeypatch.setenv("HDQT_BINARY", "torch")
    assert binary_kernel.product(torch.randn(2, 8), torch.ones(2, 1), torch.randn(2, 8), torch.ones(2, 1), None) is None
    monkeypatch.setenv("HDQT_BINARY", "avx1024")
    with pytest.raises(ValueError, match="HDQT_BINARY must be one of"):
        binary_kernel.variant()
    missing = [v for v in ("avx512", "avx2", "neon") if v not in RUNNABLE]
    for name in missing:  # never run on a CPU that cannot: an error that names what runs
        monkeypatch.setenv("HDQT_BINARY", name)
        with pytest.raises(RuntimeError, match="cannot run it"):
            binary_kernel.product(torch.randn(2, 8), torch.ones(2, 1), torch.randn(2, 8), torch.ones(2, 1), None)
    monkeypatch.setenv("HDQT_NATIVE", "0")
    monkeypatch.setenv("HDQT_BINARY", "auto")
    assert binary_kernel.variant() == "torch" and not native.enabled()


@pytest.mark.parametrize("variant", RUNNABLE)  # avx512 and avx2 pack contiguous rows in vectors
@pytest.mark.parametrize("group", [None, 2, 4, 8, 16, 64, 128])
@pytest.mark.parametrize("shape", [(5, 37), (3, 200), (4, 64), (2, 7, 577), (1, 1), (3, 16)])
def test_packing_computes_the_betas_of_the_float64_formula(monkeypatch, variant, group, shape):
    monkeypatch.setenv("HDQT_BINARY", variant)
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    t = torch.randn(*shape, generator=gen) * 3
    t.view(-1)[::7] = 0.0
    bits, betas = binary_kernel.pack_with_betas(t, group)
    assert torch.equal(bits, binary_kernel.pack(t))
    assert torch.equal(betas, binarize.group_betas(t.double(), group).float())  # the float64 mean, rounded once
    assert torch.allclose(betas, binarize.group_betas(t, group), rtol=4 * 2.0**-23, atol=0)  # torch's float32 sums


@pytest.mark.parametrize("group", [None, 4, 16])
def test_strided_im2col_rows_pack_with_their_betas(group):
    x = torch.randn(2, 5, 13, 13)
    x[:, :, :3] = torch.relu(x[:, :, :3])
    rows = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # (B, L, K) strided view
    bits, betas = binary_kernel.pack_with_betas(rows, group)
    assert torch.equal(bits, binary_kernel.pack(rows.contiguous()))
    assert torch.equal(betas, binarize.group_betas(rows.double(), group).float())
    cm = rows.transpose(0, 1).contiguous().permute(1, 0, 2)  # another stride pattern: (L, B, K) memory
    assert torch.equal(binary_kernel.pack_with_betas(cm, group)[1], betas)


@pytest.mark.parametrize("variant", RUNNABLE)
def test_a_nonfinite_value_gives_its_group_a_nonfinite_beta(monkeypatch, variant):
    monkeypatch.setenv("HDQT_BINARY", variant)
    t = torch.randn(2, 40)
    t[0, 3], t[1, 39] = float("nan"), float("inf")
    bits, betas = binary_kernel.pack_with_betas(t, 16)
    assert betas[0, 0].isnan() and betas[1, 2].isinf() and torch.isfinite(betas[0, 1:]).all()
    assert (bits[0, 0].item() >> 3) & 1 == 1 and (bits[1, 0].item() >> 39) & 1 == 0  # NaN: -1, inf: +1


@pytest.mark.parametrize("group", [None, 4, 16])
@pytest.mark.parametrize("b, c, h, w, kernel, stride, padding, dilation", [
    (2, 3, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1)), (2, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 5, 7, 11, (3, 2), (1, 2), (2, 0), (1, 2)), (1, 2, 3, 300, (1, 3), (1, 1), (0, 1), (1, 1)),  # 300 wide: two blocks along a row
    (1, 2, 40, 40, (3, 3), (1, 1), (1, 1), (1, 1))])  # 6 rows a block, the last block 4
def test_conv_rows_pack_straight_from_the_input(group, b, c, h, w, kernel, stride, padding, dilation):
    x = torch.relu(torch.randn(b, c, h, w))  # zeros, like a ReLU's output, and zero padding: sign -1
    rows = torch.nn.functional.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)
    bits, betas = binary_kernel.pack_conv_with_betas(x, kernel, stride, padding, dilation, group)
    assert torch.equal(bits, binary_kernel.pack(rows.contiguous()))
    assert torch.equal(betas, binarize.group_betas(rows.double(), group).float())


@pytest.mark.skipif(binary_kernel._lib() is None, reason="the native kernels are not available here")
@pytest.mark.parametrize("group", [None, 16])
def test_the_benchmark_times_every_path_of_this_cpu(load_benchmark, group):
    """bench_binary.py's cases call the kernels with their current signatures (the grouped
    kernel's product-only case took an argument fewer once): a tiny shape runs each path."""
    times = load_benchmark("bench_binary").bench_shape(8, 96, 12, group, 1)
    assert set(times) == {"float", "end_to_end", "unfused", "product"}
    assert all(t > 0 for t in times.values())
