"""Commands that hand a model to other tools: convert."""

from __future__ import annotations

from pathlib import Path


def cmd_convert(args) -> None:
    from .. import hf

    if args.from_hf:
        if not args.out:
            raise ValueError("--from-hf needs --out DIR")
        out = hf.convert_from_hf(args.from_hf, Path(args.out))
    elif args.source and args.to_hf:
        out = hf.convert_to_hf(Path(args.source), Path(args.to_hf))
    else:
        raise ValueError("use `gptkit convert --from-hf SRC --out DIR` or `gptkit convert DIR --to-hf OUT`")
    print(f"wrote {out}")


def _add_convert(sub) -> None:
    s = sub.add_parser("convert", help="convert to and from Hugging Face transformers checkpoints")
    s.add_argument("source", nargs="?", help="gptkit checkpoint directory (with --to-hf)")
    s.add_argument("--from-hf", metavar="SRC", help="transformers checkpoint directory or hub name")
    s.add_argument("--out", help="output gptkit checkpoint directory (with --from-hf)")
    s.add_argument("--to-hf", metavar="OUT", help="output transformers directory")
    s.set_defaults(func=cmd_convert)


def register(sub) -> None:
    _add_convert(sub)
