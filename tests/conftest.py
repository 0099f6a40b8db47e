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
