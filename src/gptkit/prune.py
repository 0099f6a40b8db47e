"""Pruning: zero the least important weights of every linear layer of the blocks, or drop whole attention heads
or MLP channels.

- `magnitude`: importance |W|.  `wanda` (Sun et al. 2023): |W| x the L2 norm of the layer's input feature over
  calibration tokens, so a small weight on a large activation survives; block by block, each calibrated on the
  activations that the blocks before it, already pruned, pass on. Both compared within each output row,
  either to a fraction of the row (`sparsity`) or as N:M (keep N of every M consecutive inputs: 2:4, 4:8).
- `heads`, `channels`: structured; attention heads (whole key/value groups) or each MLP's hidden channels
  ranked by their weight norms (x activation norm with calibration), the least important dropped from every
  layer alike: a smaller dense model, faster everywhere.
Unstructured and N:M pruning leave the shapes as they are (zeros in the weights) and give no speed on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import GptkitError
from .model import GPT
from .tokenizer import Tokenizer

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
STRUCTURED = ("heads", "channels")  # these make a smaller dense model
METHODS = ("magnitude", "wanda", *STRUCTURED)


class PruneError(GptkitError):
    """A pruning request that cannot be carried out."""


@dataclass(frozen=True)
class PruneSpec:
    method: str  # magnitude, wanda, heads, channels
    sparsity: float | None = None  # fraction of each row's weights zeroed (unstructured)
    pattern: tuple[int, int] | None = None  # N:M: keep N of every M
    keep: float | None = None  # heads / channels: the fraction of attention heads / MLP channels kept

    def __post_init__(self):
        if self.method not in METHODS:
            raise PruneError(f"unknown method {self.method!r}; choose {', '.join(METHODS)}")
        if self.method in STRUCTURED:
            if self.keep is None or not 0 < self.keep < 1:
                raise PruneError(f"--keep must be between 0 and 1 (exclusive) for {self.method}, got {self.keep}")
            return
        if (self.sparsity is None) == (self.pattern is None):
            raise PruneError("give either --sparsity or --pattern N:M")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise PruneError(f"--sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if self.pattern is not None and not 0 < self.pattern[0] < self.pattern[1]:
            raise PruneError(f"a pattern N:M needs 0 < N < M, got {self.pattern[0]}:{self.pattern[1]}")


def parse_pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(p) for p in text.split(":"))
    except ValueError:
        raise PruneError(f"a pattern is N:M (e.g. 2:4), got {text!r}") from None
    return n, m


def calibration_batches(path: Path, tokenizer: Tokenizer, context: int, sequences: int = 128,
                        length: int = 256, batch: int = 8) -> list[Tensor]:
    """Up to `sequences` windows of `length` tokens (at most the context) from a text file, or from a prepared
    data directory's train split (which must come from the model's tokenizer)."""
    from .data import TokenShards

    path, length = Path(path), min(length, context)
    if path.is_dir():
        data = TokenShards(path, "train")
        if data.tokenizer_sha256() != tokenizer.fingerprint():
            raise PruneError(f"{path} was tokenized with a different tokenizer than the model's")
        ids = torch.cat([x.flatten() for x, _ in data.windows(length, batch)])[:sequences * length]
    elif path.is_file():
        ids = torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))[:sequences * length])
    else:
        raise PruneError(f"no calibration text at {path}")
    n = len(ids) // length
    if n == 0:
        raise PruneError(f"{path} holds fewer than {length} tokens: too little to calibrate on")
    windows = ids[:n * length].view(n, length)
    return list(windows.split(batch))


def block_linears(model: GPT) -> dict[str, nn.Module]:
    return {f"blocks.{i}.{name}": block.get_submodule(name) for i, block in enumerate(model.blocks) for name in LINEARS}


@torch.no_grad()
def input_norms(model: GPT, batches: list[Tensor], names: list[str]) -> dict[str, Tensor]:
    """The L2 norm of each input feature of the named linear layers over all calibration tokens."""
    sums = {name: None for name in names}
    modules = {name: model.get_submodule(name) for name in names}

    def hook(name):
        def record(_, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = (x * x).sum(0)
            sums[name] = s if sums[name] is None else sums[name] + s
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        was_training = model.training
        model.eval()
        for batch in batches:
            model(batch)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def check_pattern(spec: PruneSpec, name: str, inputs: int) -> None:
    if spec.pattern is not None and inputs % spec.pattern[1]:
        raise PruneError(f"{name}: its {inputs} inputs are not a multiple of M = {spec.pattern[1]}")


def row_mask(score: Tensor, spec: PruneSpec, name: str) -> Tensor:
    """True where a weight is kept: the largest scores of each output row (a fraction, or N of every M)."""
    N, K = score.shape
    check_pattern(spec, name, K)
    if spec.pattern is not None:
        n, m = spec.pattern
        groups = score.reshape(N, K // m, m)
        keep = groups.topk(n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(N, K)
    drop = round(spec.sparsity * K)
    lowest = score.topk(drop, dim=-1, largest=False).indices
    return torch.ones_like(score, dtype=torch.bool).scatter_(-1, lowest, False)


@torch.no_grad()
def prune(model: GPT, spec: PruneSpec, calibration: list[Tensor] | None = None) -> dict[str, Tensor]:
    """Zero the pruned weights of every linear of the blocks in place; returns the masks (True = kept)."""
    if spec.method in STRUCTURED:
        raise PruneError(f"{spec.method} pruning makes a new model: use prune_{spec.method}")
    if spec.method == "wanda" and not calibration:
        raise PruneError("wanda needs calibration text (--calib FILE)")
    layers = block_linears(model)
    for name, layer in layers.items():  # every layer checked before any weight changes
        check_pattern(spec, name, layer.weight.shape[1])
    masks = {}
    for i in range(len(model.blocks)):
        names = [f"blocks.{i}.{name}" for name in LINEARS]
        # as in Wanda's own code: a block is calibrated on what the blocks before it, already pruned, pass on
        norms = input_norms(model, calibration, names) if spec.method == "wanda" else {}
        for name in names:
            score = layers[name].weight.detach().abs().float()
            if name in norms:
                score = score * norms[name][None, :]
            masks[name] = row_mask(score, spec, name)
        for name in names:
            layers[name].weight.mul_(masks[name])
    return masks


@torch.no_grad()
def prune_channels(model: GPT, keep: float, calibration: list[Tensor] | None = None) -> GPT:
    """A smaller dense model: the same `round(keep * hidden)` most important MLP channels kept in every layer
    (importance: the channel's input-row and output-column norms, times its activation norm when calibrated)."""
    c = model.config
    hidden = c.hidden
    kept = max(1, round(keep * hidden))
    norms = input_norms(model, calibration, [f"blocks.{i}.mlp.proj" for i in range(c.n_layer)]) if calibration else None
    small = GPT(c.replace(mlp_hidden=kept)).to(model.device)
    state = model.state_dict()
    for i, block in enumerate(model.blocks):
        fc, proj = block.mlp.fc.weight, block.mlp.proj.weight
        gated = fc.shape[0] == 2 * hidden  # SwiGLU: gate rows, then up rows
        score = proj.norm(dim=0) * (fc[:hidden].norm(dim=1) + (fc[hidden:].norm(dim=1) if gated else 0))
        if norms is not None:
            score = score * norms[f"blocks.{i}.mlp.proj"]
        channels = score.topk(kept).indices.sort().values
        rows = torch.cat([channels, channels + hidden]) if gated else channels
        p = f"blocks.{i}.mlp."
        state[p + "fc.weight"] = fc[rows]
        state[p + "proj.weight"] = proj[:, channels]
        if c.bias:
            state[p + "fc.bias"] = block.mlp.fc.bias[rows]
    small.load_state_dict(state)
    return small.eval()


@torch.no_grad()
def prune_heads(model: GPT, keep: float, calibration: list[Tensor] | None = None) -> GPT:
    """A smaller dense model: the same `round(keep * kv_heads)` most important key/value heads kept in every layer,
    with their query heads (grouped-query attention drops whole groups). A group's importance: the norms of its
    query heads' columns of the output projection, times their activation norms when calibrated. The head size
    stays; the attention's width shrinks (config.head_size records it)."""
    c = model.config
    groups, d = c.kv_heads, c.head_dim
    per_group = c.n_head // groups
    kept = max(1, round(keep * groups))
    norms = input_norms(model, calibration, [f"blocks.{i}.attn.proj" for i in range(c.n_layer)]) if calibration else None
    small = GPT(c.replace(n_head=kept * per_group, n_kv_head=kept if c.n_kv_head else None, head_size=d))
    state = model.state_dict()
    for i, block in enumerate(model.blocks):
        proj = block.attn.proj.weight  # [n_embd, n_head * d]
        column = proj.norm(dim=0) * (norms[f"blocks.{i}.attn.proj"] if norms is not None else 1)
        score = column.reshape(groups, per_group * d).norm(dim=1)
        chosen = score.topk(kept).indices.sort().values
        q_heads = (chosen[:, None] * per_group + torch.arange(per_group)).flatten()
        q_rows = (q_heads[:, None] * d + torch.arange(d)).flatten()
        kv_rows = (chosen[:, None] * d + torch.arange(d)).flatten()
        rows = torch.cat([q_rows, c.n_head * d + kv_rows, (c.n_head + groups) * d + kv_rows])
        p = f"blocks.{i}.attn."
        state[p + "qkv.weight"] = block.attn.qkv.weight[rows]
        if c.bias:
            state[p + "qkv.bias"] = block.attn.qkv.bias[rows]
        state[p + "proj.weight"] = proj[:, q_rows]
    small.load_state_dict(state)
    return small.to(model.device).eval()


def sparsity(model: GPT) -> float:
    """The fraction of zeros in the linear layers of the blocks."""
    weights = [layer.weight for layer in block_linears(model).values()]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def record(spec: PruneSpec, calibration: str | None, achieved: float) -> dict:
    return {**{k: v for k, v in asdict(spec).items() if v is not None}, "calibration": calibration,
            "sparsity_achieved": round(achieved, 6)}
