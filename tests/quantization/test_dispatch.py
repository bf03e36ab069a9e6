"""Which kernel runs a product: the dispatch between the int8 kernel, the float32
kernel and the torch path, tested on every machine.

The int8 kernels themselves need AVX512-VNNI (their bit-identity tests in
test_native.py skip elsewhere, saying so). The decisions around them do not: here a
stand-in library records which entry points were called and answers as the real one
does (0 done, 1 declined operands, 2 no int8 on this CPU, -1 out of memory).
"""
import pytest
import torch

from hdqt.quantization import native
from hdqt.quantization.im2col import ConvGeometry, _native_conv
from hdqt.quantization.matmul import _native_product, tiled_matmul_kj


class StandInLibrary:
    def __init__(self, int8_status: int, int8_available: bool = True):
        self.int8_status, self.available, self.calls = int8_status, int8_available, []

    def hdqt_int8_dot_available(self):
        return int(self.available)

    def hdqt_tiled_matmul_i8(self, *args):
        self.calls.append("i8")
        return self.int8_status

    def hdqt_tiled_matmul_f32(self, *args):
        self.calls.append("f32")

    def hdqt_conv_tiled_i8(self, *args):
        self.calls.append("conv i8")
        return self.int8_status

    def hdqt_conv_tiled_f32(self, *args):
        self.calls.append("conv f32")
        return 0


@pytest.fixture
def stand_in(monkeypatch):
    def install(int8_status=0, int8_available=True, env_int8="1"):
        lib = StandInLibrary(int8_status, int8_available)
        monkeypatch.setattr(native, "load", lambda: lib)
        monkeypatch.setattr(native, "_int8_available", lambda l: bool(l.hdqt_int8_dot_available()))
        monkeypatch.setenv("HDQT_INT8", env_int8)
        return lib
    return install


A, B = torch.zeros(4, 8), torch.zeros(8, 3)


@pytest.mark.parametrize("status, int8_available, env, expected", [
    (0, True, "1", ["i8"]),            # bytes on VNNI: the int8 kernel alone
    (1, True, "1", ["i8", "f32"]),     # declined operands: the float32 kernel takes over
    (2, True, "1", ["i8", "f32"]),     # the library says no int8 after all
    (0, False, "1", ["f32"]),          # a CPU without VNNI: straight to float32
    (0, True, "0", ["f32"]),           # HDQT_INT8=0
])
def test_tiled_product_dispatch(stand_in, status, int8_available, env, expected):
    lib = stand_in(status, int8_available, env)
    assert _native_product(A, B, 4, 127.0) is not None
    assert lib.calls == expected


@pytest.mark.parametrize("status, int8_available, expected_calls, returns", [
    (0, True, ["i8"], True),
    (1, True, ["i8"], False),   # int8 only (the exact unlimited product): declined means the caller's path
    (0, False, [], False),
])
def test_int8_only_product_never_falls_to_float32(stand_in, status, int8_available, expected_calls, returns):
    lib = stand_in(status, int8_available)
    out = _native_product(A, B, 8, float(2**31 - 1), int8_only=True)
    assert (out is not None) == returns and lib.calls == expected_calls


def test_out_of_memory_is_an_error_not_a_silent_fallback(stand_in):
    stand_in(-1)
    with pytest.raises(MemoryError, match="int8 product"):
        _native_product(A, B, 4, 127.0)


def test_unlimited_product_asks_int8_only_for_quantized_operands(stand_in, monkeypatch):
    from hdqt.quantization import matmul

    lib = stand_in(1)  # declined: the product falls to torch's a @ b
    a, b = torch.randint(-7, 8, (4, 8)).float(), torch.randint(-7, 8, (8, 3)).float()
    assert torch.equal(tiled_matmul_kj(a, b, 32, None, bounds=(7, 7)), a @ b)
    assert lib.calls == []  # a small product: torch's GEMM, the same exact sums, no kernel asked
    monkeypatch.setattr(matmul, "SMALL_EXACT_PRODUCT", 0)
    assert torch.equal(tiled_matmul_kj(a, b, 32, None, bounds=(7, 7)), a @ b)
    assert lib.calls == ["i8"]
    lib.calls.clear()
    assert torch.equal(tiled_matmul_kj(a, b, 32, None), a @ b)  # float operands: no kernel asked
    assert lib.calls == []


@pytest.mark.parametrize("status, int8_available, int8_only, expected_calls, returns", [
    (0, True, False, ["conv i8"], True),
    (1, True, False, ["conv i8", "conv f32"], True),
    (0, False, False, ["conv f32"], True),
    (1, True, True, ["conv i8"], False),
    (0, False, True, [], False),
])
def test_conv_dispatch(stand_in, status, int8_available, int8_only, expected_calls, returns):
    lib = stand_in(status, int8_available)
    x, w = torch.zeros(1, 2, 5, 5), torch.zeros(3, 2, 3, 3)
    geo = ConvGeometry.of(x, (3, 3), (1, 1), (1, 1), (1, 1))
    out = _native_conv(x, w, geo, 8, 127.0, int8_only=int8_only)
    assert (out is not None) == returns and lib.calls == expected_calls


def test_real_int8_entry_points_answer_for_this_cpu():
    """On a CPU with AVX512-VNNI the int8 kernel multiplies bytes; on any other it
    declines (2) and writes nothing. Either way one of the two is checked here."""
    lib = native.load()
    if lib is None:
        pytest.skip("no native kernels here (no C compiler, or HDQT_NATIVE=0): only the torch path exists")
    a, b = torch.randint(-7, 8, (5, 40)).float(), torch.randint(0, 16, (40, 6)).float()
    y = torch.full((5, 6), -1.0)
    status = lib.hdqt_tiled_matmul_i8(a.data_ptr(), 40, 1, b.data_ptr(), 0, y.data_ptr(), 5, 40, 6, 32, 127.0,
                                      None, 1)
    if lib.hdqt_int8_dot_available():
        assert status == 0 and torch.equal(y, tiled_matmul_kj(a, b, 32, 8))
    else:
        assert status == 2 and torch.equal(y, torch.full((5, 6), -1.0))
