"""Decode speed on CPU: gptkit vs Hugging Face transformers on the same random GPT-2 124M weights.

    python benchmarks/decode.py [--new-tokens 128] [--prompt-tokens 32] [--repeats 3]

Batch 1, greedy, fp32. Prints tokens/s for both and the ratio (best of --repeats interleaved runs each).
"""

import argparse
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import gptkit.hf
from gptkit.engine import generate_tokens
from gptkit.generate import SamplingParams


def best_rates(runs: dict, new_tokens: int, repeats: int) -> dict:
    """Best tokens/s of each run, the runs interleaved so that both see the same machine (its memory
    bandwidth drifts by tens of percent from minute to minute)."""
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: new_tokens / min(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # 124M, random weights
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = gptkit.hf.load(d)  # the engine picks its native stepper
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens))
    n = args.new_tokens

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[0, prompt.shape[1]:].tolist()

    def run_ours():
        return generate_tokens(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=n, temperature=0))[0]

    same = run_hf() == run_ours()
    rates = best_rates({"transformers": run_hf, "gptkit": run_ours}, n, args.repeats)
    rate_hf, rate_ours = rates["transformers"], rates["gptkit"]
    print(f"GPT-2 124M fp32, CPU ({torch.get_num_threads()} threads), batch 1, {args.prompt_tokens}-token prompt, "
          f"{n} new tokens, greedy; same tokens: {same}")
    print(f"| {'':14} | {'tokens/s':>9} | {'vs transformers':>15} |")
    print(f"| {'transformers':14} | {rate_hf:9.1f} | {1.0:14.2f}x |")
    print(f"| {'gptkit':14} | {rate_ours:9.1f} | {rate_ours / rate_hf:14.2f}x |")


if __name__ == "__main__":
    main()
