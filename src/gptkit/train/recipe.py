"""Training recipes: a dataclass, read from TOML, overridden by `key=value` pairs from the command line."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import GptkitError
from ..config import GPTConfig, check_fields, field_types, from_fields, parse_text, preset


LIMITS = ("max_steps", "max_tokens", "time_limit")
DEFAULT_TIME_LIMIT = 120.0  # seconds: what a bare `gptkit train` trains for


class RecipeError(GptkitError):
    """A recipe file or override that does not describe a valid run."""


@dataclass(frozen=True)
class TrainConfig:
    # what to train, on what, where
    preset: str = "tiny-modern"
    model: dict = field(default_factory=dict)  # GPTConfig overrides, e.g. {n_layer = 6}
    init: str = ""  # a checkpoint to continue from (its config and weights; a pruned one keeps its zeros)
    # distillation (DistilGPT2's recipe): a teacher checkpoint makes the loss alpha KL + beta LM + cosine (1 - cos)
    teacher: str = ""
    distill_temperature: float = 2.0
    distill_alpha: float = 5.0
    distill_beta: float = 2.0
    distill_cosine: float = 0.0  # DistilGPT2 used 1.0; needs the teacher's width
    data: str = ""  # prepared data directory; empty: the embedded corpus, prepared on first use
    out: str = "runs/default"
    # batch
    batch_size: int = 16  # sequences per micro-batch
    block_size: int = 0  # tokens per sequence; 0: the model's context
    grad_accum: int = 1  # micro-batches per optimizer step
    tokens_per_step: int = 0  # > 0: set grad_accum to reach this many tokens per step
    # stopping: whichever comes first (0 = no limit)
    max_steps: int = 2000
    max_tokens: int = 0
    time_limit: float = 0.0  # seconds of training
    # optimizer and schedule
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # warmup-stable-decay: the last fraction of steps decays linearly
    grad_clip: float = 1.0  # 0 = off
    sampled_softmax: bool = False  # loss over each batch's own targets only: a cheaper head for small models
    # execution
    dtype: Literal["fp32", "bf16", "auto"] = "fp32"  # auto: bf16 where the hardware multiplies it natively
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    # distributed (torchrun): batch_size is the global batch, split evenly over the ranks
    strategy: Literal["ddp", "fsdp"] = "ddp"
    dist_timeout: float = 600.0  # seconds a collective may wait for a lost rank before the run fails
    # bookkeeping
    eval_interval: int = 250
    eval_tokens: int = 0  # 0: the whole validation split
    ckpt_interval: int = 500
    log_interval: int = 10
    progress_seconds: float = 30.0  # when stderr is not a terminal: a plain progress line this often

    def __post_init__(self):
        check_fields(self, RecipeError)
        checks = [
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
            (self.max_steps > 0 or self.max_tokens > 0 or self.time_limit > 0,
             "give a limit: max_steps, max_tokens or time_limit"),
            (self.lr > 0, "lr must be positive"),
            (self.eval_interval >= 1 and self.ckpt_interval >= 1 and self.log_interval >= 1,
             "intervals must be at least 1"),
            (self.distill_temperature > 0, "distill_temperature must be positive"),
            (min(self.distill_alpha, self.distill_beta, self.distill_cosine) >= 0, "distillation weights must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RecipeError(msg)
        preset(self.preset, **self.model)  # an unknown preset or a bad model field fails now, before any data work

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def has_limit(overrides: list[str]) -> bool:
    """Whether `key=value` overrides set one of the run's limits."""
    return any(o.split("=")[0].strip().replace("-", "_") in LIMITS for o in overrides)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`values` with each `key=value` (or `model.FIELD=value`) override, read as its field's type."""
    values = dict(values)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r} is not key=value")
        key = key.strip().replace("-", "_")
        if key.startswith("model."):
            name = key[len("model."):]
            kind = field_types(GPTConfig).get(name, str)  # an unknown field is named when the model is made
            model = values.get("model", {})
            values["model"] = {**(model if isinstance(model, dict) else {}), name: parse_text(kind, text)}
        elif key in field_types(TrainConfig):
            values[key] = parse_text(field_types(TrainConfig)[key], text)
        else:
            raise RecipeError(f"unknown recipe field(s): {key}")
    return values


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), **flags) -> TrainConfig:
    """Recipe file, then `key=value` overrides, then explicit flags (None = not given)."""
    values = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise RecipeError(f"no recipe file {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: {e}") from None
    values = apply_overrides(values, list(overrides))
    values |= {k: v for k, v in flags.items() if v is not None}
    return from_fields(TrainConfig, values, RecipeError, "recipe")
