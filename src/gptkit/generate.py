"""Decoding rules: sampling settings, pure sampling functions, penalties, the stop policy and incremental
detokenizer, and beam search. The loop that runs them over many rows is `engine.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import native
from .errors import GptkitError
from .model import GPT
from .tokenizer import Tokenizer


class GenerationError(GptkitError):
    """Invalid sampling settings, or a prompt that does not fit the model's context."""


SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL's, over prompt and output
    presence_penalty: float = 0.0  # OpenAI's, over the output so far
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k most likely
    num_beams: int = 1  # > 1: beam search (deterministic; the sampling settings are not used)
    json_schema: dict | str | None = None  # structured output: every reply is JSON valid under it (grammar.py)
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's log-prob and the k most likely

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        checks = [
            (self.max_new_tokens >= 1 or self.max_new_tokens == 0 and self.prompt_logprobs is not None,
             f"max_new_tokens must be at least 1 (0 only to score the prompt), got {self.max_new_tokens}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.seed is None or (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"seed must be an integer that fits in 64 bits, got {self.seed}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.num_beams >= 1, f"num_beams must be at least 1, got {self.num_beams}"),
            (all(self.stop), "stop strings must not be empty"),
            (self.json_schema is None or isinstance(self.json_schema, (dict, str)),
             "json_schema must be a JSON schema (a dict, or its JSON text)"),
            (self.json_schema is None and self.prompt_logprobs is None or self.num_beams == 1,
             "json_schema and prompt_logprobs do not combine with beam search"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GenerationError(msg)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


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
    # Inverse-CDF sampling: one uniform number per row (multinomial draws one per vocabulary entry, which
    # dominates a small model's decode step). side="right" never lands on a token of probability 0.
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on every token in `seen` [B, L]: positive logits divided, negative multiplied."""
    score = logits.gather(1, seen)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, seen, score)


def apply_penalties(logits: Tensor, prompt: Tensor, output: Tensor, params: SamplingParams) -> Tensor:
    """One row's logits [V] after the repetition penalty (over `prompt` and `output` ids) and OpenAI's
    presence and frequency penalties (over `output`: minus presence once, minus frequency per occurrence)."""
    if params.repetition_penalty != 1:
        logits = apply_repetition_penalty(logits[None], torch.cat([prompt, output])[None], params.repetition_penalty)[0]
    if len(output) and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(output, minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
        logits = logits - counts * params.frequency_penalty - (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


def check_fits(model: GPT, prompt_len: int, max_new_tokens: int) -> None:
    context = model.config.context
    if prompt_len + max_new_tokens > context:
        raise GenerationError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the "
                              f"model's context of {context}; shorten the prompt or lower max_new_tokens")


@torch.inference_mode()
def beam_search(stepper, prompt: list[int], num_beams: int, max_new_tokens: int, eot_id: int | None = None,
                length_penalty: float = 1.0, vocab_limit: int | None = None) -> list[int]:
    """The highest-scoring continuation (sum of log-probs / length ** length_penalty), over ids below
    `vocab_limit` (a model vocabulary padded past its tokenizer's). `stepper` runs the model (native.py's, or
    the model itself: anything with its prefill / decode / logits)."""
    if isinstance(stepper, GPT):
        stepper = native.stepper(stepper)
    model = stepper.model
    check_fits(model, len(prompt), max_new_tokens)
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    h = stepper.prefill(torch.tensor([prompt], device=cache.device), cache)
    logp = stepper.logits(h[:, -1])[:, :vocab_limit].log_softmax(-1)
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
        # the best a live beam can still reach: its sum only falls, and with length_penalty > 0 its divisor
        # grows up to max_new_tokens ** length_penalty (both normalised, like the finished scores)
        longest = max_new_tokens if length_penalty > 0 else step + 1
        if not next_beams or (len(finished) >= num_beams and best_done >= max(next_scores) / longest ** length_penalty):
            break
        while len(rows) < num_beams:  # keep the cache's batch constant
            next_beams.append(next_beams[-1]), next_scores.append(-math.inf), rows.append(rows[-1])
        cache.reorder(torch.tensor(rows, device=logp.device))
        beams, scores = next_beams, torch.tensor(next_scores, device=logp.device)
        logp = stepper.decode(torch.tensor([b[-1] for b in beams], device=logp.device), cache)[:, :vocab_limit].log_softmax(-1)
        cache.advance(1)
    return max(finished, key=lambda f: f[0])[1]




class Detokenizer:
    """One row's token stream as text pieces, at O(new tokens) per token: each token is decoded together with
    the few tokens before it (a window that moves on once its text is complete), so pieces never split a
    character and tokenizers whose tokens' text depends on their neighbours (SentencePiece spaces) decode as
    the whole sequence would. Special tokens are never shown as text; `stop_ids` end the stream, and the text
    is cut at the first stop string (text that may begin one is held back until it is decided)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), stop_ids: tuple[int, ...] = ()):
        self.tokenizer, self.stop, self.stop_ids = tokenizer, stop, set(stop_ids)
        self.hidden = set(tokenizer.special_by_id)
        self.ids: list[int] = []  # visible tokens so far
        self.start = self.read = 0  # the decode window: ids[start:read] is already text, ids[read:] is not yet
        self.pending = ""  # text decoded but not yet sent (it may begin a stop string)
        self.done, self.finish_reason = False, None
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.stop_ids:
            return self.finish("stop")
        if token in self.hidden:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        text = self.tokenizer.decode(self.ids[self.start:])
        if text.endswith("\ufffd") or len(text) <= len(before):  # an incomplete UTF-8 sequence: wait for more
            return ""
        self.start, self.read = self.read, len(self.ids)
        return self._emit(text[len(before):])

    def _emit(self, new: str) -> str:
        text = self.pending + new
        found = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if found:  # the stop string that occurs first in the text, whichever comes first in the list
            self.pending = text[:min(found)]
            return self._end("stop")
        # hold back the longest tail that is a prefix of a stop string
        hold = next((k for k in range(min(self.hold, len(text)), 0, -1)
                     if any(s.startswith(text[-k:]) for s in self.stop)), 0)
        piece, self.pending = text[:len(text) - hold], text[len(text) - hold:]
        return piece

    def finish(self, reason: str) -> str:
        """End the stream (a stop token, the length): the text held back is sent now, and tokens that end inside a
        UTF-8 character as U+FFFD (as transformers and tiktoken decode them)."""
        if not self.done and self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.start:self.read])
            self.pending += self.tokenizer.decode(self.ids[self.start:])[len(before):]
        return self._end(reason)

    def _end(self, reason: str) -> str:
        piece, self.pending = self.pending, ""
        if not self.done:
            self.done, self.finish_reason = True, reason
        return piece
