"""Continuous batching: requests that arrive together are decoded together, one batched forward pass per
step. Each running request owns one row (slot) of a shared KV cache; new requests are admitted between steps.

The engine runs in its own thread and knows nothing of HTTP: it reports through each request's callback.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import Detokenizer, SamplingParams, check_fits, sample
from ..model import GPT
from ..tokenizer import Tokenizer


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[dict], None]  # {"text": piece} ... then {"finish_reason": ..., "completion_tokens": n}
    stop_ids: tuple[int, ...] = ()
    cancelled: bool = False  # set by the caller (client gone): the engine frees the slot at the next step
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class Slot:
    request: Request
    detok: Detokenizer
    logits: torch.Tensor  # next-token logits [V]
    generator: torch.Generator | None
    generated: int = 0


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cache = model.new_cache(max_batch).per_row()
        self.slots: list[Slot] = []  # slot i lives in cache row i
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.max_rows = 0  # the widest batched step so far (observability, tests)
        self._thread = threading.Thread(target=self._loop, name="gptkit-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Request:
        check_fits(self.model, len(request.prompt), request.params.max_new_tokens)
        self.pending.put(request)
        return request

    def close(self) -> None:
        self.pending.put(None)
        self._thread.join(timeout=10)

    # --- the loop (engine thread only) --------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                block = not self.slots  # idle: sleep until a request comes
                while len(self.slots) < self.cache.k.shape[1]:
                    try:
                        request = self.pending.get(block=block)
                    except queue.Empty:
                        break
                    if request is None:
                        return
                    block = False
                    if not request.cancelled:
                        self._admit(request)
                if self.slots:
                    self._step()

    def _admit(self, request: Request) -> None:
        one = self.model.new_cache(1, len(request.prompt))
        try:
            logits = self.model(torch.tensor([request.prompt], device=self.cache.k.device), one, last_only=True)
        except Exception as e:  # never let one bad request stop the engine
            request.on_event({"error": str(e)})
            return
        one.advance(len(request.prompt))
        self.cache.set_row(len(self.slots), one)
        seed = request.params.seed
        gen = torch.Generator(device=logits.device).manual_seed(seed) if seed is not None else None
        detok = Detokenizer(self.tokenizer, request.params.stop, request.stop_ids)
        self.slots.append(Slot(request, detok, logits[0, -1], gen))

    def _sample(self) -> list[int]:
        """Next token of every slot: unseeded slots with the same settings are sampled in one call."""
        tokens = [0] * len(self.slots)
        groups: dict[tuple, list[int]] = {}
        for i, slot in enumerate(self.slots):
            p = slot.request.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p) if slot.generator is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
        vocab = self.tokenizer.vocab_size  # never an id the tokenizer lacks (padded model vocabularies)
        for rows in groups.values():
            p, gen = self.slots[rows[0]].request.params, self.slots[rows[0]].generator
            logits = torch.stack([self.slots[i].logits[:vocab] for i in rows])
            for i, t in zip(rows, sample(logits, p.temperature, p.top_k, p.top_p, p.min_p, gen).tolist()):
                tokens[i] = t
        return tokens

    def _step(self) -> None:
        tokens = self._sample()
        for slot, token in zip(self.slots, tokens):
            slot.generated += 1
            piece = slot.detok.push(token)
            if piece:
                slot.request.on_event({"text": piece})
        # Finished or abandoned requests leave; the last slot moves into the hole (rows stay contiguous).
        for i in reversed(range(len(self.slots))):
            slot = self.slots[i]
            done = slot.detok.done or slot.generated >= slot.request.params.max_new_tokens
            if done or slot.request.cancelled:
                if done and not slot.request.cancelled:
                    tail = slot.detok.flush()
                    if tail:
                        slot.request.on_event({"text": tail})
                    slot.request.on_event({"finish_reason": slot.detok.finish_reason or "length",
                                           "completion_tokens": slot.generated})
                self._free(i)
                tokens[i] = tokens[-1]
                tokens.pop()
        n = len(self.slots)
        if not n:
            return
        self.max_rows = max(self.max_rows, n)
        rows = self.cache.rows(n)
        logits = self.model(torch.tensor(tokens, device=self.cache.k.device)[:, None], rows)[:, -1]
        self.cache.advance_rows(n)
        for slot, row in zip(self.slots, logits):
            slot.logits = row

    def _free(self, i: int) -> None:
        last = len(self.slots) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.slots[i] = self.slots[last]
        self.slots.pop()
        self.cache.reset_row(last)
