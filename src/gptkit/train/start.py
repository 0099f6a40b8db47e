"""Where a run's model starts: a preset, a checkpoint (`init`: its config and weights, a pruned one keeping its
zeros), and for distillation the teacher it learns from (DistilGPT2's start: every other teacher block)."""

from __future__ import annotations

import torch

from ..errors import GptkitError
from .. import checkpoint
from ..config import GPTConfig, preset
from ..model import GPT
from ..tokenizer import Tokenizer
from .recipe import TrainConfig


class TrainError(GptkitError):
    """A run that cannot start or continue as asked."""


def build(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> tuple[GPT, GPT | None, list]:
    """(the model, the teacher or None, the masks [(weight, kept)] that hold a pruned model's zeros)."""
    config = init_config(cfg, tokenizer) if cfg.init else preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size,
                                                                                  **cfg.model})
    if config.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"vocab_size {config.vocab_size} is smaller than the data's tokenizer "
                         f"({tokenizer.vocab_size} tokens)")
    model = GPT(config).to(device)
    teacher = load_teacher(cfg, tokenizer, config, device) if cfg.teacher else None
    masks = []
    if cfg.init:
        masks = start_from(model, cfg.init, device)
    elif teacher is not None:
        init_from_teacher(model, teacher)
    return model, teacher, masks


def _same_tokenizer(path: str, tokenizer: Tokenizer, what: str) -> None:
    theirs = checkpoint.load_tokenizer(path)
    if theirs is None or theirs.files() != tokenizer.files():
        raise TrainError(f"{what} {path} was trained with another tokenizer than the data's")


def init_config(cfg: TrainConfig, tokenizer: Tokenizer) -> GPTConfig:
    """The config of the checkpoint to start from, if the data and settings fit it."""
    if checkpoint.quantization(cfg.init):
        raise TrainError(f"{cfg.init} is quantized: training needs floating-point weights (start from the "
                         f"checkpoint it was quantized from)")
    _same_tokenizer(cfg.init, tokenizer, "the checkpoint")
    if cfg.strategy == "fsdp":
        raise TrainError("init is not supported with strategy fsdp yet; use ddp")
    config = checkpoint.load_config(cfg.init)
    return config.replace(**cfg.model) if cfg.model else config


def start_from(model: GPT, init: str, device: torch.device) -> list:
    """Copy the weights of `init` into `model`; where it was pruned (zeros by magnitude, Wanda or N:M) the masks
    that the trainer re-applies after every optimizer step."""
    from ..prune import block_linears

    source = checkpoint.load_model(init, device)
    model.load_state_dict(source.state_dict())
    model.records = source.records
    pruning = source.records.pruning
    if not pruning or pruning.get("method") in ("heads", "channels"):
        return []
    return [(layer.weight, layer.weight != 0) for layer in block_linears(model).values()]


def load_teacher(cfg: TrainConfig, tokenizer: Tokenizer, student: GPTConfig, device: torch.device) -> GPT:
    """The teacher, frozen, in bf16 where the device computes it natively."""
    teacher = checkpoint.load_model(cfg.teacher, device)
    if teacher.config.vocab_size != student.vocab_size:
        raise TrainError(f"the teacher {cfg.teacher} has a vocabulary of {teacher.config.vocab_size} tokens, the "
                         f"student {student.vocab_size}: distillation compares their distributions token by token")
    _same_tokenizer(cfg.teacher, tokenizer, "the teacher")
    if cfg.distill_cosine and teacher.config.n_embd != student.n_embd:
        raise TrainError(f"distill_cosine compares hidden states: the teacher is {teacher.config.n_embd} wide, the "
                         f"student {student.n_embd}")
    if checkpoint.is_native(torch.bfloat16, device) and not checkpoint.quantization(cfg.teacher):
        teacher = teacher.to(torch.bfloat16)
    return teacher.requires_grad_(False).eval()


def init_from_teacher(model: GPT, teacher: GPT) -> None:
    """Where the student is the teacher with fewer blocks: its blocks are copies of evenly spaced teacher blocks
    (every other one at half depth) and the rest of its weights the teacher's. Other shapes keep their own start."""
    t, s = teacher.config, model.config
    if t.replace(n_layer=s.n_layer) != s or s.n_layer > t.n_layer:
        return
    theirs = {k: v.float() for k, v in teacher.state_dict().items()}
    state = {k: v for k, v in theirs.items() if not k.startswith("blocks.")}
    for i in range(s.n_layer):
        j = f"blocks.{i * t.n_layer // s.n_layer}."
        state |= {f"blocks.{i}." + k[len(j):]: v for k, v in theirs.items() if k.startswith(j)}
    model.load_state_dict(state)
