"""torch.distributed plumbing for `torchrun`: process group, DDP / FSDP2 wrapping, sharded checkpoints."""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup(device_type: str, strategy: str, timeout_s: float) -> Dist:
    """Join the process group that torchrun describes in the environment (NCCL on GPU, Gloo on CPU).
    FSDP needs a group even for one process: outside torchrun it makes a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and strategy != "fsdp":
        return Dist()
    if "RANK" not in os.environ:  # a plain process asked for FSDP: a group of one on loopback
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process."""
    return os.environ.get("RANK", "0") == "0"


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, d: Dist, device: torch.device, bf16: bool) -> nn.Module:
    if not d.active:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and \
        device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def grad_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are all-reduced only when `sync` (the last
    micro-batch of an accumulation)."""
    if hasattr(model, "no_sync"):  # DDP
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def mean_across_ranks(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active and d.world > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:
            value /= d.world
    return value


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# --- sharded checkpoints (FSDP) ---------------------------------------------------------------------------
SHARDS_DIR = "dcp"


def save_sharded(out: Path, model: nn.Module, optimizers: list, d: Dist, step: int) -> tuple[dict, str]:
    """Save model + optimizer shards with torch.distributed.checkpoint into out/dcp-STEP (renamed into place
    whole when complete) and return the full model state dict (gathered to CPU, on rank 0) for the
    single-file export, and the directory's name. The checkpoint is committed only when train_state.pt naming
    that directory lands (see `drop_old_shards`): a crash in between resumes from the previous one, whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    name = f"{SHARDS_DIR}-{step:08d}"
    final, tmp = out / name, out / (name + ".tmp")
    if d.main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(d)
    state = {"model": get_model_state_dict(model)}
    for i, opt in enumerate(optimizers):
        state[f"optim{i}"] = get_optimizer_state_dict(model, opt)
    dcp.save(state, checkpoint_id=str(tmp))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    barrier(d)
    if d.main:
        if final.exists():  # the same step saved again (a resumed run's last step)
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier(d)
    return full, name


def drop_old_shards(out: Path, keep: str) -> None:
    """After the commit: every other shard directory (older steps, leftovers of a crash, the old `dcp` and
    `dcp.old` layout) goes. Rank 0 only."""
    for path in out.glob(SHARDS_DIR + "*"):
        if path.name != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def load_sharded(out: Path, model: nn.Module, optimizers: list, name: str = SHARDS_DIR) -> None:
    """Load out/NAME into a model and optimizers sharded over any number of processes (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model)}
    for i, opt in enumerate(optimizers):
        state[f"optim{i}"] = get_optimizer_state_dict(model, opt)
    dcp.load(state, checkpoint_id=str(out / name))
    set_model_state_dict(model, state["model"])
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(model, opt, state[f"optim{i}"])
