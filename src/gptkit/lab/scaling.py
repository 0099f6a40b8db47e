"""Scaling laws: a grid of small runs (model sizes x token budgets), then Chinchilla's fit
L(N, D) = E + A / N^alpha + B / D^beta (approach 3: a Huber loss on log-losses, minimised by L-BFGS from a grid
of starting points) and the compute-optimal split of a compute budget C = 6 N D that it implies."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import GPTConfig
from ..files import atomic_write
from ..tokenizer import Tokenizer
from .runs import LabError, LabRun, body_params, complete, match_width, shape

RECIPE = {"lr": 3e-3, "warmup_steps": 20, "batch_size": 8, "schedule": "wsd"}  # every run of the grid: its own full schedule


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N: float, D: float) -> float:
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N, D) minimising the loss at compute C = 6 N D (Chinchilla's closed form)."""
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return G * (compute / 6) ** a, (compute / 6) ** b / G


def fit_scaling_law(N, D, L, delta: float = 1e-3) -> ScalingLaw:
    """The least Huber-loss fit of log L over a grid of starting points (Hoffmann et al. 2022, approach 3)."""
    from scipy.optimize import minimize

    logN, logD, logL = (np.log(np.asarray(v, dtype=float)) for v in (N, D, L))
    if len(logL) < 5:
        raise LabError(f"a fit of five parameters needs at least 5 runs, got {len(logL)}")

    def objective(x):  # the Huber loss of the log-residuals, and its gradient
        a, b, e, alpha, beta = x
        u = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
        predicted = np.logaddexp(np.logaddexp(u[0], u[1]), u[2])
        w = np.exp(u - predicted)  # d predicted / d u
        r = predicted - logL
        huber = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
        g = np.clip(r, -delta, delta)
        grad = [(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(), -(g * w[0] * logN).sum(), -(g * w[1] * logD).sum()]
        return huber.sum() / delta, np.array(grad) / delta  # scaled: the tolerances of L-BFGS are absolute

    best = None
    for a, b, e, alpha, beta in itertools.product((0, 5, 10), (0, 5, 10), (-1, 0.5), (0.3, 0.6), (0.3, 0.6)):
        result = minimize(objective, [a, b, e, alpha, beta], jac=True, method="L-BFGS-B", options={"maxiter": 300},
                          bounds=[(None, None)] * 3 + [(0, 2)] * 2)  # a loss that grows with N or D is no law
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def grid_config(vocab: int, context: int, params: float) -> GPTConfig:
    """A grid point's model: GPT-2's shape for `params`, its MLP width set to hit `params` exactly."""
    return match_width(GPTConfig(vocab_size=vocab, context=context, **shape(params)), params)


def scaling(data: str, out: Path, sizes: list[float], tokens: list[int], context: int = 256, seed: int = 0,
            say=print) -> ScalingLaw:
    """Train every size x token budget (resumable), fit the law, write `fit.json` and `scaling.png`."""
    vocab = Tokenizer.load(Path(data)).vocab_size
    points = []
    for params, budget in itertools.product(sizes, tokens):
        config = grid_config(vocab, context, params)
        result = complete(LabRun(f"n{body_params(config)}-d{budget}", config, RECIPE), Path(out), data, {"max_tokens": budget},
                     seed)
        say(f"N = {result['params']:,}, D = {result['tokens']:,}: val loss {result['val_loss']:.4f}")
        points.append((result["params"], result["tokens"], result["val_loss"]))
    law = fit_scaling_law(*zip(*points))
    largest = max(6 * n * d for n, d, _ in points)
    n_opt, d_opt = law.optimal(largest)
    record = {**asdict(law), "points": points, "compute_optimal": {"compute": largest, "params": n_opt,
                                                                    "tokens": d_opt, "tokens_per_param": d_opt / n_opt}}
    atomic_write(Path(out) / "fit.json", json.dumps(record, indent=1))
    plot(law, points, Path(out) / "scaling.png")
    say(f"L(N, D) = {law.E:.3f} + {law.A:.3g} / N^{law.alpha:.3f} + {law.B:.3g} / D^{law.beta:.3f}; at "
        f"C = {largest:.2e} FLOPs the optimum is N = {n_opt:,.0f}, D = {d_opt:,.0f} ({d_opt / n_opt:.1f} tokens "
        f"per parameter)")
    return law


def load_scaling_law(out: Path) -> ScalingLaw:
    path = Path(out) / "fit.json"
    if not path.exists():
        raise LabError(f"no fit in {out}: run `gptkit lab scaling` there first")
    try:
        record = json.loads(path.read_text())
        return ScalingLaw(**{k: float(record[k]) for k in ("E", "A", "B", "alpha", "beta")})
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a fit's record
        raise LabError(f"{path} is not a fit written by `gptkit lab scaling` ({type(e).__name__}: {e}); "
                       f"run it again") from None


def plot(law: ScalingLaw, points: list[tuple], png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n in sorted({p[0] for p in points}):
        measured = sorted((d, loss) for m, d, loss in points if m == n)
        ax.plot(*zip(*measured), "o", label=f"N = {n:,}")
        ds = np.geomspace(min(d for d, _ in measured), max(d for d, _ in measured) * 4, 50)
        ax.plot(ds, [law.loss(n, d) for d in ds], "-", color=ax.lines[-1].get_color(), lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
