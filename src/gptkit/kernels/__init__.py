"""Native CPU kernels as tensor functions, compiled on first use with the machine's C compiler and cached.

The skinny linears that bound decoding speed: fp32 (gemv.c) and int8 / int4 weight-only (quant.c; `quantize.py`'s
linears call it), the integer GEMM of quantized prompts (gemm.c) and the whole one-token step (step.c, `step.py`).
Where no C compiler or OpenMP is available the loader returns None and callers keep their PyTorch path; a compiler
that fails says so once on stderr, naming its log. Every entry point checks shapes and dtypes before it passes a
pointer. Nothing of gptkit's is imported here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(name) for name in ("gemv.c", "quant.c", "gemm.c", "step.c")]
FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
# What each build targets (`GPTKIT_KERNEL_TARGET`; the C files pick their paths from the ISA these enable): the
# machine's own instructions, and for x86-64 the older kinds, so one machine can build and test the paths of others.
TARGETS = {"native": ["-march=native"], "avx-vnni": ["-march=x86-64-v3", "-mavxvnni"], "avx2": ["-march=x86-64-v3"],
           "portable": []}
MAX_ROWS = 64  # measured (AVX2 EPYC): passes of 8 rows beat MKL up to 64 rows, oneDNN up to 32


def _cpu_signature() -> str:
    """What -march=native depends on, so a cache shared between different CPUs never runs the wrong code."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def _build(compiler: str, flags: list[str], out: Path) -> None:
    """Compile to a temporary file and rename it into place, so a half-written library is never loaded. A failed
    build leaves its compiler output in `out` + ".log" and raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    log = out.with_suffix(".log")
    try:
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                timeout=120)
        if result.returncode:
            log.write_text(f"{' '.join([compiler, *flags])}\n{result.stdout}{result.stderr}")
            raise subprocess.SubprocessError(f"{compiler} exited with {result.returncode}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class KernelTargetError(ValueError):
    """A `GPTKIT_KERNEL_TARGET` this module does not know."""


def target() -> str:
    """The build `_library` loads: `GPTKIT_KERNEL_TARGET`, else "portable" under `GPTKIT_PORTABLE_KERNELS`, else
    "native"."""
    portable = os.environ.get("GPTKIT_PORTABLE_KERNELS")
    name = os.environ.get("GPTKIT_KERNEL_TARGET") or ("portable" if portable else "native")
    if name not in TARGETS:
        raise KernelTargetError(f"GPTKIT_KERNEL_TARGET={name!r}: the kernels build for {', '.join(TARGETS)}")
    return name


@functools.cache
def _library():
    """The build the environment asks for, loaded once (`_library.cache_clear()` reads the environment again)."""
    return _library_for(target())


def _library_for(name: str):
    """The build for target `name`, compiled on first use and cached on disk; None without a compiler."""
    compiler = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    if os.environ.get("GPTKIT_NO_KERNELS") or not shutil.which(compiler):
        return None
    flags = FLAGS + TARGETS[name]
    source = "".join(p.read_text() for p in SOURCES)
    key = hashlib.sha256((source + " ".join(flags) + compiler + _cpu_signature()).encode()).hexdigest()
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptkit" / "kernels" / f"gptkit-{key[:16]}.so"
    try:
        if not path.exists():
            _build(compiler, flags, path)
        # torch is already loaded, so the library's OpenMP calls bind to torch's own runtime and thread pool.
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log = path.with_suffix(".log")
        print(f"gptkit: the native CPU kernels did not build ({e}); decoding runs on PyTorch alone, 2-4x slower"
              + (f"; compiler output in {log}" if log.exists() else ""), file=sys.stderr)
        return None
    lib.skinny_linear_f32.restype = None
    lib.skinny_linear_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    lib.quant_linear.restype = ctypes.c_int
    lib.quant_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 5
    lib.quant_gemm.restype = ctypes.c_int
    lib.quant_gemm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 5
    lib.gemm_path.restype = ctypes.c_char_p
    lib.gemm_path.argtypes = []
    lib.decode_step.restype = ctypes.c_int
    lib.decode_step.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    return lib


def available() -> bool:
    return _library() is not None


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """F.linear(x, weight, bias) for a few fp32 CPU rows, streaming the weights once; None where not applicable."""
    lib = _library()
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (lib is None or not 0 < rows <= MAX_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or not weight.is_contiguous() or torch.is_grad_enabled() and weight.requires_grad
            or bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())):
        return None
    N, K = weight.shape
    if x.shape[-1] != K or weight.dim() != 2 or bias is not None and bias.shape != (N,):
        raise ValueError(f"activations of width {x.shape[-1]} for weights {tuple(weight.shape)}"
                         + (f" and a bias of {tuple(bias.shape)}" if bias is not None else ""))
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N)
    lib.skinny_linear_f32(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                          y.data_ptr(), rows, N, K)
    return y


QUANT_MAX_ROWS = 32  # the decode kernel: one pass over the weights per 4 rows
GEMM_MIN_ROWS = 5  # from here the integer GEMM (gemm.c): on a Zen 5 EPYC the AVX2 build's GEMM ties its decode
# kernel at 5 rows and leads from 8 (weights in cache); the AVX-512 VNNI build's decode kernel is the GEMM from 3


def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, bits: int, group_size: int,
                 kernel: str | None = None) -> Tensor | None:
    """x @ dequant(qweight, scales).T + bias for fp32 CPU rows, over the quantized blocks as stored: a few rows
    through the decode kernel (quant.c: the weights streamed once per 4 rows), more through the integer GEMM
    (gemm.c: x quantized to int8 blocks once). `kernel` ("skinny" or "gemm") overrides the choice by row count.
    None where no kernel applies (no compiler, another dtype or device)."""
    lib = _library()
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if (lib is None or rows == 0 or x.dtype != torch.float32 or x.device.type != "cpu"
            or qweight.device.type != "cpu" or bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())):
        return None
    kernel = kernel or ("gemm" if rows >= GEMM_MIN_ROWS else "skinny")
    if kernel not in ("skinny", "gemm") or kernel == "skinny" and rows > QUANT_MAX_ROWS:
        raise ValueError(f"no {kernel!r} kernel for {rows} rows: 'gemm', or 'skinny' for at most {QUANT_MAX_ROWS}")
    N = scales.shape[0]
    if (bits not in (8, 4) or group_size <= 0 or group_size % 32 or K % group_size
            or qweight.shape != (N, K if bits == 8 else K // 2) or scales.shape != (N, K // group_size)
            or qweight.dtype != (torch.int8 if bits == 8 else torch.uint8) or scales.dtype != torch.float16
            or not qweight.is_contiguous() or not scales.is_contiguous() or bias is not None and bias.shape != (N,)):
        raise ValueError(f"activations of width {K} for int{bits} weights {tuple(qweight.shape)} "
                         f"({qweight.dtype}) with scales {tuple(scales.shape)} ({scales.dtype}), groups of {group_size}")
    if not x.is_contiguous():
        x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (N,))
    run = lib.quant_gemm if kernel == "gemm" else lib.quant_linear
    failed = run(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), bias.data_ptr() if bias is not None else None,
                 y.data_ptr(), rows, N, K, group_size, bits)
    return None if failed else y


def gemm_path() -> str | None:
    """Which path of the integer GEMM the loaded build runs: avx512-vnni, avx-vnni, avx2 or portable."""
    lib = _library()
    return lib.gemm_path().decode() if lib is not None else None
