import platform

import pytest
import torch
import torch.nn.functional as F

from gptkit import kernels
from gptkit.quantize import dequantize_weight, interleave, quantize_weight

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler with OpenMP on this machine")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 16, 64])
@pytest.mark.parametrize("K", [64, 100, 768])  # 100: a tail after the vector loop
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_linear_equals_torch_linear(rows, K, bias):
    torch.manual_seed(rows + K)
    x, w = torch.randn(rows, 1, K), torch.randn(257, K)
    b = torch.randn(257) if bias else None
    with torch.inference_mode():
        y = kernels.skinny_linear(x, w, b)
    assert y.shape == (rows, 1, 257)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_skinny_linear_declines_what_it_does_not_cover():
    w = torch.randn(8, 16)
    with torch.inference_mode():
        assert kernels.skinny_linear(torch.randn(65, 16), w, None) is None  # too many rows: GEMM is better
        assert kernels.skinny_linear(torch.randn(1, 16).bfloat16(), w.bfloat16(), None) is None
    assert kernels.skinny_linear(torch.randn(1, 16), torch.nn.Parameter(w), None) is None  # autograd needs torch


def test_without_a_compiler_there_is_no_kernel(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    kernels._library.cache_clear()
    try:
        assert kernels.skinny_linear(torch.randn(1, 16), torch.randn(8, 16), None) is None
    finally:
        kernels._library.cache_clear()


def test_cpu_signature_closes_proc_cpuinfo(monkeypatch):
    opened = []

    class Tracked:
        def __init__(self, *args, **kw):
            self.f = open(*args, **kw)
            opened.append(self.f)

        def __enter__(self):
            return self.f.__enter__()

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __iter__(self):
            return iter(self.f)

    monkeypatch.setattr(kernels, "open", Tracked, raising=False)
    kernels._cpu_signature()
    assert opened and all(f.closed for f in opened)


def test_a_compiler_that_fails_is_said_once_with_its_log(tmp_path, monkeypatch, capsys):
    """Before, a failed build was swallowed with its output discarded: decoding silently ran 2-4x slower."""
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'quant.c:1: error: no such intrinsic' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels._library.cache_clear()
    try:
        assert kernels._library() is None and kernels._library() is None  # asked twice, said once
        err = capsys.readouterr().err
        assert err.count("the native CPU kernels did not build") == 1
        log = err.split("compiler output in ")[1].strip()
        assert "no such intrinsic" in open(log).read()
    finally:
        kernels._library.cache_clear()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def _targets_this_machine_runs() -> list[str]:
    flags, x86 = _cpu_flags(), platform.machine() in ("x86_64", "AMD64")
    runs = {"native": True, "portable": True, "avx2": x86 and {"avx2", "fma", "f16c"} <= flags}
    runs["avx-vnni"] = runs["avx2"] and "avx_vnni" in flags
    return [name for name in kernels.TARGETS if runs[name]]


@pytest.fixture(params=_targets_this_machine_runs())
def build(request, monkeypatch):
    """Each build of the kernels this machine can run (the paths of older CPUs too), loaded as the kernels' own."""
    monkeypatch.setenv("GPTKIT_KERNEL_TARGET", request.param)
    kernels._library.cache_clear()
    if kernels._library() is None:
        pytest.skip(f"this compiler cannot build the {request.param} kernels")
    yield request.param
    monkeypatch.undo()
    kernels._library.cache_clear()


def _quantized_activations(x):
    """x through int8 blocks of 32 as the kernels quantize it: d = max|x| / 127, rounded half away from zero."""
    blocks = x.double().reshape(*x.shape[:-1], -1, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).float().double()
    q = torch.trunc(blocks / torch.where(d > 0, d, 1) + torch.copysign(torch.full_like(blocks, 0.5), blocks))
    return (q.clamp(-127, 127) * d).reshape(x.shape)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N, K, group", [(27, 64, 32), (40, 192, 64)])  # odd groups of 8, rows after the last
def test_integer_gemm_at_every_row_count_equals_dequantize_then_matmul(build, bits, N, K, group):
    torch.manual_seed(N + bits)
    w, x, b = torch.randn(N, K), torch.randn(512, K) * torch.rand(512, 1) * 4, torch.randn(N)
    x[7, :32] = 0  # a block of zeros: scale 0
    q, s = quantize_weight(w, bits, group)
    W = dequantize_weight(q, s, bits)
    exact = (_quantized_activations(x) @ W.double().T + b.double()).float()  # what the integers compute
    plain = F.linear(x, W, b)
    qi, si = interleave(q, s)
    with torch.inference_mode():
        for rows in range(1, 513):
            y = kernels.quant_linear(x[:rows], qi, si, b, bits, group, kernel="gemm")
            assert y.shape == (rows, N)
            torch.testing.assert_close(y, exact[:rows], atol=1e-5 * exact[:rows].abs().max().item(), rtol=1e-5,
                                       msg=lambda m: f"{rows} rows: {m}")
    # and within the activations' 8-bit rounding (about 0.5%) of dequantize-then-matmul on fp32 activations
    assert ((y - plain).norm() / plain.norm()).item() < 1e-2


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_every_row_count_takes_a_kernel_that_matches(build, bits):
    """quant_linear's own choice (decode kernel for a few rows, GEMM for more), against dequantize-then-matmul."""
    torch.manual_seed(bits)
    w, x = torch.randn(24, 96), torch.randn(80, 1, 96)
    q, s = quantize_weight(w, bits, 32)
    ref = F.linear(x, dequantize_weight(q, s, bits))
    with torch.inference_mode():
        for rows in range(1, 81):
            y = kernels.quant_linear(x[:rows], *interleave(q, s), None, bits, 32)
            assert y.shape == (rows, 1, 24)
            assert ((y - ref[:rows]).norm() / ref[:rows].norm()).item() < 2e-2, rows


@needs_kernel
def test_the_native_build_takes_the_best_path_of_this_cpu():
    flags = _cpu_flags()
    if {"avx512_vnni", "avx512bw", "avx512vl"} <= flags:
        expected = "avx512-vnni"
    elif "avx_vnni" in flags:
        expected = "avx-vnni"
    elif {"avx2", "fma", "f16c"} <= flags:
        expected = "avx2"
    else:
        expected = "portable"
    assert kernels.gemm_path() == expected
    assert kernels._library_for("portable").gemm_path() == b"portable"


def test_an_unknown_kernel_target_is_named(monkeypatch):
    monkeypatch.setenv("GPTKIT_KERNEL_TARGET", "avx9000")
    kernels._library.cache_clear()
    try:
        with pytest.raises(kernels.KernelTargetError, match="GPTKIT_KERNEL_TARGET='avx9000'.*native"):
            kernels.available()
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()


@needs_kernel
def test_quant_linear_names_a_kernel_that_cannot_run():
    q, s = interleave(*quantize_weight(torch.randn(8, 32), 8, 32))
    with torch.inference_mode(), pytest.raises(ValueError, match="'skinny' for at most 32"):
        kernels.quant_linear(torch.randn(33, 32), q, s, None, 8, 32, kernel="skinny")
