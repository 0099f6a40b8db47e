"""Weight-only quantization on CPU: speed, size, memory and quality of fp32 / bf16 / int8 / int4, side by side.

    python benchmarks/quantize.py [--repeats 5] [--new-tokens 128] [--train-seconds 600]
                                  [--checkpoint DIR --data DIR] [--skip-quality] [--skip-speed]

Speed (random GPT-2 124M weights, as transformers initialises them): decode tokens/s at batch 1 (greedy, 32-token
prompt), best of `--repeats` runs interleaved between the precisions, with transformers' fp32 decode as the outside
reference; bytes on disk of each checkpoint; peak resident memory of a fresh process loading it with
`gptkit.load` and decoding one token, which reads every weight (its growth over the process after `import gptkit`,
and the whole; safetensors maps the file, so the weights become resident as they are read). bf16 only where the CPU
multiplies it natively.
Quality: validation perplexity of a model trained by gptkit: `--checkpoint DIR --data DIR` (a prepared data
directory from the same tokenizer), or a modern ~6M-parameter model trained here for `--train-seconds` on the
embedded corpus (its val split, which nothing was tuned on).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import gptkit
import gptkit.hf
from gptkit import Tokenizer, checkpoint, evaluate, quantize
from gptkit.data import embedded_corpus
from gptkit.engine import generate_tokens
from gptkit.generate import SamplingParams

LOAD_PEAK = """
import json, sys
import gptkit
from gptkit.engine import generate_tokens
from gptkit.generate import SamplingParams
def status(key):  # VmHWM: this process's peak since exec (ru_maxrss would count the forking parent's)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
before = status("VmRSS:")
lm = gptkit.load(sys.argv[1])
generate_tokens(lm.model, [[1, 2, 3]], SamplingParams(max_new_tokens=1, temperature=0))  # every weight read once
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
"""


def cpu_kind() -> str:
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    vnni = " + VNNI" if "avx512_vnni" in flags or "avx_vnni" in flags else ""
    return f"{name}, {isa}{vnni}, {torch.get_num_threads()} threads"


def load_peak(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def write_precisions(fp32_dir: Path, root: Path, with_bf16: bool) -> dict[str, Path]:
    dirs = {"fp32": fp32_dir}
    for bits in (8, 4):
        model = quantize.quantize(checkpoint.load_model(fp32_dir), bits=bits)
        checkpoint.save(root / f"int{bits}", model, checkpoint.load_tokenizer(fp32_dir))
        dirs[f"int{bits}"] = root / f"int{bits}"
    if with_bf16:
        dirs["bf16"] = fp32_dir  # the same file, cast at load
    return dirs


def speed(args, root: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from decode import best_rates  # benchmarks/decode.py: interleaved runs, best of each

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.save_pretrained(root / "hf")
    gptkit.hf.convert_from_hf(root / "hf", root / "fp32")
    tokenizer = Tokenizer.train_bpe((d.text for d in list(embedded_corpus())[:20]), vocab_size=1024)
    for name, text in tokenizer.files().items():  # any tokenizer will do for speed: the prompt is token ids
        (root / "fp32" / name).write_text(text)
    bf16 = checkpoint.is_native(torch.bfloat16, torch.device("cpu"))
    dirs = write_precisions(root / "fp32", root, bf16)
    lms = {name: gptkit.load(d, dtype="bf16" if name == "bf16" else "fp32") for name, d in dirs.items()}
    prompt = torch.randint(0, 50257, (1, 32))
    n = args.new_tokens

    def ours(lm):
        return lambda: generate_tokens(lm.model, [prompt[0].tolist()], SamplingParams(max_new_tokens=n, temperature=0))

    def theirs():
        with torch.inference_mode():
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)

    rates = best_rates({"transformers fp32": theirs, **{f"gptkit {k}": ours(lm) for k, lm in lms.items()}}, n,
                       args.repeats)
    same = {k: ours(lm)() == ours(lms["fp32"])() for k, lm in lms.items()}
    fp32 = rates["gptkit fp32"]
    print(f"\nGPT-2 124M (random weights), decode at batch 1, {n} new tokens, greedy; {cpu_kind()}")
    print(f"| {'':18} | {'tokens/s':>8} | {'vs gptkit fp32':>14} | {'vs transformers':>15} | {'on disk MB':>10} | "
          f"{'load peak MB (growth / whole)':>29} | {'same tokens as fp32':>19} |")
    print(f"|{'-' * 20}|{'-' * 10}|{'-' * 16}|{'-' * 17}|{'-' * 12}|{'-' * 31}|{'-' * 21}|")
    for name, rate in rates.items():
        key = name.split()[-1]
        disk = mem = same_tokens = ""
        if name.startswith("gptkit"):
            disk = f"{(dirs[key] / checkpoint.WEIGHTS_FILE).stat().st_size / 1e6:.0f}"
            if key != "bf16":
                peak = load_peak(dirs[key])
                mem = f"{(peak['peak'] - peak['before']) / 1e6:.0f} / {peak['peak'] / 1e6:.0f}"
            same_tokens = str(same[key])
        print(f"| {name:18} | {rate:8.1f} | {rate / fp32:13.2f}x | {rate / rates['transformers fp32']:14.2f}x | "
              f"{disk:>10} | {mem:>29} | {same_tokens:>19} |")


def train_small(root: Path, seconds: float) -> tuple[Path, Path]:
    from gptkit.train import load_recipe, train
    from gptkit.train.trainer import default_data_dir

    data = default_data_dir()
    cfg = load_recipe(None, ["block_size=256", "batch_size=16", "lr=3e-3", "warmup_steps=50", "schedule=wsd",
                             "eval_interval=500", "model.n_layer=6", "model.n_embd=256", "model.n_head=4",
                             "model.n_kv_head=2", "model.mlp_hidden=704"],
                      preset="tiny-modern", data=str(data), out=str(root / "trained"), time_limit=seconds, max_steps=0)
    train(cfg)
    return root / "trained", data


def quality(args, root: Path) -> None:
    ckpt, data = (Path(args.checkpoint), Path(args.data)) if args.checkpoint else train_small(root, args.train_seconds)
    dirs = write_precisions(ckpt, root / "quality", False)
    base = None
    n = sum(t.numel() for t in checkpoint.load_model(ckpt).state_dict().values())
    print(f"\nValidation perplexity of a trained model ({ckpt}, {n / 1e6:.1f}M parameters; {data} val split)")
    print(f"| {'':6} | {'perplexity':>10} | {'vs fp32':>8} | {'on disk MB':>10} |")
    print(f"|{'-' * 8}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")
    for name, d in dirs.items():
        lm = gptkit.load(d)
        with torch.inference_mode():
            ppl = evaluate.split_perplexity(lm.model, lm.tokenizer, data)["perplexity"]
        base = base or ppl
        print(f"| {name:6} | {ppl:10.3f} | {(ppl / base - 1) * 100:+7.2f}% | "
              f"{(d / checkpoint.WEIGHTS_FILE).stat().st_size / 1e6:10.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--train-seconds", type=float, default=600)
    ap.add_argument("--checkpoint", help="a trained gptkit checkpoint for the quality table")
    ap.add_argument("--data", help="its prepared data directory (the val split is measured)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if bool(args.checkpoint) != bool(args.data):
        ap.error("--checkpoint and --data go together")
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_speed:
            speed(args, Path(d))
        if not args.skip_quality:
            quality(args, Path(d))


if __name__ == "__main__":
    main()
