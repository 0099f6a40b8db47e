"""Weight-only int8 / int4 quantization, swapped into a model as modules (the model code does not change).

A weight row is cut into blocks of 32 inputs, each stored as small integers and one fp16 scale per `group_size`
inputs: llama.cpp's Q8_0 (q = round(w / d), d = max|w| / 127) and Q4_0 (d = the block's largest-magnitude
weight / -8, q + 8 in a nibble, two per byte: weight j low, weight j + 16 high) when the group is 32, so GGUF
export can copy the blocks. On CPU the native kernels multiply the stored integers: a few rows (decoding) through
kernels/quant.c, more (a prompt) through the integer GEMM of kernels/gemm.c, which quantizes the activations to int8
blocks once (as llama.cpp does: about 0.5% relative error a layer). Under autograd, on other devices and without a
compiler, the layer dequantizes and runs the ordinary matmul.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .errors import GptkitError
from .kernels.step import Weights
from .model import GPT

BLOCK = 32  # the integers' packing unit; a group is a whole number of blocks
LAYOUTS = ("rows8", "rows")


class QuantizeError(GptkitError):
    """A model or setting that cannot be quantized as asked."""


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint's weights are stored; recorded as `quantization` in its config.json."""

    bits: int = 8  # every linear of the blocks (and an untied LM head)
    group_size: int = 32  # inputs sharing one scale
    embedding_bits: int | None = 8  # the token embedding (the tied LM head too); None: kept in floating point
    skip: tuple[str, ...] = ()  # module names kept in floating point (e.g. lm_head, wte, blocks.0.attn.qkv)
    layout: str = "rows8"  # in the file and in memory: "rows8" (`interleave`), or "rows" (each row's blocks in order)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise QuantizeError(f"unknown weight layout {self.layout!r}; gptkit knows {', '.join(LAYOUTS)}")
        if self.bits not in (4, 8):
            raise QuantizeError(f"--bits must be 8 or 4, got {self.bits}")
        if self.embedding_bits not in (8, None):
            raise QuantizeError(f"embeddings are quantized to 8 bits or not at all, got {self.embedding_bits}")
        if self.group_size <= 0 or self.group_size % BLOCK:
            raise QuantizeError(f"--group-size must be a positive multiple of {BLOCK}, got {self.group_size}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, d: dict) -> Scheme:
        try:
            return cls(**{"layout": "rows", **d, "skip": tuple(d.get("skip", ()))})  # (no layout: written before rows8)
        except TypeError as e:
            raise QuantizeError(f"invalid quantization record: {e}") from None

    def skips(self, name: str) -> bool:
        return any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in self.skip)


def _round(v: Tensor) -> Tensor:
    return torch.trunc(v + torch.copysign(torch.full_like(v, 0.5), v))  # half away from zero, as C's roundf


def quantize_weight(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(q, scales) for a weight [N, K]: q int8 [N, K] or packed uint8 [N, K / 2], scales fp16 [N, K / group]."""
    N, K = w.shape
    blocks = w.detach().float().reshape(N, K // BLOCK, BLOCK)
    per_group = group_size // BLOCK
    groups = blocks.reshape(N, K // group_size, group_size)
    if bits == 8:
        d = groups.abs().amax(-1) / 127
        inv = torch.where(d > 0, 1 / d, 0).repeat_interleave(per_group, 1)[..., None]
        return _round(blocks * inv).to(torch.int8).reshape(N, K), d.half()
    biggest = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]  # signed: it maps to -8 exactly
    d = biggest / -8
    inv = torch.where(d != 0, 1 / d, 0).repeat_interleave(per_group, 1)[..., None]
    q = torch.floor(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)  # as llama.cpp's quantize_row_q4_0
    return (q[..., :16] | q[..., 16:] << 4).reshape(N, K // 2), d.half()


def interleave(q: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """The layout the kernels stream ("rows8"; kernels/quant.c, dots8): in each complete group of 8 rows, the rows'
    bytes in 4-byte chunks, chunk c of the 8 rows side by side, and the scales of each group of inputs for the 8
    rows side by side; the last N % 8 rows as they are. The same blocks as llama.cpp's, in another order (as its
    own CPU backend repacks Q4_0 for AVX2). Layers hold their weights so, in memory and in the file, so loading
    a checkpoint maps it and copies nothing."""
    n, width = q.shape[0] // 8 * 8, q.shape[1]
    grouped = q[:n].reshape(n // 8, 8, width // 4, 4).transpose(1, 2).reshape(n, width)
    scaled = scales[:n].reshape(n // 8, 8, scales.shape[1]).transpose(1, 2).reshape(n, scales.shape[1])
    return torch.cat([grouped, q[n:]]), torch.cat([scaled, scales[n:]])


def deinterleave(q: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    n, width = q.shape[0] // 8 * 8, q.shape[1]
    rows = q[:n].reshape(n // 8, width // 4, 8, 4).transpose(1, 2).reshape(n, width)
    scaled = scales[:n].reshape(n // 8, scales.shape[1], 8).transpose(1, 2).reshape(n, scales.shape[1])
    return torch.cat([rows, q[n:]]), torch.cat([scaled, scales[n:]])


def dequantize_weight(q: Tensor, scales: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    N, groups = scales.shape
    if bits == 8:
        values = q.to(dtype).reshape(N, groups, -1)
    else:
        packed = q.reshape(N, -1, BLOCK // 2)
        nibbles = torch.cat([packed & 15, packed >> 4], dim=-1).to(dtype) - 8
        values = nibbles.reshape(N, groups, -1)
    return (values * scales.to(dtype)[..., None]).reshape(N, -1)


class QuantLinear(nn.Module):
    """A linear layer with quantized weights: `qweight`, `scales` (interleaved: `interleave`) and an optional
    fp32 `bias` in the state dict."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 device=None, persistent: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        width = in_features if bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.empty(out_features, width, device=device,
                                                    dtype=torch.int8 if bits == 8 else torch.uint8), persistent)
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, device=device,
                                                   dtype=torch.float16), persistent)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.compute_dtype = torch.float32  # what model.to(dtype) asked for: the embedding's output dtype

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None, bits: int, group_size: int) -> QuantLinear:
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, bits, group_size, device=weight.device)
        layer.qweight, layer.scales = interleave(*quantize_weight(weight, bits, group_size))
        if bias is not None:
            layer.bias.data = bias.detach().float().clone()
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(*deinterleave(self.qweight, self.scales), self.bits, dtype)

    def native_weights(self) -> Weights:
        """Its blocks as the native kernels read them (native.py builds the decode plan from these)."""
        return Weights(self.qweight, self.scales, self.bias, self.bits, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda and not torch.is_grad_enabled():  # any row count: the kernels pick decode kernel or GEMM
            y = kernels.quant_linear(x if x.dtype == torch.float32 else x.float(), self.qweight, self.scales, self.bias,
                                     self.bits, self.group_size)
            if y is not None:
                return y if x.dtype == torch.float32 else y.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # moves between devices like any module, but a cast (model.half(), .to(torch.bfloat16)) leaves the
        # integers and their fp16 scales as they are: casting fp16 scales through bf16 would round them
        stored = (self.qweight, self.scales)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(lambda t: t.to(fn(t.new_empty(0)).device) if any(t is s for s in stored) else fn(t),
                              recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QuantEmbedding(QuantLinear):
    """A token embedding stored like a linear layer's weight ([vocab, n_embd] int8 rows with their scales):
    looking up a token dequantizes its row; as the tied LM head it runs through the kernel."""

    def __init__(self, vocab: int, dim: int, group_size: int, device=None):
        super().__init__(dim, vocab, False, 8, group_size, device=device)

    def forward(self, idx: Tensor) -> Tensor:
        q, scales = self._rows(self.qweight, idx), self._rows(self.scales, idx)
        rows = q.float().reshape(*idx.shape, scales.shape[-1], -1)
        return (rows * scales.float()[..., None]).reshape(*idx.shape, -1).to(self.compute_dtype)

    @staticmethod
    def _rows(t: Tensor, idx: Tensor) -> Tensor:
        """Rows `idx` of an interleaved tensor, each in its own order."""
        n, width = t.shape[0] // 8 * 8, t.shape[1]
        if n == 0:
            return t[idx]
        chunk = 4 if t.dtype != torch.float16 else 1  # 4-byte chunks of weights; scales one by one
        grouped = t[:n].reshape(n // 8, width // chunk, 8, chunk)
        inside = idx < n
        i = torch.where(inside, idx, 0)
        rows = grouped[i // 8, :, i % 8].reshape(*idx.shape, width)
        return torch.where(inside[..., None], rows, t[idx]) if n < t.shape[0] else rows

    @property
    def weight(self) -> Tensor:  # for code that reads the embedding matrix (the tied head under autograd)
        return self.dequantize()


def _linears(model: GPT):
    """(parent, attribute, qualified name, layer) of every linear layer, whatever module carries it."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(getattr(child, "weight", None), Tensor) and \
                    not isinstance(child, (nn.Embedding, QuantLinear)) and child.weight.dim() == 2:
                yield parent, name, full, child


@torch.no_grad()
def quantize(model: GPT, bits: int = 8, group_size: int = 32, skip: tuple[str, ...] = (),
             embedding_bits: int | None = 8) -> GPT:
    """Quantize `model` in place: every linear of the blocks and the LM head to `bits`, the token embedding to
    int8 (unless in `skip`), and record the scheme in `model.records`. Returns the model."""
    if model.records.quantization:
        raise QuantizeError("the model is already quantized; quantize its floating-point original instead")
    scheme = Scheme(bits, group_size, embedding_bits, tuple(skip))
    unknown = [s for s in scheme.skip if not any(scheme.skips(n) for n, _ in model.named_modules())]
    if unknown:
        raise QuantizeError(f"--skip names no layer of this model: {', '.join(unknown)}")
    layers = [(p, a, n, c) for p, a, n, c in _linears(model) if not scheme.skips(n)]
    for _, _, name, layer in layers:  # check every layer before changing any
        if layer.weight.shape[1] % group_size:
            raise QuantizeError(f"{name}: its {layer.weight.shape[1]} inputs are not a multiple of the group size "
                                f"{group_size}")
    for parent, attr, _, layer in layers:
        setattr(parent, attr, QuantLinear.of(layer.weight, layer.bias, bits, group_size))
    if embedding_bits and not scheme.skips("wte"):
        if model.config.n_embd % group_size:
            raise QuantizeError(f"wte: its {model.config.n_embd} columns are not a multiple of the group size "
                                f"{group_size}")
        w = model.wte.weight
        embedding = QuantEmbedding(*w.shape, group_size, device=w.device)
        embedding.qweight, embedding.scales = interleave(*quantize_weight(w, 8, group_size))
        model.wte = embedding
    model.records = dataclasses.replace(model.records, quantization=scheme.to_dict())
    return model


def arrange(state: dict[str, Tensor], record: dict) -> dict[str, Tensor]:
    """A quantized checkpoint's tensors in the layout its layers hold: files written before the interleaved layout
    ("rows") are interleaved here, the current ones are already so."""
    if Scheme.from_dict(record).layout == "rows":
        for key in [k for k in state if k.endswith(".qweight") and k[:-7] + "scales" in state]:
            state[key], state[key[:-7] + "scales"] = interleave(state[key], state[key[:-7] + "scales"])
    return state


def skeleton(model: GPT, record: dict) -> GPT:
    """Swap empty quantized modules into a (meta-device) model built from its config, so a quantized state
    dict loads into it with `assign=True`: the floating-point weights never exist."""
    scheme = Scheme.from_dict(record)
    for parent, attr, name, layer in list(_linears(model)):
        if not scheme.skips(name):
            N, K = layer.weight.shape
            setattr(parent, attr, QuantLinear(K, N, layer.bias is not None, scheme.bits, scheme.group_size,
                                              device=layer.weight.device))
    if scheme.embedding_bits and not scheme.skips("wte"):
        model.wte = QuantEmbedding(*model.wte.weight.shape, scheme.group_size, device=model.wte.weight.device)
    model.records = dataclasses.replace(model.records, quantization={**scheme.to_dict(), "layout": "rows8"})
    # (`arrange` brings older files to that layout)
    return model


def check_loaded(model: GPT) -> GPT:
    """After a quantized state dict is assigned: every tensor of the stored kind with finite scales (a scale
    that is not is a corrupt file, which would otherwise decode as NaN)."""
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            expected = torch.int8 if layer.bits == 8 else torch.uint8
            if layer.qweight.dtype != expected or layer.scales.dtype != torch.float16:
                raise QuantizeError(f"{name} holds {layer.qweight.dtype} weights and {layer.scales.dtype} scales, "
                                    f"not {expected} and torch.float16")
            if not torch.isfinite(layer.scales).all():
                raise QuantizeError(f"{name}.scales holds values that are not finite numbers")
    return model


@torch.no_grad()
def dequantize(model: GPT) -> GPT:
    """The model with floating-point layers again (the quantized values, so not the weights it was made from)."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantEmbedding):
                embedding = nn.Embedding(child.out_features, child.in_features, device=child.qweight.device)
                embedding.weight.data = child.dequantize()
                setattr(parent, name, embedding)
            elif isinstance(child, QuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                   device=child.qweight.device)
                linear.weight.data = child.dequantize()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.clone()
                setattr(parent, name, linear)
    model.records = dataclasses.replace(model.records, quantization=None)
    return model


def nbytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory (parameters and saved buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def is_quantized(model: GPT) -> bool:
    return bool(model.records.quantization)
