"""LoRA by swapping linear layers in place: W x + (alpha / r) B A x, with A, B the only new weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from ..errors import GptkitError


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # starts as W
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


class LoRAError(GptkitError):
    """LoRA settings that match nothing in the model."""


def apply_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> list[str]:
    """Wrap every linear layer whose name ends with a target (e.g. "attn.qkv", "proj", "fc"); freeze the rest
    of `model`. Returns the wrapped layers' names."""
    if rank < 1:
        raise LoRAError(f"LoRA rank must be at least 1, got {rank}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
    if missing:
        kinds = sorted({n.split(".", 2)[-1] for n in linears})
        raise LoRAError(f"LoRA target(s) {', '.join(missing)} match no linear layer; layers are named: {', '.join(kinds)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(linears[name], rank, alpha))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer back into a plain linear layer."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}
