"""Decoding: pure sampling functions, batched KV-cached generation, beam search, streaming text."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import GPT
from .tokenizer import Tokenizer


class GenerationError(ValueError):
    """Invalid sampling settings, or a prompt that does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1  # > 1: beam search (deterministic; the sampling settings are not used)

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"num_beams must be at least 1, got {self.num_beams}"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GenerationError(msg)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(dim=-1)
    if min_p is not None and min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keeps the token that crosses top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on every token in `seen` [B, L]: positive logits divided, negative multiplied."""
    score = logits.gather(1, seen)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, seen, score)


def check_fits(model: GPT, prompt_len: int, max_new_tokens: int) -> None:
    context = model.config.context
    if prompt_len + max_new_tokens > context:
        raise GenerationError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the "
                              f"model's context of {context}; shorten the prompt or lower max_new_tokens")


@torch.inference_mode()
def generate_ids(model: GPT, prompts: list[list[int]], params: SamplingParams,
                 vocab_limit: int | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row, step by step, for prompts of different lengths (left padded).
    `vocab_limit`: sample only ids below it (a model vocabulary padded beyond its tokenizer's)."""
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise GenerationError("empty prompt: give at least one token")
    L, B = max(lengths), len(prompts)
    check_fits(model, L, params.max_new_tokens)
    device = model.wte.weight.device
    # Left padding: pad slots repeat the row's first token (harmless for the repetition penalty's gather).
    idx = torch.tensor([[p[0]] * (L - len(p)) + p for p in prompts], device=device)
    pad = torch.tensor([L - n for n in lengths], device=device) if min(lengths) < L else None
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    cache = model.new_cache(B, L + params.max_new_tokens)
    seen = idx
    logits = model(idx, cache, pad, last_only=True)[:, -1]
    cache.advance(L)
    for step in range(params.max_new_tokens):
        if params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        token = sample(logits[:, :vocab_limit], params.temperature, params.top_k, params.top_p, params.min_p, gen)
        yield token
        if step + 1 == params.max_new_tokens:
            return
        if params.repetition_penalty != 1.0:
            seen = torch.cat([seen, token[:, None]], dim=1)
        logits = model(token[:, None], cache, pad)[:, -1]
        cache.advance(1)


@torch.inference_mode()
def beam_search(model: GPT, prompt: list[int], num_beams: int, max_new_tokens: int, eot_id: int | None = None,
                length_penalty: float = 1.0) -> list[int]:
    """The highest-scoring continuation (sum of log-probs / length ** length_penalty)."""
    check_fits(model, len(prompt), max_new_tokens)
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    logp = model(torch.tensor([prompt], device=model.wte.weight.device), cache, last_only=True)[:, -1].log_softmax(-1)
    cache.advance(len(prompt))
    cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=logp.device))
    beams, scores = [[]], torch.zeros(1, device=logp.device)
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        total = (scores[:, None] + logp).flatten()
        top = total.topk(min(2 * num_beams, total.numel()))
        next_beams, next_scores, rows = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            row, tok = divmod(flat, logp.shape[-1])
            seq = beams[row] + [tok]
            if tok == eot_id or step + 1 == max_new_tokens:
                finished.append((score / len(seq) ** length_penalty, seq))
            elif len(next_beams) < num_beams:
                next_beams.append(seq), next_scores.append(score), rows.append(row)
        best_done = max((s for s, _ in finished), default=-math.inf)
        if not next_beams or (len(finished) >= num_beams and best_done >= max(next_scores)):
            break  # with length_penalty >= 0 no live beam can still overtake the best finished one
        while len(rows) < num_beams:  # keep the cache's batch constant
            next_beams.append(next_beams[-1]), next_scores.append(-math.inf), rows.append(rows[-1])
        cache.reorder(torch.tensor(rows, device=logp.device))
        beams, scores = next_beams, torch.tensor(next_scores, device=logp.device)
        logp = model(torch.tensor([b[-1:] for b in beams], device=logp.device), cache)[:, -1].log_softmax(-1)
        cache.advance(1)
    return max(finished, key=lambda f: f[0])[1]


class Detokenizer:
    """Turns one row's token stream into text pieces: whole characters only, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), stop_ids: tuple[int, ...] = ()):
        self.tokenizer, self.stop, self.stop_ids = tokenizer, stop, stop_ids
        self.ids: list[int] = []
        self.text, self.sent, self.done = "", 0, False
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.stop_ids:
            self.done, self.finish_reason = True, "stop"
            return self.flush()
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.done, self.finish_reason = self.text[:at], True, "stop"
                return self.flush()
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)  # hold back what may be the start of a stop string
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


class LM:
    """A model with its tokenizer: text in, text out."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        eot = self.tokenizer.special.get("<|endoftext|>")
        return ids or ([eot] if eot is not None else [])  # an empty prompt starts a new document

    def stream_batch(self, prompts: list[str], params: SamplingParams) -> Iterator[list[str]]:
        """Yield, per step, the new text piece of every prompt ('' for finished rows)."""
        eot = self.tokenizer.special.get("<|endoftext|>")
        stop_ids = (eot,) if eot is not None else ()
        ids = [self.encode_prompt(p) for p in prompts]
        self.finish_reasons = ["length"] * len(prompts)
        if params.num_beams > 1:
            for i, p in enumerate(ids):
                out = beam_search(self.model, p, params.num_beams, params.max_new_tokens, eot)
                det = Detokenizer(self.tokenizer, params.stop, stop_ids)
                text = "".join(det.push(t) for t in out) + det.flush()
                yield ["" if j != i else text for j in range(len(prompts))]
                self.finish_reasons[i] = det.finish_reason or "length"
            return
        dets = [Detokenizer(self.tokenizer, params.stop, stop_ids) for _ in prompts]
        for tokens in generate_ids(self.model, ids, params, self.tokenizer.vocab_size):
            yield [d.push(t) for d, t in zip(dets, tokens.tolist())]
            if all(d.done for d in dets):
                break
        yield [d.flush() for d in dets]
        self.finish_reasons = [d.finish_reason or "length" for d in dets]

    def stream(self, prompt: str, **settings) -> Iterator[str]:
        params = SamplingParams(**settings)
        for pieces in self.stream_batch([prompt], params):
            if pieces[0]:
                yield pieces[0]

    def generate(self, prompt: str | list[str], **settings) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [""] * len(prompts)
        for pieces in self.stream_batch(prompts, SamplingParams(**settings)):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts[0] if isinstance(prompt, str) else texts
