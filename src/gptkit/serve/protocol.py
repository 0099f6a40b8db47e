"""The OpenAI API's shapes as gptkit serves them: request bodies (pydantic validates every field before a
request reaches the engine), error bodies, server-sent events, and the mapping from a body to engine settings."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine import row_seed
from ..generate import SEED_RANGE, GenerationError, SamplingParams


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
    # structured output, as OpenAI's API: {"type": "text" | "json_object"} or {"type": "json_schema",
    # "json_schema": {"name": ..., "schema": {...}, "strict": true}}
    response_format: dict | None = None
    # settings of OpenAI's API that gptkit does not implement: refused by name, never silently ignored
    logit_bias: dict | None = None
    best_of: int | None = None
    suffix: str | None = None
    tool_choice: str | dict | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("logit_bias", "suffix")
    @classmethod
    def _not_supported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v):
        if v not in (None, 1):
            raise ValueError("best_of is not supported (ask for n samples instead)")
        return v

    @field_validator("tool_choice", "function_call", "parallel_tool_calls")
    @classmethod
    def _no_tool_settings(cls, v, info):
        if v not in (None, "none", False):
            raise ValueError(f"{info.field_name} is not supported: gptkit serves no function calling")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is None:
            return v
        kind = v.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise ValueError("response_format json_schema needs {\"name\": ..., \"schema\": {...}}")
        return v

    def json_schema(self) -> dict | bool | None:
        """The schema every reply must be valid JSON under (None: free text)."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            return self.response_format["json_schema"].get("schema", {})
        return None

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
    max_tokens: int | None = Field(16, ge=0)  # 0: score the prompt (echo and logprobs), as lm-eval asks
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("an empty list is not a prompt")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]  # a list of text parts, as many OpenAI clients send it

    @field_validator("content")
    @classmethod
    def _joined(cls, v):
        return v if isinstance(v, str) else "".join(part.text for part in v)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    functions: list | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} (function calling) is not supported; use response_format with a "
                             f"json_schema for structured replies")
        return v


def sampling_params(body: Sampling, max_tokens: int, index: int, stop: tuple[str, ...],
                    logprobs: int | None) -> SamplingParams:
    """The engine settings of sample `index` of a request (its seed is the body's plus the index)."""
    user_stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              stop=user_stop + stop, seed=row_seed(body.seed, index), logprobs=logprobs,
                              prompt_logprobs=logprobs if getattr(body, "echo", False) else None,
                              json_schema=body.json_schema())
    except GenerationError as e:
        raise APIError(400, str(e)) from None


def token_budget(prompt: list[int], max_tokens: int | None, context: int, param: str) -> int:
    """New tokens a prompt may get: `max_tokens`, or what is left of the context when not given."""
    if len(prompt) >= context + (max_tokens == 0):  # scoring alone (max_tokens 0) may fill the whole context
        raise APIError(400, f"prompt of {len(prompt)} tokens leaves no room in the model's context of {context}",
                       param=param, code="context_length_exceeded")
    if max_tokens is None:
        return context - len(prompt)
    if len(prompt) + max_tokens > context:
        raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the model's "
                            f"context of {context}", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"
