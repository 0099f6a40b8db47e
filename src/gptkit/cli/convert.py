"""Commands that change a checkpoint's form: convert (to and from other tools' formats), quantize."""

from __future__ import annotations

from pathlib import Path


def cmd_convert(args) -> None:
    from .. import hf

    if args.from_hf:
        if not args.out:
            raise ValueError("--from-hf needs --out DIR")
        out = hf.convert_from_hf(args.from_hf, Path(args.out))
    elif args.source and args.to_hf:
        out = hf.convert_to_hf(Path(args.source), Path(args.to_hf), dequantize=args.dequantize)
    else:
        raise ValueError("use `gptkit convert --from-hf SRC --out DIR` or `gptkit convert DIR --to-hf OUT`")
    print(f"wrote {out}")


def _add_convert(sub) -> None:
    s = sub.add_parser("convert", help="convert to and from Hugging Face transformers checkpoints")
    s.add_argument("source", nargs="?", help="gptkit checkpoint directory (with --to-hf)")
    s.add_argument("--from-hf", metavar="SRC", help="transformers checkpoint directory or hub name")
    s.add_argument("--out", help="output gptkit checkpoint directory (with --from-hf)")
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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; choose another --out")
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


def register(sub) -> None:
    _add_convert(sub)
    _add_quantize(sub)
