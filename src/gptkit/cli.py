"""The `gptkit` command: one subcommand per stage, thin over the modules."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path


def cmd_info(args) -> None:
    from .checkpoint import load_config, load_tokenizer
    from .config import PRESETS, preset
    from .model import GPT

    path = Path(args.target)
    if args.target in PRESETS:
        config, tokenizer = preset(args.target), None
    else:
        if not path.exists():
            raise FileNotFoundError(f"{args.target} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
        config, tokenizer = load_config(path), load_tokenizer(path)
    import torch

    with torch.device("meta"):  # count without allocating
        model = GPT(config)
    for key, value in config.to_dict().items():
        print(f"{key:>16}: {value}")
    n = model.num_params()
    print(f"{'parameters':>16}: {n:,} ({n / 1e6:.1f}M; {model.num_params(embeddings=False):,} without embeddings)")
    print(f"{'train FLOPs/tok':>16}: {model.flops_per_token():,}")
    if tokenizer is not None:
        print(f"{'tokenizer':>16}: {tokenizer.describe()}")


def _sampling(args):
    from .generate import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=tuple(args.stop), seed=args.seed, num_beams=args.num_beams)


def cmd_generate(args) -> None:
    import gptkit

    from .engine import row_seed

    params = _sampling(args)  # validate settings before loading a large model
    lm = gptkit.load(args.checkpoint, device=args.device)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    for i in range(args.num_samples):
        steps = lm.stream_batch([prompt], dataclasses.replace(params, seed=row_seed(params.seed, i)))  # checks first
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        for pieces in steps:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
    print()


def cmd_convert(args) -> None:
    from . import hf

    if args.from_hf:
        if not args.out:
            raise ValueError("--from-hf needs --out DIR")
        out = hf.convert_from_hf(args.from_hf, Path(args.out))
    elif args.source and args.to_hf:
        out = hf.convert_to_hf(Path(args.source), Path(args.to_hf))
    else:
        raise ValueError("use `gptkit convert --from-hf SRC --out DIR` or `gptkit convert DIR --to-hf OUT`")
    print(f"wrote {out}")


def cmd_prepare(args) -> None:
    from .data import prepare, read_sources

    docs = read_sources(texts=args.text, jsonl=args.jsonl, corpora=args.corpus, hf=args.hf_dataset, field=args.field)
    meta = prepare(docs, Path(args.out), tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, dtype=args.dtype)
    s = meta["splits"]
    print(f"{args.out}: {meta['documents']} documents, {meta['chars']:,} characters -> "
          f"{s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens ({meta['dtype']}, "
          f"{meta['vocab_size']} token {meta['tokenizer']['kind']} vocabulary)")


def cmd_train(args) -> None:
    from .train import load_recipe, train
    from .train.recipe import DEFAULT_TIME_LIMIT, has_limit

    overrides = list(args.overrides)
    if not (args.config or args.max_steps is not None or args.time_limit is not None or has_limit(overrides)):
        print(f"no recipe or limit given: training for {DEFAULT_TIME_LIMIT:.0f} seconds (set --max-steps or "
              f"--time-limit)")
        overrides += [f"time_limit={DEFAULT_TIME_LIMIT}", "max_steps=0"]
    cfg = load_recipe(args.config, overrides, preset=args.preset, data=args.data, out=args.out,
                      max_steps=args.max_steps, time_limit=args.time_limit, device=args.device)
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


def cmd_serve(args) -> None:
    import gptkit

    from .serve import create_app, run_server

    import logging

    for flag in ("max_batch", "max_queue", "request_timeout"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    lm = gptkit.load(args.checkpoint, device=args.device)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(lm, name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     request_timeout=args.request_timeout)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # one line per request
    print(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1, metrics at /metrics, "
          f"docs at /docs)", flush=True)
    run_server(app, args.host, args.port)
    print("stopped", flush=True)


OPTIONAL_MODULES = {"transformers": "hf", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
                    "sacrebleu": "eval", "rouge_score": "eval", "datasets": "hf"}  # module -> the extra

def task_inputs(task: str) -> tuple[str, ...]:
    """A task's input fields (finetune/data.py's FIELDS, less the label)."""
    from .finetune.data import FIELDS

    return tuple(f for f in FIELDS[task] if f != "label")


def cmd_finetune(args) -> None:
    from .finetune import FinetuneConfig, SFTConfig, finetune, load_examples
    from .finetune.data import hold_out
    from .finetune.fit import check_out, clear_out
    from .finetune.sft import load_conversations, sft

    check_out(Path(args.out), Path(args.base), args.overwrite, args.resume)
    read = (lambda p: load_conversations(p, args.skip_bad)) if args.task == "sft" else \
        (lambda p: load_examples(p, args.task, skip_bad=args.skip_bad))
    train = read(args.train)
    train, val = (train, read(args.val)) if args.val else hold_out(train, args.train)
    kind = SFTConfig if args.task == "sft" else FinetuneConfig
    cfg = kind(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kind)})
    if args.overwrite and not args.resume:
        clear_out(Path(args.out))
    if args.task == "sft":
        result = sft(args.base, train, val, args.out, cfg, resume=args.resume)
        print(f"best val loss on assistant tokens {result['val_loss']:.4f}; saved in {args.out}")
        return
    result = finetune(args.base, train, val, args.out, cfg, resume=args.resume)
    print(f"best val accuracy {result['val_accuracy']:.4f}; trained {result['trainable_params']:,} of "
          f"{result['total_params']:,} parameters; saved in {args.out}")


def cmd_classify(args) -> None:
    from .finetune import load_task, predict

    model, tokenizer = load_task(args.checkpoint)
    task = model.spec.task
    fields = {k: getattr(args, k) for k in task_inputs(task)}
    if any(v in (None, []) for v in fields.values()):
        flags = ("--option" if k == "options" else "--" + k.replace("_", "-") for k in fields)
        raise ValueError(f"a {task} model needs " + " ".join(flags))
    label, probs = predict(model, tokenizer, fields)
    print(f"label: {label}")
    for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: {p:.4f}")


def cmd_chat(args) -> None:
    import gptkit

    from .chat import ChatSession, terminal
    from .generate import SamplingParams

    SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)  # check first
    lm = gptkit.load(args.checkpoint, device=args.device)
    session = ChatSession(lm, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
    terminal(session)


def cmd_merge(args) -> None:
    from .finetune import merge

    print(f"wrote {merge(args.adapter, args.out)}")


def cmd_eval(args) -> None:
    from . import evaluate

    result, written = evaluate.run(args.task, args.checkpoint, args.data, stride=args.stride,
                                   max_new_tokens=args.max_new_tokens, skip_bad=args.skip_bad)
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:>{width}}  {shown}")
    print(f"written to {written}")


def add_config_flags(parser: argparse.ArgumentParser, kind, help: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    """A `--field-name` flag per field of the dataclass `kind`, with its type and default (one place for both)."""
    for f in dataclasses.fields(kind):
        if f.name in skip:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help.get(f.name))
        elif f.type.startswith("tuple"):
            parser.add_argument(flag, type=lambda text: tuple(text.split(",")), default=",".join(default),
                                help=help.get(f.name))  # argparse passes a string default through `type`
        else:
            kind_of = {"int": int, "float": float}.get(f.type.replace(" | None", ""), str)
            parser.add_argument(flag, type=kind_of, default=default, help=help.get(f.name))


def _train_epilog() -> str:
    from .config import PRESETS
    from .train.recipe import TrainConfig

    fields = ", ".join(f"{f.name}={getattr(TrainConfig(), f.name)!r}" for f in dataclasses.fields(TrainConfig)
                       if f.name != "model")
    return (f"presets: {', '.join(PRESETS)}.\n\nrecipe fields, set in a TOML recipe or as key=value (defaults shown): "
            f"{fields}; model.FIELD=VALUE changes a field of the preset's model config (e.g. model.n_layer=6).")


def _add_info(sub) -> None:
    s = sub.add_parser("info", help="print a preset's or checkpoint's config and parameter count")
    s.add_argument("target", help="preset name (e.g. gpt2, tiny-modern) or checkpoint directory")
    s.set_defaults(func=cmd_info)


def _add_prepare(sub) -> None:
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
    s.add_argument("--out", required=True, help="data directory to write")
    s.set_defaults(func=cmd_prepare)


def _add_train(sub) -> None:
    s = sub.add_parser("train", help="pre-train a model (no arguments: a tiny model on the embedded corpus)",
                       epilog=_train_epilog())
    s.add_argument("--config", help="TOML recipe (e.g. configs/shakespeare-char.toml)")
    s.add_argument("--data", help="prepared data directory (default: the embedded corpus)")
    s.add_argument("--preset", help="model preset (listed below; default: the recipe's, tiny-modern)")
    s.add_argument("--out", help="run directory (a checkpoint directory)")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--time-limit", type=float, metavar="SECONDS")
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="any recipe field, e.g. lr=3e-4 model.n_layer=6")
    s.set_defaults(func=cmd_train)


def _add_generate(sub) -> None:
    s = sub.add_parser("generate", help="sample text from a checkpoint, streaming to the terminal")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", help="prompt text (default: read standard input)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--seed", type=int)
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_generate)


def _add_finetune(sub) -> None:
    from .finetune.data import FIELDS
    from .finetune.tasks import HELP, FinetuneConfig

    s = sub.add_parser("finetune", help="fine-tune a checkpoint for a task (GPT-1 heads, LoRA)")
    s.add_argument("base", help="pre-trained checkpoint directory")
    s.add_argument("--task", required=True, choices=[*FIELDS, "sft"])
    s.add_argument("--train", required=True, help="JSONL, CSV or TSV of labelled examples; sft: JSONL of "
                   '{"messages": [{"role": ..., "content": ...}]}')
    s.add_argument("--val", help="validation file (default: a tenth of --train)")
    s.add_argument("--out", required=True)
    add_config_flags(s, FinetuneConfig, HELP, skip=("task",))
    s.add_argument("--skip-bad", action="store_true", help="skip malformed lines instead of failing")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    s.add_argument("--resume", action="store_true", help="continue a stopped run in --out from its last epoch")
    s.set_defaults(func=cmd_finetune)


def _add_classify(sub) -> None:
    from .finetune.data import FIELDS

    s = sub.add_parser("classify", help="label a text with a fine-tuned task model")
    s.add_argument("checkpoint")
    for name in sorted({f for task in FIELDS for f in task_inputs(task)} - {"options"}):
        s.add_argument("--" + name.replace("_", "-"), dest=name)
    s.add_argument("--option", dest="options", action="append", default=[], help="a choice option (repeat)")
    s.set_defaults(func=cmd_classify)


def _add_chat(sub) -> None:
    s = sub.add_parser("chat", help="talk to a chat model in the terminal")
    s.add_argument("checkpoint")
    s.add_argument("--system", help="system message")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_chat)


def _add_merge(sub) -> None:
    s = sub.add_parser("merge", help="fold a LoRA adapter into its base: a plain task checkpoint")
    s.add_argument("adapter")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_merge)


def _add_eval(sub) -> None:
    s = sub.add_parser("eval", help="measure a checkpoint: ppl, choice, lambada, classify, generate")
    s.add_argument("checkpoint")
    s.add_argument("--task", required=True, choices=["ppl", "choice", "lambada", "classify", "generate"])
    s.add_argument("--data", required=True, help="text file or prepared data dir (ppl), JSONL (choice: ctx, "
                   "endings, label; generate: prompt, reference), text lines (lambada), labelled file (classify)")
    s.add_argument("--stride", type=int, help="ppl: sliding-window stride (default: half the context)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="generate: tokens per answer")
    s.add_argument("--skip-bad", action="store_true")
    s.set_defaults(func=cmd_eval)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible HTTP API and a chat page")
    s.add_argument("checkpoint")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 requests")
    s.add_argument("--model-name", help="model id clients use (default: the checkpoint directory's name)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together (rows of the KV cache)")
    s.add_argument("--max-queue", type=int, help="requests waiting for a row before new ones get 429 "
                   "(default: 32 per CPU core, at least 64)")
    s.add_argument("--request-timeout", type=float, default=600, metavar="SECONDS",
                   help="a request still running after this long fails with 504")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_serve)


def _add_convert(sub) -> None:
    s = sub.add_parser("convert", help="convert to and from Hugging Face transformers checkpoints")
    s.add_argument("source", nargs="?", help="gptkit checkpoint directory (with --to-hf)")
    s.add_argument("--from-hf", metavar="SRC", help="transformers checkpoint directory or hub name")
    s.add_argument("--out", help="output gptkit checkpoint directory (with --from-hf)")
    s.add_argument("--to-hf", metavar="OUT", help="output transformers directory")
    s.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("gptkit")
    except PackageNotFoundError:
        release = "unknown"
    p = argparse.ArgumentParser(prog="gptkit", description="Build, train, fine-tune, evaluate and serve GPT models.")
    p.add_argument("--version", action="version", version=f"gptkit {release}")
    sub = p.add_subparsers(dest="command", required=True)
    plain_add = sub.add_parser

    def add_parser(name, **kw):  # every subcommand's --help shows its defaults, documented flags or not
        parser = plain_add(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)
        plain_argument = parser.add_argument

        def add_argument(*names, **options):
            if "help" not in options and options.get("default") not in (None, False, []):
                options["help"] = "(default: %(default)s)"
            return plain_argument(*names, **options)

        parser.add_argument = add_argument
        return parser

    sub.add_parser = add_parser
    _add_info(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_finetune(sub)
    _add_classify(sub)
    _add_chat(sub)
    _add_merge(sub)
    _add_eval(sub)
    _add_serve(sub)
    _add_convert(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":  # key=value overrides may come after options too
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional extra that is not installed; any other ImportError is a bug
        if e.name not in OPTIONAL_MODULES:
            raise
        print(f"gptkit: error: {e.name} is not installed; pip install 'gptkit[{OPTIONAL_MODULES[e.name]}]'",
              file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as e:  # our errors subclass ValueError; files raise OSError
        if os.environ.get("GPTKIT_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"gptkit: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
