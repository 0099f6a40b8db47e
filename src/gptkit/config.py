"""GPTConfig: one frozen dataclass describes every model of the family; presets are data."""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import GptkitError


ADDED_LATER = {"attn_dropout", "head_size"}  # fields that checkpoints written before them lack; their default keeps the old meaning


class ConfigError(GptkitError):
    """A config or preset that cannot describe a valid model."""


# The one typed reader of config dataclasses (GPTConfig, train recipes, fine-tuning settings): a field's annotation
# says what it holds; dicts (JSON, TOML) and text (`key=value`, flags) are read into it here and nowhere else.

_MISMATCH = object()


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """Each field of the dataclass `cls` and its declared type (annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _arms(kind) -> tuple:
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def _convert(kind, value):
    """`value` as a `kind`, where that is exact (JSON and TOML write a float 3.0 as 3, a tuple as a list)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    for arm in _arms(kind):
        origin, args = typing.get_origin(arm), typing.get_args(arm)
        if arm is type(None) and value is None or arm in (str, bool, dict) and isinstance(value, arm):
            return value
        if arm is int and integer or arm is float and isinstance(value, float):
            return value
        if arm is float and integer:
            return float(value)
        if origin is Literal and any(value == a and type(value) is type(a) for a in args):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            items = [_convert(args[0], v) for v in value]
            if _MISMATCH not in items:
                return tuple(items)  # a tuple, not JSON's list: configs stay hashable
    return _MISMATCH


def _describe(kind) -> str:
    words = []
    for arm in _arms(kind):
        origin, args = typing.get_origin(arm), typing.get_args(arm)
        if origin is Literal:
            words.append(", ".join(map(str, args[:-1])) + f" or {args[-1]}" if len(args) > 1 else str(args[0]))
        elif origin is tuple:
            words.append("a list of " + {int: "integers", float: "numbers", str: "strings"}[args[0]])
        else:
            words.append({int: "an integer", float: "a number", bool: "true or false", str: "a string",
                          dict: "a table of fields", type(None): "null"}[arm])
    return " or ".join(words)


def check_fields(obj, error: type[GptkitError]) -> None:
    """Each field of the dataclass `obj` holds its declared type (exact conversions made in place), or `error`
    names the field and what it must be."""
    for name, kind in field_types(type(obj)).items():
        value = getattr(obj, name)
        converted = _convert(kind, value)
        if converted is _MISMATCH:
            raise error(f"{name} must be {_describe(kind)}, got {value!r}")
        if converted is not value:
            object.__setattr__(obj, name, converted)  # frozen dataclasses too


def parse_text(kind, text: str):
    """What a `key=value` string or a flag's text means for a field of type `kind` (checked when the config is
    made): a TOML value (`3`, `1e-3`, `true`, `"x"`, `[1, 3]`, `{n_layer = 2}`); for a string, the text as it is;
    for a list, comma-separated items too (`1,3`); for an optional field, `none` or `null`."""
    text = text.strip()
    if type(None) in _arms(kind) and text.lower() in ("none", "null"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word
    if not isinstance(value, str) and _convert(kind, text) is not _MISMATCH:
        return text  # a string field given `3` or `true` means the text
    item = next((typing.get_args(a)[0] for a in _arms(kind) if typing.get_origin(a) is tuple), None)
    if item is not None and not isinstance(value, list):
        return [parse_text(item, part) for part in text.split(",")]
    return value


def from_fields(cls, values: dict, error: type[GptkitError], what: str):
    """The dataclass `cls` made from `values` (its fields' types are checked as it is made), or `error` naming
    the fields it does not have."""
    if not isinstance(values, dict):
        raise error(f"a {what} must be a table of fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(field_types(cls)))
    if unknown:
        raise error(f"unknown {what} field(s): {', '.join(unknown)}")
    return cls(**values)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (multi-head); fewer: grouped-query attention
    n_embd: int = 768
    head_size: int | None = None  # None: n_embd / n_head; set when heads were pruned away (prune --method heads)
    mlp_hidden: int | None = None  # None: 4 * n_embd
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True  # False: GPT-1's post-norm blocks (and no final norm)
    pos: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    activation: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = "gelu_tanh"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_dropout: float | None = None  # None: as dropout; 0 keeps CPU attention on its fused kernel
    qk_norm: bool = False
    window: int | None = None  # band width of the locally banded attention layers
    local_layers: tuple[int, ...] = ()  # which layers use the band (GPT-3 alternates dense / banded)

    def __post_init__(self):
        check_fields(self, ConfigError)
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.head_size is not None or self.n_embd % self.n_head == 0,
             f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        need(self.head_size is None or self.head_size > 0, f"head_size must be positive, got {self.head_size}")
        need(self.n_head % self.kv_heads == 0, f"n_head {self.n_head} is not divisible by n_kv_head {self.kv_heads}")
        need(self.pos != "rope" or self.head_dim % 2 == 0, "RoPE needs an even head dimension")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.attn_dropout is None or 0.0 <= self.attn_dropout < 1.0,
             f"attn_dropout must be in [0, 1), got {self.attn_dropout}")
        need(not self.local_layers or (self.window or 0) > 0, "local_layers needs a positive window")
        need(all(0 <= i < self.n_layer for i in self.local_layers), "local_layers names a layer that does not exist")

    def replace(self, **changes) -> GPTConfig:
        return from_fields(GPTConfig, {**self.to_dict(), **changes}, ConfigError, "config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, complete: bool = False) -> GPTConfig:
        """The config `d` describes; `complete`: every field must be given (a saved config states them all)."""
        missing = [n for n in field_types(cls) if isinstance(d, dict) and n not in d and n not in ADDED_LATER]
        if complete and missing:
            raise ConfigError(f"missing config field(s): {', '.join(missing)}")
        return from_fields(cls, d, ConfigError, "config")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> GPTConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()), complete=True)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def _gpt3(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    # GPT-3 (Brown et al. 2020, table 2.1): GPT-2 blocks, 2048 context, dense and locally banded
    # attention in alternating layers (the band width is not published; 256 as in GPT-Neo).
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, context=2048,
                     window=256, local_layers=tuple(range(1, n_layer, 2)))


def _modern(n_layer: int, n_head: int, n_kv_head: int, n_embd: int, mlp_hidden: int, **kw) -> GPTConfig:
    # Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, mlp_hidden=mlp_hidden,
                     norm="rmsnorm", norm_eps=1e-6, pos="rope", activation="swiglu", bias=False, **kw)


PRESETS: dict[str, GPTConfig] = {
    # GPT-1 (Radford et al. 2018): post-norm, learned positions, exact GELU, 40478 BPE tokens.
    "gpt1": GPTConfig(vocab_size=40478, context=512, prenorm=False, activation="gelu"),
    "gpt2": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "gpt3-125m": _gpt3(12, 12, 768),
    "gpt3-350m": _gpt3(24, 16, 1024),
    "gpt3-760m": _gpt3(24, 16, 1536),
    "gpt3-1.3b": _gpt3(24, 16, 2048),  # the paper lists 24 heads of 128, which do not tile 2048
    "gpt3-2.7b": _gpt3(32, 32, 2560),
    "gpt3-6.7b": _gpt3(32, 32, 4096),
    "gpt3-13b": _gpt3(40, 40, 5120),
    "gpt3-175b": _gpt3(96, 96, 12288),
    "modern-125m": _modern(12, 12, 4, 768, 2048, context=2048, vocab_size=50304),
    "modern-350m": _modern(24, 16, 4, 1024, 2816, context=2048, vocab_size=50304),
    "modern-1b": _modern(16, 32, 8, 2048, 8192, context=4096, vocab_size=128256, rope_theta=500000.0),
    # Tiny models that train in minutes on a CPU; the vocabulary is set from the tokenizer.
    "tiny-gpt1": GPTConfig(context=256, n_layer=4, n_head=4, n_embd=128, prenorm=False, activation="gelu"),
    "tiny-gpt2": GPTConfig(context=256, n_layer=4, n_head=4, n_embd=128),
    "tiny-gpt3": GPTConfig(context=256, n_layer=4, n_head=4, n_embd=128, window=32, local_layers=(1, 3)),
    "tiny-modern": _modern(4, 4, 2, 128, 384, context=256, qk_norm=True),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
