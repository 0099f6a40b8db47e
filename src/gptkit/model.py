"""The GPT model: one class for GPT-1, GPT-2, GPT-3-style and modern decoders, plus its KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import GPTConfig


class KVCache:
    """Preallocated keys and values for every layer. The generator owns it and advances it; layers only
    `write` their new keys and values and read the filled part.

    Two modes: all rows at one shared position `pos` (generation, prefill of any length), or, after
    `per_row()`, each row at its own length (serving slots: single-token decode steps)."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (config.n_layer, batch, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.lengths: Tensor | None = None  # per-row mode
        self.span = 0  # per-row mode: max(lengths), kept on the host

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def per_row(self) -> KVCache:
        self.lengths = torch.zeros(self.k.shape[1], dtype=torch.long, device=self.k.device)
        return self

    def advance(self, n: int) -> None:
        if self.lengths is None:
            self.pos += n
        else:
            self.lengths += n
            self.span += n

    def set_row(self, row: int, other: KVCache) -> None:
        """Install a batch-1 cache (a prefilled prompt) as row `row` (per-row mode)."""
        n = other.pos
        self.k[:, row, :, :n] = other.k[:, 0, :, :n]
        self.v[:, row, :, :n] = other.v[:, 0, :, :n]
        self.lengths[row] = n
        self.span = int(self.lengths.max())

    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0
        self.span = int(self.lengths.max())

    def move_row(self, src: int, dst: int) -> None:
        self.k[:, dst], self.v[:, dst], self.lengths[dst] = self.k[:, src], self.v[:, src], self.lengths[src]

    def rows(self, n: int) -> KVCache:
        """A view of the first `n` rows (per-row mode): writes through it land in this cache."""
        view = object.__new__(KVCache)
        view.k, view.v, view.pos = self.k[:, :n], self.v[:, :n], 0
        view.lengths, view.span = self.lengths[:n], self.span
        return view

    def advance_rows(self, n: int) -> None:
        self.lengths[:n] += 1
        self.span = int(self.lengths.max())

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values [B, kv_heads, T, d]; return all keys/values so far."""
        if self.lengths is None:
            end = self.pos + k.shape[2]
            self.k[layer, :, :, self.pos:end] = k
            self.v[layer, :, :, self.pos:end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer, rows, :, self.lengths] = k[:, :, 0]
            self.v[layer, rows, :, self.lengths] = v[:, :, 0]
            end = self.span + 1
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Keep the batch rows `rows` (in that order), e.g. the surviving beams."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)


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
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
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


class PackedLinear(nn.Module):
    """Inference-only CPU linear layer for decoding, whose speed is the speed at which weights stream from memory.
    A few fp32 rows go through gptkit's native skinny kernel (kernels/gemv.c); everything else, and machines
    without a C compiler, through oneDNN's prepacked weight layout. Both stream weights two to three times
    faster than the BLAS matrix-vector path."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight = weight
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), persistent=False)
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.skinny_linear(x, self.weight, self.bias)
        if y is None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ w.T` against `targets`, a chunk of rows at a time, each chunk's logits
    turned into their gradient (softmax - one-hot) while still in cache: the [tokens, vocab] logits never
    reach memory, which makes the head and loss of a small model 1.6x faster on CPU. Backward only scales
    the gradients formed here."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, ignore_index: int, rows: int) -> Tensor:
        keep = targets != ignore_index
        count = keep.sum().clamp_min(1)
        want_w = ctx.needs_input_grad[1]  # not for a frozen head (LoRA)
        grad_h, grad_w, loss = torch.empty_like(h), torch.zeros_like(w) if want_w else None, h.new_zeros(())
        buffer = h.new_empty(min(rows, len(h)), len(w))  # reused: a fresh block page-faults on every chunk
        for s in range(0, len(h), rows):
            hc, kc = h[s:s + rows], keep[s:s + rows]
            yc = targets[s:s + rows].where(kc, 0)
            z = torch.mm(hc, w.t(), out=buffer[:len(hc)])
            picked = z.gather(1, yc[:, None]).squeeze(1)
            top = z.amax(1, keepdim=True)
            total = z.sub_(top).exp_().sum(1, keepdim=True)  # z: softmax once divided by total
            loss += ((total.log() + top).squeeze(1) - picked).mul(kc).sum()
            z.div_(total)
            z[torch.arange(len(yc)), yc] -= 1
            if not kc.all():
                z[~kc] = 0
            torch.mm(z, w, out=grad_h[s:s + rows])
            if want_w:
                grad_w.addmm_(z.t(), hc)
        ctx.save_for_backward(grad_h / count, grad_w / count if want_w else None)
        return loss / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, None if grad_w is None else grad_w * grad, None, None, None


def sampled_lm_loss(h: Tensor, w: Tensor, targets: Tensor, unigram: Tensor) -> Tensor:
    """Cross-entropy over the batch's own targets only, not the whole vocabulary (in-batch sampled softmax,
    the negatives of retrieval models). A token of frequency f is in a batch of N targets with probability
    q = 1 - (1 - f)^N; subtracting log q from its logit makes up for the batches it misses (logQ correction,
    Bengio & Senecal 2008; Yi et al. 2019). For a small model the full head is most of the step: on CPU
    with 8k tokens and 2k targets per batch (about 900 distinct) this pre-trains 1.6x the tokens per second
    and reaches a lower full-softmax validation loss in the same time."""
    keep = targets != -100
    h, targets = h[keep], targets[keep]
    candidates, picked = torch.unique(targets, return_inverse=True)
    log_q = torch.log(-torch.expm1(len(targets) * torch.log1p(-unigram[candidates].clamp(0, 1 - 1e-7))))
    logits = F.linear(h, w[candidates]).float() - log_q.clamp_min(-30)
    return F.cross_entropy(logits, picked)


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
        self.packed_head: PackedLinear | None = None  # set by pack_for_cpu_inference
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

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        w = self.wte.weight
        return KVCache(self.config, batch, max_len or self.config.context, w.dtype, w.device)

    def _masks(self, T: int, start: int, pad: Tensor | None, device) -> tuple[Tensor | None, Tensor | None]:
        """Boolean masks (True = may attend) for the dense and the banded layers; None = plain causal."""
        window = self.config.window if self.config.local_layers else None
        if pad is None and window is None and (start == 0 or T == 1):
            return None, None
        i = torch.arange(start, start + T, device=device)[:, None]
        j = torch.arange(start + T, device=device)[None, :]
        dense = j <= i
        if pad is not None:  # left padding: rows ignore their pad keys; pad queries see themselves (no NaN)
            dense = (dense & (j >= pad[:, None, None])) | (i == j)
            dense = dense[:, None]
        local = dense & (j > i - window) if window else None
        return dense, local

    def hidden_states(self, idx: Tensor, cache: KVCache | None = None, pad: Tensor | None = None) -> Tensor:
        """Final hidden states [B, T, n_embd]. `pad[b]` = left-pad tokens in row b (positions start after them)."""
        B, T = idx.shape
        if cache is not None and cache.lengths is not None:  # per-row lengths: one new token per row
            pos = cache.lengths[:, None]
            dense, local = self._row_masks(cache.lengths, cache.span + 1)
        else:
            start = cache.pos if cache is not None else 0
            if start + T > self.config.context:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.context}")
            pos = torch.arange(start, start + T, device=idx.device)
            if pad is not None:
                pos = (pos[None, :] - pad[:, None]).clamp_min(0)
            dense, local = self._masks(T, start, pad, idx.device)
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

    def _row_masks(self, lengths: Tensor, span: int) -> tuple[Tensor, Tensor | None]:
        j = torch.arange(span, device=lengths.device)[None, :]
        dense = j <= lengths[:, None]
        local = dense & (j > lengths[:, None] - self.config.window) if self.config.local_layers else None
        return dense[:, None, None], (local[:, None, None] if local is not None else None)

    def logits(self, h: Tensor) -> Tensor:
        if self.packed_head is not None:
            return self.packed_head(h)
        return F.linear(h, self.wte.weight) if self.lm_head is None else self.lm_head(h)

    def lm_loss(self, h: Tensor, targets: Tensor, unigram: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy of hidden states `h` [..., n_embd] against `targets` [...]
        (-100 = ignored). CPU fp32 training takes the chunked path; elsewhere the plain one. With `unigram`
        (the training tokens' frequencies), a sampled softmax instead: see `sampled_lm_loss`."""
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        h, targets = h.flatten(0, -2), targets.flatten()
        if unigram is not None:
            return sampled_lm_loss(h, w, targets, unigram)
        if (h.device.type == "cpu" and torch.is_grad_enabled() and h.dtype == w.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            rows = max(64, (1 << 21) // w.shape[0])  # about 8 MB of logits per chunk: fits in cache
            return _ChunkedLinearCrossEntropy.apply(h, w, targets, -100, rows)
        return F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=-100)

    @torch.no_grad()
    def pack_for_cpu_inference(self) -> GPT:
        """Give every linear layer a prepacked copy of its weights for fast CPU decoding (fp32 or bf16).
        The parameters stay as they are, so the state dict is unchanged; no-op where oneDNN is unavailable."""
        w = self.wte.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
            return self
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(child, PackedLinear):
                    setattr(module, name, PackedLinear(child.weight, child.bias))  # same parameters and keys
        # a detached view: the head must not add a key to the state dict
        self.packed_head = PackedLinear((w if self.lm_head is None else self.lm_head.weight).detach(), None)
        return self

    def forward(self, idx: Tensor, cache: KVCache | None = None, pad: Tensor | None = None,
                last_only: bool = False, targets: Tensor | None = None, unigram: Tensor | None = None) -> Tensor:
        """Logits [B, T or 1, vocab]; with `targets` [B, T], the mean training loss instead (sampled over
        the batch's own targets when given the `unigram` frequencies)."""
        h = self.hidden_states(idx, cache, pad)
        if targets is not None:
            return self.lm_loss(h, targets, unigram)
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
