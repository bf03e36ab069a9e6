"""How the native kernels are built, declared and reported: tests that run on any
machine with a C compiler (no particular instruction set needed)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hdqt.quantization import native

CSRC = Path(native.__file__).with_name("csrc")
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine (cc or gcc)")


def _defined_functions() -> set[str]:
    """Names of the non-static hdqt_* functions that the C sources define."""
    names = set()
    for path in [CSRC.parent / "kernels.c", *CSRC.glob("*.[ch]")]:
        if path.name == "api.h":
            continue
        names |= set(re.findall(r"^(?:int|void|float|double)\s+(hdqt_\w+)\([^;]*?\)\s*\{", path.read_text(), re.M | re.S))
    return names


def test_every_exported_function_is_declared_once_in_api_h():
    declared = native.api_declarations()
    assert set(declared) == _defined_functions()
    assert len(declared) >= 13
    # a spot check of the mapping: 11 arguments, a double written back through a pointer
    result, arguments = declared["hdqt_quantize_f32"]
    assert result is native.ctypes.c_int and len(arguments) == 11
    assert arguments[9] is native.ctypes.POINTER(native.ctypes.c_double)


@needs_compiler
def test_loaded_library_uses_the_declared_types():
    lib = native.load()
    if lib is None:
        pytest.skip("the native kernels did not build here (HDQT_NATIVE=0 or no compiler)")
    for name, (result, arguments) in native.api_declarations().items():
        function = getattr(lib, name)
        assert function.argtypes == arguments and function.restype == result, name


@needs_compiler
def test_a_declaration_that_disagrees_with_its_definition_does_not_compile(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    shutil.copy(CSRC.parent / "kernels.c", tmp_path / "kernels.c")
    shutil.copytree(CSRC, tmp_path / "csrc")
    cmd = [compiler, "-fsyntax-only", "-fopenmp", str(tmp_path / "kernels.c")]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    api = tmp_path / "csrc" / "api.h"
    text = api.read_text()
    mutated = text.replace("int64_t rows, int64_t row_len, int64_t p, int threads",
                           "int rows, int64_t row_len, int64_t p, int threads")
    assert mutated != text
    api.write_text(mutated)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode != 0 and "hdqt_fwht_rows_f32" in done.stderr


def test_unmappable_type_is_a_named_error(tmp_path):
    header = tmp_path / "api.h"
    header.write_text("int hdqt_example(const float *x, long double y);\n")
    with pytest.raises(ValueError, match="hdqt_example: cannot map the C type 'long double y'"):
        native.api_declarations(header)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native._compiled as on a machine that never built the kernels; the real one after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("HDQT_NATIVE", raising=False)  # the build is what is under test
    native._compiled.cache_clear()
    yield
    native._compiled.cache_clear()


def test_without_a_compiler_the_fallback_is_said_once(monkeypatch, capsys, fresh_build):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.load() is None and native.load() is None
    err = capsys.readouterr().err
    assert err.count("hdqt: no C compiler found") == 1 and "pure-torch path" in err
    assert native.kernel_variant().startswith("pure-torch path (the native kernels are not available")


def test_a_failed_compile_is_said_with_the_compilers_words(monkeypatch, capsys, tmp_path, fresh_build):
    script = tmp_path / "broken-cc"
    script.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    assert native.load() is None
    err = capsys.readouterr().err
    assert "hdqt: compiling the native CPU kernels" in err
    assert "did not compile" in err and "this compiler is broken" in err


def test_variant_names_every_bit():
    assert native.describe_variant(1 | 4 | 16) == \
        "x86-64-v4 (AVX-512), int8 dot products (AVX512-VNNI), OpenMP threads"
    assert native.describe_variant(2 | 8) == \
        "x86-64-v3 (AVX2, FMA), narrow register blocks, float32 products (no int8 dot products)"
    assert native.describe_variant(0).startswith("baseline (no vector clones)")


def test_torch_path_is_named_when_chosen(monkeypatch):
    monkeypatch.setenv("HDQT_NATIVE", "0")
    assert native.kernel_variant() == "pure-torch path (HDQT_NATIVE=0)"
