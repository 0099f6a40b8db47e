"""GPTConfig: one frozen dataclass describes every model of the family; presets are data."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from .errors import GptkitError


ADDED_LATER = {"attn_dropout", "head_size"}  # fields that checkpoints written before them lack; their default keeps the old meaning


class ConfigError(GptkitError):
    """A config or preset that cannot describe a valid model."""


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
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Each field holds its declared type (JSON numbers and lists are converted where that is exact)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type.replace(" | None", "")
            if value is None and f.type.endswith("| None"):
                continue
            integer = isinstance(value, int) and not isinstance(value, bool)
            if kind == "float" and integer:
                object.__setattr__(self, f.name, float(value))
            elif kind == "tuple[int, ...]" and isinstance(value, (list, tuple)):
                object.__setattr__(self, f.name, tuple(value))  # JSON gives lists; keep the config hashable
            ok = {"int": integer, "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "bool": isinstance(value, bool),
                  "tuple[int, ...]": isinstance(value, (list, tuple))
                  and all(isinstance(i, int) and not isinstance(i, bool) for i in value)}.get(kind, isinstance(value, str))
            if not ok:
                name = {"int": "an integer", "float": "a number", "bool": "true or false",
                        "tuple[int, ...]": "a list of integers"}.get(kind, "a string")
                raise ConfigError(f"{f.name} must be {name}{' or null' if f.type.endswith('| None') else ''}, "
                                  f"got {value!r}")

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
        need(self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r}")
        need(self.pos in ("learned", "rope"), f"unknown positions {self.pos!r}")
        need(self.activation in ("gelu", "gelu_tanh", "swiglu", "relu2"), f"unknown activation {self.activation!r}")
        need(not self.local_layers or (self.window or 0) > 0, "local_layers needs a positive window")
        need(all(0 <= i < self.n_layer for i in self.local_layers), "local_layers names a layer that does not exist")

    def replace(self, **changes) -> GPTConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, complete: bool = False) -> GPTConfig:
        """The config `d` describes; `complete`: every field must be given (a saved config states them all)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of fields, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        missing = [n for n in names if n not in d and n not in ADDED_LATER]
        if complete and missing:
            raise ConfigError(f"missing config field(s): {', '.join(missing)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid config: {e}") from None

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
