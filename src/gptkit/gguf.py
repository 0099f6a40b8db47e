"""GGUF, llama.cpp's model file: export a checkpoint as one, and read one back into a checkpoint.

Written and read with the `gguf` package (llama.cpp's own Python reader and writer). Two llama.cpp architectures:
`gpt2` (learned positions, LayerNorm with biases, tanh-GELU, fused QKV) and `llama` (RoPE, RMSNorm, SwiGLU, no
biases, grouped-query attention; Q and K rows permuted to llama.cpp's interleaved rotary pairs, as its own
converter does). Q8_0 and Q4_0 tensors are the blocks of gptkit's quantization (quantize.py), byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import GptkitError
from . import checkpoint, quantize
from .config import ConfigError, GPTConfig
from .model import GPT
from .tokenizer import GPT2_PATTERN, Tokenizer

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
GPT2_PRE = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex


class GGUFError(GptkitError):
    """A model llama.cpp cannot represent, or a file that is not a GGUF gptkit can read."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise GGUFError(message)


def architecture(c: GPTConfig) -> str:
    """The llama.cpp architecture that computes what `c` does, or a GGUFError naming what has none."""
    _require(c.prenorm, "GPT-1's post-norm blocks have no llama.cpp architecture")
    _require(not c.local_layers, "GPT-3-style banded attention layers have no llama.cpp equivalent")
    _require(not c.qk_norm, "QK-norm is not part of llama.cpp's gpt2 or llama architectures")
    _require(c.activation != "relu2", "the ReLU² MLP is not part of llama.cpp's gpt2 or llama architectures")
    _require(c.head_size is None, "a head size other than n_embd / n_head (pruned heads) is not exported yet")
    if c.pos == "learned":
        _require(c.norm == "layernorm" and c.bias and c.activation == "gelu_tanh" and c.kv_heads == c.n_head,
                 "llama.cpp's gpt2 needs LayerNorm, biases, tanh-GELU and as many KV heads as heads")
        return "gpt2"
    _require(c.norm == "rmsnorm" and c.activation == "swiglu" and not c.bias,
             "llama.cpp's llama needs RMSNorm, SwiGLU and no biases")
    return "llama"


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotary pairs (i, i + d/2) of each head -> llama.cpp's (2i, 2i + 1): its converter's permutation."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _names(c: GPTConfig, arch: str) -> dict[str, str]:
    """gptkit state-dict name -> GGUF tensor name, for the tensors that map one to one."""
    names = {"wte.weight": "token_embd.weight", "norm_f.weight": "output_norm.weight"}
    if not c.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    parts = {"norm1": "attn_norm", "attn.proj": "attn_output", "norm2": "ffn_norm", "mlp.proj": "ffn_down"}
    if arch == "gpt2":
        names |= {"wpe.weight": "position_embd.weight", "norm_f.bias": "output_norm.bias"}
        parts |= {"attn.qkv": "attn_qkv", "mlp.fc": "ffn_up"}
    suffixes = ("weight", "bias") if c.bias else ("weight",)
    for i in range(c.n_layer):
        for ours, theirs in parts.items():
            for s in suffixes if not ours.startswith("norm") or c.norm == "layernorm" else ("weight",):
                names[f"blocks.{i}.{ours}.{s}"] = f"blk.{i}.{theirs}.{s}"
    return names


def gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names and layouts (float)."""
    c, state = model.config, model.state_dict()
    tensors = {theirs: state[ours] for ours, theirs in _names(c, arch).items()}
    if arch == "llama":
        q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
        for i in range(c.n_layer):
            wq, wk, wv = state[f"blocks.{i}.attn.qkv.weight"].split([q, kv, kv])
            gate, up = state[f"blocks.{i}.mlp.fc.weight"].chunk(2)
            tensors |= {f"blk.{i}.attn_q.weight": _permute(wq, c.n_head), f"blk.{i}.attn_k.weight": _permute(wk, c.kv_heads),
                        f"blk.{i}.attn_v.weight": wv, f"blk.{i}.ffn_gate.weight": gate, f"blk.{i}.ffn_up.weight": up}
    return tensors


def _tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> dict:
    _require(tokenizer.chars is None, "a character vocabulary has no merges: llama.cpp's BPE cannot encode with it")
    spec = json.loads(tokenizer.engine.to_str())
    pre = spec.get("pre_tokenizer") or {}
    patterns = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [])]
    _require(GPT2_PATTERN in patterns, "only GPT-2's pre-tokenizer is written (llama.cpp's `gpt-2`); this "
             "tokenizer splits text differently")
    vocab = tokenizer.engine.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows past the tokenizer's vocabulary: unused
    types = [5] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, 3 if i in tokenizer.special_by_id else 1
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "eot": tokenizer.special.get("<|endoftext|>")}


def _encode(t: torch.Tensor, kind: str):
    """(numpy data, GGML type) of a tensor: matrices in `kind`, vectors and position tables in f32."""
    import gguf

    Q = gguf.GGMLQuantizationType
    t = t.detach().float().contiguous()
    if t.dim() == 1 or kind == "f32":
        return t.numpy(), Q.F32
    if kind in ("q8_0", "q4_0") and t.shape[1] % quantize.BLOCK == 0:
        bits = 8 if kind == "q8_0" else 4
        q, d = quantize.quantize_weight(t, bits, quantize.BLOCK)  # the same blocks as gptkit's int8 / int4
        N, B = d.shape
        blocks = np.concatenate([d.numpy().view(np.uint8).reshape(N, B, 2),
                                 q.numpy().view(np.uint8).reshape(N, B, -1)], axis=-1)
        return blocks.reshape(N, -1), Q.Q8_0 if bits == 8 else Q.Q4_0
    qtype = {"f16": Q.F16, "bf16": Q.BF16}.get(kind, Q.F32)
    return gguf.quants.quantize(t.numpy(), qtype), qtype


def export(src: Path, out: Path, kind: str = "f32") -> Path:
    """Write the checkpoint `src` as a GGUF file `out` with its matrices in `kind` (f32, f16, bf16, q8_0, q4_0)."""
    import gguf

    _require(kind in TYPES, f"unknown GGUF type {kind!r}; choose {', '.join(TYPES)}")
    c = checkpoint.load_config(src)
    arch = architecture(c)
    tokenizer = checkpoint.load_tokenizer(src)
    _require(tokenizer is not None, f"{src} has no tokenizer; a GGUF file carries one")
    fields = _tokenizer_fields(tokenizer, c.vocab_size)
    model = checkpoint.load_model(src)
    if quantize.is_quantized(model):
        quantize.dequantize(model)  # its quantized values; q8_0 / q4_0 re-derive the same blocks
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(Path(src).resolve().name)
        writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}[kind])
        writer.add_context_length(c.context)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.hidden)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        if arch == "gpt2":
            writer.add_layer_norm_eps(c.norm_eps)
        else:
            writer.add_head_count_kv(c.kv_heads)
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_rope_dimension_count(c.head_dim)
            writer.add_vocab_size(c.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(GPT2_PRE)
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["types"])
        writer.add_token_merges(fields["merges"])
        if fields["eot"] is not None:
            writer.add_bos_token_id(fields["eot"])
            writer.add_eos_token_id(fields["eot"])
        for name, tensor in gguf_tensors(model, arch).items():
            data, qtype = _encode(tensor, "f32" if name == "position_embd.weight" else kind)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# --- reading ------------------------------------------------------------------------------------------------

def _read(path: Path):
    import gguf

    if not Path(path).is_file():
        raise GGUFError(f"no such file: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, OSError... for damaged files
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated?'})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GGUFError(f"the GGUF file has no {key}")
    return field.contents()


def _f32(value) -> float:
    return float(f"{float(value):.7g}")  # GGUF stores float32: 1e-5 comes back as 9.99999974738e-06


def _config(reader, arch: str, vocab_size: int) -> GPTConfig:
    a = arch
    n_embd, n_head = int(_field(reader, f"{a}.embedding_length")), int(_field(reader, f"{a}.attention.head_count"))
    hidden = int(_field(reader, f"{a}.feed_forward_length"))
    common = dict(vocab_size=vocab_size, context=int(_field(reader, f"{a}.context_length")), n_head=n_head,
                  n_layer=int(_field(reader, f"{a}.block_count")), n_embd=n_embd,
                  mlp_hidden=None if hidden == 4 * n_embd else hidden,  # None: the default width, as presets say it
                  tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
    try:
        if arch == "gpt2":
            return GPTConfig(**common, norm_eps=_f32(_field(reader, "gpt2.attention.layer_norm_epsilon")))
        kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
        return GPTConfig(**common, n_kv_head=None if kv == n_head else kv, norm="rmsnorm", pos="rope",
                         norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
                         rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0)), activation="swiglu",
                         bias=False)
    except ConfigError as e:
        raise GGUFError(f"the GGUF file describes no valid model: {e}") from None


def _tokenizer(reader) -> Tokenizer:
    _require(_field(reader, "tokenizer.ggml.model") == "gpt2", "only byte-level BPE vocabularies (tokenizer.ggml.model "
             f"= gpt2) are read, not {_field(reader, 'tokenizer.ggml.model')!r}")
    pre = _field(reader, "tokenizer.ggml.pre", GPT2_PRE)
    _require(pre == GPT2_PRE, f"the pre-tokenizer {pre!r} is not read (only {GPT2_PRE!r})")
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (1, 6)}
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3}
    return Tokenizer.from_bpe(vocab, merges, GPT2_PATTERN, special)


def _dequantized(tensor) -> torch.Tensor:
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"{tensor.name} is stored as {tensor.tensor_type.name}, which gptkit does not read "
                        f"(f32, f16, bf16, q8_0, q4_0)") from None
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def import_gguf(path: Path, out: Path) -> Path:
    """Read a gpt2 or llama GGUF file into a gptkit checkpoint directory `out` (weights dequantized to fp32)."""
    reader = _read(Path(path))
    arch = _field(reader, "general.architecture")
    _require(arch in ("gpt2", "llama"), f"{path}: architecture {arch!r} is not read (gpt2, llama)")
    tensors = {t.name: t for t in reader.tensors}
    _require("token_embd.weight" in tensors, f"{path} has no token_embd.weight")
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    n_tokens = len(_field(reader, "tokenizer.ggml.tokens"))
    _require(n_tokens == vocab_size, f"{path}: {n_tokens} tokens in the vocabulary but {vocab_size} rows in "
             f"token_embd.weight")
    config = _config(reader, arch, vocab_size)
    tokenizer = _tokenizer(reader)
    with torch.device("meta"):
        model = GPT(config)
    names = {theirs: ours for ours, theirs in _names(config, arch).items()}
    state = {}
    for name, tensor in tensors.items():
        value = _dequantized(tensor)
        if name in names:
            state[names[name]] = value
        elif arch == "llama" and name.startswith("blk."):
            state[name] = value  # split tensors, fused below
        elif name != "output.weight":
            raise GGUFError(f"{path}: unexpected tensor {name}")
    if arch == "llama":
        for i in range(config.n_layer):
            p = f"blk.{i}."
            try:
                q, k, v = state.pop(p + "attn_q.weight"), state.pop(p + "attn_k.weight"), state.pop(p + "attn_v.weight")
                gate, up = state.pop(p + "ffn_gate.weight"), state.pop(p + "ffn_up.weight")
            except KeyError as e:
                raise GGUFError(f"{path} has no {e.args[0]}") from None
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([_unpermute(q, config.n_head), _unpermute(k, config.kv_heads), v])
            state[f"blocks.{i}.mlp.fc.weight"] = torch.cat([gate, up])
        leftover = [k for k in state if k.startswith("blk.")]
        _require(not leftover, f"{path}: unexpected tensor {leftover[0] if leftover else ''}")
    try:
        checkpoint.check_state(model, state, path)
    except checkpoint.CheckpointError as e:
        raise GGUFError(str(e)) from None
    model.load_state_dict(state, assign=True)
    if config.pos == "rope":
        from .model import rope_tables

        model.rope_cos, model.rope_sin = rope_tables(config)
    checkpoint.save(Path(out), model, tokenizer)
    return Path(out)
