"""The one fine-tuning loop, for task heads and SFT alike: shuffle, clip, step, schedule, evaluate each epoch,
keep the best epoch, stop after `patience` epochs without improvement. Each epoch ends with a checkpoint of
the loop itself (`fit_state.pt` in the output directory), so a killed run resumes at its last epoch."""

from __future__ import annotations

import copy
import math
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import files
from ..errors import GptkitError

STATE_FILE = "fit_state.pt"


class ResumeError(GptkitError):
    """A fine-tuning run that cannot resume as asked."""


@dataclass
class LoopResult:
    best: float  # the best epoch's score
    best_state: dict
    history: list[dict] = field(default_factory=list)


def finetune_loop(model: nn.Module, groups: list[dict], lr: float, epochs: int, patience: int,
        batches: Callable[[random.Random], Iterable], loss: Callable[[object], torch.Tensor],
        evaluate: Callable[[], dict], score: str, rng: random.Random, out: Path, identity: dict,
        lower_is_better: bool = False, warmup: float = 0.0, clip: float = 1.0, resume: bool = False,
        quiet: bool = False) -> LoopResult:
    """Train `model` (its parameters in the AdamW `groups`) for up to `epochs`. `batches(rng)` gives one
    epoch's batches, `loss(batch)` their loss, `evaluate()` a dict of validation metrics of which `score`
    picks the best epoch (the highest, or the lowest with `lower_is_better`). `identity` (base, task, settings) must match on resume.
    The learning rate warms up over the first `warmup` fraction of the steps, then decays linearly to 0."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr)
    steps = epochs * max(1, sum(1 for _ in batches(random.Random(0))))
    warm = max(1, int(steps * warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (min(1.0, (s + 1) / warm) if warmup else 1.0) * max(0.0, 1 - s / steps))
    sign = -1.0 if lower_is_better else 1.0
    result, stale, first = LoopResult(-sign * math.inf, {}), 0, 0
    if resume:
        state = _load(out, identity)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        result = LoopResult(state["best"], state["best_state"], state["history"])
        stale, first = state["stale"], state["epoch"]
    for epoch in range(first, epochs):
        if stale >= patience:
            break
        model.train()
        last = math.nan
        for batch in batches(rng):
            value = loss(batch)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            last = value.item()
        model.eval()
        with torch.no_grad():
            metrics = evaluate()
        result.history.append({"epoch": epoch + 1, **metrics, "train_loss": last})
        if not quiet:
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if sign * metrics[score] > sign * result.best:
            result.best, result.best_state, stale = metrics[score], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "schedule": schedule.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                 "best": result.best, "best_state": result.best_state, "history": result.history, "stale": stale,
                 "identity": identity}
        files.atomic_write(out / STATE_FILE, lambda p, state=state: torch.save(state, p))
    model.load_state_dict(result.best_state)
    return result


def check_out(out: Path, base: Path, overwrite: bool, resume: bool) -> None:
    """A fine-tuning run writes to a new or empty directory, never into its base (`overwrite`: replace it)."""
    if out.resolve() == base.resolve():
        raise ResumeError(f"--out {out} is the base checkpoint itself; write the fine-tuned model elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (overwrite or resume):
        raise ResumeError(f"--out {out} already exists and is not empty; choose another, pass --overwrite, or "
                          f"--resume a run that was stopped")


def clear_out(out: Path) -> None:
    """What was in an output directory being overwritten (another run's state too) goes."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()


def finished(out: Path) -> None:
    """The run's final checkpoint is written: the loop's own state is no longer needed."""
    (Path(out) / STATE_FILE).unlink(missing_ok=True)


def _load(out: Path, identity: dict) -> dict:
    path = Path(out) / STATE_FILE
    if not path.exists():
        raise ResumeError(f"nothing to resume: {path} does not exist (the run finished, or never saved an epoch)")
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ResumeError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    differs = sorted(k for k in identity.keys() | state["identity"].keys()
                     if identity.get(k) != state["identity"].get(k))
    if differs:
        raise ResumeError(f"cannot resume {out}: it was run with other settings ({', '.join(differs)})")
    return state
