"""CPU decoding, gptkit against llama.cpp on the same GPT-2 124M weights: fp32 / int8 / int4 vs f32 / q8_0 / q4_0.

    python benchmarks/gguf_llama_cpp.py --build          # once: compiles llama.cpp (llama-cpp-python's vendored copy), minutes
    python benchmarks/gguf_llama_cpp.py [--repeats 5] [--new-tokens 128] [--threads 2]

Random GPT-2 124M weights (as transformers initialises them) written as a gptkit checkpoint, quantized by gptkit
(`gptkit.quantize`, groups of 32) and exported by gptkit (`gptkit export --type f32|q8_0|q4_0`): both runtimes read
the same numbers at each precision (the token embedding, which is also the tied LM head, in q8_0 / q4_0 too on
llama.cpp's side; int8 on gptkit's for both quantized rows). Batch 1, a 32-token prompt, greedy, best of
`--repeats` runs interleaved between all six. llama.cpp keeps an f32 KV cache, as gptkit does. Also checks that
llama.cpp's f32 logits equal gptkit's.
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # this file would shadow the gguf package

import torch  # noqa: E402


def build() -> None:
    """llama.cpp from source, through the llama-cpp-python package that vendors it (cmake + the C compiler)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", "llama-cpp-python"],
                   check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="compile and install llama.cpp's Python binding, then exit")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.build:
        return build()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama.cpp is not built: python benchmarks/gguf_llama_cpp.py --build")
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    import gptkit
    import gptkit.hf
    from gptkit import Tokenizer, checkpoint, gguf, quantize
    from gptkit.data import embedded_corpus
    from gptkit.engine import generate_tokens
    from gptkit.generate import SamplingParams

    torch.set_num_threads(args.threads)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(root / "hf")
        gptkit.hf.convert_from_hf(root / "hf", root / "fp32")
        tokenizer = Tokenizer.train_bpe((doc.text for doc in list(embedded_corpus())[:20]), vocab_size=1024)
        for name, text in tokenizer.files().items():  # any BPE vocabulary will do: the prompt is token ids
            (root / "fp32" / name).write_text(text)
        for bits in (8, 4):
            model = quantize.quantize(checkpoint.load_model(root / "fp32"), bits=bits)
            checkpoint.save(root / f"int{bits}", model, tokenizer)
        ours = {k: gptkit.load(root / k).model for k in ("fp32", "int8", "int4")}
        theirs = {}
        for kind in ("f32", "q8_0", "q4_0"):
            gguf.export(root / "fp32", root / f"{kind}.gguf", kind)
            theirs[kind] = llama_cpp.Llama(str(root / f"{kind}.gguf"), n_ctx=256, n_threads=args.threads,
                                           n_batch=64, logits_all=kind == "f32", verbose=False, type_k=0, type_v=0)
        prompt = torch.randint(0, 1024, (32,)).tolist()

        with torch.no_grad():  # the oracle first: same logits on the prompt
            our_logits = ours["fp32"](torch.tensor([prompt]))[0]
        theirs["f32"].eval(prompt)
        their_logits = torch.from_numpy(np.array(theirs["f32"].scores[:32], dtype=np.float32))
        diff = (our_logits - their_logits).abs().max().item()
        theirs["f32"].reset()

        def run_ours(model):
            return lambda: generate_tokens(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0))[0]

        def run_theirs(llm):
            def run():
                llm.reset()
                out = []
                for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                    out.append(token)
                    if len(out) == n:
                        return out
            return run

        runs = {**{f"gptkit {k}": run_ours(m) for k, m in ours.items()},
                **{f"llama.cpp {k}": run_theirs(llm) for k, llm in theirs.items()}}
        for run in runs.values():
            run()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, run in runs.items():
                t = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t)
        rate = {k: n / min(ts) for k, ts in times.items()}
        same = run_ours(ours["fp32"])() == run_theirs(theirs["f32"])()
    spec = importlib.util.spec_from_file_location("quantize_benchmark", HERE / "quantize.py")
    sibling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sibling)
    cpu_kind = sibling.cpu_kind

    print(f"\nGPT-2 124M (random weights), batch 1, 32-token prompt, {n} new tokens, greedy, {args.threads} threads; "
          f"{cpu_kind()}")
    print(f"f32 logits, llama.cpp vs gptkit: max |diff| {diff:.2e}; same greedy tokens: {same}")
    print(f"| {'precision':9} | {'gptkit tok/s':>12} | {'llama.cpp tok/s':>15} | {'gptkit / llama.cpp':>18} |")
    print(f"|{'-' * 11}|{'-' * 14}|{'-' * 17}|{'-' * 20}|")
    for a, b, label in (("fp32", "f32", "fp32/f32"), ("int8", "q8_0", "int8/q8_0"), ("int4", "q4_0", "int4/q4_0")):
        ours_rate, theirs_rate = rate[f"gptkit {a}"], rate[f"llama.cpp {b}"]
        print(f"| {label:9} | {ours_rate:12.1f} | {theirs_rate:15.1f} | {ours_rate / theirs_rate:17.2f}x |")


if __name__ == "__main__":
    main()
