"""The `gptkit lab` commands: the GPT evolution lab and scaling laws."""

from __future__ import annotations

import math
from pathlib import Path

from .flags import UsageError, seconds


def _data(args) -> str:
    if args.data:
        return args.data
    from ..train.trainer import default_data_dir

    return str(default_data_dir())


def _budget(args) -> dict:
    if (args.budget is None) == (args.tokens is None):
        raise UsageError("give one budget per run: --budget SECONDS or --tokens N")
    return {"time_limit": seconds(args.budget, "--budget")} if args.budget is not None else {"max_tokens": args.tokens}


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < math.inf for v in values):
        raise UsageError(f"{flag} must be comma-separated positive numbers, got {text!r}")
    return values


def cmd_evolution(args) -> None:
    from ..lab import evolution

    budget, out = _budget(args), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evolution(_data(args), out, budget, params=args.params, seeds=args.seeds, context=args.context)
    print((out / "table.md").read_text() + f"\nwritten to {out / 'table.md'} and {out / 'evolution.png'}")


def cmd_scaling(args) -> None:
    from ..lab import load_scaling_law, scaling

    out = Path(args.out)
    if args.predict:
        values = _numbers(args.predict, "--predict")
        if len(values) != 2:
            raise UsageError(f"--predict takes two numbers, N,D (parameters, tokens), got {args.predict!r}")
        n, d = values
        print(f"predicted validation loss at N = {n:,.0f}, D = {d:,.0f}: {load_scaling_law(out).loss(n, d):.4f}")
        return
    out.mkdir(parents=True, exist_ok=True)
    sizes = _numbers(args.sizes, "--sizes")
    tokens = [int(x) for x in _numbers(args.tokens, "--tokens")]
    scaling(_data(args), out, sizes, tokens, context=args.context)


def register(sub) -> None:
    lab = sub.add_parser("lab", help="experiments over many runs: evolution (GPT-1 to modern), scaling laws")
    labs = lab.add_subparsers(dest="lab", required=True)
    s = labs.add_parser("evolution", help="GPT-1, GPT-2, GPT-3-style, modern and the one-change ladder, "
                        "at matched size on the same data")
    s.add_argument("--data", help="prepared data directory (default: the embedded corpus)")
    s.add_argument("--budget", metavar="DURATION", help="training time per run: seconds, or with a unit (600s, 10m, 1h)")
    s.add_argument("--tokens", type=int, help="training tokens per run (instead of --budget)")
    s.add_argument("--params", type=float, default=2e6, help="non-embedding parameters of every model")
    s.add_argument("--seeds", type=int, default=1)
    s.add_argument("--context", type=int, default=256)
    s.add_argument("--out", required=True, help="lab directory (a stopped lab continues where it was)")
    s.set_defaults(func=cmd_evolution)
    s = labs.add_parser("scaling", help="a grid of sizes x token budgets, fitted with L(N, D) = E + A/N^a + B/D^b")
    s.add_argument("--data", help="prepared data directory (default: the embedded corpus)")
    s.add_argument("--sizes", default="2e5,4e5,8e5,1.6e6", help="non-embedding parameter counts, comma-separated")
    s.add_argument("--tokens", default="1.6e5,3.2e5,6.4e5", help="token budgets, comma-separated")
    s.add_argument("--context", type=int, default=256)
    s.add_argument("--predict", metavar="N,D", help="print the fitted law's loss at N parameters and D tokens")
    s.add_argument("--out", required=True, help="lab directory (holds the runs and fit.json)")
    s.set_defaults(func=cmd_scaling)
