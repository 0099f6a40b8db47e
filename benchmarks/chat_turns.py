"""Time to first token by turn of a multi-turn chat whose client resends the whole conversation (a long system
prompt, then short questions), with the engine's prefix cache and with a fresh engine each turn (no reuse).

    python benchmarks/chat_turns.py MODEL.gguf|CKPT [--turns 6] [--system-words 450]

In-process, greedy, 24 new tokens a turn; the system prompt is README.md's first words.
"""

import argparse
import time
from pathlib import Path

import gptkit
from gptkit.chat_template import chat_stops, encode_chat
from gptkit.engine import Engine, Request
from gptkit.generate import SamplingParams


def turns(lm, stops, convo, n: int, reuse: bool) -> list[tuple[int, float]]:
    engine, out = Engine(lm.model, lm.tokenizer, max_batch=2), []
    for turn in range(n):
        convo = convo + [{"role": "user", "content": f"Question {turn}: what does gptkit do?"}]
        ids = encode_chat(lm.tokenizer, convo)
        if not reuse:
            engine = Engine(lm.model, lm.tokenizer, max_batch=2)
        request = engine.add(Request(ids, SamplingParams(max_new_tokens=24, temperature=0), stops))
        start, first, text = time.perf_counter(), None, ""
        while engine.has_work():
            for o in engine.step():
                first = first if first is not None else time.perf_counter() - start
                text += o.text if o.request is request else ""
        out.append((len(ids), first))
        convo = convo + [{"role": "assistant", "content": text}]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-words", type=int, default=450)
    args = ap.parse_args()
    lm = gptkit.load(args.model)
    system = " ".join((Path(__file__).parents[1] / "README.md").read_text().split()[:args.system_words])
    convo = [{"role": "system", "content": "Answer briefly. Reference: " + system}]
    stops = chat_stops(lm.tokenizer)[1]
    cached, fresh = turns(lm, stops, convo, args.turns, True), turns(lm, stops, convo, args.turns, False)
    print("| turn | prompt tokens | TTFT, prefix cache (ms) | TTFT, fresh engine (ms) |\n|---:|---:|---:|---:|")
    for i, ((n, a), (_, b)) in enumerate(zip(cached, fresh)):
        print(f"| {i + 1} | {n} | {a * 1000:.0f} | {b * 1000:.0f} |")


if __name__ == "__main__":
    main()
