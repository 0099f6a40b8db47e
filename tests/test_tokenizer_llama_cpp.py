"""llama.cpp's pre-tokenizers, token for token against llama.cpp's own tokenizer (its llama-tokenize tool, built
from source) on held-out text: several languages and scripts, numbers, runs of spaces and newlines, code, emoji.
Each split is written into a GGUF by gptkit's export (which names it) and read back by llama.cpp: both the name and
the split are checked."""

import json
import subprocess

import pytest
import torch

from conftest import llama_cpp_tool
from gptkit import GPT, Tokenizer, checkpoint, gguf, preset
from gptkit.chat_template import chat_stops
from gptkit.tokenizer import PRE_TOKENIZERS

pytest.importorskip("gguf")

HELD_OUT = [
    "Hello world! 123",
    "I'm sure they'll say it's John's; we've seen what you'd do. DON'T SHOUT, I'LL hear. O'Neil's 'quote'",
    "Die Straße ist schön — naïve café, Ελληνικά κείμενα, русский текст, Ωμέγα ǅemal",
    "中文字符和日本語のテキスト、한국어 문장입니다。",
    "العربية لغة جميلة · नमस्ते दुनिया · ভাষা · ภาษาไทย",
    "3.14159 + 2718281828 = 1,000,000.00; 12 345 678; ١٢٣ ½ ² phone 555-0123 x10",
    "def add(a, b):\n\treturn a + b  # sum\n\n\n    x = [i**2 for i in range(10)]\r\n}\n",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵 ✔︎ ©®™",
    "   leading spaces, trailing   \n\n\n  \t mixed \u00a0nbsp\u3000ideographic  space \u2028 line   ",
    "<|im_start|>user is ordinary text here<|im_end|> $$ ^^ || ~~ <=> ++",
    "a" * 40 + " " * 17 + "!!!???..." + "\n" * 5 + "9" * 13,
]


def smollm_vocabulary(path):
    spec = json.loads(gguf.read_tokenizer(path).engine.to_str())
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    vocab = {k: v for k, v in spec["model"]["vocab"].items() if k not in special}
    return vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"]["merges"]], special


@pytest.mark.slow
@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_each_pre_tokenizer_splits_as_llama_cpp(tmp_path, smollm2_gguf, pre):
    tool = llama_cpp_tool("llama-tokenize")
    vocab, merges, special = smollm_vocabulary(smollm2_gguf)
    tokenizer = Tokenizer.from_bpe(vocab, merges, pre, special)  # SmolLM2's vocabulary, split the `pre` way
    assert tokenizer.pre_tokenizer_name() == pre
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=len(vocab) + len(special), context=64, qk_norm=False))
    checkpoint.save(tmp_path / "m", model, tokenizer)
    gguf.export(tmp_path / "m", tmp_path / "m.gguf", "q8_0")
    assert gguf.read_tokenizer(tmp_path / "m.gguf").pre_tokenizer_name() == pre
    for i, text in enumerate(HELD_OUT):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
        got = subprocess.run([str(tool), "-m", str(tmp_path / "m.gguf"), "-f", str(tmp_path / f"{i}.txt"), "--ids",
                              "--no-bos", "--no-parse-special", "--log-disable"], capture_output=True, text=True,
                             check=True)
        theirs = json.loads(got.stdout.strip().splitlines()[-1])
        assert tokenizer.encode(text) == theirs, (pre, text)


def test_smollm2_tokens_are_the_files(smollm2_gguf):
    tokenizer = gguf.read_tokenizer(smollm2_gguf)
    assert tokenizer.pre_tokenizer_name() == "smollm"
    assert tokenizer.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]  # llama.cpp's ids
    assert (tokenizer.bos, tokenizer.eos, tokenizer.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert tokenizer.eos_id == 2 and 2 in chat_stops(tokenizer)[1]
