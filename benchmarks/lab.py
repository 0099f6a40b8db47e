"""The labs as benchmarks: the evolution table, and a scaling-law fit checked against a larger run it predicts.

    python benchmarks/lab.py evolution [--data DIR] [--budget 600] [--params 2e6] --out DIR
    python benchmarks/lab.py scaling [--data DIR] [--sizes 2e5,4e5,8e5,1.6e6] [--tokens 1.6e5,3.2e5,6.4e5] --out DIR

`--data`: a prepared data directory (`gptkit prepare`), e.g. tiny shakespeare; default: the embedded corpus.
Both are resumable (rerun the same command: finished runs are read back, a stopped one continues).

evolution: `gptkit lab evolution` (GPT-1, GPT-2, GPT-3-style, modern and the one-change ladder, matched size,
`--budget` seconds each), then its table.
scaling: `gptkit lab scaling` over the grid, then one run at twice the largest model and twice the largest token
budget (4x the grid's largest compute), which the fit never saw; prints its predicted and measured validation
loss and the error. Nothing is tuned on that run: the grid, the recipe and the fit are fixed before it trains.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from gptkit.lab import evolution, scaling
from gptkit.lab.runs import LabRun, body_params, complete
from gptkit.lab.scaling import RECIPE, grid_config
from gptkit.tokenizer import Tokenizer
from gptkit.train.trainer import default_data_dir


def cpu_kind() -> str:
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return f"{name}, {'AVX-512' if ' avx512f' in flags else 'AVX2' if ' avx2' in flags else 'no AVX2'}"


def bench_evolution(args, data: str, out: Path) -> None:
    start = time.time()
    evolution(data, out, {"time_limit": args.budget}, params=args.params, seeds=args.seeds)
    print(f"\nEvolution lab on {data} ({cpu_kind()}), {args.budget:.0f} s a run, {time.time() - start:.0f} s in all")
    print((out / "table.md").read_text())


def bench_scaling(args, data: str, out: Path) -> None:
    start = time.time()
    sizes = [float(x) for x in args.sizes.split(",")]
    tokens = [int(float(x)) for x in args.tokens.split(",")]
    law = scaling(data, out, sizes, tokens, context=args.context)
    grid_s = time.time() - start
    fitted = json.loads((out / "fit.json").read_text())
    largest = max(6 * n * d for n, d, _ in fitted["points"])
    vocab = Tokenizer.load(Path(data)).vocab_size
    config = grid_config(vocab, args.context, 2 * max(sizes))
    budget = 2 * max(tokens)
    n = body_params(config)
    predicted = law.loss(n, budget)
    result = complete(LabRun(f"predicted-n{n}-d{budget}", config, RECIPE), out, data, {"max_tokens": budget}, 0)
    measured = result["val_loss"]
    error = (measured - predicted) / predicted
    print(f"\nScaling lab on {data} ({cpu_kind()}): {len(fitted['points'])} runs in {grid_s:.0f} s")
    print(f"L(N, D) = {law.E:.3f} + {law.A:.4g} / N^{law.alpha:.3f} + {law.B:.4g} / D^{law.beta:.3f}")
    print("| N (non-embedding) | D (tokens) | val loss | fitted | residual |")
    print("|---:|---:|---:|---:|---:|")
    for pn, pd, loss in fitted["points"]:
        print(f"| {pn:,} | {pd:,} | {loss:.4f} | {law.loss(pn, pd):.4f} | {(loss / law.loss(pn, pd) - 1) * 100:+.2f}% |")
    print(f"\nPredicted run: N = {n:,}, D = {result['tokens']:,} ({6 * n * budget / largest:.1f}x the grid's largest "
          f"compute), {result['elapsed_s']:.0f} s: predicted {predicted:.4f}, measured {measured:.4f}, "
          f"error {error * 100:+.2f}% (target within 3%)")
    opt = fitted["compute_optimal"]
    print(f"Compute-optimal at the grid's largest compute ({opt['compute']:.2e} FLOPs): N = {opt['params']:,.0f}, "
          f"D = {opt['tokens']:,.0f}, {opt['tokens_per_param']:.1f} tokens per parameter")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lab", choices=["evolution", "scaling"])
    ap.add_argument("--data", help="prepared data directory (default: the embedded corpus)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=600, help="evolution: seconds a run")
    ap.add_argument("--params", type=float, default=2e6, help="evolution: non-embedding parameters a model")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--sizes", default="2e5,4e5,8e5,1.6e6", help="scaling: non-embedding parameter counts")
    ap.add_argument("--tokens", default="1.6e5,3.2e5,6.4e5", help="scaling: token budgets (the predicted run has "
                    "twice the largest: keep it within one pass over the data)")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    data = args.data or str(default_data_dir())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (bench_evolution if args.lab == "evolution" else bench_scaling)(args, data, out)


if __name__ == "__main__":
    sys.exit(main())
