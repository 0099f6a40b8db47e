"""OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, streaming, health, metrics and a
chat page, over the decoding engine running in its own thread (`runner.py`). Request shapes: `protocol.py`;
one request's decoding and answer: `generation.py`."""

from __future__ import annotations

import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LM, Engine, kv_bytes_per_token
from .generation import Server, chat_completion, completion
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, error_body
from .runner import Mailroom, Runner

PAGE = Path(__file__).parent / "static" / "chat.html"
log = logging.getLogger("gptkit.serve")


def default_max_queue() -> int:
    return max(64, 32 * (os.cpu_count() or 1))


DEFAULT_KV_MEMORY = 1 << 30  # at most this much of keys and values unless --kv-memory says otherwise


def default_kv_memory(lm: LM, max_batch: int) -> int:
    """What `max_batch` full-context rows need, at most DEFAULT_KV_MEMORY: the server does not preallocate the
    worst case of every row (that was 12 GB for SmolLM2 at 32 rows)."""
    return min(max_batch * lm.model.config.context * kv_bytes_per_token(lm.model), DEFAULT_KV_MEMORY)


def create_app(lm: LM, model_name: str, api_key: str | None = None, max_batch: int = 16,
               max_queue: int | None = None, request_timeout: float = 600, kv_memory: int | None = None) -> FastAPI:
    """The app serving `lm` as `model_name`. The engine thread starts with the app and stops with it."""
    state: dict = {}
    tokenizer, context = lm.tokenizer, lm.model.config.context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        mailroom = Mailroom()
        engine = Engine(lm.model, tokenizer, max_batch, kv_memory=kv_memory or default_kv_memory(lm, max_batch))
        runner = Runner(engine, max_queue or default_max_queue(), request_timeout, after_step=mailroom.deliver)
        metrics = Metrics(lambda: runner.queued, lambda: runner.running, engine.kv_stats)
        state.update(runner=runner, engine=runner.engine, metrics=metrics,
                     server=Server(runner, mailroom, metrics, tokenizer, model_name, context))
        yield
        runner.close()

    app = FastAPI(title="gptkit", description="OpenAI-compatible API for a gptkit checkpoint", lifespan=lifespan)
    app.state.runtime = state
    app.add_middleware(AuthAndLog, api_key=api_key)

    add_error_handlers(app)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

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
        return await completion(state["server"], lm, http, body).answer()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        check_model(body.model)
        return await chat_completion(state["server"], http, body).answer()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error object: ours, pydantic's validation errors (400) and routing errors."""

    async def api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = "malformed JSON body" if first.get("type") == "json_invalid" else f"{where}: {first['msg']}"
        return JSONResponse(error_body(message, "invalid_request_error", where), status_code=400)

    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


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
