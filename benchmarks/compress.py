"""Compression beyond quantization: pruning and distillation, validation perplexity side by side.

    python benchmarks/compress.py [--train-seconds 600] [--student-steps 400] [--checkpoint DIR --data DIR]
    python benchmarks/compress.py --speed-only [--checkpoint DIR]

A teacher: `--checkpoint DIR --data DIR` (a trained gptkit checkpoint and its prepared data directory), or a modern
6-layer, 256-wide model pre-trained here for `--train-seconds` on the embedded corpus. Then, on the data's val
split (never tuned on; calibration windows come from the train split):
- magnitude vs Wanda at 50% and 70% unstructured and at 2:4 (128 calibration windows of 256 tokens);
- structured: 25% of the MLP channels dropped, and 25% of both the attention heads and the MLP channels (calibrated;
  the teacher has 4 key/value heads so that a quarter of them can go), and their decode speed against the dense
  model's (batch 1, 128 new tokens, best of 5 interleaved runs);
- a half-depth student distilled from the teacher (DistilGPT2's recipe: every other block, KL at T = 2 + LM
  loss) against the same student trained alone for the same `--student-steps`, beside the teacher.
`--speed-only`: the structured row's decode speed alone, in minutes: the checkpoint's shape (default: the teacher's)
with random weights (speed does not depend on the values), 25% of the MLP channels dropped, then both 25% of the
MLP channels and 25% of the key/value head groups where the model has 4 or more.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import gptkit
from gptkit import checkpoint, evaluate, prune
from gptkit.engine import generate_tokens
from gptkit.generate import SamplingParams
from gptkit.train import load_recipe, train

MODEL = ["model.n_layer=6", "model.n_embd=256", "model.n_head=4", "model.n_kv_head=4", "model.mlp_hidden=704"]
RUN = ["block_size=256", "batch_size=16", "lr=3e-3", "warmup_steps=50", "eval_interval=100000"]


def perplexity(path: Path, data: Path) -> float:
    lm = gptkit.load(path)
    with torch.inference_mode():
        return evaluate.split_perplexity(lm.model, lm.tokenizer, data)["perplexity"]


def decode_rate(paths: dict, repeats: int = 5, n: int = 128) -> dict:
    models = {k: gptkit.load(p).model for k, p in paths.items()}
    prompt = list(range(1, 33))
    best = {k: float("inf") for k in models}
    for _ in range(repeats + 1):  # the first round warms up
        for k, m in models.items():
            t = time.perf_counter()
            generate_tokens(m, [prompt], SamplingParams(max_new_tokens=n, temperature=0))
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: n / t for k, t in best.items()}


def speed_only(args) -> None:
    from gptkit import GPT, Tokenizer, preset

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if args.checkpoint:
            model, tokenizer = checkpoint.load_model(args.checkpoint), checkpoint.load_tokenizer(args.checkpoint)
            model.init_weights(seed=0)
        else:
            from gptkit.train.trainer import default_data_dir

            tokenizer = Tokenizer.load(default_data_dir())  # the teacher's data and tokenizer
            overrides = dict(o[len("model."):].split("=") for o in MODEL)
            model = GPT(preset("tiny-modern").replace(vocab_size=tokenizer.vocab_size,
                                                      **{k: int(v) for k, v in overrides.items()}))
        checkpoint.save(root / "dense", model, tokenizer)
        paths = {"dense": root / "dense"}
        checkpoint.save(root / "channels", prune.prune_channels(checkpoint.load_model(root / "dense"), 0.75), tokenizer)
        paths["channels -25%"] = root / "channels"
        if model.config.kv_heads >= 4:
            both = prune.prune_heads(prune.prune_channels(checkpoint.load_model(root / "dense"), 0.75), 0.75)
            checkpoint.save(root / "both", both, tokenizer)
            paths["channels and heads -25%"] = root / "both"
        rates = decode_rate(paths)
        print(f"\nDecode speed of structured pruning ({model.num_params() / 1e6:.1f}M parameters, random weights; "
              f"batch 1, 128 new tokens, best of 5 interleaved)")
        print("| | parameters | weight bytes | tokens/s | vs dense |")
        print("|---|---:|---:|---:|---:|")
        for name, path in paths.items():
            m = checkpoint.load_model(path)
            print(f"| {name} | {m.num_params() / 1e6:.2f}M | {m.num_params() / model.num_params():.0%} | "
                  f"{rates[name]:.0f} | {rates[name] / rates['dense']:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-seconds", type=float, default=600)
    ap.add_argument("--student-steps", type=int, default=400)
    ap.add_argument("--checkpoint")
    ap.add_argument("--data")
    ap.add_argument("--speed-only", action="store_true", help="only the structured row's decode speed (random weights)")
    args = ap.parse_args()
    if args.speed_only:
        return speed_only(args)
    if bool(args.checkpoint) != bool(args.data):
        ap.error("--checkpoint and --data go together")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if args.checkpoint:
            teacher, data = Path(args.checkpoint), Path(args.data)
        else:
            from gptkit.train.trainer import default_data_dir

            teacher, data = root / "teacher", default_data_dir()
            train(load_recipe(None, [*RUN, *MODEL, "schedule=wsd"], preset="tiny-modern", data=str(data),
                              out=str(teacher), time_limit=args.train_seconds, max_steps=0))
        model, tokenizer = checkpoint.load_model(teacher), checkpoint.load_tokenizer(teacher)
        calibration = prune.calibration_batches(data, tokenizer, model.config.context)
        dense = perplexity(teacher, data)
        rows = [("dense", dense, "")]
        for label, spec in [("magnitude 50%", prune.PruneSpec("magnitude", sparsity=0.5)),
                            ("Wanda 50%", prune.PruneSpec("wanda", sparsity=0.5)),
                            ("magnitude 70%", prune.PruneSpec("magnitude", sparsity=0.7)),
                            ("Wanda 70%", prune.PruneSpec("wanda", sparsity=0.7)),
                            ("magnitude 2:4", prune.PruneSpec("magnitude", pattern=(2, 4))),
                            ("Wanda 2:4", prune.PruneSpec("wanda", pattern=(2, 4)))]:
            pruned = checkpoint.load_model(teacher)
            prune.prune(pruned, spec, calibration)
            out = root / label.replace(" ", "-").replace("%", "").replace(":", "-")
            checkpoint.save(out, pruned, tokenizer)
            rows.append((label, perplexity(out, data), f"{prune.sparsity(pruned):.0%} zeros"))
        structured = {"channels -25%": prune.prune_channels(checkpoint.load_model(teacher), 0.75, calibration)}
        if model.config.kv_heads >= 4:
            structured["heads and channels -25%"] = prune.prune_heads(structured["channels -25%"], 0.75, calibration)
        paths = {label: root / label.replace(" ", "-") for label in structured}
        for label, small in structured.items():
            checkpoint.save(paths[label], small, tokenizer)
        rates = decode_rate({"dense": teacher, **paths})
        for label, small in structured.items():
            rows.append((label, perplexity(paths[label], data),
                         f"{small.num_params() / model.num_params():.0%} of the parameters; decode "
                         f"{rates[label] / rates['dense']:.2f}x ({rates[label]:.0f} vs {rates['dense']:.0f} tok/s)"))

        # the student: the teacher's config at half depth, trained alone and distilled for the same steps
        half, student_run = [f"model.n_layer={model.config.n_layer // 2}"], [*RUN, "seed=7"]
        config = json.loads((teacher / "config.json").read_text())
        overrides = [f"model.{k}={json.dumps(v)}" for k, v in config.items()
                     if k not in ("quantization", "pruning", "n_layer") and v is not None and not isinstance(v, list)]
        train(load_recipe(None, [*student_run, *overrides, *half], preset="tiny-modern", data=str(data),
                          out=str(root / "alone"), max_steps=args.student_steps))
        train(load_recipe(None, [*student_run, *overrides, *half, f"teacher={teacher}"], preset="tiny-modern",
                          data=str(data), out=str(root / "distilled"), max_steps=args.student_steps))
        alone, distilled = perplexity(root / "alone", data), perplexity(root / "distilled", data)
        gap = (alone - distilled) / (alone - dense) if alone != dense else float("nan")
        rows += [(f"student {half[0][6:]} alone", alone, f"{args.student_steps} steps"),
                 (f"student {half[0][6:]} distilled", distilled, f"{args.student_steps} steps; closes {gap:.0%} of "
                                                                  f"the gap to the teacher")]
    print(f"\nValidation perplexity ({teacher}, {model.num_params() / 1e6:.1f}M parameters; {data} val split)")
    print(f"| {'':28} | {'perplexity':>10} | {'vs dense':>9} | note |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 11}|------|")
    for label, ppl, note in rows:
        print(f"| {label:28} | {ppl:10.3f} | {(ppl / dense - 1) * 100:+8.2f}% | {note} |")


if __name__ == "__main__":
    main()
