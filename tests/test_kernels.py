import pytest
import torch
import torch.nn.functional as F

from gptkit import kernels

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
