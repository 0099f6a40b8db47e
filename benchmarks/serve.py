"""Serving on CPU, gptkit against `transformers serve --continuous-batching` on the same weights, then a load test.

    python benchmarks/serve.py [--models tiny,gpt2] [--streams 1,4,8,16,32] [--peer-streams 1,4,8] [--tokens 64]
                               [--repeats 3] [--peer-repeats 1] [--no-peer] [--load-seconds 60] [--load-clients 64]

For each model a random-weight checkpoint (a BPE tokenizer trained on the embedded corpus) is written as a
gptkit checkpoint and, converted, as a transformers directory. Both servers run as real processes on loopback,
one measured at a time (interleaved, `--repeats` rounds); N streaming /v1/completions clients (httpx, in this
process) each ask for `--tokens` new tokens at temperature 1. Aggregate tokens/s counts the completion tokens
the server reports (`stream_options.include_usage`; gptkit sends the tokens that piled up under load as one
chunk) or, where it reports none (transformers), the streamed chunks with a choice (one per token there);
time to first token is from sending to the first chunk.
The load test then runs `--load-clients` clients against gptkit for `--load-seconds`, a tenth of the requests
hanging up mid-stream, and reports 5xx answers, requests left hanging, and the server's resident memory.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptkit import GPT, Tokenizer, checkpoint, hf, preset
from gptkit.data import embedded_corpus

PRESETS = {"tiny": "tiny-gpt2", "gpt2": "gpt2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def one_stream(client: httpx.AsyncClient, model: str, i: int, tokens: int, hang_up_after: int | None = None):
    """(tokens streamed, seconds to the first one, HTTP status, finished)."""
    body = {"model": model, "prompt": f"def function_{i}(", "max_tokens": tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, count, usage = time.perf_counter(), None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return 0, None, r.status_code, True
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return usage if usage is not None else count, first, 200, True
            chunk = json.loads(line[6:]) if line.startswith("data: {") else {}
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                count += 1
                first = first if first is not None else time.perf_counter() - t0
                if hang_up_after is not None and count >= hang_up_after:
                    return count, first, 200, True  # leaving the block closes the connection mid-stream
    return count, first, 200, False


async def measure(url: str, model: str, streams: int, tokens: int) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_stream(client, model, 999, 4)  # warm-up
        t = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, i, tokens) for i in range(streams)))
        elapsed = time.perf_counter() - t
    return sum(r[0] for r in results) / elapsed, [r[1] for r in results if r[1] is not None]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load_test(url: str, pid: int, clients: int, seconds: float) -> dict:
    stats = {"requests": 0, "5xx": 0, "other_errors": 0, "hung": 0, "hung_up": 0, "tokens": 0}
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60), limits=httpx.Limits(max_connections=None)) as c:
        await asyncio.gather(*(one_stream(c, "bench", i, 32) for i in range(clients)))  # warm-up
        warm = rss_mb(pid)
        end = time.monotonic() + seconds

        async def client(i: int):
            while time.monotonic() < end:
                hang_up = rng.randint(1, 8) if rng.random() < 0.1 else None
                try:
                    n, _, status, finished = await one_stream(c, "bench", i, rng.randint(16, 64), hang_up)
                except httpx.TimeoutException:
                    stats["hung"] += 1
                    continue
                except httpx.HTTPError:
                    stats["other_errors"] += 1
                    continue
                stats["requests"] += 1
                stats["tokens"] += n
                stats["5xx"] += status >= 500
                stats["other_errors"] += 400 <= status < 500
                stats["hung"] += not finished
                stats["hung_up"] += hang_up is not None

        await asyncio.gather(*(client(i) for i in range(clients)))
        await asyncio.sleep(1)
        health = (await c.get("/health")).json()
    return stats | {"rss_warm_mb": warm, "rss_end_mb": rss_mb(pid), "running_after": health.get("running"),
                    "queued_after": health.get("queued")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,gpt2")
    ap.add_argument("--streams", default="1,4,8,16,32")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-streams", default="1,4,8", help="stream counts the peer is measured at (its CPU "
                    "continuous batching is slow enough that 32 streams of GPT-2 124M take most of an hour)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="rounds for the peer (it is 30-200x slower: its "
                    "noise does not matter, its time does)")
    ap.add_argument("--no-peer", action="store_true", help="gptkit only")
    ap.add_argument("--load-seconds", type=float, default=60, help="0: no load test")
    ap.add_argument("--load-clients", type=int, default=64)
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    peer_streams = {int(s) for s in args.peer_streams.split(",")}
    tokenizer = Tokenizer.train_bpe((d.text for d in list(embedded_corpus())[:60]), vocab_size=2048)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    print(f"{cpu} ({isa}), {os.cpu_count()} cores; {args.tokens} new tokens per stream, temperature 1, random "
          f"weights, BPE 2048 tokenizer; best of {args.repeats} interleaved rounds "
          f"(the peer: {args.peer_repeats})\n")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            torch.manual_seed(0)
            ckpt, hf_dir = Path(d) / name, Path(d) / f"{name}-hf"
            checkpoint.save(ckpt, GPT(preset(PRESETS[name], vocab_size=50257)), tokenizer)
            servers = {}
            port = free_port()
            servers["gptkit"] = (*start([sys.executable, "-m", "gptkit", "serve", str(ckpt), "--port", str(port),
                                         "--model-name", "bench"], port, Path(d) / "gptkit.log"), "bench")
            if not args.no_peer:
                hf.convert_to_hf(ckpt, hf_dir)
                port = free_port()
                cmd = [str(Path(sys.executable).with_name("transformers")), "serve", "--continuous-batching",
                       "--device", "cpu", "--port", str(port), str(hf_dir)]
                servers["transformers"] = (*start(cmd, port, Path(d) / "peer.log"), str(hf_dir))
            try:
                for n in streams:
                    kinds = [k for k in servers if k == "gptkit" or n in peer_streams]
                    runs = {k: [] for k in kinds}
                    for r in range(args.repeats):
                        for kind in kinds:
                            if kind != "gptkit" and r >= args.peer_repeats:
                                continue
                            _, url, model = servers[kind]
                            runs[kind].append(asyncio.run(measure(url, model, n, args.tokens)))
                    for kind, results in runs.items():
                        rate = max(r[0] for r in results)
                        ttft = sorted(t for r in results for t in r[1])
                        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
                        rows.append((name, kind, n, rate, statistics.median(ttft), p99))
                        print(f"  {name} {kind} {n} streams: {rate:.1f} tok/s", file=sys.stderr, flush=True)
                if args.load_seconds > 0:
                    proc, url, _ = servers["gptkit"]
                    for kind, (p, *_rest) in servers.items():
                        if kind != "gptkit":
                            stop(p)
                    result = asyncio.run(load_test(url, proc.pid, args.load_clients, args.load_seconds))
                    print(f"load test, {name}: {args.load_clients} clients for {args.load_seconds:g} s -> "
                          + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
            finally:
                for p, *_rest in servers.values():
                    if p.poll() is None:
                        stop(p)

    print("\n| model | server | streams | aggregate tokens/s | vs 1 stream | vs transformers | TTFT p50 | TTFT p99 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    best = {(m, k, n): r for m, k, n, r, *_ in rows}
    for m, k, n, rate, p50, p99 in rows:
        one = best.get((m, k, streams[0]))
        peer = best.get((m, "transformers", n))
        vs_peer = f"{rate / peer:.2f}x" if peer and k == "gptkit" else ""
        print(f"| {m} ({PRESETS[m]}) | {k} | {n} | {rate:,.1f} | {rate / one:.2f}x | {vs_peer} | "
              f"{p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
