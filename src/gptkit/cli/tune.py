"""Commands that adapt a model to a task: finetune, classify, merge."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import field_types, parse_text
from .flags import UsageError


def task_inputs(task: str) -> tuple[str, ...]:
    """A task's input fields (finetune/data.py's FIELDS, less the label)."""
    from ..finetune.data import FIELDS

    return tuple(f for f in FIELDS[task] if f != "label")


def add_config_flags(parser: argparse.ArgumentParser, kind, help: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    """A `--field-name` flag per field of the dataclass `kind`, its default shown as it would be typed; the text
    given is read as the field's type by `config_from_flags` (one place for both)."""
    types = field_types(kind)
    for f in dataclasses.fields(kind):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if types[f.name] is bool:
            parser.add_argument(flag, action="store_true", help=help.get(f.name))
        else:
            shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            parser.add_argument(flag, default=shown, help=help.get(f.name))


def config_from_flags(kind, args):
    """The dataclass `kind` from the flags `add_config_flags` made: each flag's text read as its field's type
    (a bad one named in one line)."""
    types = field_types(kind)
    given = {name: getattr(args, name) for name in types if hasattr(args, name)}
    return kind(**{name: parse_text(types[name], v) if isinstance(v, str) else v for name, v in given.items()})


def cmd_finetune(args) -> None:
    from ..finetune import FinetuneConfig, SFTConfig, finetune, load_examples
    from ..finetune.data import hold_out
    from ..finetune.fit import check_out, clear_out
    from ..finetune.sft import load_conversations, sft

    cfg = config_from_flags(SFTConfig if args.task == "sft" else FinetuneConfig, args)  # settings first: no data read
    check_out(Path(args.out), Path(args.base), args.overwrite, args.resume)
    read = (lambda p: load_conversations(p, args.skip_bad)) if args.task == "sft" else \
        (lambda p: load_examples(p, args.task, skip_bad=args.skip_bad))
    train = read(args.train)
    train, val = (train, read(args.val)) if args.val else hold_out(train, args.train)
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
    from ..finetune import load_task, predict

    model, tokenizer = load_task(args.checkpoint)
    task = model.spec.task
    fields = {k: getattr(args, k) for k in task_inputs(task)}
    if any(v in (None, []) for v in fields.values()):
        flags = ("--option" if k == "options" else "--" + k.replace("_", "-") for k in fields)
        raise UsageError(f"a {task} model needs " + " ".join(flags))
    label, probs = predict(model, tokenizer, fields)
    print(f"label: {label}")
    for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: {p:.4f}")


def cmd_merge(args) -> None:
    from ..finetune import merge

    print(f"wrote {merge(args.adapter, args.out)}")


def _add_finetune(sub) -> None:
    from ..finetune.data import FIELDS
    from ..finetune.tasks import HELP, FinetuneConfig

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
    from ..finetune.data import FIELDS

    s = sub.add_parser("classify", help="label a text with a fine-tuned task model")
    s.add_argument("checkpoint")
    for name in sorted({f for task in FIELDS for f in task_inputs(task)} - {"options"}):
        s.add_argument("--" + name.replace("_", "-"), dest=name)
    s.add_argument("--option", dest="options", action="append", default=[], help="a choice option (repeat)")
    s.set_defaults(func=cmd_classify)


def _add_merge(sub) -> None:
    s = sub.add_parser("merge", help="fold a LoRA adapter into its base: a plain task checkpoint")
    s.add_argument("adapter")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_merge)


def register(sub) -> None:
    _add_finetune(sub)
    _add_classify(sub)
    _add_merge(sub)
