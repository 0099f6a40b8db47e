"""The GPT evolution lab: GPT-1, GPT-2, GPT-3-style and modern decoders at matched size on the same data, budget
and seed, and the ladder from GPT-1 to modern that changes one thing at a time."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from ..config import GPTConfig
from ..files import atomic_write
from ..data import TokenShards
from ..tokenizer import Tokenizer
from .runs import LabRun, body_params, complete, match_width, shape, time_to

GPT1 = dict(prenorm=False, pos="learned", norm="layernorm", activation="gelu", bias=True, qk_norm=False)
# (row, model field changes, recipe changes): each rung changes exactly one thing from the one before
LADDER = [
    ("GPT-1 (post-norm)", {}, {}),
    ("+ pre-norm (GPT-2)", {"prenorm": True}, {}),
    ("+ RoPE", {"pos": "rope"}, {}),
    ("+ RMSNorm", {"norm": "rmsnorm"}, {}),
    ("+ SwiGLU", {"activation": "swiglu"}, {}),
    ("+ QK-norm", {"qk_norm": True}, {}),
    ("+ no biases", {"bias": False}, {}),
    ("+ grouped-query attention", {"n_kv_head": "half"}, {}),
    ("+ Muon", {}, {"optimizer": "muon"}),
    ("+ WSD schedule = modern", {}, {"schedule": "wsd"}),
]
BASE_RECIPE = {"optimizer": "adamw", "schedule": "cosine", "lr": 3e-3, "warmup_steps": 20, "batch_size": 16}
# GPT-1's paper: Adam at 2.5e-4 (its 2,000 warm-up steps of ~300k are a smaller share than the shared recipe's 20)
GPT1_LR = 2.5e-4


def ladder(base: GPTConfig) -> list[LabRun]:
    """The ablation rungs, each at the size of GPT-2's rung (its MLP width adjusted to match)."""
    config, recipe, rungs = base.replace(**GPT1), dict(BASE_RECIPE), []
    target = body_params(config.replace(prenorm=True))
    for name, model, changes in LADDER:
        model = {k: (max(1, config.n_head // 2) if v == "half" else v) for k, v in model.items()}
        config, recipe = match_width(config.replace(**model), target) if model else config, {**recipe, **changes}
        rungs.append(LabRun(name, config, recipe))
    return rungs


def generations(base: GPTConfig) -> list[LabRun]:
    """GPT-1 (under the shared recipe, and at its paper's learning rate: post-norm needs a gentler one), GPT-2,
    GPT-3-style (alternating dense and locally banded attention) and modern, at matched size."""
    rungs = ladder(base)
    gpt1, gpt2 = rungs[0], rungs[1]
    gpt1_own_lr = LabRun(f"GPT-1 at its paper's lr ({GPT1_LR:g})", gpt1.config, {**gpt1.recipe, "lr": GPT1_LR})
    gpt3 = LabRun("GPT-3-style (banded)", gpt2.config.replace(window=max(16, base.context // 4),
                                                           local_layers=tuple(range(1, base.n_layer, 2))), gpt2.recipe)
    return [gpt1, gpt1_own_lr, gpt2, gpt3, rungs[-1]]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def evolution(data: str, out: Path, budget: dict, params: float = 2e6, seeds: int = 1, context: int = 256,
              say=print) -> list[dict]:
    """Train every generation and ladder rung (`seeds` times each, resuming a stopped lab where it was), then
    write `table.md` and `evolution.png` to `out`. Returns one summary per run."""
    tokenizer = Tokenizer.load(Path(data))
    base = GPTConfig(vocab_size=tokenizer.vocab_size, context=context, **shape(params))
    _, gpt1_own_lr, _, gpt3, _ = generations(base)
    rungs = ladder(base)  # GPT-1, GPT-2 and modern are rungs too: trained once, the other two beside their kin
    results = []
    for lab_run in [rungs[0], gpt1_own_lr, rungs[1], gpt3, *rungs[2:]]:
        for seed in range(seeds):
            result = complete(LabRun(slug(lab_run.name), lab_run.config, lab_run.recipe), Path(out), data, budget, seed)
            result["name"] = lab_run.name
            say(f"{lab_run.name} (seed {seed}): val loss {result['val_loss']:.4f}, {result['tokens']:,} tokens, "
                f"{result['tokens_per_s']:,.0f} tokens/s")
            results.append(result)
    write_table(results, Path(out) / "table.md", bytes_per_token(tokenizer, data), reference=LADDER[1][0])  # GPT-2
    plot(results, Path(out) / "evolution.png")
    return results


def bytes_per_token(tokenizer: Tokenizer, data: str) -> float:
    """UTF-8 bytes per token of the validation text (its tokens decoded back, the end-of-text separators as no
    bytes): loss per token to bits per byte."""
    ids = np.concatenate([np.asarray(a) for a in TokenShards(Path(data), "val").arrays])
    text = tokenizer.decode(ids[ids != tokenizer.eot_id])
    return len(text.encode("utf-8")) / max(len(ids), 1)


def write_table(results: list[dict], path: Path, token_bytes: float, reference: str) -> str:
    """One row per configuration (the mean over seeds, ± their spread; `token_bytes` of text per token); the time
    column is when each run first reaches the `reference` configuration's final loss ("—" if it never does)."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    common = statistics.mean(r["val_loss"] for r in by_name[reference])
    columns = ["run", "parameters", "tokens", "tokens/s", "val loss", "best val loss", "bits/byte",
               f"seconds to {common:.3f}"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for name, rs in by_name.items():
        losses = [r["val_loss"] for r in rs]
        spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        best = statistics.mean(min((p["val_loss"] for p in r["curve"]), default=r["val_loss"]) for r in rs)
        seconds = statistics.mean(time_to(r["curve"], common, "elapsed_s") for r in rs)
        lines.append(f"| {name} | {rs[0]['params']:,} | {statistics.mean(r['tokens'] for r in rs):,.0f} | "
                     f"{statistics.mean(r['tokens_per_s'] for r in rs):,.0f} | {statistics.mean(losses):.4f}{spread} | "
                     f"{best:.4f} | {statistics.mean(losses) / math.log(2) / token_bytes:.3f} | "
                     f"{'—' if math.isnan(seconds) else f'{seconds:.0f}'} |")
    lines.append(f"\nVal loss: the last evaluation's; bits/byte: of the validation text; seconds to {common:.3f}: "
                 f"when a run first reaches {reference}'s final loss (—: never).")
    text = "\n".join(lines) + "\n"
    atomic_write(path, text)
    return text


def plot(results: list[dict], png: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    by_tokens, by_time = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    # one colour per configuration along the ladder (a cycle of 10 would repeat one), seeds share it
    names = list(dict.fromkeys(r["name"] for r in results))
    colour = {name: colormaps["turbo"](i / max(1, len(names) - 1)) for i, name in enumerate(names)}
    for r in results:
        label = r["name"] + (f" (seed {r['seed']})" if r["seed"] else "")
        style = dict(label=label, lw=1, color=colour[r["name"]], ls="--" if r["seed"] else "-")
        by_tokens.plot([p["tokens"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], **style)
        by_time.plot([p["elapsed_s"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], **style)
    for ax, x in ((by_tokens, "tokens"), (by_time, "seconds")):
        ax.set_xlabel(x)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
