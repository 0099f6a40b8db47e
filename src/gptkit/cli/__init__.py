"""The `gptkit` command: one subcommand per stage, thin over the modules. Each subcommand's flags and its
function sit together in the group module named for what it does (build, run, tune, convert, lab)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import GptkitError
from . import build, convert, lab, run, tune

OPTIONAL_MODULES = {"transformers": "hf", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
                    "sacrebleu": "eval", "rouge_score": "eval", "datasets": "hf", "gguf": "gguf",
                    "scipy": "lab"}  # module -> the extra


class Parser(argparse.ArgumentParser):
    """A parser whose flags show their default in --help, documented or not; not where the help already names
    it, nor where there is none to show (None, a switch's False, an empty list)."""

    def add_argument(self, *names, **options):
        action = super().add_argument(*names, **options)
        nothing = action.default is None or action.default is False or action.default == [] or \
            action.default == argparse.SUPPRESS  # by identity and equality: a default of 0 is shown
        shown = not nothing and action.help != argparse.SUPPRESS
        if shown and "default" not in (action.help or "").lower():
            action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"
        return action


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("gptkit")
    except PackageNotFoundError:
        release = "unknown"
    p = Parser(prog="gptkit", description="Build, train, fine-tune, evaluate and serve GPT models.")
    p.add_argument("--version", action="version", version=f"gptkit {release}")
    sub = p.add_subparsers(dest="command", required=True)  # subcommands (and theirs) are Parsers too
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
    except (GptkitError, OSError) as e:  # what the user can act on; anything else is a bug and shows its traceback
        if os.environ.get("GPTKIT_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"gptkit: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
