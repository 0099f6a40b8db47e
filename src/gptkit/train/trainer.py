"""The pre-training loop: batches in, checkpoints, metrics.jsonl and loss.png out; resumable bit for bit."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import checkpoint
from ..config import preset
from ..data import TokenShards, embedded_corpus, prepare
from ..data.corpora import CACHE
from ..model import GPT
from ..tokenizer import Tokenizer
from .metrics import MetricsLog, plot_losses
from .optim import build_optimizers, lr_factor
from .recipe import TrainConfig

STATE_FILE = "train_state.pt"
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense bf16


class TrainError(ValueError):
    """A run that cannot start or continue as asked."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_data_dir() -> Path:
    """The embedded corpus, prepared once (BPE, 4096 tokens) into the cache."""
    out = CACHE / "data" / "python-bpe4096"
    prepare(embedded_corpus(), out, tokenizer="bpe", vocab_size=4096)
    return out


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def evaluate_loss(model: GPT, data: TokenShards, block: int, batch_size: int, device, autocast,
                  max_tokens: int = 0) -> float:
    """Mean next-token loss over the split (all of it, or its first `max_tokens`)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.windows(block, batch_size):
            with autocast():
                logits = model(x.to(device))
            total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
            count += y.numel()
            if max_tokens and count >= max_tokens:
                break
    model.train()
    return total / count


class Run:
    """Everything one training run holds; `save` and `restore` make it resumable."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device = pick_device(cfg.device)
        data_dir = Path(cfg.data) if cfg.data else default_data_dir()
        self.train_data = TokenShards(data_dir, "train")
        self.val_data = TokenShards(data_dir, "val")
        self.tokenizer = Tokenizer.load(data_dir)
        state_path = self.out / STATE_FILE
        if state_path.exists() and not resume:
            raise TrainError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if resume and not state_path.exists():
            raise TrainError(f"nothing to resume: {state_path} does not exist")

        torch.manual_seed(cfg.seed)
        model_config = preset(cfg.preset, **{"vocab_size": self.tokenizer.vocab_size, **cfg.model})
        if model_config.vocab_size < self.tokenizer.vocab_size:
            raise TrainError(f"vocab_size {model_config.vocab_size} is smaller than the data's tokenizer "
                             f"({self.tokenizer.vocab_size} tokens)")
        self.model = GPT(model_config).to(self.device)
        self.block = cfg.block_size or model_config.context
        if self.block > model_config.context:
            raise TrainError(f"block_size {self.block} exceeds the model's context {model_config.context}")
        self.grad_accum = (max(1, round(cfg.tokens_per_step / (cfg.batch_size * self.block)))
                           if cfg.tokens_per_step else cfg.grad_accum)
        self.optimizers = build_optimizers(self.model, cfg, self.device)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
        self.data_rng = torch.Generator().manual_seed(cfg.seed)  # the data position
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        if resume:
            self.restore(state_path, model_config)

    def restore(self, path: Path, model_config) -> None:
        saved_config = checkpoint.load_config(self.out)
        if saved_config != model_config:
            diff = [f"{k}={v} (run has {getattr(saved_config, k)})" for k, v in model_config.to_dict().items()
                    if getattr(saved_config, k) != getattr(model_config, k)]
            raise TrainError(f"cannot resume {self.out}: this recipe's model differs: {', '.join(diff)}")
        state = torch.load(path, weights_only=True)
        if state["data_tokenizer"] != self.train_data.tokenizer_sha256():
            raise TrainError(f"cannot resume {self.out}: the data directory was made with a different tokenizer")
        if state["optimizer"] != self.cfg.optimizer:
            raise TrainError(f"cannot resume {self.out} with optimizer {self.cfg.optimizer}: the run used {state['optimizer']}")
        self.model.load_state_dict(checkpoint.load_model(self.out, self.device).state_dict())
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])

    def save(self) -> None:
        state = {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "optimizer": self.cfg.optimizer,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "data_rng": self.data_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "data_tokenizer": self.train_data.tokenizer_sha256(),
            "recipe": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
        }
        files = checkpoint.model_files(self.model, self.tokenizer)
        files[STATE_FILE] = lambda p: torch.save(state, p)
        try:
            checkpoint.write_atomically(self.out, files)
        except OSError as e:
            raise TrainError(f"could not write the checkpoint ({e.strerror or e}); the previous one in "
                             f"{self.out} is intact") from None

    def progress(self) -> float:
        """Fraction of the run done, by whichever limit binds first."""
        cfg = self.cfg
        parts = [self.step / cfg.max_steps if cfg.max_steps else 0.0,
                 self.tokens / cfg.max_tokens if cfg.max_tokens else 0.0,
                 self.elapsed / cfg.time_limit if cfg.time_limit else 0.0]
        return max(parts)


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> dict:
    """Train as the recipe says; returns the final metrics. The run directory is a checkpoint directory."""
    run = Run(cfg, resume)
    model, device = run.model, run.device
    compiled = torch.compile(model) if cfg.compile else model
    use_bf16 = cfg.dtype == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    log = MetricsLog(run.out / "metrics.jsonl", truncate_after=run.step if resume else 0)
    tokens_per_step = cfg.batch_size * run.block * run.grad_accum
    flops_per_step = model.flops_per_token(run.block) * tokens_per_step
    peak = peak_flops(device)
    bar = tqdm(total=cfg.max_steps or None, initial=run.step, unit="step", disable=quiet or None,
                dynamic_ncols=True, mininterval=1.0)
    val_loss, loss_value = None, math.nan
    model.train()
    window_t, window_steps = time.perf_counter(), 0
    while run.progress() < 1:
        t0 = time.perf_counter()
        factor = lr_factor(run.step, run.progress(), cfg)
        for opt in run.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        loss_sum = torch.zeros((), device=device)
        for _ in range(run.grad_accum):
            x, y = run.train_data.batch(cfg.batch_size, run.block, run.data_rng)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = compiled(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / run.grad_accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in run.optimizers:
            opt.step()
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        run.step += 1
        run.tokens += tokens_per_step
        run.elapsed += time.perf_counter() - t0
        window_steps += 1
        bar.update(1)
        done = run.progress() >= 1
        if run.step % cfg.log_interval == 0 or done:
            loss_value = loss_sum.item() / run.grad_accum  # the only host sync per log interval
            now = time.perf_counter()
            tok_s = window_steps * tokens_per_step / (now - window_t)
            record = {"step": run.step, "loss": round(loss_value, 6), "lr": run.optimizers[0].param_groups[0]["lr"], "tokens": run.tokens,
                      "tokens_per_s": round(tok_s, 1), "elapsed_s": round(run.elapsed, 2)}
            if peak:
                record["mfu"] = round(flops_per_step * window_steps / (now - window_t) / peak, 4)
            log.write(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
            window_t, window_steps = time.perf_counter(), 0
        if run.step % cfg.eval_interval == 0 or done:
            t_eval = time.perf_counter()
            val_loss = evaluate_loss(model, run.val_data, run.block, cfg.batch_size, device, autocast, cfg.eval_tokens)
            log.write({"step": run.step, "val_loss": round(val_loss, 6), "elapsed_s": round(run.elapsed, 2)})
            if not quiet:
                bar.write(f"step {run.step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
            plot_losses(log.path, run.out / "loss.png")
            window_t += time.perf_counter() - t_eval  # keep evaluation out of tokens/s
        if run.step % cfg.ckpt_interval == 0 or done:
            t_ckpt = time.perf_counter()
            run.save()
            window_t += time.perf_counter() - t_ckpt
    bar.close()
    return {"step": run.step, "tokens": run.tokens, "train_loss": loss_value, "val_loss": val_loss,
            "elapsed_s": run.elapsed, "out": str(run.out)}
