"""How the engine runs a model: a stepper. `stepper(model)` is the PyTorch model itself, or on CPU the native one
(kernels/step.c for a whole one-token step, the skinny kernels for the LM head) where every layer of the model says
how it runs natively. The model computes in PyTorch and knows nothing of this module.

The native plan holds the model's tensors where they are (nothing is copied). It is only used while it still
describes the model: before the first step on each KV cache it checks that the same modules hold the same tensors at
the same addresses, with no hooks, so a model changed after the plan was built (quantized, wrapped with LoRA, moved,
cast, hooked) takes the PyTorch path, which computes the same thing. (Checking every step cost more than the rest of
the Python around a step.)
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from . import kernels
from .kernels.step import DecodePlan, Layer, Shape, Unsupported, Weights
from .model import GPT, KVCache, PagedKVCache
from .quantize import QuantEmbedding, QuantLinear


class Stepper:
    """The PyTorch path: prefill, one-token decode and the LM head, as the model computes them."""

    def __init__(self, model: GPT):
        self.model = model

    def prefill(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Final hidden states [B, T, n_embd] of tokens that follow each row's cached ones."""
        return self.model.hidden_states(idx, cache)

    def decode(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Next-token logits [B, vocab] after one new token [B] a row."""
        return self.logits(self.model.hidden_states(tokens[:, None], cache)[:, -1])

    def logits(self, h: Tensor) -> Tensor:
        return self.model.logits(h)


class NativeStepper(Stepper):
    def __init__(self, model: GPT):
        super().__init__(model)
        self.watched: list[tuple] = []  # (dict, key, object, address): what the plan read, and where
        self.plan = self._plan()
        self.head = self._head()
        self.checked = None  # the cache buffer the model was last checked for (a weak reference)

    def decode(self, tokens: Tensor, cache: KVCache | PagedKVCache) -> Tensor:
        if self._native(cache, len(tokens)):
            lengths = cache.row_lengths()
            if max(lengths) < min(self.model.config.context, cache.max_len):  # else the PyTorch path raises why
                if isinstance(cache, PagedKVCache):
                    tables = cache.block_tables(max(lengths) // cache.block_size + 1, pad=-1)
                else:  # a contiguous cache is one block a row
                    tables = torch.tensor(list(cache.rows()))[:, None]
                h = self.plan(tokens, torch.tensor(lengths), tables, cache.k, cache.v)
                return self.logits(h)
        return super().decode(tokens, cache)

    def logits(self, h: Tensor) -> Tensor:
        if self.head is not None and not torch.is_grad_enabled() and self._current_head():
            y = self.head(h)
            if y is not None:
                return y
        return self.model.logits(h)

    def _native(self, cache: KVCache, rows: int) -> bool:
        if (self.plan is None or self.model.training or torch.is_grad_enabled() or not 0 < rows <= kernels.QUANT_MAX_ROWS
                or cache.k.dtype != torch.float32 or not cache.k.is_contiguous()):
            return False
        if self.checked is None or self.checked() is not cache.k:
            if not self._current():
                return False
            self.checked = weakref.ref(cache.k)
        return True

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

    def _current_head(self) -> bool:
        return self.head_module is self._head_module() and self.head_weight.data_ptr() == self.head_address

    # --- reading the model ----------------------------------------------------------------------------------
    def _head_module(self) -> nn.Module:
        return self.model.wte if self.model.lm_head is None else self.model.lm_head

    def _head(self):
        """The LM head as a kernel call (None: the model's own)."""
        module = self.head_module = self._head_module()
        if isinstance(module, QuantEmbedding) and module.compute_dtype == torch.float32:  # the tied int8 head
            self.head_weight, self.head_address = module.qweight, module.qweight.data_ptr()
            return lambda h: kernels.quant_linear(h, module.qweight, module.scales, None, 8, module.group_size)
        if type(module) in (nn.Embedding, nn.Linear) and module.weight.dtype == torch.float32 \
                and module.weight.device.type == "cpu":
            weight = module.weight
            self.head_weight, self.head_address = weight, weight.data_ptr()
            return lambda h: kernels.skinny_linear(h, weight.detach(), None)
        return None  # a QuantLinear head (it calls the kernel itself), another dtype or device

    def _plan(self) -> DecodePlan | None:
        model, c = self.model, self.model.config
        try:
            if model.device.type != "cpu" or model.dtype != torch.float32 or not kernels.available():
                raise Unsupported
            wte = self._weights(self._module(model._modules, "wte"))
            wpe = self._tensor(self._module(model._modules, "wpe"), "weight") if model.wpe is not None else None
            layers = [self._layer(model, i, block) for i, block in enumerate(model.blocks)]
            final = self._norm(model, "norm_f") if model.norm_f is not None else None
            rope = (self._tensor(model, "rope_cos"), self._tensor(model, "rope_sin")) if c.pos == "rope" else None
            shape = Shape(c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.head_dim, c.hidden, c.context, c.activation,
                          c.norm == "rmsnorm", c.pos == "rope", c.prenorm, c.window or 0, c.norm_eps)
            return DecodePlan(shape, wte, wpe, layers, final, rope)
        except Unsupported:
            return None

    def _layer(self, model: GPT, i: int, block) -> Layer:
        self._module(model.blocks._modules, str(i))
        attn = self._module(block._modules, "attn")
        mlp = self._module(block._modules, "mlp")
        qn = kn = None
        if attn.q_norm is not None:
            qn = self._tensor(self._module(attn._modules, "q_norm"), "weight")
            kn = self._tensor(self._module(attn._modules, "k_norm"), "weight")
        linear = [self._weights(self._module(owner._modules, name))
                  for owner, name in ((attn, "qkv"), (attn, "proj"), (mlp, "fc"), (mlp, "proj"))]
        return Layer(self._norm(block, "norm1"), self._norm(block, "norm2"), qn, kn, *linear,
                     i in model.config.local_layers)

    def _weights(self, layer: nn.Module) -> Weights:
        """How a layer runs natively: a quantized layer hands over its blocks; fp32 linears and embeddings their
        weights. Anything else (LoRA, another dtype) is not computed here."""
        if isinstance(layer, QuantLinear):
            if layer.compute_dtype != torch.float32:
                raise Unsupported
            weights = layer.native_weights()
        elif type(layer) in (nn.Linear, nn.Embedding):
            weights = Weights(layer.weight, None, getattr(layer, "bias", None))
        else:
            raise Unsupported
        for key in ("weight", "scales", "bias"):
            t = getattr(weights, key)
            if t is not None:
                self._watch(layer, t)
        return weights

    def _norm(self, owner: nn.Module, name: str) -> tuple[Tensor, Tensor | None]:
        norm = self._module(owner._modules, name)
        if not isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) or norm.eps != self.model.config.norm_eps:
            raise Unsupported
        bias = self._tensor(norm, "bias") if getattr(norm, "bias", None) is not None else None
        return self._tensor(norm, "weight"), bias

    def _module(self, holder: dict, key: str) -> nn.Module:
        module = holder.get(key)
        if module is None:
            raise Unsupported
        self.watched.append((holder, key, module, None))
        return module

    def _tensor(self, module: nn.Module, key: str) -> Tensor:
        """A module's parameter, buffer or plain tensor attribute, watched from now on."""
        holder = next((d for d in (module._parameters, module._buffers, module.__dict__) if key in d), {})
        t = holder.get(key)
        if t is None:
            raise Unsupported
        self.watched.append((holder, key, t, t.data_ptr()))
        return t.detach()

    def _watch(self, module: nn.Module, t: Tensor) -> None:
        for holder in (module._parameters, module._buffers):
            for key, value in holder.items():
                if value is t:
                    self.watched.append((holder, key, value, value.data_ptr()))


_steppers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stepper(model: GPT) -> Stepper:
    """The fastest stepper for `model` here: the native one on CPU where the kernels build, else PyTorch. Built once
    per model (a plan reads every layer)."""
    if model.device.type != "cpu" or not kernels.available():
        return Stepper(model)
    found = _steppers.get(model)
    if found is None or not found._current():  # a model changed since: read it again
        found = _steppers[model] = NativeStepper(model)
    return found
