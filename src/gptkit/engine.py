"""The one decoding engine. Requests are decoded together: each running request owns one row of a paged KV cache
(blocks from one pool under a memory budget, `blocks.py`), starting from the longest prefix of its prompt already
in the cache; prompts are prefilled in chunks between decoding steps, so a long prompt never stalls the running
rows for long, and every step runs one forward pass for all decoding rows. `LM.generate` / `LM.stream`,
`ChatSession` and the HTTP server all run on it (the server from a thread of its own, see `serve/runner.py`); one
stop policy (stop ids, stop strings, max tokens, context end) holds for all of them.
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
from .blocks import BlockPool, block_hashes
from .grammar import Matcher, json_schema_grammar
from .generate import (SEED_RANGE, Detokenizer, GenerationError, SamplingParams, apply_penalties, beam_search,
                       check_fits, sample)
from .model import GPT, PagedKVCache
from .tokenizer import Tokenizer

BLOCK_SIZE = 16  # positions a KV block holds (vLLM's default)
PREFILL_CHUNK = 512  # prompt tokens prefilled per step at most, between decoding steps


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...] = ()  # tokens that end the reply (not shown)
    cancelled: bool = False  # set by the caller (client gone): the engine frees the row at its next step
    grammar: str | None = None  # params.json_schema compiled (by Engine.check)
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
    prompt_logprobs: list[TokenLogprob] | None = None  # with a request's first output: prompt tokens 1..n-1


@dataclass(eq=False)
class _Row:
    request: Request
    detok: Detokenizer | None
    generator: torch.Generator | None
    prompt: Tensor  # for the penalties
    reserved: int  # blocks it may still take (its worst case, held back from other requests)
    names: list[bytes]  # the names of its full blocks so far (blocks.py)
    matcher: Matcher | None = None  # structured output: the tokens its grammar allows next
    output: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the cache
    logits: Tensor | None = None  # next-token logits once the prompt is in
    prompt_logprobs: list[TokenLogprob] | None = None  # asked for: filled by the prefill, sent with the first output


def row_seed(seed: int | None, index: int) -> int | None:
    """The seed of the `index`-th sample of a request seeded with `seed` (wraps within 64 bits)."""
    return None if seed is None else (seed + index) % (SEED_RANGE[1] + 1)


def kv_bytes_per_token(model: GPT) -> int:
    c = model.config
    return 2 * c.n_layer * c.kv_heads * c.head_dim * torch.empty(0, dtype=model.dtype).element_size()


class Engine:
    """Rows of a paged KV cache decoded step by step. Not thread-safe: one thread calls `add` and `step`.
    `kv_memory`: bytes for keys and values (default: enough for `max_batch` rows of `max_len`; a server sets its
    own budget); a request is admitted once its worst case (prompt + max_new_tokens) fits beside the running ones,
    and waits in the queue until then."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, max_batch: int = 16, max_len: int | None = None,
                 kv_memory: int | None = None, block_size: int = BLOCK_SIZE, prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stepper = native.stepper(self.model)
        self.max_len = min(max_len or model.config.context, model.config.context)
        per_block = kv_bytes_per_token(model) * block_size
        if kv_memory is None:
            kv_memory = -(-self.max_len // block_size) * max_batch * per_block
        if prefill_chunk < 1 or block_size < 1:
            raise GenerationError(f"prefill_chunk and block_size must be at least 1, got {prefill_chunk}, {block_size}")
        n_blocks = kv_memory // per_block
        if n_blocks < 1:
            raise GenerationError(f"a KV memory of {kv_memory:,} bytes holds no block of {block_size} tokens "
                                  f"({per_block:,} bytes)")
        self.pool = BlockPool(n_blocks)
        self.cache = PagedKVCache(model.config, max_batch, n_blocks, block_size, model.dtype, model.device)
        self.block_size, self.prefill_chunk = block_size, prefill_chunk
        self.vocab = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
        self.rows: list[_Row] = []  # row i of the cache
        self.waiting: deque[Request] = deque()
        self.max_rows = 0  # the widest step so far (observability, tests)
        self.in_step: list[Request] = []  # requests the current step took out of rows (for `abort`)

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
        """Whether the engine takes another request into its queue now (it starts once its blocks are free)."""
        return len(self.rows) + len(self.waiting) < self.max_batch

    def kv_stats(self) -> dict:
        return {"blocks": self.pool.n_blocks, "blocks_in_use": self.pool.in_use, "block_size": self.block_size,
                "evictions": self.pool.evictions, "reused_blocks": self.pool.reused_blocks,
                "bytes": self.pool.n_blocks * self.block_size * kv_bytes_per_token(self.model)}

    def _worst_case(self, request: Request) -> int:
        return -(-(len(request.prompt) + request.params.max_new_tokens) // self.block_size)

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
        if len(prompt) + p.max_new_tokens > self.max_len:
            raise GenerationError(f"prompt of {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} exceeds this "
                                  f"engine's rows of {self.max_len} tokens")
        if p.json_schema is not None:
            if self.tokenizer is None:
                raise GenerationError("json_schema needs a tokenizer")
            request.grammar = json_schema_grammar(p.json_schema, self.tokenizer, request.stop_ids)
        if self._worst_case(request) > self.pool.n_blocks:
            raise GenerationError(f"prompt of {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} exceeds the "
                                  f"KV cache's whole budget of {self.pool.n_blocks * self.block_size} tokens")

    def add(self, request: Request) -> Request:
        self.check(request)
        return self.enqueue(request)

    def enqueue(self, request: Request) -> Request:
        """Queue a request `check` has already passed (the server checks on the handler's thread)."""
        self.waiting.append(request)
        return request

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def step(self) -> list[Output]:
        """Admit waiting requests whose blocks fit, prefill up to `prefill_chunk` prompt tokens, sample the next
        token of every row whose prompt is in, then run one forward pass for the rows still going."""
        self.in_step = []
        with torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            self._prefill()
            scored = [self._scored_only(i) for i, row in enumerate(self.rows)
                      if row.logits is not None and row.request.params.max_new_tokens == 0]
            self.in_step = [o.request for o in scored]  # done: only their prompt was asked for
            self._free([i for i, row in enumerate(self.rows) if any(row.request is r for r in self.in_step)])
            ready = [i for i, row in enumerate(self.rows) if row.logits is not None]
            if not ready:
                self.in_step = []
                return scored
            self.max_rows = max(self.max_rows, len(ready))
            rows = [self.rows[i] for i in ready]
            logits = torch.stack([row.logits for row in rows])
            tokens = self._sample(rows, logits)
            logprobs = self._logprobs(rows, logits, tokens)
            outputs = [self._emit(row, t, lp) for row, t, lp in zip(rows, tokens, logprobs)]
            done = {id(row) for row, o in zip(rows, outputs) if o.finish_reason is not None}
            self.in_step += [row.request for row in rows if id(row) in done]
            going = [(row, t) for row, t in zip(rows, tokens) if id(row) not in done]
            outputs = scored + outputs
            self._free([i for i, row in enumerate(self.rows) if id(row) in done])
            if going:
                self._decode(going)
        self.in_step = []
        return outputs

    def abort(self) -> list[Request]:
        """Drop every request of the engine after a failed step, and return them: running, waiting, and those the
        failed step finished (their outputs never left it). The engine stays usable."""
        dropped = [row.request for row in self.rows] + list(self.waiting) + self.in_step
        self._free(list(range(len(self.rows))))
        self.in_step = []
        self.waiting.clear()
        return dropped

    # --- one step -------------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        self._free([i for i, row in enumerate(self.rows) if row.request.cancelled])

    def _free(self, gone: list[int]) -> None:
        """Give rows `gone` back: their blocks return to the pool, the others keep their order in rows 0..n-1."""
        if not gone:
            return
        cache, gone = self.cache, set(gone)
        for i in gone:
            for block in cache.tables[i]:
                self.pool.release(block)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        tables, lengths = [cache.tables[i] for i in keep], [cache.lengths[i] for i in keep]
        for dst in range(len(self.rows)):
            cache.tables[dst] = tables[dst] if dst < len(keep) else []
            cache.lengths[dst] = lengths[dst] if dst < len(keep) else 0
        self.rows = [self.rows[i] for i in keep]

    def _available(self) -> int:
        return self.pool.available() - sum(row.reserved for row in self.rows)

    def _admit(self) -> None:
        """Start waiting requests in order while rows are free and their worst case fits the budget; each starts
        from the longest cached prefix of its prompt (at least its last token is computed, for its logits)."""
        while self.waiting and len(self.rows) < self.cache.batch:
            request = self.waiting[0]
            if self._worst_case(request) - (len(request.prompt) - 1) // self.block_size > self._available():
                return  # it cannot fit even with its whole prompt cached: no need to name its blocks yet
            names = block_hashes(request.prompt[:-1], self.block_size)
            scored = request.params.prompt_logprobs is not None  # every prompt position's logits: no reuse
            hits, idle = (0, 0) if scored else self.pool.probe(names)
            need = self._worst_case(request) - hits
            if need > self._available() - idle:
                return  # it waits for blocks; the requests behind it wait their turn
            seed, device = request.params.seed, self.cache.device  # what may raise comes first: nothing taken yet
            detok = Detokenizer(self.tokenizer, request.params.stop, request.stop_ids) if self.tokenizer else None
            gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
            matcher = Matcher(request.grammar, self.tokenizer, request.stop_ids) if request.grammar else None
            row = _Row(request, detok, gen, torch.tensor(request.prompt, device=device), need, names[:hits],
                       matcher, prefilled=hits * self.block_size, prompt_logprobs=[] if scored else None)
            self.waiting.popleft()
            slot = len(self.rows)
            self.cache.tables[slot], self.cache.lengths[slot] = self.pool.cached(names[:hits]), hits * self.block_size
            self.rows.append(row)

    def _grow(self, slot: int, row: _Row, length: int) -> None:
        """Blocks for row `slot` to hold `length` positions (taken from its reservation)."""
        table = self.cache.tables[slot]
        while len(table) * self.block_size < length:
            table.append(self.pool.allocate())
            row.reserved -= 1

    def _remember(self, slot: int, row: _Row, tokens: list[int]) -> None:
        """Name the row's blocks that are full now (their contents are `tokens`' prefix), for later requests."""
        full, known = len(tokens) // self.block_size, len(row.names)
        if full > known:
            parent = row.names[-1] if row.names else b""
            row.names += block_hashes(tokens[known * self.block_size:full * self.block_size], self.block_size, parent)
            for block, name in zip(self.cache.tables[slot][known:full], row.names[known:]):
                self.pool.remember(block, name)

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens into the cache, rows in order; a row whose prompt is complete gets
        the logits of its last token. (A row is taken from the queue only once its blocks are reserved, and a
        prefill that raises leaves the rows in place for `abort`.)"""
        budget = self.prefill_chunk
        for slot, row in enumerate(self.rows):
            prompt = row.request.prompt
            if row.logits is not None or budget <= 0:
                continue
            chunk = prompt[row.prefilled:row.prefilled + budget]
            budget -= len(chunk)
            self._grow(slot, row, row.prefilled + len(chunk))
            view = self.cache.select(slot, slot + 1)
            h = self.stepper.prefill(torch.tensor([chunk], device=self.cache.device), view)
            if row.prompt_logprobs is not None:
                self._score_prompt(row, h[0])
            row.prefilled += len(chunk)
            self.cache.lengths[slot] = row.prefilled
            self._remember(slot, row, prompt[:row.prefilled])
            if row.prefilled == len(prompt):
                row.logits = self.stepper.logits(h[0, -1])

    def _score_prompt(self, row: _Row, h: Tensor) -> None:
        """The log-probs of the prompt tokens that the chunk's positions [T, n_embd] predict."""
        prompt, start, k = row.request.prompt, row.prefilled, row.request.params.prompt_logprobs
        targets = prompt[start + 1:start + 1 + len(h)]
        if not targets:
            return
        lp = self.stepper.logits(h[:len(targets)])[:, :self.vocab].float().log_softmax(-1)
        chosen = lp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
        top = lp.topk(k) if k else None
        for j, (token, value) in enumerate(zip(targets, chosen)):
            row.prompt_logprobs.append(TokenLogprob(token, value, list(zip(top.indices[j].tolist(),
                                                                           top.values[j].tolist())) if k else []))

    def _sample(self, rows: list[_Row], logits: Tensor) -> list[int]:
        """Next token of every row. Rows with the same settings and no seed of their own share one call."""
        logits = logits[:, :self.vocab]  # never an id the tokenizer lacks (padded model vocabularies)
        penalized = [i for i, row in enumerate(rows) if row.request.params.penalized]
        constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
        if penalized or constrained:
            logits = logits.clone()
            for i in penalized:
                row = rows[i]
                out = torch.tensor(row.output, dtype=torch.long, device=logits.device)
                logits[i] = apply_penalties(logits[i], row.prompt, out, row.request.params)
            for i in constrained:
                rows[i].matcher.mask(logits[i])
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            p = row.request.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p) if row.generator is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
        tokens = [0] * len(rows)
        for members in groups.values():
            p, gen = rows[members[0]].request.params, rows[members[0]].generator
            picked = logits if len(members) == len(rows) else logits[members]
            for i, t in zip(members, sample(picked, p.temperature, p.top_k, p.top_p, p.min_p, gen).tolist()):
                tokens[i] = t
        return tokens

    def _logprobs(self, rows: list[_Row], logits: Tensor, tokens: list[int]) -> list[TokenLogprob | None]:
        wanted = [i for i, row in enumerate(rows) if row.request.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(rows)
        if not wanted:
            return result
        lp = logits[wanted, :self.vocab].float().log_softmax(-1)
        for j, i in enumerate(wanted):
            k = rows[i].request.params.logprobs
            top = lp[j].topk(k) if k else None
            result[i] = TokenLogprob(tokens[i], lp[j, tokens[i]].item(),
                                     list(zip(top.indices.tolist(), top.values.tolist())) if k else [])
        return result

    def _scored_only(self, i: int) -> Output:
        """A request that asked for no new token (max_new_tokens 0): its prompt's log-probs, and done."""
        row = self.rows[i]
        return Output(row.request, "", -1, None, "length", 0, prompt_logprobs=row.prompt_logprobs)

    def _emit(self, row: _Row, token: int, logprob: TokenLogprob | None) -> Output:
        first = not row.output
        row.output.append(token)
        r, detok = row.request, row.detok
        text = detok.push(token) if detok is not None else ""
        finish = "stop" if (detok.done if detok is not None else token in r.stop_ids) else None
        if row.matcher is not None and finish is None:
            row.matcher.accept(token)
            if row.matcher.complete:  # the JSON is whole: only an end token could follow
                finish = "stop"
                text += detok.finish("stop")
        position = len(r.prompt) + len(row.output)  # where this token goes in the cache
        if finish is None and (len(row.output) >= r.params.max_new_tokens or position >= self.max_len):
            finish = "length"
            text += detok.finish("length") if detok is not None else ""
        return Output(r, text, token, logprob, finish, len(row.output),
                      prompt_logprobs=row.prompt_logprobs if first else None)

    def _decode(self, going: list[tuple[_Row, int]]) -> None:
        """One forward pass for the rows that sampled and go on (they are rows 0..n-1: the prefilling ones follow)."""
        slots = {id(row): i for i, row in enumerate(self.rows)}
        order = [slots[id(row)] for row, _ in going]
        assert order == list(range(len(order))), "decoding rows come first"
        for slot, (row, _) in enumerate(going):
            self._grow(slot, row, self.cache.lengths[slot] + 1)
        view = self.cache.select(0, len(going))
        logits = self.stepper.decode(torch.tensor([t for _, t in going], device=self.cache.device), view)
        view.advance(1)
        for slot, ((row, _), row_logits) in enumerate(zip(going, logits)):
            row.logits = row_logits
            if self.cache.lengths[slot] // self.block_size > len(row.names):  # a block just filled
                self._remember(slot, row, row.request.prompt + row.output)


def engine_for(model: GPT, tokenizer: Tokenizer | None, prompts: list[list[int]], params: SamplingParams,
          stop_ids: tuple[int, ...]) -> tuple[Engine, list[Request]]:
    """An engine sized for `prompts`, holding one request each (checked now); prompt i gets the seed
    `seed + i`."""
    longest = max(map(len, prompts)) + params.max_new_tokens
    blocks = sum(-(-(len(p) + params.max_new_tokens) // BLOCK_SIZE) for p in prompts)
    engine = Engine(model, tokenizer, len(prompts), longest, kv_memory=blocks * BLOCK_SIZE * kv_bytes_per_token(model))
    return engine, [engine.add(Request(p, dataclasses.replace(params, seed=row_seed(params.seed, i)), stop_ids))
                    for i, p in enumerate(prompts)]


def generate_tokens(model: GPT, prompts: list[list[int]], params: SamplingParams,
                    stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """The generated token ids of each prompt (no tokenizer needed), decoded together."""
    engine, requests = engine_for(model, None, prompts, params, stop_ids)
    out: dict[int, list[int]] = {r.id: [] for r in requests}
    while engine.has_work():
        for o in engine.step():
            if o.token >= 0:  # (a request for no new token ends with an output of none)
                out[o.request.id].append(o.token)
    return [out[r.id] for r in requests]


class LM:
    """A model with its tokenizer: text in, text out."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.finish_reasons: list[str] = []

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode_document(prompt)  # BOS first where the model's files say so
        eot = self.tokenizer.eos_id
        return ids or ([eot] if eot is not None else [])  # an empty prompt starts a new document

    def stop_ids(self) -> tuple[int, ...]:
        eot = self.tokenizer.eos_id  # the model's end of document (<|endoftext|> unless its files name another)
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
            out = beam_search(native.stepper(self.model), p, params.num_beams, params.max_new_tokens, *self.stop_ids()[:1],
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
