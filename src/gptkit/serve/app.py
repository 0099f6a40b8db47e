"""OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, streaming, and a chat page."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import LM, GenerationError, SamplingParams
from .engine import Engine
from .engine import Request as EngineRequest

PAGE = Path(__file__).parent / "static" / "chat.html"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts


class CompletionRequest(Sampling):
    prompt: str
    max_tokens: int | None = Field(16, ge=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def create_app(lm: LM, model_name: str, api_key: str | None = None, max_batch: int = 16) -> FastAPI:
    """The app serving `lm` as `model_name`. The engine thread starts with the app and stops with it."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["engine"] = Engine(lm.model, lm.tokenizer, max_batch)
        yield
        state["engine"].close()

    app = FastAPI(title="gptkit", description="OpenAI-compatible API for a gptkit checkpoint", lifespan=lifespan)
    app.state.runtime = state
    context = lm.model.config.context

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = "malformed JSON body" if first.get("type") == "json_invalid" else f"{where}: {first['msg']}"
        return JSONResponse(error_body(message, "invalid_request_error", where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse(error_body("invalid or missing API key", "invalid_request_error",
                                           code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def params_for(body: Sampling, max_tokens: int, index: int, stop: tuple[str, ...]) -> SamplingParams:
        user_stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=user_stop + stop, seed=None if body.seed is None else body.seed + index)
        except GenerationError as e:
            raise APIError(400, str(e)) from None

    def submit(body: Sampling, prompt: list[int], max_tokens: int | None, stop: tuple[str, ...],
               stop_ids: tuple[int, ...]) -> tuple[asyncio.Queue, list[EngineRequest]]:
        if not prompt:
            prompt = [lm.tokenizer.special.get("<|endoftext|>", 0)]
        if len(prompt) >= context:
            raise APIError(400, f"prompt of {len(prompt)} tokens leaves no room in the model's context of "
                                f"{context}", param="messages" if stop_ids else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = context - len(prompt)
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the model's "
                                f"context of {context}", param="max_tokens", code="context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        for i in range(body.n):
            def emit(event, i=i):
                loop.call_soon_threadsafe(events.put_nowait, (i, event))
            req = EngineRequest(prompt, params_for(body, max_tokens, i, stop), emit, stop_ids)
            requests.append(state["engine"].submit(req))
        return events, requests

    async def run(kind: str, body: Sampling, prompt: list[int], max_tokens, stop=(), stop_ids=()):
        events, requests = submit(body, prompt, max_tokens, stop, stop_ids)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage(completion: int) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion}

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "chat":
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj + (".chunk" if kind == "chat" else ""),
                                          "created": created, "model": model_name, "choices": [choice]}) + "\n\n"

        async def events_until_done():
            remaining = len(requests)
            while remaining:
                i, event = await events.get()
                if "error" in event:
                    raise APIError(500, event["error"], "server_error")
                if "finish_reason" in event:
                    remaining -= 1
                yield i, event

        if body.stream:
            async def stream():
                try:
                    if kind == "chat":
                        for i in range(body.n):
                            yield chunk(i, None, None, first=True)
                    used = 0
                    async for i, event in events_until_done():
                        yield chunk(i, event.get("text"), event.get("finish_reason"))
                        used += event.get("completion_tokens", 0)
                    if (body.stream_options or {}).get("include_usage"):
                        yield "data: " + json.dumps({
                            "id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                            "model": model_name, "choices": [], "usage": usage(used)}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (or we are done): free the slots
                    for r in requests:
                        r.cancelled = True
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts, finish, used = [""] * body.n, [None] * body.n, 0
        try:
            async for i, event in events_until_done():
                texts[i] += event.get("text", "")
                if "finish_reason" in event:
                    finish[i], used = event["finish_reason"], used + event["completion_tokens"]
        finally:
            for r in requests:
                r.cancelled = True
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                "usage": usage(used)}

    @app.get("/health")
    async def health():
        engine = state.get("engine")
        return {"status": "ok", "model": model_name, "running": len(engine.slots) if engine else 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptkit",
                                            "max_model_len": context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        return await run("text", body, lm.encode_prompt(body.prompt), body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        prompt = lm.tokenizer.encode_chat([m.model_dump() for m in body.messages])
        stop, stop_ids = lm.tokenizer.chat_stops()
        return await run("chat", body, prompt, body.max_completion_tokens or body.max_tokens, stop, stop_ids)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app
