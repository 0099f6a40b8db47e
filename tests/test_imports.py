"""DESIGN.md's import direction, checked on the source: no reverse arrows."""

import ast
from pathlib import Path

import gptkit

PACKAGE = Path(gptkit.__file__).parent
# module -> modules of ours it must never import
FORBIDDEN = {
    "tokenizer": {"config", "model", "generate", "checkpoint", "hf", "data", "train", "finetune", "evaluate", "serve", "cli"},
    "config": {"model", "generate", "checkpoint", "hf", "data", "train", "finetune", "evaluate", "serve", "cli", "tokenizer"},
    "model": {"generate", "checkpoint", "hf", "data", "train", "finetune", "evaluate", "serve", "cli", "tokenizer",
              "kernels", "engine"},  # the model only: no losses, no kernels or packing
    "generate": {"engine", "serve", "cli", "train", "finetune", "hf"},
    "engine": {"serve", "cli", "train", "finetune", "hf", "data", "evaluate", "chat"},
}
ANYWHERE_BUT_CLI = {"cli", "serve"}


def ours_imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = (node.module or "").split(".")[0]
            names |= {base} if base else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptkit."):
            names.add(node.module.split(".")[1])
    return names


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
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield rel.parts[0], path


def test_no_reverse_imports():
    for top, path in modules():
        imported = ours_imported(path)
        assert not imported & FORBIDDEN.get(top, set()), f"{path.name} imports {imported & FORBIDDEN[top]}"
        if top not in ("cli", "__main__", "serve"):
            assert not imported & ANYWHERE_BUT_CLI, f"{path} imports cli/serve"


def test_transformers_and_fastapi_stay_in_their_modules():
    for top, path in modules():
        mods = third_party(path)
        if top != "hf":
            assert "transformers" not in mods, f"{path} imports transformers"
        if top != "serve":
            assert "fastapi" not in mods, f"{path} imports fastapi"
