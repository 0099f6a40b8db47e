"""OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, streaming, metrics, a chat page.

Every field is validated here before a request reaches the engine; the engine runs in its own thread
(`runner.py`) and reports through callbacks that hand events to the request's event loop."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LM, Engine, Output, row_seed
from ..engine import Request as EngineRequest
from ..generate import SEED_RANGE, GenerationError, SamplingParams
from .metrics import Metrics
from .runner import QueueFull, Runner

PAGE = Path(__file__).parent / "static" / "chat.html"
log = logging.getLogger("gptkit.serve")


def default_max_queue() -> int:
    return max(64, 32 * (os.cpu_count() or 1))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def engine_error(e: Exception) -> APIError:
    """An exception the engine thread reported for one request, as the HTTP error it becomes."""
    if isinstance(e, TimeoutError):
        return APIError(504, str(e), "timeout")
    if isinstance(e, ConnectionAbortedError):
        return APIError(503, str(e), "server_error")
    return APIError(500, str(e), "server_error")


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None  # accepted, not used
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    # gptkit's own settings, as extra body fields
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    num_beams: int = 1

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("up to 4 non-empty stop strings")
        return v

    @field_validator("num_beams")
    @classmethod
    def _no_beams(cls, v):
        if v != 1:
            raise ValueError("beam search is not served (num_beams must be 1); use LM.generate or `gptkit generate`")
        return v


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("an empty list is not a prompt")
        return v


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def create_app(lm: LM, model_name: str, api_key: str | None = None, max_batch: int = 16,
               max_queue: int | None = None, request_timeout: float = 600) -> FastAPI:
    """The app serving `lm` as `model_name`. The engine thread starts with the app and stops with it."""
    state: dict = {}
    tokenizer, context = lm.tokenizer, lm.model.config.context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["mailroom"] = mailroom = Mailroom()
        runner = Runner(Engine(lm.model, tokenizer, max_batch), max_queue or default_max_queue(), request_timeout,
                        after_step=mailroom.deliver)
        state["runner"], state["engine"] = runner, runner.engine
        state["metrics"] = Metrics(lambda: runner.queued, lambda: runner.running)
        yield
        runner.close()

    app = FastAPI(title="gptkit", description="OpenAI-compatible API for a gptkit checkpoint", lifespan=lifespan)
    app.state.runtime = state

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = "malformed JSON body" if first.get("type") == "json_invalid" else f"{where}: {first['msg']}"
        return JSONResponse(error_body(message, "invalid_request_error", where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    app.add_middleware(AuthAndLog, api_key=api_key)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    def settings(body: Sampling, max_tokens: int, index: int, stop: tuple[str, ...], logprobs: int | None):
        user_stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  stop=user_stop + stop, seed=row_seed(body.seed, index), logprobs=logprobs)
        except GenerationError as e:
            raise APIError(400, str(e)) from None

    def budget(prompt: list[int], max_tokens: int | None, param: str) -> int:
        if len(prompt) >= context:
            raise APIError(400, f"prompt of {len(prompt)} tokens leaves no room in the model's context of "
                                f"{context}", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return context - len(prompt)
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the model's "
                                f"context of {context}", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def submit(body: Sampling, prompts: list[list[int]], max_tokens: int | None, param: str, stop: tuple[str, ...],
               stop_ids: tuple[int, ...], logprobs: int | None) -> tuple[Inbox, list[EngineRequest]]:
        """One engine request per prompt and sample (choice index = prompt * n + sample); all or none."""
        jobs = []
        for p, prompt in enumerate(prompts):
            limit = budget(prompt, max_tokens, param)
            for j in range(body.n):
                index = p * body.n + j
                jobs.append((index, EngineRequest(prompt, settings(body, limit, index, stop, logprobs), stop_ids)))
        events = Inbox(state["mailroom"], asyncio.get_running_loop())
        runner: Runner = state["runner"]
        if not runner.alive:
            raise APIError(503, "the decoding engine is not running", "server_error")
        submitted = []
        try:
            for index, request in jobs:
                runner.submit(request, lambda event, index=index: events.put((index, event)))
                submitted.append(request)
        except (QueueFull, GenerationError) as e:
            for r in submitted:
                r.cancelled = True
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"}) from None
            raise APIError(400, str(e), param=param) from None
        return events, [r for _, r in jobs]

    async def run(kind: str, http: Request, body: Sampling, prompts: list[list[int]], max_tokens: int | None,
                  param: str, stop=(), stop_ids=(), logprobs: int | None = None, echo: list[str] | None = None):
        metrics: Metrics = state["metrics"]
        arrived = time.perf_counter()
        events_, requests = submit(body, prompts, max_tokens, param, stop, stop_ids, logprobs)
        count = len(requests)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        prompt_tokens = sum(len(p) for p in prompts) * body.n
        last_seen = [None] * count
        offsets = [len(echo[i // body.n]) if echo else 0 for i in range(count)]

        def usage(completion: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def logprob_block(i: int, out: Output) -> dict | None:
            lp = out.logprob
            if lp is None:
                return None
            if kind == "chat":
                if lp.token in stop_ids:
                    return {"content": []}
                entry = lambda t, v: {"token": token_text(t), "logprob": v,  # noqa: E731
                                      "bytes": list(token_text(t).encode())}
                return {"content": [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}]}
            text = token_text(lp.token)
            block = {"tokens": [text], "token_logprobs": [lp.logprob],
                     "top_logprobs": [{token_text(t): v for t, v in lp.top}], "text_offset": [offsets[i]]}
            offsets[i] += len(text)
            return block

        def merge(a: dict | None, b: dict | None) -> dict | None:
            return b if a is None else a if b is None else {k: a[k] + b[k] for k in a}

        async def batches():
            """Per wake-up, what each choice got since the last one: {index: (text, finish, logprobs, tokens)}
            (under load a stream's tokens pile up and go out as one chunk). An engine error raises APIError."""
            remaining = count
            while remaining:
                try:
                    events = await events_.get_all(timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                batch: dict[int, tuple] = {}
                now = time.perf_counter()
                for i, event in events:
                    if isinstance(event, Exception):
                        metrics.requests.labels(kind, "error").inc()
                        raise engine_error(event)
                    if last_seen[i] is None:
                        metrics.ttft.observe(now - arrived)
                    else:
                        metrics.token_latency.observe(now - last_seen[i])
                    last_seen[i] = now
                    text, _, block, tokens = batch.get(i, ("", None, None, 0))
                    batch[i] = (text + event.text, event.finish_reason, merge(block, logprob_block(i, event)), tokens + 1)
                    remaining -= event.finish_reason is not None
                metrics.generated_tokens.inc(len(events))
                yield batch
            metrics.requests.labels(kind, "finished").inc(count)
            metrics.prompt_tokens.inc(prompt_tokens)

        def chunk(i: int, text: str | None, finish: str | None, logprobs_=None, first: bool = False) -> str:
            if kind == "chat":
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": logprobs_, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": logprobs_, "finish_reason": finish}
            return sse({"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                        "model": model_name, "choices": [choice]})

        if body.stream:
            async def stream():
                used = 0
                try:
                    for i in range(count):
                        if kind == "chat" or echo:
                            yield chunk(i, echo[i // body.n] if echo else None, None, first=True)
                    async for batch in batches():
                        used += sum(b[3] for b in batch.values())
                        yield "".join(chunk(i, text, finish, block) for i, (text, finish, block, _) in batch.items())
                    if (body.stream_options or {}).get("include_usage"):
                        yield sse({"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                                   "model": model_name, "choices": [], "usage": usage(used)})
                except APIError as e:
                    yield sse(error_body(e.message, e.type, e.param, e.code))
                finally:  # done, failed, or the client went away: free the rows
                    for r in requests:
                        r.cancelled = True
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [echo[i // body.n] if echo else "" for i in range(count)]
        finish, used = [None] * count, 0
        blocks: list[dict | None] = [None] * count
        try:
            async for batch in batches():
                for i, (text, reason, block, tokens) in batch.items():
                    texts[i] += text
                    used += tokens
                    blocks[i] = merge(blocks[i], block)
                    finish[i] = reason
        finally:
            for r in requests:
                r.cancelled = True
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": b, "finish_reason": f}
                       for i, (t, b, f) in enumerate(zip(texts, blocks, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": b, "finish_reason": f}
                       for i, (t, b, f) in enumerate(zip(texts, blocks, finish))]
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                "usage": usage(used)}

    @app.get("/health")
    async def health():
        runner: Runner | None = state.get("runner")
        if runner is None or not runner.alive:
            return JSONResponse({"status": "unavailable", "model": model_name}, status_code=503)
        return {"status": "ok", "model": model_name, "running": runner.running, "queued": runner.queued}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(state["metrics"].render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptkit",
                                            "max_model_len": context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        raw = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
        prompts = [lm.encode_prompt(p) if isinstance(p, str) else list(p) for p in raw]
        for p in prompts:
            if not all(0 <= t < tokenizer.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in raw] if body.echo else None
        return await run("text", http, body, prompts, body.max_tokens, "prompt", stop_ids=lm.stop_ids(),
                         logprobs=body.logprobs, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        check_model(body.model)
        prompt = tokenizer.encode_chat([m.model_dump() for m in body.messages])
        stop, stop_ids = tokenizer.chat_stops()
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return await run("chat", http, body, [prompt], body.max_completion_tokens or body.max_tokens, "messages",
                         stop, stop_ids, logprobs)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


class AuthAndLog:
    """ASGI middleware: the API key on /v1 (compared in constant time), and one log line per request. Plain
    ASGI rather than Starlette's BaseHTTPMiddleware, which costs a task and a stream per streamed chunk."""

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), scope["path"]

        async def logged(message):
            if message["type"] == "http.response.start":
                log.info("%s %s %d %.3fs", scope["method"], path, message["status"], time.perf_counter() - start)
            await send(message)

        given = dict(scope["headers"]).get(b"authorization", b"")
        if self.expected and path.startswith("/v1/") and not hmac.compare_digest(given, self.expected):
            response = JSONResponse(error_body("invalid or missing API key", "invalid_request_error",
                                               code="invalid_api_key"), status_code=401)
            return await response(scope, receive, logged)
        await self.app(scope, receive, logged)


class Inbox:
    """Events from the engine thread to one HTTP handler. The engine thread only appends; once per step
    `Mailroom.deliver` wakes every handler with news in one call per event loop (not one per token), and
    the handler takes everything that arrived meanwhile."""

    def __init__(self, mailroom: Mailroom, loop: asyncio.AbstractEventLoop):
        self.mailroom, self.loop, self.items, self.ready = mailroom, loop, [], asyncio.Event()

    def put(self, item) -> None:  # engine thread
        self.mailroom.post(self, item)

    async def get_all(self, timeout: float) -> list:
        await asyncio.wait_for(self.ready.wait(), timeout)
        with self.mailroom.lock:
            items, self.items = self.items, []
            self.ready.clear()
        return items


class Mailroom:
    def __init__(self):
        self.lock, self.news = threading.Lock(), set()

    def post(self, inbox: Inbox, item) -> None:
        with self.lock:
            inbox.items.append(item)
            self.news.add(inbox)

    def deliver(self) -> None:  # engine thread, after each step
        with self.lock:
            news, self.news = self.news, set()
        loops: dict[asyncio.AbstractEventLoop, list[Inbox]] = {}
        for inbox in news:
            loops.setdefault(inbox.loop, []).append(inbox)
        for loop, inboxes in loops.items():
            try:
                loop.call_soon_threadsafe(_wake, inboxes)
            except RuntimeError:  # that loop is closed: its handlers are gone
                pass


def _wake(inboxes: list[Inbox]) -> None:
    for inbox in inboxes:
        inbox.ready.set()


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def run_server(app: FastAPI, host: str, port: int, grace: float = 3) -> None:
    """Serve until SIGINT/SIGTERM, then stop the engine: running and queued requests end with an error
    (streams get an error event), and the process exits 0 (a signal is how a server is meant to stop).
    Connections still open after `grace` seconds are cancelled."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # uvicorn would re-raise the signal after shutting down
            runner = app.state.runtime.get("runner")
            if runner is not None:
                runner.stop()

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)).run()
