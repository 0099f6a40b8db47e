"""Linear layers for CPU decoding, swapped into a model in place (its parameters and state dict unchanged)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import available, skinny_linear


class PackedLinear(nn.Module):
    """Inference-only CPU linear layer for decoding, whose speed is the speed at which weights stream from memory.
    Up to 64 fp32 rows go through gptkit's native skinny kernel (gemv.c), more rows through PyTorch's
    GEMM. Without a C compiler, every call goes through oneDNN's prepacked weight layout (a second copy of the
    weights), which still streams them faster than the BLAS matrix-vector path. Where autograd needs the
    weights (training through a packed model), the plain `F.linear`."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.packed = None
        if not available() and torch.backends.mkldnn.is_available():
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        y = skinny_linear(x, self.weight, self.bias)
        if y is not None:
            return y
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@torch.no_grad()
def pack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap every fp32/bf16 linear layer of a CPU model (a GPT) for a PackedLinear over the same parameters,
    and give it a packed LM head (`inference_head`, over the tied embedding where there is one) unless it has
    a faster one already (a quantized model's), and a native decode step (`inference_step`: every block of a
    one-token step in one call, step.c) where its layers allow. Returns the model; a no-op elsewhere."""
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child.weight, child.bias))  # same parameters and keys
    head = model.wte if model.lm_head is None else model.lm_head
    if model.inference_head is None and isinstance(head, (nn.Embedding, PackedLinear)):
        # a detached view: the head must not add a key to the state dict
        model.inference_head = PackedLinear(head.weight.detach(), None)
    if available():
        from .step import DecodeStep  # it reads PackedLinear's weights

        step = DecodeStep(model)
        model.inference_step = step if step.plan is not None else None
    return model
