"""Serving throughput on CPU: aggregate generated tokens/s with 1, 4, 8 and 16 concurrent streams.

    python benchmarks/serve.py [--models tiny,gpt2] [--tokens 64]

Starts `gptkit serve` (a real uvicorn server in its own process) on a random-weight checkpoint and runs N
streaming chat clients at once (httpx), counting the completion tokens the server reports.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptkit import GPT, Tokenizer, checkpoint, preset
from gptkit.data import embedded_corpus


async def one_stream(client: httpx.AsyncClient, i: int, tokens: int) -> int:
    body = {"model": "bench", "prompt": f"def function_{i}(", "max_tokens": tokens, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}}
    used = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                used = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", used)
    return used


async def measure(url: str, streams: int, tokens: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_stream(client, 999, 4)  # warm-up
        t = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(client, i, tokens) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - t)


def serve(ckpt: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", str(ckpt), "--port", str(port),
                             "--model-name", "bench"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,gpt2")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    args = ap.parse_args()
    tokenizer = Tokenizer.train_bpe((d.text for d in list(embedded_corpus())[:60]), vocab_size=2048)
    presets = {"tiny": "tiny-gpt2", "gpt2": "gpt2"}
    print(f"CPU, {os.cpu_count()} cores, {args.tokens} new tokens per stream, random weights\n")
    print("| model | streams | aggregate tokens/s | vs 1 stream |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            torch.manual_seed(0)
            ckpt = Path(d) / name
            checkpoint.save(ckpt, GPT(preset(presets[name], vocab_size=max(tokenizer.vocab_size, 50257))), tokenizer)
            proc, url = serve(ckpt)
            try:
                base = None
                for n in (1, 4, 8, 16):
                    rate = asyncio.run(measure(url, n, args.tokens))
                    base = base or rate
                    print(f"| {name} ({presets[name]}) | {n} | {rate:,.1f} | {rate / base:.2f}x |", flush=True)
            finally:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
