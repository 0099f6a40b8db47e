"""Optimizers (AdamW with decay on matrices only; Muon for hidden matrices) and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..model import GPT
from .recipe import TrainConfig


def build_optimizers(model: GPT, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW decays matrices only (not embeddings' rows of norms or biases). With Muon, the blocks'
    matrices go to Muon and everything else stays on AdamW."""
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    embed = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("blocks.")]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        adam = torch.optim.AdamW([{"params": embed, "weight_decay": 0.0}, {"params": vectors, "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=betas, **fused)
        muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
        return [adam, muon]
    groups = [{"params": hidden + embed, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **fused)]


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate: linear warmup over steps, then the schedule over the run's
    progress (0 to 1, by whichever limit binds: steps, tokens or time)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = 1 - cfg.decay_fraction
        return 1.0 if progress < decay_start else floor + (1 - floor) * (1 - progress) / cfg.decay_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
