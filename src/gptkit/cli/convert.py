"""Commands that change a checkpoint's form: convert (to and from other tools' formats), quantize, export, prune."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def check_empty(out: Path) -> None:
    """A command writing a new checkpoint never mixes it into an existing one."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; choose another --out")


def cmd_convert(args) -> None:
    from .. import hf

    if args.from_hf or args.from_gguf:
        if not args.out:
            raise ValueError(f"--from-{'hf' if args.from_hf else 'gguf'} needs --out DIR")
        check_empty(Path(args.out))
        if args.from_gguf:
            from .. import gguf

            out = gguf.import_gguf(Path(args.from_gguf), Path(args.out), args.weights)
        else:
            out = hf.convert_from_hf(args.from_hf, Path(args.out))
    elif args.source and args.to_hf:
        out = hf.convert_to_hf(Path(args.source), Path(args.to_hf), dequantize=args.dequantize)
    else:
        raise ValueError("use `gptkit convert --from-hf SRC --out DIR`, `gptkit convert --from-gguf FILE --out DIR` "
                         "or `gptkit convert DIR --to-hf OUT`")
    print(f"wrote {out}")


def _add_convert(sub) -> None:
    s = sub.add_parser("convert", help="convert to and from transformers checkpoints; read GGUF files")
    s.add_argument("source", nargs="?", help="gptkit checkpoint directory (with --to-hf)")
    s.add_argument("--from-hf", metavar="SRC", help="transformers checkpoint directory or hub name")
    s.add_argument("--from-gguf", metavar="FILE", help="llama.cpp GGUF file (gpt2, llama, qwen2, qwen3; every type the "
                   "gguf package dequantizes)")
    s.add_argument("--weights", choices=["auto", "int8", "int4", "fp32"], default="auto",
                   help="--from-gguf: how its matrices are kept (auto: Q8_0 / Q4_0 blocks as gptkit's int8 / int4 as "
                   "they are, other quantized types re-quantized to the nearer of the two; fp32: dequantized)")
    s.add_argument("--out", help="output gptkit checkpoint directory (with --from-hf or --from-gguf)")
    s.add_argument("--to-hf", metavar="OUT", help="output transformers directory")
    s.add_argument("--dequantize", action="store_true", help="--to-hf from a quantized checkpoint: write its "
                   "quantized values as floats")
    s.set_defaults(func=cmd_convert)


def cmd_quantize(args) -> None:
    from .. import checkpoint, quantize

    source, out = Path(args.checkpoint), Path(args.out)
    record = checkpoint.quantization(source)
    if record:
        raise quantize.QuantizeError(f"{source} is already quantized ({record['bits']}-bit); quantize the "
                                     f"floating-point checkpoint it came from")
    check_empty(out)
    quantize.Scheme(args.bits, args.group_size, None if args.no_embedding else 8, tuple(args.skip))  # check first
    model, tokenizer = checkpoint.load_model(source), checkpoint.load_tokenizer(source)
    before = quantize.nbytes(model)
    quantize.quantize(model, args.bits, args.group_size, tuple(args.skip), None if args.no_embedding else 8)
    checkpoint.save(out, model, tokenizer)
    on_disk = (out / checkpoint.WEIGHTS_FILE).stat().st_size
    print(f"wrote {out}: int{args.bits} weights in groups of {args.group_size}, {on_disk / 1e6:,.1f} MB on disk, "
          f"{quantize.nbytes(model) / 1e6:,.1f} MB in memory ({before / 1e6:,.1f} MB before)")


def _add_quantize(sub) -> None:
    s = sub.add_parser("quantize", help="store a checkpoint's weights as int8 or int4 (weight-only, per group)")
    s.add_argument("checkpoint")
    s.add_argument("--bits", type=int, choices=[8, 4], default=8)
    s.add_argument("--group-size", type=int, default=32, help="inputs sharing one scale (a multiple of 32)")
    s.add_argument("--skip", type=lambda text: [t for t in text.split(",") if t], default=[],
                   help="comma-separated layers kept in floating point, e.g. lm_head,wte or blocks.0.attn.qkv")
    s.add_argument("--no-embedding", action="store_true", help="keep the token embedding (and tied head) in fp32")
    s.add_argument("--out", required=True, help="the quantized checkpoint directory to write")
    s.set_defaults(func=cmd_quantize)


def cmd_export(args) -> None:
    from .. import gguf

    out = gguf.export(Path(args.checkpoint), Path(args.out), args.type)
    print(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB, {args.type})")


def _add_export(sub) -> None:
    from ..gguf import TYPES

    s = sub.add_parser("export", help="write a checkpoint as a llama.cpp GGUF file")
    s.add_argument("checkpoint")
    s.add_argument("--format", choices=["gguf"], default="gguf")
    s.add_argument("--type", choices=TYPES, default="f32", help="how the weight matrices are stored")
    s.add_argument("--out", required=True, help="the .gguf file to write")
    s.set_defaults(func=cmd_export)


def cmd_prune(args) -> None:
    from .. import checkpoint, prune

    source, out = Path(args.checkpoint), Path(args.out)
    check_empty(out)
    pattern = prune.parse_pattern(args.pattern) if args.pattern else None
    spec = prune.PruneSpec(args.method, args.sparsity, pattern, args.keep)  # check before loading
    if checkpoint.quantization(source):
        raise prune.PruneError(f"{source} is quantized; prune the floating-point checkpoint it came from")
    model, tokenizer = checkpoint.load_model(source), checkpoint.load_tokenizer(source)
    calibration = (prune.calibration_batches(Path(args.calib), tokenizer, model.config.context, args.calib_sequences)
                   if args.calib else None)
    if args.method in prune.STRUCTURED:
        before = model.num_params()
        model = getattr(prune, f"prune_{args.method}")(model, args.keep, calibration)
        done = (f"{model.config.n_head} heads, MLP width {model.config.hidden}, {model.num_params():,} parameters "
                f"(was {before:,})")
    else:
        prune.prune(model, spec, calibration)
        done = f"{prune.sparsity(model):.1%} of the blocks' linear weights are zero"
    model.records = dataclasses.replace(model.records, pruning=prune.record(spec, str(args.calib) if args.calib else None,
                                                                            prune.sparsity(model)))
    checkpoint.save(out, model, tokenizer)
    print(f"wrote {out}: {done}")


def _add_prune(sub) -> None:
    s = sub.add_parser("prune", help="zero unimportant weights (magnitude, Wanda; N:M) or drop heads / MLP channels")
    s.add_argument("checkpoint")
    s.add_argument("--method", choices=["magnitude", "wanda", "heads", "channels"], required=True)
    s.add_argument("--sparsity", type=float, help="fraction of each weight row to zero, e.g. 0.5")
    s.add_argument("--pattern", help="N:M sparsity instead, e.g. 2:4 (keep 2 of every 4 inputs)")
    s.add_argument("--keep", type=float, help="heads / channels: fraction of attention heads (key/value groups) or "
                   "MLP channels kept, e.g. 0.75")
    s.add_argument("--calib", help="calibration text file or prepared data directory (wanda; optional for heads, channels)")
    s.add_argument("--calib-sequences", type=int, default=128, help="calibration windows of up to 256 tokens")
    s.add_argument("--out", required=True, help="the pruned checkpoint directory to write")
    s.set_defaults(func=cmd_prune)


def register(sub) -> None:
    _add_convert(sub)
    _add_quantize(sub)
    _add_export(sub)
    _add_prune(sub)
