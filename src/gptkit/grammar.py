"""Structured outputs: the tokens a row may take next, from a JSON schema compiled by llguidance (the grammar
library llama.cpp, vLLM and SGLang use; it runs on the CPU, ~50 us a mask). A `Matcher` follows one row: before a
token is sampled its `mask` sets every token the grammar forbids to -inf; after, `accept` advances it; once the
grammar is complete only the row's end tokens remain allowed.
"""

from __future__ import annotations

import json
import tempfile
import weakref
from pathlib import Path

import torch
from torch import Tensor

from .errors import GptkitError
from .tokenizer import Tokenizer

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {end ids: LLTokenizer}


class GrammarError(GptkitError):
    """A schema that does not compile (the library's reason), or structured output without what it needs."""


def _llguidance():
    try:
        import llguidance
        import llguidance.torch
    except ModuleNotFoundError:
        raise GrammarError("structured outputs need llguidance: pip install 'gptkit[structured]'") from None
    return llguidance


def _ll_tokenizer(tokenizer: Tokenizer, end_ids: tuple[int, ...]):
    llg = _llguidance()
    known = _tokenizers.setdefault(tokenizer, {})
    if end_ids not in known:
        with tempfile.TemporaryDirectory() as d:  # llguidance reads a tokenizers file by path
            path = Path(d) / "tokenizer.json"
            path.write_text(tokenizer.engine.to_str(), encoding="utf-8")
            known[end_ids] = llg.LLTokenizer(str(path), n_vocab=tokenizer.vocab_size, eos_token=list(end_ids))
    return known[end_ids]


def json_schema_grammar(schema: dict | str | bool, tokenizer: Tokenizer, end_ids: tuple[int, ...]) -> str:
    """The llguidance grammar of `schema` (`{"type": "object"}`: any JSON object), checked against the tokenizer;
    GrammarError with the library's reason when it does not compile."""
    llg = _llguidance()
    if not end_ids:
        raise GrammarError("structured outputs need an end token to stop at (the tokenizer has none)")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                         defaults={"whitespace_flexible": False})
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(f"the JSON schema does not compile: {e}") from None
    error = llg.LLMatcher.validate_grammar(grammar, _ll_tokenizer(tokenizer, end_ids))
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"the JSON schema does not compile: {error}")
    return grammar


class Matcher:
    def __init__(self, grammar: str, tokenizer: Tokenizer, end_ids: tuple[int, ...]):
        llg = _llguidance()
        self.llg, self.end_ids = llg, end_ids
        self.matcher = llg.LLMatcher(_ll_tokenizer(tokenizer, end_ids), grammar)
        self.bitmask = llg.torch.allocate_token_bitmask(1, tokenizer.vocab_size)

    def mask(self, logits: Tensor) -> None:
        """Set the logits [vocab] of every token the grammar forbids next to -inf, in place."""
        self.llg.torch.fill_next_token_bitmask(self.matcher, self.bitmask)
        self.llg.torch.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device))

    def accept(self, token: int) -> None:
        if token in self.end_ids:
            return
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing but an end token can follow."""
        return self.matcher.is_stopped()
