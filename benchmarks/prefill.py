"""Prompt processing and decoding on CPU, gptkit against llama.cpp's llama-bench on the same real model's weights.

    python benchmarks/prefill.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --llama-bin DIR
                                 [--threads 2] [--rounds 3] [--prompt 512] [--new-tokens 128]

DIR holds llama.cpp's `llama-bench` and `llama-quantize`, built from llama-cpp-python's vendored source
(`cmake -S vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON`, then
`cmake --build build --target llama-bench llama-quantize`). The weights come from one GGUF file and are
re-quantized by each runtime's own tools: transformers reads it (dequantized to fp32; its GGUF reader knows more
tokenizers than gptkit's does), gptkit converts that (`gptkit.hf.convert_from_hf`) and quantizes it
(`gptkit.quantize`, groups of 32, int8 token embedding); llama.cpp's `llama-quantize
--allow-requantize` writes f32 / q8_0 / q4_0 from the same file (its default per-tensor choices). Prefill: gptkit's
engine on a prompt of `--prompt` random token ids (hidden states of all of them, logits of the last), against
`llama-bench -p`; decode: `--new-tokens` greedy tokens after a 1-token prompt, against `llama-bench -n` (which also
starts from an empty context). Same thread count on both sides; rounds interleaved between all six, best of each.
`GPTKIT_KERNEL_TARGET=avx2` (etc.) measures another path of gptkit's kernels on the same machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import torch  # noqa: E402

import gptkit  # noqa: E402
import gptkit.hf  # noqa: E402
from gptkit import checkpoint, kernels, quantize  # noqa: E402
from gptkit.engine import generate_tokens  # noqa: E402
from gptkit.generate import SamplingParams  # noqa: E402

PRECISIONS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # gptkit's -> llama.cpp's


def cpu_kind() -> str:
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    named = (("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "BF16"))
    extra = [n for f, n in named if f" {f}" in flags]
    return f"{name}, {' + '.join([isa, *extra])}"


def from_gguf(path: Path, out: Path) -> None:
    """A gptkit fp32 checkpoint of a GGUF file's weights, through transformers (which dequantizes them)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.hf_quantizer = None  # the weights are fp32 now; transformers would refuse to save a "GGUF-quantized" model
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(out / "hf")
    transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out / "hf")
    gptkit.hf.convert_from_hf(out / "hf", out / "fp32")


def llama_bench(binary: Path, model: Path, threads: int, prompt: int, new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one llama-bench run (after its own warm-up)."""
    out = subprocess.run([str(binary), "-m", str(model), "-p", str(prompt), "-n", str(new_tokens), "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rates = {(t["n_prompt"], t["n_gen"]): t["avg_ts"] for t in json.loads(out)}
    return rates[(prompt, 0)], rates[(0, new_tokens)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True, help="the model, as a GGUF file both runtimes start from")
    ap.add_argument("--llama-bin", type=Path, required=True, help="the folder of llama-bench and llama-quantize")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    bench, quantizer = args.llama_bin / "llama-bench", args.llama_bin / "llama-quantize"
    for tool in (bench, quantizer, args.gguf):
        if not tool.exists():
            sys.exit(f"{tool} does not exist")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        from_gguf(args.gguf.resolve(), root)
        for bits in (8, 4):
            model = quantize.quantize(checkpoint.load_model(root / "fp32"), bits=bits)
            checkpoint.save(root / f"int{bits}", model, checkpoint.load_tokenizer(root / "fp32"))
        for kind in PRECISIONS.values():
            subprocess.run([str(quantizer), "--allow-requantize", str(args.gguf), str(root / f"{kind}.gguf"),
                            kind.upper()], capture_output=True, check=True)
        models = {name: gptkit.load(root / name).model for name in PRECISIONS}
        vocab = models["fp32"].config.vocab_size
        prompt = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()

        def prefill(model):
            return lambda: generate_tokens(model, [prompt], SamplingParams(max_new_tokens=1, temperature=0))

        def decode(model):
            return lambda: generate_tokens(model, [prompt[:1]], SamplingParams(max_new_tokens=args.new_tokens,
                                                                               temperature=0))

        best = {key: 0.0 for name in PRECISIONS for key in ((name, "ours"), (name, "theirs"))}
        best_decode = dict(best)
        for name, model in models.items():  # warm-up: the kernels' build, first-touch of the weights
            prefill(model)(), decode(model)()
        for _ in range(args.rounds):
            for name, model in models.items():
                t = time.perf_counter()
                prefill(model)()
                best[name, "ours"] = max(best[name, "ours"], args.prompt / (time.perf_counter() - t))
                t = time.perf_counter()
                decode(model)()
                best_decode[name, "ours"] = max(best_decode[name, "ours"], args.new_tokens / (time.perf_counter() - t))
                p, n = llama_bench(bench, root / f"{PRECISIONS[name]}.gguf", args.threads, args.prompt, args.new_tokens)
                best[name, "theirs"], best_decode[name, "theirs"] = max(best[name, "theirs"], p), max(
                    best_decode[name, "theirs"], n)

    print(f"\n{args.gguf.name}, {cpu_kind()}, {args.threads} threads; gptkit kernels: {kernels.target()} build, "
          f"integer GEMM path {kernels.gemm_path()}; best of {args.rounds} interleaved rounds")
    print(f"| precision | prefill {args.prompt} tok/s, gptkit / llama.cpp | ratio | "
          f"decode {args.new_tokens} tok/s, gptkit / llama.cpp | ratio |")
    print("|---|---|---:|---|---:|")
    for name, kind in PRECISIONS.items():
        ours, theirs = best[name, "ours"], best[name, "theirs"]
        d_ours, d_theirs = best_decode[name, "ours"], best_decode[name, "theirs"]
        print(f"| {name} / {kind} | {ours:.0f} / {theirs:.0f} | {ours / theirs:.2f}x | {d_ours:.0f} / {d_theirs:.0f} "
              f"| {d_ours / d_theirs:.2f}x |")


if __name__ == "__main__":
    main()
