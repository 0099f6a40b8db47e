"""A whole decoding step in one native call (step.c), over tensors described here: what a decoder's weights are,
not where a model keeps them (the caller, gptkit's `native.py`, reads the model).

`DecodePlan(shape, ...)` checks every tensor against the shape before it builds the pointer table step.c walks
(nothing is copied: the plan holds the caller's tensors), and each call checks its tokens, rows and positions
against the plan and the cache: a bad index raises before any memory is touched.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from . import QUANT_MAX_ROWS, _library

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "swiglu": 2, "relu2": 3}
_ptr = ctypes.c_void_p


class Unsupported(Exception):
    """Tensors the native step does not compute (another dtype, device or layout); the caller keeps its own path."""


@dataclass(frozen=True)
class Weights:
    """A linear layer (or an embedding table) as the kernels read it: fp32 `weight` [N, K] (bits 32), or int8
    [N, K] / packed int4 [N, K / 2] blocks (bits 8 / 4) with fp16 `scales` [N, K / group_size] in quantize.py's
    interleaved layout; an optional fp32 `bias` [N]."""
    weight: Tensor
    scales: Tensor | None = None
    bias: Tensor | None = None
    bits: int = 32
    group_size: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        N, width = self.weight.shape
        return N, width * 2 if self.bits == 4 else width


@dataclass(frozen=True)
class Layer:
    norm1: tuple[Tensor, Tensor | None]
    norm2: tuple[Tensor, Tensor | None]
    q_norm: Tensor | None
    k_norm: Tensor | None
    qkv: Weights
    proj: Weights
    fc: Weights
    out: Weights
    local: bool


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    kv_heads: int
    head_dim: int
    hidden: int
    context: int
    activation: str
    rmsnorm: bool
    rope: bool
    prenorm: bool
    window: int
    eps: float


class _Linear(ctypes.Structure):
    _fields_ = [("w", _ptr), ("s", _ptr), ("b", _ptr), ("N", ctypes.c_long), ("K", ctypes.c_long),
                ("G", ctypes.c_long), ("bits", ctypes.c_long)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("n1w", "n1b", "n2w", "n2b", "qn", "kn")] + \
               [(name, _Linear) for name in ("qkv", "proj", "fc", "out")] + [("local", ctypes.c_long)]


class _Plan(ctypes.Structure):
    _fields_ = [("wte", _Linear), ("wpe", _ptr)] + \
               [(name, ctypes.c_long) for name in ("n_layer", "E", "H", "KV", "D", "hidden", "context", "rms", "act",
                                                    "rope", "prenorm", "window")] + \
               [("eps", ctypes.c_float)] + [(name, _ptr) for name in ("cos", "sin", "nfw", "nfb", "layers")]


def _address(t: Tensor | None, shape: tuple, dtype: torch.dtype = torch.float32) -> int | None:
    if t is None:
        return None
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise Unsupported
    if tuple(t.shape) != shape:
        raise ValueError(f"a tensor of shape {tuple(t.shape)} where the plan needs {shape}")
    return t.data_ptr()


def _linear(w: Weights, N: int, K: int, bias_allowed: bool = True) -> _Linear:
    if w.bits == 32:
        weight = _address(w.weight, (N, K))
        if w.scales is not None:
            raise ValueError("fp32 weights have no scales")
    elif w.bits in (8, 4):
        if w.group_size <= 0 or w.group_size % 32 or K % w.group_size:
            raise ValueError(f"group size {w.group_size} does not divide {K} inputs in blocks of 32")
        weight = _address(w.weight, (N, K if w.bits == 8 else K // 2), torch.int8 if w.bits == 8 else torch.uint8)
        _address(w.scales, (N, K // w.group_size), torch.float16)
    else:
        raise Unsupported
    if w.bias is not None and not bias_allowed:
        raise Unsupported
    return _Linear(weight, w.scales.data_ptr() if w.bits != 32 else None, _address(w.bias, (N,)), N, K,
                   w.group_size, w.bits)


class DecodePlan:
    """The native one-token step over a decoder's weights. Raises Unsupported for tensors it does not compute and
    ValueError for tensors whose shapes do not fit `shape`."""

    def __init__(self, shape: Shape, wte: Weights, wpe: Tensor | None, layers: list[Layer],
                 final_norm: tuple[Tensor, Tensor | None] | None, rope: tuple[Tensor, Tensor] | None):
        s = shape
        if _library() is None:
            raise Unsupported
        if len(layers) != s.n_layer or s.n_head % s.kv_heads or s.activation not in ACTIVATIONS:
            raise ValueError("the layers do not fit the plan's shape")
        E, D, H, KV = s.n_embd, s.head_dim, s.n_head, s.kv_heads
        if wte.bits not in (32, 8) or wte.bias is not None:
            raise Unsupported
        vocab = wte.weight.shape[0]
        self.vocab = vocab
        table = _linear(wte, vocab, E)

        def norm(pair):
            return _address(pair[0], (E,)), _address(pair[1], (E,))

        rows = []
        for layer in layers:
            if (layer.q_norm is None) != (layer.k_norm is None):
                raise ValueError("QK-norm needs both the query and the key norm")
            rows.append(_Layer(*norm(layer.norm1), *norm(layer.norm2), _address(layer.q_norm, (D,)),
                               _address(layer.k_norm, (D,)), _linear(layer.qkv, (H + 2 * KV) * D, E),
                               _linear(layer.proj, E, H * D),
                               _linear(layer.fc, (2 if s.activation == "swiglu" else 1) * s.hidden, E),
                               _linear(layer.out, E, s.hidden), layer.local))
        cos, sin = (_address(t, (s.context, D)) for t in rope) if s.rope else (None, None)
        if s.rope and rope is None:
            raise ValueError("a RoPE model needs its tables")
        nfw, nfb = norm(final_norm) if final_norm is not None else (None, None)
        self.shape = s
        self.tensors = (wte, wpe, layers, final_norm, rope)  # everything it points at lives as long as the plan
        self.layers = (_Layer * len(rows))(*rows)
        self.plan = _Plan(table, _address(wpe, (s.context, E)), s.n_layer, E, H, KV, D, s.hidden, s.context,
                          s.rmsnorm, ACTIVATIONS[s.activation], s.rope, s.prenorm, s.window, s.eps, cos, sin, nfw, nfb,
                          ctypes.cast(self.layers, _ptr))

    def __call__(self, tokens: Tensor, positions: Tensor, tables: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Final hidden states [B, n_embd] of one new token a row: token b at position positions[b] of its row, whose
        position j lives in block tables[b, j // block_size] of keys / values [n_layer, n_blocks, kv_heads,
        block_size, head_dim] (a contiguous cache is one block a row); the new key and value are written there."""
        s, B = self.shape, tokens.numel()
        if not 0 < B <= QUANT_MAX_ROWS or tokens.shape != (B,) or positions.shape != (B,) or tables.dim() != 2 \
                or tables.shape[0] != B:
            raise ValueError(f"{tuple(tokens.shape)} tokens, {tuple(positions.shape)} positions and "
                             f"{tuple(tables.shape)} block tables: one row each, at most {QUANT_MAX_ROWS}")
        expected = (s.n_layer, keys.shape[1], s.kv_heads, keys.shape[3], s.head_dim) if keys.dim() == 5 else None
        if expected is None or tuple(keys.shape) != expected or tuple(values.shape) != expected:
            raise ValueError(f"a cache of shape {tuple(keys.shape)} / {tuple(values.shape)} for a plan of "
                             f"{s.n_layer} layers x {s.kv_heads} heads x {s.head_dim}")
        for t in (keys, values):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise Unsupported
        tokens, positions, tables = (t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()
                                     for t in (tokens, positions, tables))
        n_blocks, block_size, max_blocks = keys.shape[1], keys.shape[3], tables.shape[1]
        x = torch.empty(B, s.n_embd)
        # step.c checks every token, position and block index a row uses before it touches memory (-2: none touched)
        failed = _library().decode_step(ctypes.byref(self.plan), tokens.data_ptr(), x.data_ptr(), B,
                                        positions.data_ptr(), tables.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                        n_blocks, block_size, max_blocks)
        if failed == -2:
            raise IndexError(f"a token, position or cache block out of range: tokens in [0, {self.vocab}), positions "
                             f"below {min(max_blocks * block_size, s.context)}, blocks in [0, {n_blocks})")
        if failed:
            raise MemoryError("the native decode step could not allocate its scratch memory")
        return x
