"""The pre-training loop: batches in, checkpoints, metrics.jsonl and loss.png out; resumable bit for bit."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import pickle
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, files
from ..data import TokenShards, embedded_corpus, prepare
from ..data.corpora import CACHE
from ..errors import GptkitError
from ..model import GPT
from ..tokenizer import Tokenizer
from . import distributed, start
from .start import TrainError
from .loss import DistillationLoss, LanguageModelLoss
from .metrics import MetricsLog, Progress, plot_losses
from .optim import build_optimizers, lr_factor
from .recipe import TrainConfig

STATE_FILE = "train_state.pt"
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense bf16


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return checkpoint.check_device(name)


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


class TrainingRun:
    """Everything one training run holds; `save` and `restore` make it resumable."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.dist = distributed.setup(self.device.type, cfg.strategy, cfg.dist_timeout)
        if self.device.type == "cuda" and self.dist.active:
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.batch_size % self.dist.world:
            raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the world size {self.dist.world}")
        self.rank_batch = cfg.batch_size // self.dist.world
        self.rows = slice(self.dist.rank * self.rank_batch, (self.dist.rank + 1) * self.rank_batch)
        if cfg.strategy == "fsdp" and cfg.optimizer == "muon":
            raise TrainError("Muon is not supported with FSDP yet; use optimizer=\"adamw\" or strategy=\"ddp\"")
        if cfg.data:
            data_dir = Path(cfg.data)
        else:  # rank 0 prepares the embedded corpus into the shared cache while the others wait
            data_dir = default_data_dir() if self.dist.main else None
            distributed.barrier(self.dist)
            data_dir = data_dir or default_data_dir()
        self.train_data = TokenShards(data_dir, "train")
        self.val_data = TokenShards(data_dir, "val")
        self.tokenizer = Tokenizer.load(data_dir)
        state_path = self.out / STATE_FILE
        if self.out.is_dir():
            files.recover(self.out)  # a checkpoint a kill interrupted is finished first
        if state_path.exists() and not resume:
            raise TrainError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if resume and not state_path.exists():
            raise TrainError(f"nothing to resume: {state_path} does not exist")

        torch.manual_seed(cfg.seed)
        self.model, self.teacher, self.masks = start.build(cfg, self.tokenizer, self.device)
        model_config = self.model.config
        if resume:  # one whole checkpoint, or which file does not belong to it
            try:
                manifest = checkpoint.verify(self.out)
            except checkpoint.CheckpointError as e:
                raise TrainError(f"cannot resume: {e}") from None
            if manifest is not None and STATE_FILE not in manifest["files"]:
                raise TrainError(f"cannot resume {self.out}: its {STATE_FILE} does not belong to its last checkpoint "
                                 f"(written at another time)")
        state = read_state(state_path) if resume else None  # read once: checked now, restored below
        if resume:  # weights first: FSDP shards what it is given
            self.check_resumable(state, model_config)
            self.model.load_state_dict(checkpoint.load_model(self.out, self.device).state_dict())
        self.bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and checkpoint.is_native(torch.bfloat16, self.device))
        self.wrapped = distributed.wrap(self.model, cfg.strategy, self.dist, self.device, self.bf16)
        self.block = cfg.block_size or model_config.context
        if self.block > model_config.context:
            raise TrainError(f"block_size {self.block} exceeds the model's context {model_config.context}")
        for split in (self.train_data, self.val_data):
            longest = max((len(a) for a in split.arrays), default=0)
            if longest < (self.block + 1 if split is self.train_data else 2):
                raise TrainError(f"{data_dir} has too little data: its longest {'train' if split is self.train_data else 'val'} "
                                 f"shard holds {longest} tokens, a block needs {self.block + 1}; lower block_size or "
                                 f"prepare more text")
        self.grad_accum = (max(1, round(cfg.tokens_per_step / (cfg.batch_size * self.block)))
                           if cfg.tokens_per_step else cfg.grad_accum)
        self.sharded = self.dist.active and cfg.strategy == "fsdp"
        self.optimizers = build_optimizers(self.model, cfg, self.device, fused=not self.sharded)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
        self.data_rng = torch.Generator().manual_seed(cfg.seed)  # the data position
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.saved_step: int | None = None  # the last checkpoint written (or resumed from)
        if resume:
            self.restore(state)
            self.saved_step = self.step

    def check_resumable(self, state: dict, model_config) -> None:
        saved_config = checkpoint.load_config(self.out)
        if saved_config != model_config:
            diff = [f"{k}={v} (run has {getattr(saved_config, k)})" for k, v in model_config.to_dict().items()
                    if getattr(saved_config, k) != getattr(model_config, k)]
            raise TrainError(f"cannot resume {self.out}: this recipe's model differs: {', '.join(diff)}")
        if state["data_tokenizer"] != self.train_data.tokenizer_sha256():
            raise TrainError(f"cannot resume {self.out}: the data directory was made with a different tokenizer")
        if state["optimizer"] != self.cfg.optimizer:
            raise TrainError(f"cannot resume {self.out} with optimizer {self.cfg.optimizer}: the run used {state['optimizer']}")
        was_sharded = state.get("sharded", False)
        if was_sharded != (self.cfg.strategy == "fsdp"):
            raise TrainError(f"cannot resume {self.out} with strategy {self.cfg.strategy}: the run used "
                             f"{'fsdp' if was_sharded else 'ddp or one process'}")

    def restore(self, state: dict) -> None:
        if self.sharded:
            distributed.load_sharded(self.out, self.model, self.optimizers, state.get("shards") or distributed.SHARDS_DIR)
        else:
            for opt, sd in zip(self.optimizers, state["optimizers"]):
                opt.load_state_dict(sd)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])

    def save(self) -> None:
        full, shards = (distributed.save_sharded(self.out, self.model, self.optimizers, self.dist, self.step)
                        if self.sharded else (None, None))
        if not self.dist.main:
            distributed.barrier(self.dist)
            return
        state = {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "optimizer": self.cfg.optimizer,
            "sharded": self.sharded, "shards": shards, "world": self.dist.world,
            "optimizers": None if self.sharded else [opt.state_dict() for opt in self.optimizers],
            "data_rng": self.data_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "data_tokenizer": self.train_data.tokenizer_sha256(),
            "recipe": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
        }
        written = checkpoint.model_files(self.model, self.tokenizer, state_dict=full)
        written[STATE_FILE] = lambda p: torch.save(state, p)
        try:
            files.commit(self.out, written, {"step": self.step})
        except (OSError, GptkitError) as e:
            raise TrainError(f"could not write the checkpoint at step {self.step}: {e}; {self.last_good()}") from None
        finally:
            distributed.barrier(self.dist)
        if shards:  # committed: the shards train_state.pt names are the only ones kept
            distributed.drop_old_shards(self.out, shards)
        self.saved_step = self.step

    def last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint in {self.out} is step {self.saved_step}"

    def progress(self) -> float:
        """Fraction of the run done, by whichever limit binds first."""
        cfg = self.cfg
        parts = [self.step / cfg.max_steps if cfg.max_steps else 0.0,
                 self.tokens / cfg.max_tokens if cfg.max_tokens else 0.0,
                 self.elapsed / cfg.time_limit if cfg.time_limit else 0.0]
        return max(parts)


def read_state(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise TrainError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); the weights beside it "
                         f"still load, but the run cannot resume from it") from None


class StopRequest:
    """The first SIGINT/SIGTERM asks the run to stop after the current step (with a checkpoint); a second
    one stops it at once. Only in the main thread of a single-process run."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal: int | None = None

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            for s, handler in self.previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # the second one: now
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              f"(again to stop at once)", file=sys.stderr, flush=True)


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> dict:
    """Train as the recipe says; returns the final metrics. The run directory is a checkpoint directory.
    Under torchrun every rank calls this; only rank 0 writes logs, plots and single-file checkpoints.
    A first SIGINT/SIGTERM (single process) ends the run after the current step with a checkpoint; the
    result then says which signal in `interrupted`. A run that fails before its first checkpoint leaves
    no run directory behind (when it made it)."""
    out = Path(cfg.out)
    made_out = not out.exists()
    try:
        return _train(cfg, resume, quiet)
    except BaseException:
        if made_out and out.exists() and not (out / STATE_FILE).exists() and distributed.is_main_process():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, resume: bool, quiet: bool) -> dict:
    run = TrainingRun(cfg, resume)
    with StopRequest(enabled=not run.dist.active) as stop:
        try:
            return _loop(run, cfg, resume, quiet, stop)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # metrics or plot on a full disk
                raise TrainError(f"the disk is full ({e.filename or run.out}); {run.last_good()}") from None
            raise


def _optimizer_step(run: TrainingRun, cfg: TrainConfig, compiled, autocast, unigram) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches (gradients all-reduced on the last); the summed loss."""
    factor = lr_factor(run.step, run.progress(), cfg)
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(run.grad_accum):
        x, y = run.train_data.batch(cfg.batch_size, run.block, run.data_rng, run.rows)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with distributed.grad_sync(run.wrapped, micro == run.grad_accum - 1):
            with autocast():
                loss = compiled(x, targets=y, unigram=unigram)
            (loss / run.grad_accum).backward()
        loss_sum += loss.detach()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    for opt in run.optimizers:
        opt.step()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for weight, kept in run.masks:
            weight.mul_(kept)
    return loss_sum


def _loop(run: TrainingRun, cfg: TrainConfig, resume: bool, quiet: bool, stop: StopRequest) -> dict:
    model, device, main = run.model, run.device, run.dist.main
    with_loss = (LanguageModelLoss(model, run.wrapped) if run.teacher is None else
                 DistillationLoss(model, run.wrapped, run.teacher, cfg.distill_temperature, cfg.distill_alpha,
                                  cfg.distill_beta, cfg.distill_cosine))
    compiled = torch.compile(with_loss) if cfg.compile else with_loss

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if run.bf16 else contextlib.nullcontext()

    log = MetricsLog(run.out / "metrics.jsonl", truncate_after=run.step if resume else 0) if main else None
    tokens_per_step = cfg.batch_size * run.block * run.grad_accum  # global: all ranks
    progress = Progress(log, cfg.max_steps, run.step, tokens_per_step, model.flops_per_token(run.block) * tokens_per_step,
                        peak_flops(device), quiet or not main, cfg.progress_seconds)
    # the sampled softmax's train loss is over the batch's targets only; val_loss is always the full one
    unigram = run.train_data.unigram(model.config.vocab_size).to(device) if cfg.sampled_softmax else None
    val_loss, loss_value = None, math.nan
    model.train()
    while run.progress() < 1:
        t0 = time.perf_counter()
        loss_sum = _optimizer_step(run, cfg, compiled, autocast, unigram)
        run.step += 1
        run.tokens += tokens_per_step
        run.elapsed += time.perf_counter() - t0
        progress.advance()
        done = run.progress() >= 1 or stop.signal is not None
        if run.step % cfg.log_interval == 0 or done:
            loss_value = distributed.mean_across_ranks(loss_sum, run.dist).item() / run.grad_accum  # the one sync
            progress.record(run.step, loss_value, run.optimizers[0].param_groups[0]["lr"], run.tokens, run.elapsed)
        progress.line(run.step, loss_value, run.tokens, run.elapsed, run.progress(), last=done)
        if stop.signal is not None:
            run.save()
            break
        if run.step % cfg.eval_interval == 0 or done:
            with progress.paused():
                val_loss = evaluate_loss(model, run.val_data, run.block, cfg.batch_size, device, autocast,
                                         cfg.eval_tokens)
                if main:
                    log.write({"step": run.step, "val_loss": round(val_loss, 6), "elapsed_s": round(run.elapsed, 2)})
                    plot_losses(log.path, run.out / "loss.png")
                progress.say(f"step {run.step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
        if run.step % cfg.ckpt_interval == 0 or done:
            with progress.paused():
                run.save()
    progress.close()
    return {"step": run.step, "tokens": run.tokens, "train_loss": loss_value, "val_loss": val_loss,
            "elapsed_s": run.elapsed, "out": str(run.out),
            "interrupted": signal.Signals(stop.signal).name if stop.signal is not None else None}
