"""One completion or chat-completion request as the engine runs it: one engine request per prompt and sample,
their events gathered per engine step, and the answer as one JSON body or as server-sent events."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from .. import chat_template
from ..engine import LM, Output
from ..engine import Request as EngineRequest
from ..generate import GenerationError
from ..grammar import GrammarError
from ..tokenizer import Tokenizer
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, Sampling, engine_error, error_body, sampling_params,
                       sse, token_budget)
from .runner import Inbox, Mailroom, QueueFull, Runner


@dataclass
class Server:
    """What every request of one app shares."""
    runner: Runner
    mailroom: Mailroom
    metrics: Metrics
    tokenizer: Tokenizer
    model_name: str
    context: int


@dataclass
class Generation:
    server: Server
    kind: str  # "chat" or "text"
    http: Request
    body: Sampling
    prompts: list[list[int]]
    max_tokens: int | None
    param: str  # the body field the prompt came from (for errors)
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    echo: list[str] | None = None  # completions: the prompts' text, to print before the completion
    requests: list[EngineRequest] = field(default_factory=list)
    gone: bool = False  # the client hung up

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created, self.arrived = int(time.time()), time.perf_counter()
        self.object = "chat.completion" if self.kind == "chat" else "text_completion"
        self.count = len(self.prompts) * self.body.n  # choices: index = prompt * n + sample
        self.prompt_tokens = sum(len(p) for p in self.prompts) * self.body.n
        self.last_seen: list[float | None] = [None] * self.count
        self.offsets = [len(self.echo[i // self.body.n]) if self.echo else 0 for i in range(self.count)]

    # --- submitting -----------------------------------------------------------------------------------------
    def submit(self) -> None:
        """Queue every sample's engine request; all or none (a full queue is a 429)."""
        jobs = []
        for p, prompt in enumerate(self.prompts):
            limit = token_budget(prompt, self.max_tokens, self.server.context, self.param)
            for j in range(self.body.n):
                index = p * self.body.n + j
                params = sampling_params(self.body, limit, index, self.stop, self.logprobs)
                jobs.append((index, EngineRequest(prompt, params, self.stop_ids)))
        runner = self.server.runner
        if not runner.alive:
            raise APIError(503, "the decoding engine is not running", "server_error")
        self.inbox = Inbox(self.server.mailroom, asyncio.get_running_loop())
        try:
            for index, request in jobs:
                runner.submit(request, lambda event, index=index: self.inbox.put((index, event)))
                self.requests.append(request)
        except (QueueFull, GenerationError, GrammarError) as e:
            self.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"}) from None
            raise APIError(400, str(e), param="response_format" if isinstance(e, GrammarError) else self.param) from None

    def cancel(self) -> None:
        """Done, failed, or the client went away: the engine frees the rows at its next step."""
        for r in self.requests:
            r.cancelled = True

    # --- events ---------------------------------------------------------------------------------------------
    async def batches(self) -> AsyncIterator[dict[int, tuple]]:
        """Per wake-up, what each choice got since the last one: {index: (text, finish, logprobs, tokens)}
        (under load a stream's tokens pile up and go out as one chunk). An engine error raises APIError."""
        metrics, remaining = self.server.metrics, self.count
        while remaining:
            try:
                events = await self.inbox.get_all(timeout=1.0)
            except asyncio.TimeoutError:
                events = []
            if self.gone or not events and await self.http.is_disconnected():
                raise APIError(499, "the client closed the connection", "client_closed")  # nobody reads it
            if not events:
                continue
            batch: dict[int, tuple] = {}
            now = time.perf_counter()
            for i, event in events:
                if isinstance(event, Exception):
                    metrics.requests.labels(self.kind, "error").inc()
                    raise engine_error(event)
                seen = self.last_seen[i]
                (metrics.ttft.observe(now - self.arrived) if seen is None else metrics.token_latency.observe(now - seen))
                self.last_seen[i] = now
                text, _, block, tokens = batch.get(i, ("", None, None, 0))
                if event.prompt_logprobs is not None and self.echo:
                    block = merge(block, self.prompt_block(i, event.prompt_logprobs))
                batch[i] = (text + event.text, event.finish_reason, merge(block, self.logprob_block(i, event)),
                            tokens + (event.token >= 0))
                remaining -= event.finish_reason is not None
            metrics.generated_tokens.inc(len(events))
            yield batch
        metrics.requests.labels(self.kind, "finished").inc(self.count)
        metrics.prompt_tokens.inc(self.prompt_tokens)

    def logprob_block(self, i: int, out: Output) -> dict | None:
        """The OpenAI logprobs of one token: chat's `content` entries or completions' parallel lists."""
        lp, text_of = out.logprob, self.token_text
        if lp is None or out.token < 0:
            return None
        if self.kind == "chat":
            if lp.token in self.stop_ids:
                return {"content": []}

            def entry(t: int, v: float) -> dict:
                return {"token": text_of(t), "logprob": v, "bytes": list(text_of(t).encode())}
            return {"content": [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}]}
        text = text_of(lp.token)
        block = {"tokens": [text], "token_logprobs": [lp.logprob],
                 "top_logprobs": [{text_of(t): v for t, v in lp.top}], "text_offset": [self.offsets[i]]}
        self.offsets[i] += len(text)
        return block

    def prompt_block(self, i: int, scored: list) -> dict:
        """Completions' logprobs of the echoed prompt: its first token has none (nothing predicts it)."""
        prompt = self.prompts[i // self.body.n]
        texts = [self.token_text(t) for t in prompt]
        offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
        return {"tokens": texts, "token_logprobs": [None] + [s.logprob for s in scored],
                "top_logprobs": [None] + [{self.token_text(t): v for t, v in s.top} for s in scored],
                "text_offset": offsets}

    def token_text(self, token: int) -> str:
        return self.server.tokenizer.decode([token])

    # --- answers --------------------------------------------------------------------------------------------
    def usage(self, completion: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def envelope(self, **fields) -> dict:
        chunk = ".chunk" if self.kind == "chat" and self.body.stream else ""
        return {"id": self.id, "object": self.object + chunk, "created": self.created,
                "model": self.server.model_name, **fields}

    def chunk(self, i: int, text: str | None, finish: str | None, logprobs=None, first: bool = False) -> str:
        if self.kind == "chat":
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return sse(self.envelope(choices=[choice]))

    def stream(self) -> StreamingResponse:
        async def events():
            used = 0
            try:
                for i in range(self.count):
                    if self.kind == "chat" or self.echo:
                        yield self.chunk(i, self.echo[i // self.body.n] if self.echo else None, None, first=True)
                async for batch in self.batches():
                    used += sum(b[3] for b in batch.values())
                    yield "".join(self.chunk(i, text, finish, block) for i, (text, finish, block, _) in batch.items())
                if (self.body.stream_options or {}).get("include_usage"):
                    yield sse(self.envelope(choices=[], usage=self.usage(used)))
            except APIError as e:
                yield sse(error_body(e.message, e.type, e.param, e.code))
            finally:
                self.cancel()
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def watch_disconnect(self) -> None:
        """A non-streaming client that hangs up frees its rows at once (a streaming response's own listener does
        this for streams): the request body is read, so the next ASGI message is the disconnect."""
        while (await self.http.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.cancel()
        self.inbox.ready.set()  # wake `batches`, which ends the request

    async def collect(self) -> dict:
        texts = [self.echo[i // self.body.n] if self.echo else "" for i in range(self.count)]
        finish: list[str | None] = [None] * self.count
        blocks: list[dict | None] = [None] * self.count
        used = 0
        watcher = asyncio.create_task(self.watch_disconnect())
        try:
            async for batch in self.batches():
                for i, (text, reason, block, tokens) in batch.items():
                    texts[i], blocks[i], finish[i], used = texts[i] + text, merge(blocks[i], block), reason, used + tokens
        finally:
            watcher.cancel()
            self.cancel()
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": b, "finish_reason": f}
                       for i, (t, b, f) in enumerate(zip(texts, blocks, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": b, "finish_reason": f}
                       for i, (t, b, f) in enumerate(zip(texts, blocks, finish))]
        return self.envelope(choices=choices, usage=self.usage(used))

    async def answer(self):
        self.submit()
        return self.stream() if self.body.stream else await self.collect()


def completion(server: Server, lm: LM, http: Request, body: CompletionRequest) -> Generation:
    """/v1/completions: prompts as a string, strings, token ids or lists of them; `echo`; EOT ends a choice."""
    tokenizer = server.tokenizer
    if body.max_tokens == 0 and not (body.echo and body.logprobs is not None):
        raise APIError(400, "max_tokens 0 generates nothing: it scores the prompt, with echo and logprobs",
                       param="max_tokens")
    raw = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    prompts = [lm.encode_prompt(p) if isinstance(p, str) else list(p) for p in raw]
    if not all(0 <= t < tokenizer.vocab_size for p in prompts for t in p):
        raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in raw] if body.echo else None
    return Generation(server, "text", http, body, prompts, body.max_tokens, "prompt", stop_ids=lm.stop_ids(),
                      logprobs=body.logprobs, echo=echo)


def chat_completion(server: Server, http: Request, body: ChatRequest) -> Generation:
    """/v1/chat/completions: the conversation in the tokenizer's chat template; its end tokens end a reply."""
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    prompt = chat_template.encode_chat(server.tokenizer, [m.model_dump() for m in body.messages])
    stop, stop_ids = chat_template.chat_stops(server.tokenizer)
    return Generation(server, "chat", http, body, [prompt], body.max_completion_tokens or body.max_tokens,
                      "messages", stop, stop_ids, (body.top_logprobs or 0) if body.logprobs else None)


def merge(a: dict | None, b: dict | None) -> dict | None:
    """Two logprob blocks of one choice as one (their lists joined)."""
    return b if a is None else a if b is None else {k: a[k] + b[k] for k in a}
