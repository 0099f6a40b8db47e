"""The `gptkit` command: one subcommand per stage, thin over the modules. Each subcommand's flags and its
function sit together in the group module named for what it does (build, run, tune, convert, lab)."""

from __future__ import annotations

import argparse
import os
import sys

from . import build, convert, lab, run, tune

OPTIONAL_MODULES = {"transformers": "hf", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
                    "sacrebleu": "eval", "rouge_score": "eval", "datasets": "hf", "gguf": "gguf",
                    "scipy": "lab"}  # module -> the extra


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
    for group in (build, run, tune, convert, lab):
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) in ("train", "distill"):  # key=value overrides may come after options too
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
