"""The one decoding engine. Requests are decoded together: each running request owns one row of a shared KV
cache, newly admitted prompts are prefilled in one batched pass, and every step runs one forward pass for all
rows. `LM.generate` / `LM.stream`, `ChatSession` and the HTTP server all run on it (the server from a thread
of its own, see `serve/runner.py`); one stop policy (stop ids, stop strings, max tokens, context end) holds
for all of them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import native
from .generate import (SEED_RANGE, Detokenizer, GenerationError, SamplingParams, apply_penalties, beam_search,
                       check_fits, sample)
from .model import GPT
from .tokenizer import Tokenizer


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...] = ()  # tokens that end the reply (not shown)
    cancelled: bool = False  # set by the caller (client gone): the engine frees the row at its next step
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class TokenLogprob:
    token: int
    logprob: float  # log_softmax of the model's logits (before penalties and temperature)
    top: list[tuple[int, float]]  # the `params.logprobs` most likely tokens


@dataclass
class Output:
    """What one step produced for one request: a text piece (possibly empty), its token, and at the end a
    finish reason ("stop" or "length")."""
    request: Request
    text: str
    token: int
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(eq=False)
class _Row:
    request: Request
    detok: Detokenizer | None
    generator: torch.Generator | None
    prompt: Tensor  # for the penalties
    output: list[int] = field(default_factory=list)


def row_seed(seed: int | None, index: int) -> int | None:
    """The seed of the `index`-th sample of a request seeded with `seed` (wraps within 64 bits)."""
    return None if seed is None else (seed + index) % (SEED_RANGE[1] + 1)


class Engine:
    """Rows of a KV cache decoded step by step. Not thread-safe: one thread calls `add` and `step`."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, max_batch: int = 16, max_len: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stepper = native.stepper(self.model)
        self.cache = model.new_cache(max_batch, min(max_len or model.config.context, model.config.context))
        self.vocab = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
        self.rows: list[_Row] = []  # row i of the cache
        self.waiting: deque[Request] = deque()
        self.logits: Tensor | None = None  # next-token logits of every row [rows, V]
        self.max_rows = 0  # the widest step so far (observability, tests)
        self.in_step: list[Request] = []  # requests the current step took out of rows or waiting (for `abort`)

    @property
    def max_batch(self) -> int:
        return self.cache.batch

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def has_room(self) -> bool:
        """Whether a request added now would start at the next step."""
        return len(self.rows) + len(self.waiting) < self.max_batch

    def check(self, request: Request) -> None:
        """Raise GenerationError for a request this engine cannot run as asked."""
        p, prompt = request.params, request.prompt
        if p.num_beams > 1:
            raise GenerationError("num_beams > 1 (beam search) runs one prompt at a time in LM.generate; "
                                  "the decoding engine samples")
        if not prompt:
            raise GenerationError("empty prompt: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.vocab for t in prompt):
            raise GenerationError(f"prompt token ids must be integers in [0, {self.vocab})")
        if p.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer")
        check_fits(self.model, len(prompt), p.max_new_tokens)
        if len(prompt) + p.max_new_tokens > self.cache.max_len:
            raise GenerationError(f"prompt of {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} exceeds this "
                                  f"engine's rows of {self.cache.max_len} tokens")

    def add(self, request: Request) -> Request:
        self.check(request)
        self.waiting.append(request)
        return request

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def step(self) -> list[Output]:
        """Admit waiting requests (one batched prefill), sample the next token of every row, then run one
        forward pass for the rows still going."""
        self.in_step = []
        with torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            if not self.rows:
                return []
            self.max_rows = max(self.max_rows, len(self.rows))
            tokens = self._sample()
            logprobs = self._logprobs(tokens)
            outputs = [self._emit(row, t, lp) for row, t, lp in zip(self.rows, tokens, logprobs)]
            going = [i for i, o in enumerate(outputs) if o.finish_reason is None]
            self.in_step = [self.rows[i].request for i, o in enumerate(outputs) if o.finish_reason is not None]
            self._keep(going)
            if self.rows:
                self._decode([tokens[i] for i in going])
        self.in_step = []
        return outputs

    def abort(self) -> list[Request]:
        """Drop every request of the engine after a failed step, and return them: running, waiting, and those the
        failed step finished (their outputs never left it). The engine stays usable."""
        dropped = [row.request for row in self.rows] + list(self.waiting) + self.in_step
        self.rows, self.logits, self.in_step = [], None, []
        self.waiting.clear()
        for i in range(self.cache.batch):
            self.cache.set_length(i, 0)
        return dropped

    # --- one step -------------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        keep = [i for i, row in enumerate(self.rows) if not row.request.cancelled]
        if len(keep) < len(self.rows):
            self.logits = self.logits[keep]
            self._keep(keep)

    def _admit(self) -> None:
        # taken from the queue only once their prefill has run: a prefill that raises leaves them for `abort`
        new = list(itertools.islice(self.waiting, max(0, self.cache.batch - len(self.rows))))
        if not new:
            return
        n, lengths = len(self.rows), [len(r.prompt) for r in new]
        device = self.cache.device
        T = max(lengths)  # right-padded: each row's own tokens come first, its padding is never attended to
        idx = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in new], device=device)
        h = self.stepper.prefill(idx, self.cache.select(n, n + len(new)))
        logits = self.stepper.logits(h[torch.arange(len(new), device=device), torch.tensor(lengths, device=device) - 1])
        for _ in new:
            self.waiting.popleft()
        for i, length in enumerate(lengths):
            self.cache.set_length(n + i, length)
        for r in new:
            seed = r.params.seed
            detok = Detokenizer(self.tokenizer, r.params.stop, r.stop_ids) if self.tokenizer is not None else None
            gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
            self.rows.append(_Row(r, detok, gen, torch.tensor(r.prompt, device=device)))
        self.logits = logits if self.logits is None or n == 0 else torch.cat([self.logits, logits])

    def _sample(self) -> list[int]:
        """Next token of every row. Rows with the same settings and no seed of their own share one call."""
        logits = self.logits[:, :self.vocab]  # never an id the tokenizer lacks (padded model vocabularies)
        penalized = [i for i, row in enumerate(self.rows) if row.request.params.penalized]
        if penalized:
            logits = logits.clone()
            for i in penalized:
                row = self.rows[i]
                out = torch.tensor(row.output, dtype=torch.long, device=logits.device)
                logits[i] = apply_penalties(logits[i], row.prompt, out, row.request.params)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.rows):
            p = row.request.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p) if row.generator is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
        tokens = [0] * len(self.rows)
        for rows in groups.values():
            p, gen = self.rows[rows[0]].request.params, self.rows[rows[0]].generator
            picked = logits if len(rows) == len(self.rows) else logits[rows]
            for i, t in zip(rows, sample(picked, p.temperature, p.top_k, p.top_p, p.min_p, gen).tolist()):
                tokens[i] = t
        return tokens

    def _logprobs(self, tokens: list[int]) -> list[TokenLogprob | None]:
        wanted = [i for i, row in enumerate(self.rows) if row.request.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(self.rows)
        if not wanted:
            return result
        lp = self.logits[wanted, :self.vocab].float().log_softmax(-1)
        for j, i in enumerate(wanted):
            k = self.rows[i].request.params.logprobs
            top = lp[j].topk(k) if k else None
            result[i] = TokenLogprob(tokens[i], lp[j, tokens[i]].item(),
                                     list(zip(top.indices.tolist(), top.values.tolist())) if k else [])
        return result

    def _emit(self, row: _Row, token: int, logprob: TokenLogprob | None) -> Output:
        row.output.append(token)
        r, detok = row.request, row.detok
        text = detok.push(token) if detok is not None else ""
        finish = "stop" if (detok.done if detok is not None else token in r.stop_ids) else None
        position = len(r.prompt) + len(row.output)  # where this token goes in the cache
        if finish is None and (len(row.output) >= r.params.max_new_tokens or position >= self.cache.max_len):
            finish = "length"
            text += detok.finish("length") if detok is not None else ""
        return Output(r, text, token, logprob, finish, len(row.output))

    def _keep(self, keep: list[int]) -> None:
        """Keep rows `keep` (in order) in cache rows 0..len(keep)-1; free the others."""
        for dst, src in enumerate(keep):
            if src != dst:
                self.cache.move_row(src, dst)
        for i in range(len(keep), len(self.rows)):
            self.cache.set_length(i, 0)
        self.rows = [self.rows[i] for i in keep]

    def _decode(self, tokens: list[int]) -> None:
        view = self.cache.select(0, len(self.rows))
        self.logits = self.stepper.decode(torch.tensor(tokens, device=self.cache.device), view)
        view.advance(1)


def engine_for(model: GPT, tokenizer: Tokenizer | None, prompts: list[list[int]], params: SamplingParams,
          stop_ids: tuple[int, ...]) -> tuple[Engine, list[Request]]:
    """An engine sized for `prompts`, holding one request each (checked now); prompt i gets the seed
    `seed + i`."""
    engine = Engine(model, tokenizer, len(prompts), max(map(len, prompts)) + params.max_new_tokens)
    return engine, [engine.add(Request(p, dataclasses.replace(params, seed=row_seed(params.seed, i)), stop_ids))
                    for i, p in enumerate(prompts)]


def generate_tokens(model: GPT, prompts: list[list[int]], params: SamplingParams,
                    stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """The generated token ids of each prompt (no tokenizer needed), decoded together."""
    engine, requests = engine_for(model, None, prompts, params, stop_ids)
    out: dict[int, list[int]] = {r.id: [] for r in requests}
    while engine.has_work():
        for o in engine.step():
            out[o.request.id].append(o.token)
    return [out[r.id] for r in requests]


class LM:
    """A model with its tokenizer: text in, text out."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.finish_reasons: list[str] = []

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        eot = self.tokenizer.special.get("<|endoftext|>")
        return ids or ([eot] if eot is not None else [])  # an empty prompt starts a new document

    def stop_ids(self) -> tuple[int, ...]:
        eot = self.tokenizer.special.get("<|endoftext|>")
        return (eot,) if eot is not None else ()

    def stream_batch(self, prompts: list[str], params: SamplingParams) -> Iterator[list[str]]:
        """Per step, the new text piece of every prompt ('' for finished rows). Settings and prompt lengths are
        checked before this returns; `finish_reasons` holds each prompt's reason once the iterator is done.
        A seed gives prompt i the seed `seed + i`."""
        ids = [self.encode_prompt(p) for p in prompts]
        if params.num_beams > 1:
            for p in ids:
                check_fits(self.model, len(p), params.max_new_tokens)
            return self._beams(ids, params)
        return self._run(*engine_for(self.model, self.tokenizer, ids, params, self.stop_ids()))

    def _run(self, engine: Engine, requests: list[Request]) -> Iterator[list[str]]:
        where = {r.id: i for i, r in enumerate(requests)}
        self.finish_reasons = ["length"] * len(requests)
        while engine.has_work():
            pieces = [""] * len(requests)
            for o in engine.step():
                pieces[where[o.request.id]] += o.text
                if o.finish_reason:
                    self.finish_reasons[where[o.request.id]] = o.finish_reason
            yield pieces

    def _beams(self, ids: list[list[int]], params: SamplingParams) -> Iterator[list[str]]:
        self.finish_reasons = ["length"] * len(ids)
        for i, p in enumerate(ids):
            out = beam_search(self.model, p, params.num_beams, params.max_new_tokens, *self.stop_ids()[:1],
                              vocab_limit=self.tokenizer.vocab_size)
            det = Detokenizer(self.tokenizer, params.stop, self.stop_ids())
            text = "".join(det.push(t) for t in out)
            text += det.finish("length")
            yield ["" if j != i else text for j in range(len(ids))]
            self.finish_reasons[i] = det.finish_reason

    def stream(self, prompt: str, **settings) -> Iterator[str]:
        """The text pieces of one prompt's continuation, as they are decoded."""
        steps = self.stream_batch([prompt], SamplingParams(**settings))
        return (pieces[0] for pieces in steps if pieces[0])

    def generate(self, prompt: str | list[str], **settings) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [""] * len(prompts)
        for pieces in self.stream_batch(prompts, SamplingParams(**settings)):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts[0] if isinstance(prompt, str) else texts
