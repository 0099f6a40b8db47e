"""DESIGN.md's import direction, checked on the source: every module of the package has a row of what it may
import, and relative imports are resolved against the package they are written in."""

import ast
from pathlib import Path

import gptkit

PACKAGE = Path(gptkit.__file__).parent
BASE = {"errors", "files"}  # everything may import these
# module (a top-level file or package of gptkit) -> the modules of ours it may import
ALLOWED = {
    "errors": set(),
    "files": {"errors"},
    "kernels": set(),  # tensor functions only
    "tokenizer": {"errors"},
    "chat_template": {"errors"},
    "config": BASE,
    "model": BASE | {"config"},  # the model only: no kernels, no engine, no inference hooks
    "quantize": BASE | {"config", "model", "kernels"},
    "native": BASE | {"config", "model", "quantize", "kernels"},
    "generate": BASE | {"config", "model", "native", "tokenizer"},
    "engine": BASE | {"config", "model", "native", "blocks", "generate", "grammar", "tokenizer", "chat_template"},
    "blocks": set(),
    "grammar": BASE | {"tokenizer"},
    "checkpoint": BASE | {"config", "model", "quantize", "tokenizer", "chat_template"},
    "prune": BASE | {"config", "model", "checkpoint", "data", "tokenizer"},
    "gguf": BASE | {"config", "model", "quantize", "checkpoint", "tokenizer", "chat_template"},
    "hf": BASE | {"config", "model", "quantize", "checkpoint", "tokenizer", "chat_template"},
    "data": BASE | {"tokenizer"},
    "chat": BASE | {"config", "model", "generate", "engine", "tokenizer", "chat_template"},
    "evaluate": BASE | {"config", "model", "generate", "engine", "checkpoint", "data", "tokenizer", "finetune",
                        "chat_template", "__init__"},
    "train": BASE | {"config", "model", "checkpoint", "data", "tokenizer", "prune", "engine"},
    "finetune": BASE | {"config", "model", "checkpoint", "data", "tokenizer", "train", "engine", "generate",
                        "chat_template", "quantize"},
    "align": BASE | {"config", "model", "checkpoint", "data", "tokenizer", "train", "finetune", "engine",
                     "generate", "chat_template"},
    "lab": BASE | {"config", "model", "checkpoint", "data", "tokenizer", "train"},
    "serve": BASE | {"config", "model", "generate", "engine", "grammar", "tokenizer", "chat", "chat_template",
                     "checkpoint"},
    "__init__": BASE | {"config", "model", "generate", "engine", "checkpoint", "tokenizer", "chat_template", "gguf",
                        "native", "quantize"},
    "__main__": {"cli"},
}
ANYTHING = {"cli"}  # only the command imports everything (and nothing imports it but __main__)


def resolve(path: Path, node: ast.ImportFrom) -> set[str]:
    """The gptkit modules an `from ... import ...` names, as dotted paths (relative ones against their package)."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    if node.level:
        base = package[:len(package) - node.level + 1]
    elif (node.module or "").split(".")[0] == "gptkit":
        base = []
    else:
        return set()
    where = base + (node.module.split(".") if node.module else [])
    if node.module:
        return {".".join(where)}
    # `from . import x`: x is a module, or a name of the package itself
    return {".".join(where + [a.name]) if _is_module(where + [a.name]) else ".".join(where) for a in node.names}


def _is_module(parts: list[str]) -> bool:
    p = PACKAGE.parent.joinpath(*parts)
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def ours_imported(path: Path) -> set[str]:
    """The top-level gptkit modules a file imports (lazily inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names |= resolve(path, node)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "gptkit"}
    return {n.split(".")[1] if "." in n else "__init__" for n in names}


def third_party(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def modules():
    for path in PACKAGE.rglob("*.py"):
        yield path.relative_to(PACKAGE).with_suffix("").parts[0], path


def test_every_module_has_a_row_and_no_reverse_imports():
    for top, path in modules():
        assert top in ALLOWED or top in ANYTHING, f"{path}: a module with no row in this test's ALLOWED"
        if top in ANYTHING:
            continue
        extra = ours_imported(path) - {top} - ALLOWED[top]
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}, a reverse arrow of DESIGN.md"


def test_the_resolver_sees_relative_imports_against_their_own_package(tmp_path):
    """`from .. import quantize` inside kernels/ is gptkit.quantize (the old resolver read it as nothing)."""
    source = PACKAGE / "kernels" / "probe.py"  # resolved by path only: nothing is written there
    node = ast.parse("from .. import quantize\nfrom . import step\nfrom ..model import GPT").body
    assert [resolve(source, n) for n in node] == [{"gptkit.quantize"}, {"gptkit.kernels.step"}, {"gptkit.model"}]


def test_transformers_fastapi_and_lm_eval_stay_in_their_modules():
    for top, path in modules():
        mods = third_party(path)
        if top != "hf":
            assert "transformers" not in mods, f"{path} imports transformers"
        if top != "serve":
            assert "fastapi" not in mods, f"{path} imports fastapi"
        if top != "evaluate":
            assert "lm_eval" not in mods, f"{path} imports lm_eval"
