"""What a run reports: metrics.jsonl (one JSON object per line), the loss-curve PNG drawn from it, and the
progress bar (or plain lines) with tokens/s and MFU."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .. import files


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return rows


class MetricsLog:
    def __init__(self, path: Path, truncate_after: int = 0):
        """Open for appending; a resumed run first drops the lines written after its checkpoint's step."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= truncate_after] if truncate_after else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(metrics: Path, png: Path) -> None:
    """Train and validation loss against step, written atomically. A Figure of its own: no pyplot, so the
    process's matplotlib backend and figure registry are left as they were."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.atomic_write(png, lambda path: fig.savefig(path, format="png"))


class Progress:
    """The bar (plain lines instead when stderr is not a terminal: CI logs, nohup, files), and one train record per
    log interval with the tokens/s and MFU of the steps since the last one. Evaluation and checkpointing run
    `paused()`, so they do not count against the throughput."""

    def __init__(self, log: MetricsLog | None, max_steps: int, step: int, tokens_per_step: int,
                 flops_per_step: float, peak: float | None, quiet: bool, line_seconds: float):
        self.log, self.tokens_per_step, self.flops_per_step, self.peak = log, tokens_per_step, flops_per_step, peak
        self.bar = tqdm(total=max_steps or None, initial=step, unit="step", disable=quiet or None,
                        dynamic_ncols=True, mininterval=1.0)
        self.plain, self.quiet, self.line_seconds = not quiet and self.bar.disable, quiet, line_seconds
        self.window_t, self.window_steps, self.last_line = time.perf_counter(), 0, time.perf_counter()

    def advance(self) -> None:
        self.window_steps += 1
        self.bar.update(1)

    def record(self, step: int, loss: float, lr: float, tokens: int, elapsed: float) -> None:
        now = time.perf_counter()
        tok_s = self.window_steps * self.tokens_per_step / (now - self.window_t)  # all ranks together
        record = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens": tokens, "tokens_per_s": round(tok_s, 1),
                  "elapsed_s": round(elapsed, 2)}
        if self.peak:
            record["mfu"] = round(self.flops_per_step * self.window_steps / (now - self.window_t) / self.peak, 4)
        if self.log is not None:
            self.log.write(record)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}",
                             **({"mfu": f"{record['mfu']:.1%}"} if self.peak else {}))
        self.window_t, self.window_steps = time.perf_counter(), 0

    def line(self, step: int, loss: float, tokens: int, elapsed: float, done: float, last: bool) -> None:
        """A plain progress line every `line_seconds` (and on the last step) when there is no bar."""
        if not self.plain or (time.perf_counter() - self.last_line < self.line_seconds and not last):
            return
        self.last_line = time.perf_counter()
        eta = max(0.0, elapsed * (1 - done) / done) if done > 0 else math.nan
        print(f"step {step}: loss {loss:.4f}, {tokens:,} tokens, {tokens / max(elapsed, 1e-9):,.0f} tok/s, "
              f"{done:.0%} done, ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        if not self.quiet:
            self.bar.write(message)

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.window_t += time.perf_counter() - start

    def close(self) -> None:
        self.bar.close()
