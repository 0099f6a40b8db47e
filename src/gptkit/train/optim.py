"""Optimizers (AdamW with decay on matrices only; Muon for hidden matrices) and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..model import GPT
from .recipe import TrainConfig


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """Newton-Schulz quintic iteration towards the nearest semi-orthogonal matrix (Keller Jordan's Muon),
    batched over the leading dimension. bf16 on GPU; fp32 on CPU, where bf16 matmuls are slower."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalized updates, for 2-D hidden matrices. Same-shaped matrices are
    orthogonalized together in one batched iteration (few, larger matmuls)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                updates = []
                for p in params:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    updates.append(p.grad.lerp(buf, group["momentum"]))  # Nesterov
                ortho = orthogonalize(torch.stack(updates), group["ns_steps"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for p, o in zip(params, ortho):
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(o, alpha=-group["lr"] * scale)


def build_optimizers(model: GPT, cfg: TrainConfig, device: torch.device,
                     fused: bool = True) -> list[torch.optim.Optimizer]:
    """AdamW decays matrices only (not embeddings' rows of norms or biases). With Muon, the blocks'
    matrices go to Muon and everything else stays on AdamW."""
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    embed = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("blocks.")]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    fused = {"fused": True} if fused and device.type in ("cpu", "cuda") else {}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        adam = torch.optim.AdamW([{"params": embed, "weight_decay": 0.0}, {"params": vectors, "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=betas, **fused)
        muon = Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
        return [adam, muon]
    groups = [{"params": hidden + embed, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **fused)]


MAX_WARMUP = 0.1  # warmup never takes more than this fraction of the run, however short the budget


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate: linear warmup over `warmup_steps` steps (or over the first tenth
    of the run if that is shorter: a 20-second run still trains), then the schedule over the rest of the
    run's progress (0 to 1, by whichever limit binds: steps, tokens or time), ending decayed."""
    # the fraction of the run that warmup takes, estimated from the progress each step makes so far
    warm = min(cfg.warmup_steps * progress / step, MAX_WARMUP) if step else MAX_WARMUP
    if step < cfg.warmup_steps and progress < warm:
        return min(1.0, max((step + 1) / cfg.warmup_steps, progress / warm))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = 1 - cfg.decay_fraction
        return 1.0 if progress < decay_start else floor + (1 - floor) * (1 - progress) / cfg.decay_fraction
    p = min(1.0, max(0.0, (progress - warm) / (1 - warm)))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
