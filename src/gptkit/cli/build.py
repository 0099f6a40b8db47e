"""Commands that make a model: info, prepare, train, distill."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from .flags import seconds


def cmd_info(args) -> None:
    import torch

    from .. import quantize
    from ..checkpoint import WEIGHTS_FILE, load_config, load_tokenizer, quantization
    from ..config import PRESETS, preset
    from ..model import GPT

    path = Path(args.target)
    if path.suffix.lower() == ".gguf" and path.is_file():
        from .. import gguf

        for line in gguf.describe(path):
            print(line)
        return
    if args.target in PRESETS:
        config, tokenizer, record = preset(args.target), None, None
    else:
        if not path.exists():
            raise FileNotFoundError(f"{args.target} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
        config, tokenizer, record = load_config(path), load_tokenizer(path), quantization(path)
    with torch.device("meta"):  # count without allocating
        model = GPT(config)
    n, n_body, flops = model.num_params(), model.num_params(embeddings=False), model.flops_per_token()
    if record:
        quantize.skeleton(model, record)
    for key, value in config.to_dict().items():
        print(f"{key:>16}: {value}")
    print(f"{'parameters':>16}: {n:,} ({n / 1e6:.1f}M; {n_body:,} without embeddings)")
    print(f"{'train FLOPs/tok':>16}: {flops:,}")
    if record:
        print(f"{'quantization':>16}: int{record['bits']}, groups of {record['group_size']}, embedding "
              f"{'int8' if record['embedding_bits'] else 'fp32'}{', skip ' + ','.join(record['skip']) if record['skip'] else ''}")
    print(f"{'in memory':>16}: {quantize.nbytes(model) / 1e6:,.1f} MB")
    if (path / WEIGHTS_FILE).exists():
        print(f"{'on disk':>16}: {(path / WEIGHTS_FILE).stat().st_size / 1e6:,.1f} MB")
    if tokenizer is not None:
        print(f"{'tokenizer':>16}: {tokenizer.describe()}")


def cmd_prepare(args) -> None:
    from ..data import merge, prepare, read_sources
    from ..data.pipeline import parse_part

    if args.merge:
        meta = merge([Path(d) for d in args.merge], Path(args.out))
    else:
        corpus = read_sources(texts=args.text, jsonl=args.jsonl, corpora=args.corpus, hf=args.hf_dataset,
                              field=args.field, skip_bad=args.skip_bad)
        meta = prepare(corpus, Path(args.out), tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, dtype=args.dtype, shard_tokens=args.shard_tokens,
                       workers=args.workers, tokenizer_sample=args.tokenizer_sample,
                       part=parse_part(args.part) if args.part else (0, 1))
    s = meta["splits"]
    print(f"{args.out}: {meta['documents']} documents, {meta['chars']:,} characters -> "
          f"{s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens in {len(meta['files'])} shard "
          f"file{'s' * (len(meta['files']) != 1)} ({meta['dtype']}, {meta['vocab_size']} token "
          f"{meta['tokenizer']['kind']} vocabulary)")


def cmd_train(args, **fields) -> None:
    """`fields`: recipe fields the command sets itself (distill's), over the recipe and its overrides."""
    from ..train import load_recipe, train
    from ..train.recipe import DEFAULT_TIME_LIMIT, has_limit

    flags = dict(preset=args.preset, init=args.init, data=args.data, out=args.out, max_steps=args.max_steps,
                 time_limit=None if args.time_limit is None else seconds(args.time_limit, "--time-limit"),
                 device=args.device, **fields)
    if not (args.config or args.max_steps is not None or args.time_limit is not None or has_limit(args.overrides)):
        print(f"no recipe or limit given: training for {DEFAULT_TIME_LIMIT:.0f} seconds (set --max-steps or "
              f"--time-limit)")
        flags |= {"time_limit": DEFAULT_TIME_LIMIT, "max_steps": 0}
    cfg = load_recipe(args.config, args.overrides, **flags)
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    if result["interrupted"]:
        print(f"stopped by {result['interrupted']} after step {result['step']}: checkpoint written to "
              f"{result['out']}; continue with `gptkit train --out {result['out']} --resume`", file=sys.stderr)
        return 130 if result["interrupted"] == "SIGINT" else 143
    val = f"{result['val_loss']:.4f}" if result["val_loss"] is not None else "n/a"
    print(f"done: {result['step']} steps, {result['tokens']:,} tokens in {result['elapsed_s']:.0f}s, "
          f"val loss {val}; checkpoint in {result['out']}")
    return 0


def _train_epilog() -> str:
    from ..config import PRESETS
    from ..train.recipe import TrainConfig

    fields = ", ".join(f"{f.name}={getattr(TrainConfig(), f.name)!r}" for f in dataclasses.fields(TrainConfig)
                       if f.name != "model")
    return (f"presets: {', '.join(PRESETS)}.\n\nrecipe fields, set in a TOML recipe or as key=value (defaults shown): "
            f"{fields}; model.FIELD=VALUE changes a field of the preset's model config (e.g. model.n_layer=6).")


def _add_info(sub) -> None:
    s = sub.add_parser("info", help="print a preset's or checkpoint's config and parameter count")
    s.add_argument("target", help="preset name (e.g. gpt2, tiny-modern) or checkpoint directory")
    s.set_defaults(func=cmd_info)


def _add_prepare(sub) -> None:
    from ..data.pipeline import SHARD_TOKENS, TOKENIZER_SAMPLE

    s = sub.add_parser("prepare", help="tokenize text into train/val shards (default: the embedded corpus)")
    s.add_argument("--text", action="append", default=[], help="text file, directory or glob (repeatable)")
    s.add_argument("--jsonl", action="append", default=[], help="JSONL file(s) with a text field (repeatable)")
    s.add_argument("--field", default="text", help="JSONL / dataset field holding the text")
    s.add_argument("--corpus", action="append", default=[],
                   help="named corpus: python (embedded: stdlib source + pydoc), tinyshakespeare (download)")
    s.add_argument("--hf-dataset", action="append", default=[], help="Hugging Face dataset name (online)")
    s.add_argument("--tokenizer", default="bpe", choices=["char", "bpe", "gpt2", "cl100k"])
    s.add_argument("--vocab-size", type=int, default=4096, help="for --tokenizer bpe")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--dtype", choices=["uint16", "uint32"], help="token dtype (default: smallest that fits)")
    s.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    s.add_argument("--workers", type=int, help="tokenizing processes (default: the machine's cores; the output "
                   "is the same for any number)")
    s.add_argument("--tokenizer-sample", type=int, default=TOKENIZER_SAMPLE, metavar="BYTES",
                   help="bytes of the corpus's beginning a BPE tokenizer is trained on")
    s.add_argument("--skip-bad", action="store_true", help="leave out (with a warning) unreadable, binary or "
                   "non-UTF-8 files and malformed JSONL lines instead of stopping")
    s.add_argument("--part", metavar="I/N", help="prepare only the I-th of N disjoint parts of the inputs "
                   "(0/N to N-1/N, e.g. one per machine); join them with --merge")
    s.add_argument("--merge", nargs="+", metavar="DIR", help="join prepared data directories (the parts of a "
                   "--part run) into --out without copying their shards")
    s.add_argument("--out", required=True, help="data directory to write")
    s.set_defaults(func=cmd_prepare)


def _add_run_flags(s) -> None:
    """The flags of a training run (train, distill)."""
    s.add_argument("--config", help="TOML recipe (e.g. configs/shakespeare-char.toml)")
    s.add_argument("--data", help="prepared data directory (default: the embedded corpus)")
    s.add_argument("--out", help="run directory (a checkpoint directory)")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--time-limit", metavar="DURATION", help="seconds of training, or with a unit (600s, 10m, 1h)")
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="any recipe field, e.g. lr=3e-4 model.n_layer=6")


def _add_train(sub) -> None:
    s = sub.add_parser("train", help="pre-train a model (no arguments: a tiny model on the embedded corpus)",
                       epilog=_train_epilog())
    s.add_argument("--preset", help="model preset (listed below; default: the recipe's, tiny-modern)")
    s.add_argument("--init", metavar="CKPT", help="start from a checkpoint's config and weights (a pruned one "
                   "keeps its zeros: recovery training)")
    _add_run_flags(s)
    s.set_defaults(func=cmd_train)


def cmd_distill(args) -> None:
    student = Path(args.student)
    args.preset, args.init = (None, str(student)) if student.is_dir() else (args.student, None)
    return cmd_train(args, teacher=args.teacher, distill_temperature=args.temperature, distill_alpha=args.alpha,
                     distill_beta=args.beta, distill_cosine=args.cosine)


def _add_distill(sub) -> None:
    s = sub.add_parser("distill", help="train a smaller student on a teacher's distributions (DistilGPT2's recipe)",
                       epilog=_train_epilog())
    s.add_argument("--teacher", required=True, metavar="CKPT", help="the trained teacher checkpoint")
    s.add_argument("--student", required=True, help="a preset (with model.FIELD=VALUE changes, e.g. "
                   "model.n_layer=6: then it starts from every other teacher block) or a checkpoint directory")
    s.add_argument("--temperature", type=float, default=2.0, help="softens both distributions")
    s.add_argument("--alpha", type=float, default=5.0, help="weight of KL(teacher || student) x T²")
    s.add_argument("--beta", type=float, default=2.0, help="weight of the next-token loss")
    s.add_argument("--cosine", type=float, default=0.0, help="weight of 1 - cos(hidden states); equal widths only")
    _add_run_flags(s)
    s.set_defaults(func=cmd_distill)


def register(sub) -> None:
    _add_info(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_distill(sub)
