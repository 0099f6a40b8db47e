"""Commands that run a model: generate, chat, eval, serve."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .flags import UsageError, byte_size


def _sampling(args):
    from ..generate import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=tuple(args.stop), seed=args.seed, num_beams=args.num_beams,
                          json_schema=_json_schema(args.json_schema) if getattr(args, "json_schema", None) else None)


def _json_schema(path: str) -> dict:
    import json

    from ..grammar import GrammarError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GrammarError(f"{path} is not a JSON schema: {e}") from None


def cmd_generate(args) -> None:
    import gptkit

    from ..engine import row_seed

    params = _sampling(args)  # validate settings before loading a large model
    lm = gptkit.load(args.checkpoint, device=args.device, dtype=args.dtype)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    for i in range(args.num_samples):
        steps = lm.stream_batch([prompt], dataclasses.replace(params, seed=row_seed(params.seed, i)))  # checks first
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        for pieces in steps:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
    print()


def cmd_chat(args) -> None:
    import gptkit

    from ..chat import ChatSession, terminal
    from ..generate import SamplingParams

    SamplingParams(max_new_tokens=1 if args.max_new_tokens is None else args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p)  # check first
    lm = gptkit.load(args.checkpoint, device=args.device, dtype=args.dtype)
    session = ChatSession(lm, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
    terminal(session)


def cmd_eval(args) -> None:
    from .. import evaluate

    result, written = evaluate.run(args.task, args.checkpoint, args.data, stride=args.stride,
                                   max_new_tokens=args.max_new_tokens, skip_bad=args.skip_bad,
                                   device=args.device, dtype=args.dtype)
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:>{width}}  {shown}")
    print(f"written to {written}")


def cmd_serve(args) -> None:
    import gptkit

    from ..serve import create_app, run_server

    import logging

    for flag in ("max_batch", "max_queue", "request_timeout"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    lm = gptkit.load(args.checkpoint, device=args.device, dtype=args.dtype)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(lm, name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     request_timeout=args.request_timeout,
                     kv_memory=None if args.kv_memory is None else byte_size(args.kv_memory, "--kv-memory"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # one line per request
    print(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1, metrics at /metrics, "
          f"docs at /docs)", flush=True)
    run_server(app, args.host, args.port)
    print("stopped", flush=True)


def _add_model(s) -> None:
    """The flags of every command that runs a checkpoint."""
    s.add_argument("checkpoint")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="floating-point weights and activations (bf16/fp16 where the device computes them natively)")


def _add_generate(sub) -> None:
    s = sub.add_parser("generate", help="sample text from a checkpoint, streaming to the terminal")
    _add_model(s)
    s.add_argument("--prompt", help="prompt text (default: read standard input)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--seed", type=int)
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--json-schema", metavar="FILE", help="a JSON schema the output must be valid JSON under "
                   "(structured output: only tokens that keep it valid are sampled)")
    s.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    s = sub.add_parser("chat", help="talk to a chat model in the terminal")
    _add_model(s)
    s.add_argument("--system", help="system message (default: the model's template's own, if it has one)")
    s.add_argument("--max-new-tokens", type=int, help="longest reply (default: half the context, at most 256)")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.95)
    s.set_defaults(func=cmd_chat)


def _add_eval(sub) -> None:
    s = sub.add_parser("eval", help="measure a checkpoint: ppl, choice, lambada, classify, generate")
    _add_model(s)
    s.add_argument("--task", required=True, choices=["ppl", "choice", "lambada", "classify", "generate"])
    s.add_argument("--data", required=True, help="text file or prepared data dir (ppl), JSONL (choice: ctx, "
                   "endings, label; generate: prompt, reference), text lines (lambada), labelled file (classify)")
    s.add_argument("--stride", type=int, help="ppl: sliding-window stride (default: half the context)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="generate: tokens per answer")
    s.add_argument("--skip-bad", action="store_true")
    s.set_defaults(func=cmd_eval)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible HTTP API and a chat page")
    _add_model(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 requests")
    s.add_argument("--model-name", help="model id clients use (default: the checkpoint directory's name)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together (rows of the KV cache)")
    s.add_argument("--kv-memory", metavar="BYTES",
                   help="memory for keys and values, e.g. 2G or 512M (default: what --max-batch full-context rows "
                        "need, at most 1G); requests wait until their blocks fit")
    s.add_argument("--max-queue", type=int, help="requests waiting for a row before new ones get 429 "
                   "(default: 32 per CPU core, at least 64)")
    s.add_argument("--request-timeout", type=float, default=600, metavar="SECONDS",
                   help="a request still running after this long fails with 504")
    s.set_defaults(func=cmd_serve)


def register(sub) -> None:
    _add_generate(sub)
    _add_chat(sub)
    _add_eval(sub)
    _add_serve(sub)
