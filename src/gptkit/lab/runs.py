"""What the labs share: a model shape for a parameter budget, width matching, resumable runs, their curves."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GptkitError
from ..files import atomic_write
from ..config import GPTConfig
from ..model import GPT
from ..train import TrainConfig, train
from ..train.metrics import read_metrics
from ..train.trainer import STATE_FILE

RESULT_FILE = "result.json"  # written last (atomically): a run with it is finished
SUMMARY_KEYS = {"name", "seed", "params", "tokens", "elapsed_s", "tokens_per_s", "val_loss", "curve"}


class LabError(GptkitError):
    """A lab that cannot run as asked."""


def shape(params: float) -> dict:
    """Depth, width and heads of a GPT-2-shaped model with about `params` non-embedding parameters
    (12 x layers x width²): widths in steps of 64 with heads of 32 (an even count, for grouped-query attention),
    at least 2 layers and 16 to 128 of width per layer; of those within 25% of `params`, the closest to GPT-2's
    64 of width per layer (deep narrow models train slowly in short runs); `match_width` then hits `params`
    exactly through the MLP."""
    if params <= 0:
        raise LabError(f"a parameter budget must be positive, got {params}")
    candidates = []  # (off by more than 25%, shape's distance from GPT-2's, size error, layers, width)
    for width in range(64, 8193, 64):
        layers = max(2, round(params / (12 * width * width)))
        error = abs(12 * layers * width * width / params - 1)
        if 16 <= width / layers <= 128:
            candidates.append((error > 0.25, abs(width / layers - 64), error, layers, width))
    *_, layers, width = min(candidates, default=(0, 0, 0, 2, 64))
    return {"n_layer": layers, "n_embd": width, "n_head": width // 32}


def body_params(config: GPTConfig) -> int:
    with torch.device("meta"):
        return GPT(config).num_params(embeddings=False)


def match_width(config: GPTConfig, target: int) -> GPTConfig:
    """The config with the MLP width (a multiple of 32) that brings its non-embedding parameters closest to
    `target`: architectures compared at the same size."""
    base, step = config.replace(mlp_hidden=32), config.replace(mlp_hidden=64)
    p0, slope = body_params(base), body_params(step) - body_params(base)
    hidden = max(32, 32 * round((target - p0) / slope + 1))
    return config.replace(mlp_hidden=hidden)


@dataclass
class LabRun:
    """One training run of a lab: a name, its model config and recipe changes, and where it lives."""

    name: str
    config: GPTConfig
    recipe: dict = field(default_factory=dict)  # TrainConfig fields

    def train_config(self, directory: Path, data: str, budget: dict, seed: int) -> TrainConfig:
        """The run's recipe: its model config whole, its recipe changes, the lab's budget (instead of steps)."""
        return TrainConfig(**{"preset": "gpt2", "model": self.config.to_dict(), "data": data, "out": str(directory),
                              "max_steps": 0, "seed": seed, "eval_interval": 50, "ckpt_interval": 200,
                              **self.recipe, **budget})


def complete(lab_run: LabRun, out: Path, data: str, budget: dict, seed: int, quiet: bool = True) -> dict:
    """Train `lab_run` (or continue it where it stopped; or skip it when finished): its result."""
    directory = out / f"{lab_run.name}-seed{seed}"
    summary = finished_summary(directory)
    if summary is not None:
        return summary
    resume = (directory / STATE_FILE).exists()
    if directory.exists() and not resume:
        shutil.rmtree(directory)  # killed before its first checkpoint: start it again
    result = train(lab_run.train_config(directory, data, budget, seed), resume=resume, quiet=quiet)
    rows = read_metrics(directory / "metrics.jsonl")
    curve = [(r["step"], r["val_loss"], r["elapsed_s"]) for r in rows if "val_loss" in r]
    train_rows = [r for r in rows if "tokens" in r]
    tokens_per_step = train_rows[-1]["tokens"] / train_rows[-1]["step"] if train_rows else 0
    summary = {"name": lab_run.name, "seed": seed, "params": body_params(lab_run.config),
               "tokens": result["tokens"], "elapsed_s": result["elapsed_s"],
               "tokens_per_s": result["tokens"] / max(result["elapsed_s"], 1e-9),
               "val_loss": curve[-1][1] if curve else result["val_loss"],  # a resumed finished run trains no step
               "curve": [{"tokens": s * tokens_per_step, "val_loss": v, "elapsed_s": e} for s, v, e in curve]}
    atomic_write(directory / RESULT_FILE, json.dumps(summary, indent=1))
    return summary


def finished_summary(directory: Path) -> dict | None:
    """A finished run's summary; None where the run has not finished. A marker that cannot be read (cut short by an
    older gptkit's plain write, or damaged) counts as not finished: the run then resumes from its last checkpoint,
    which trains nothing when that checkpoint had reached the budget, and the marker is written again from the
    run's own metrics. A user restarting a lab expects it to carry on, not to stop at a file only the lab writes."""
    try:
        summary = json.loads((directory / RESULT_FILE).read_text())
    except (FileNotFoundError, ValueError):  # no marker, or not JSON (UnicodeDecodeError is a ValueError too)
        return None
    return summary if isinstance(summary, dict) and SUMMARY_KEYS <= summary.keys() else None


def time_to(curve: list[dict], loss: float, key: str) -> float:
    """When (in `key` units: tokens or elapsed_s) a validation curve first reaches `loss`, interpolated."""
    previous = None
    for point in curve:
        if point["val_loss"] <= loss:
            if previous is None:
                return point[key]
            a, b = previous["val_loss"], point["val_loss"]
            return previous[key] + (point[key] - previous[key]) * (a - loss) / (a - b)
        previous = point
    return math.nan
