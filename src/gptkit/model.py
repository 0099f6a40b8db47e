"""The GPT model: one class for GPT-1, GPT-2, GPT-3-style and modern decoders, plus its KV cache. The model
only, in PyTorch: losses live in train/loss.py; how the engine runs it (native kernels or this code) in native.py."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GPTConfig
from .errors import GptkitError


class ContextError(GptkitError):
    """A sequence longer than the model's context or the cache's rows."""


class _Rows:
    """What every KV cache keeps of its rows: their lengths (on the host, so reading them never waits for the
    device) and the window of rows a forward pass runs on (`select(start, stop)`: writes through it land here)."""

    def __init__(self, batch: int):
        self.lengths = [0] * batch  # tokens held by each row
        self.window = slice(0, batch)
        self._index: tuple | None = None  # (lengths, T) -> positions [B, T], reused by every layer

    def select(self, start: int, stop: int):
        view = copy.copy(self)  # shares the buffers and the lengths list
        view.window, view._index = slice(start, stop), None
        return view

    @property
    def device(self) -> torch.device:
        return self.k.device  # (each cache holds its keys in `k` and its values in `v`)

    def row_lengths(self) -> list[int]:
        return self.lengths[self.window]

    def rows(self) -> range:
        return range(*self.window.indices(len(self.lengths)))

    def positions(self, T: int) -> Tensor:
        """Positions [B, T] of the next T tokens of each row in the window."""
        lengths = self.row_lengths()
        if self._index is None or self._index[0] != (lengths, T):
            pos = torch.tensor(lengths, device=self.device)[:, None] + torch.arange(T, device=self.device)
            self._index = ((lengths, T), pos)
        return self._index[1]

    def advance(self, n: int | list[int]) -> None:
        """Rows of the window hold `n` more tokens (one count for all, or one per row)."""
        for i, row in enumerate(self.rows()):
            self.lengths[row] += n if isinstance(n, int) else n[i]

    def set_length(self, row: int, n: int) -> None:
        self.lengths[row] = n


class KVCache(_Rows):
    """Preallocated keys and values for every layer, `batch` rows of `max_len` positions each. The generator owns
    it and advances it; layers only `write` their new keys and values and read the filled part."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        super().__init__(batch)
        shape = (config.n_layer, batch, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def move_row(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        self.k[:, dst, :, :n], self.v[:, dst, :, :n] = self.k[:, src, :, :n], self.v[:, src, :, :n]
        self.lengths[dst] = n

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values [B, kv_heads, T, d] after each row's filled part; return every row's
        keys/values up to the longest row's end (positions past a row's own end are masked by the model)."""
        T, lengths = k.shape[2], self.row_lengths()
        keys, values = self.k[layer, self.window], self.v[layer, self.window]
        start = lengths[0]
        if all(n == start for n in lengths):
            keys[:, :, start:start + T], values[:, :, start:start + T] = k, v
        else:
            rows = torch.arange(len(lengths), device=k.device)[:, None]
            pos = self.positions(T)
            keys[rows, :, pos], values[rows, :, pos] = k.transpose(1, 2), v.transpose(1, 2)
        end = max(lengths) + T
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Keep the batch rows `rows` (in that order), e.g. the surviving beams."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.lengths = [self.lengths[i] for i in rows.tolist()]
        self.window = slice(0, len(self.lengths))


class PagedKVCache(_Rows):
    """Keys and values in blocks of `block_size` positions from one pool [n_layer, n_blocks, kv_heads, block_size,
    d]; row r's position j lives in block `tables[r][j // block_size]`. Whoever owns the cache (the engine) gives
    rows their blocks before a pass writes there; a block may sit in several rows' tables (a shared prefix)."""

    def __init__(self, config: GPTConfig, rows: int, n_blocks: int, block_size: int, dtype: torch.dtype, device=None):
        super().__init__(rows)
        shape = (config.n_layer, n_blocks, config.kv_heads, block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self.max_len = config.context

    @property
    def batch(self) -> int:
        return len(self.tables)

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    def block_tables(self, blocks: int, pad: int = 0) -> Tensor:
        """The window's first `blocks` table entries [B, blocks], `pad` past a row's own blocks (0 for a gather
        whose extra positions are masked; -1 for the native step, which refuses a block it does not have)."""
        return torch.tensor([(self.tables[r] + [pad] * blocks)[:blocks] for r in self.rows()], device=self.device)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T, bs = k.shape[2], self.block_size
        if self._index is None or len(self._index) < 3 or self._index[0] != (self.row_lengths(), T):
            if any(len(self.tables[r]) * bs < n + T for r, n in zip(self.rows(), self.row_lengths())):
                raise ContextError("a row writes past the KV blocks it was given")
            pos = self.positions(T)
            end = max(self.row_lengths()) + T
            tables = self.block_tables(-(-end // bs))
            rows = torch.arange(len(tables), device=k.device)[:, None]
            self._index = (self._index[0], pos, (tables[rows, pos // bs], pos % bs, tables, end))
        blocks, offsets, tables, end = self._index[2]
        self.k[layer][blocks, :, offsets], self.v[layer][blocks, :, offsets] = k.transpose(1, 2), v.transpose(1, 2)
        B, kv, d = len(tables), self.k.shape[2], self.k.shape[4]

        def gather(pool: Tensor) -> Tensor:  # [B, blocks, kv, bs, d] -> [B, kv, positions, d]
            return pool[layer][tables].transpose(1, 2).reshape(B, kv, -1, d)[:, :, :end]

        return gather(self.k), gather(self.v)


@dataclass(frozen=True)
class Records:
    """What was done to a model's weights (how they are quantized, how they were pruned): saved in its checkpoint's
    config.json beside the config, read back with it."""
    quantization: dict | None = None
    pruning: dict | None = None


def _norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: GPTConfig) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    angles = torch.outer(torch.arange(config.context, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # one angle per pair (i, i + d/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate the two halves of each head (the layout of Llama checkpoints in transformers).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.d = layer, config.n_head, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.d, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.d, config.n_embd, bias=config.bias)
        self.q_norm = nn.RMSNorm(self.d, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.d, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        q = q.view(B, T, self.n_head, self.d).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.d).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.d).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.activation = config.activation
        gated = 2 if config.activation == "swiglu" else 1  # SwiGLU: gate and up in one matmul
        self.fc = nn.Linear(config.n_embd, gated * config.hidden, bias=config.bias)
        self.proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.prenorm, self.local = config.prenorm, layer in config.local_layers
        self.norm1, self.attn = _norm(config, config.n_embd), Attention(config, layer)
        self.norm2, self.mlp = _norm(config, config.n_embd), MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache):
        if self.prenorm:
            x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rope, mask, cache)))  # GPT-1: normalise after the residual
        return self.norm2(x + self.drop(self.mlp(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = _norm(config, config.n_embd) if config.prenorm else None
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.records = Records()
        if config.pos == "rope":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer), norms at 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()

    @property
    def device(self) -> torch.device:
        return next(self.parameters(), next(self.buffers(), torch.empty(0))).device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (quantized weights are integers; the norms and biases are not)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.context, self.dtype, self.device)

    def _masks(self, pos: Tensor, span: int) -> tuple[Tensor | None, Tensor | None]:
        """Boolean masks (True = may attend) [B, 1, T, span] for the dense and the banded layers, from the
        queries' positions [B, T]."""
        j = torch.arange(span, device=pos.device)
        dense = (j <= pos[..., None])[:, None]
        local = dense & (j > pos[..., None] - self.config.window)[:, None] if self.config.local_layers else None
        return dense, local

    def hidden_states(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Final hidden states [B, T, n_embd]. With a cache, row b's tokens follow the row's cached ones."""
        B, T = idx.shape
        if cache is None:
            if T > self.config.context:
                raise ContextError(f"sequence of {T} tokens exceeds the context of {self.config.context}")
            pos, dense, local = torch.arange(T, device=idx.device), None, None
            if self.config.local_layers:
                dense, local = self._masks(pos[None], T)
        else:
            lengths = cache.row_lengths()
            if max(lengths) + T > self.config.context:
                raise ContextError(f"sequence of {max(lengths) + T} tokens exceeds the context of {self.config.context}")
            if max(lengths) + T > cache.max_len:
                raise ContextError(f"sequence of {max(lengths) + T} tokens exceeds the cache's {cache.max_len} positions")
            pos = cache.positions(T)
            dense = local = None
            if self.config.local_layers or any(n != lengths[0] for n in lengths) or (T > 1 and lengths[0] > 0):
                dense, local = self._masks(pos, max(lengths) + T)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])
            if pos.dim() == 2:  # per-row positions: broadcast over heads
                rope = (rope[0][:, None], rope[1][:, None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, local if block.local else dense, cache)
        return self.norm_f(x) if self.norm_f is not None else x

    def logits(self, h: Tensor) -> Tensor:
        return F.linear(h, self.wte.weight) if self.lm_head is None else self.lm_head(h)

    def head_weight(self) -> Tensor:
        """The LM head's weight [vocab, n_embd] (the token embedding when they are tied)."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: Tensor, cache: KVCache | None = None, last_only: bool = False, hidden: bool = False) -> Tensor:
        """Logits [B, T or 1, vocab]; with `hidden`, the final hidden states instead (what a training loss reads:
        train/loss.py)."""
        h = self.hidden_states(idx, cache)
        if hidden:
            return h
        return self.logits(h[:, -1:] if last_only else h)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention scores."""
        c = self.config
        matmul = self.num_params(embeddings=False) + (c.vocab_size * c.n_embd if c.tie_embeddings else 0)
        return 6 * matmul + 12 * c.n_layer * c.n_embd * (seq_len or c.context)
