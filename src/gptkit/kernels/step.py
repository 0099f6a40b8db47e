"""A whole decoding step in one native call (step.c): for CPU models whose every block is fp32 or quantized.

`DecodeStep(model)` reads the model's tensors where they are (nothing is copied) into a plan of pointers that
step.c walks. The plan is only used while it still describes the model: before the first step on a KV cache
(each generation's) it checks that the same modules hold the same tensors at the same addresses, with no hooks,
so a model changed after packing (quantized, wrapped with LoRA, moved, cast, hooked) takes the PyTorch path,
which computes the same thing. (Checking every step cost more than the rest of the Python around a step.)
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import Tensor, nn

from . import QUANT_MAX_ROWS, _library
from .packed import PackedLinear

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "swiglu": 2, "relu2": 3}
_ptr = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("w", _ptr), ("s", _ptr), ("b", _ptr), ("N", ctypes.c_long), ("K", ctypes.c_long),
                ("G", ctypes.c_long), ("bits", ctypes.c_long)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("n1w", "n1b", "n2w", "n2b", "qn", "kn")] + \
               [(name, _Linear) for name in ("qkv", "proj", "fc", "out")] + [("local", ctypes.c_long)]


class _Plan(ctypes.Structure):
    _fields_ = [("wte", _Linear), ("wpe", _ptr)] + \
               [(name, ctypes.c_long) for name in ("n_layer", "E", "H", "KV", "D", "hidden", "rms", "act", "rope",
                                                    "prenorm", "window")] + \
               [("eps", ctypes.c_float)] + [(name, _ptr) for name in ("cos", "sin", "nfw", "nfb", "layers")]


class Unsupported(Exception):
    """A part of the model that step.c does not compute (the PyTorch path does)."""


class DecodeStep:
    def __init__(self, model: nn.Module):
        self.model = model
        self.watched: list[tuple] = []  # (dict, key, object, address): what the plan read, and where
        self.plan = self._plan()
        self.checked = None  # the cache buffer that the model was last checked for (a weak reference)

    def __call__(self, idx: Tensor, cache) -> Tensor | None:
        """Final hidden states [B, 1, n_embd] for one new token a row, or None where this does not apply."""
        model, lib = self.model, _library()
        B = idx.shape[0]
        if (self.plan is None or lib is None or idx.shape[1] != 1 or not 0 < B <= QUANT_MAX_ROWS or model.training
                or cache.k.dtype != torch.float32 or not cache.k.is_contiguous()):
            return None
        if self.checked is None or self.checked() is not cache.k:
            if not self._current():
                return None
            self.checked = weakref.ref(cache.k)
        lengths, c = cache.row_lengths(), model.config
        if max(lengths) + 1 > c.context or not 0 <= int(idx.min()) <= int(idx.max()) < c.vocab_size:
            return None  # the PyTorch path raises the error
        tokens, pos = idx.reshape(B).to(torch.long).contiguous(), torch.tensor(lengths)
        rows = torch.arange(*cache.window.indices(cache.batch))
        x = torch.empty(B, 1, model.config.n_embd)
        failed = lib.decode_step(ctypes.byref(self.plan), tokens.data_ptr(), x.data_ptr(), B, pos.data_ptr(),
                                 rows.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.batch, cache.max_len)
        return None if failed else x

    def _current(self) -> bool:
        hooks = nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return False
        for holder, key, obj, address in self.watched:
            if holder.get(key) is not obj or (address is not None and obj.data_ptr() != address):
                return False
            if address is None and (obj._forward_hooks or obj._forward_pre_hooks):
                return False
        return True

    # --- reading the model --------------------------------------------------------------------------------
    def _plan(self) -> _Plan | None:
        model, c = self.model, self.model.config
        try:
            if model.device.type != "cpu" or model.dtype != torch.float32:
                raise Unsupported
            wte = self._embedding(model)
            wpe = self._tensor(self._module(model._modules, "wpe"), "weight") if model.wpe is not None else None
            layers = [self._layer(model, i, block) for i, block in enumerate(model.blocks)]
            nfw, nfb = self._norm(model, "norm_f", c) if model.norm_f is not None else (None, None)
            cos, sin = (self._tensor(model, n) for n in ("rope_cos", "rope_sin")) if c.pos == "rope" else (0, 0)
        except Unsupported:
            return None
        self.layers = (_Layer * len(layers))(*layers)  # kept alive with the plan
        return _Plan(wte, wpe, c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.head_dim, c.hidden, c.norm == "rmsnorm",
                     ACTIVATIONS[c.activation], c.pos == "rope", c.prenorm, c.window or 0, c.norm_eps, cos, sin,
                     nfw, nfb, ctypes.cast(self.layers, _ptr))

    def _layer(self, model, i: int, block) -> _Layer:
        c = model.config
        self._module(model.blocks._modules, str(i))
        attn = self._module(block._modules, "attn")
        mlp = self._module(block._modules, "mlp")
        qn = kn = None
        if attn.q_norm is not None:
            qn = self._tensor(self._module(attn._modules, "q_norm"), "weight")
            kn = self._tensor(self._module(attn._modules, "k_norm"), "weight")
        return _Layer(*self._norm(block, "norm1", c), *self._norm(block, "norm2", c), qn, kn,
                      self._linear(attn, "qkv"), self._linear(attn, "proj"), self._linear(mlp, "fc"),
                      self._linear(mlp, "proj"), i in c.local_layers)

    def _embedding(self, model) -> _Linear:
        from ..quantize import QuantEmbedding

        wte = self._module(model._modules, "wte")
        if isinstance(wte, QuantEmbedding) and wte.compute_dtype == torch.float32:
            q, s = self._tensor(wte, "qweight"), self._tensor(wte, "scales")
            return _Linear(q, s, None, wte.out_features, wte.in_features, wte.group_size, 8)
        if type(wte) is nn.Embedding:
            return _Linear(self._tensor(wte, "weight"), None, None, *wte.weight.shape, 0, 32)
        raise Unsupported

    def _norm(self, owner, name: str, c) -> tuple[int, int | None]:
        norm = self._module(owner._modules, name)
        if not isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) or norm.eps != c.norm_eps:
            raise Unsupported
        bias = getattr(norm, "bias", None)
        return self._tensor(norm, "weight"), self._tensor(norm, "bias") if bias is not None else None

    def _linear(self, owner, name: str) -> _Linear:
        from ..quantize import QuantLinear

        layer = self._module(owner._modules, name)
        if not isinstance(layer, (QuantLinear, PackedLinear, nn.Linear)):
            raise Unsupported
        bias = self._tensor(layer, "bias") if layer.bias is not None else None
        if isinstance(layer, QuantLinear) and layer.compute_dtype == torch.float32:
            q, s = self._tensor(layer, "qweight"), self._tensor(layer, "scales")
            return _Linear(q, s, bias, layer.out_features, layer.in_features, layer.group_size, layer.bits)
        if isinstance(layer, (PackedLinear, nn.Linear)):
            N, K = layer.weight.shape
            return _Linear(self._tensor(layer, "weight"), None, bias, N, K, 0, 32)
        raise Unsupported

    def _module(self, holder: dict, key: str) -> nn.Module:
        module = holder.get(key)
        if module is None:
            raise Unsupported
        self.watched.append((holder, key, module, None))
        return module

    def _tensor(self, module: nn.Module, key: str) -> int:
        """The address of a module's parameter, buffer or plain tensor attribute, watched from now on."""
        holder = next((d for d in (module._parameters, module._buffers, module.__dict__) if key in d), {})
        t = holder.get(key)
        if t is None or t.device.type != "cpu" or not t.is_contiguous() or \
                t.is_floating_point() and t.dtype != (torch.float16 if key == "scales" else torch.float32):
            raise Unsupported
        self.watched.append((holder, key, t, t.data_ptr()))
        return t.data_ptr()
