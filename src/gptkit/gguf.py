"""GGUF, llama.cpp's model file: export a checkpoint as one, and read one (into a model, or a checkpoint).

Written and read with the `gguf` package (llama.cpp's own Python reader and writer). Architectures: `gpt2`
(learned positions, LayerNorm with biases, tanh-GELU, fused QKV) and `llama` (RoPE, RMSNorm, SwiGLU, no biases,
grouped-query attention; Q and K rows permuted to llama.cpp's interleaved rotary pairs, as its own converter does)
both ways; `qwen2` (llama's layout with q/k/v biases, rotate-half order) and `qwen3` (QK-norm) are read. Q8_0 and
Q4_0 tensors are the blocks of gptkit's quantization (quantize.py), byte for byte: they load as they are.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import GptkitError
from .files import atomic_write
from . import checkpoint, quantize
from .config import ConfigError, GPTConfig
from .model import GPT
from .chat_template import ChatTemplate
from .tokenizer import PRE_TOKENIZERS, Tokenizer

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


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


def _tokenizer_fields(tokenizer: Tokenizer, vocab_size: int, src: Path) -> dict:
    _require(tokenizer.chars is None, "a character vocabulary has no merges: llama.cpp's BPE cannot encode with it")
    pre = tokenizer.pre_tokenizer_name()
    _require(pre is not None, f"{src}: its tokenizer splits text in a way llama.cpp has no pre-tokenizer name for "
             f"(gptkit writes {', '.join(PRE_TOKENIZERS)})")
    spec = json.loads(tokenizer.engine.to_str())
    vocab = tokenizer.engine.get_vocab(with_added_tokens=True)
    added = {i for i, t in tokenizer.engine.get_added_tokens_decoder().items() if not t.special}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows past the tokenizer's vocabulary: unused
    types = [5] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, 3 if i in tokenizer.special_by_id else 4 if i in added else 1
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    eot = tokenizer.special.get("<|endoftext|>")
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "bos": tokenizer.bos_id if tokenizer.bos is not None else eot, "eos": tokenizer.eos_id,
            "eot": tokenizer.token_id(tokenizer.eot)}


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
    fields = _tokenizer_fields(tokenizer, c.vocab_size, src)
    model = checkpoint.load_model(src)
    if quantize.is_quantized(model):
        quantize.dequantize(model)  # its quantized values; q8_0 / q4_0 re-derive the same blocks

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(str(path), arch)
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
        writer.add_tokenizer_pre(fields["pre"])
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["types"])
        writer.add_token_merges(fields["merges"])
        for role in ("bos", "eos", "eot"):
            if fields[role] is not None:
                getattr(writer, f"add_{role}_token_id")(fields[role])
        writer.add_add_bos_token(tokenizer.add_bos)
        if tokenizer.chat_template is not None:
            writer.add_chat_template(tokenizer.chat_template)
        for name, tensor in gguf_tensors(model, arch).items():
            data, qtype = _encode(tensor, "f32" if name == "position_embd.weight" else kind)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(Path(out), write)


# --- reading ------------------------------------------------------------------------------------------------

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


@dataclass
class Tensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's order: the row length first
    data: np.ndarray  # float types: the values; quantized: uint8 rows of blocks (as GGUFReader gives them)


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed lean; its tensors mapped, not read. The `gguf` package's
    GGUFReader keeps every array item of the metadata as numpy views of the file: a BPE vocabulary of 49k tokens
    and 49k merges costs it ~160 MB of Python objects, more than SmolLM2's weights. Here the metadata becomes plain
    Python values (one pass with `struct`) and each tensor a numpy view of a memory map, in the layout GGUFReader
    gives it, so `gguf.quants.dequantize` reads it unchanged."""

    def __init__(self, path: Path | str):
        import gguf

        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFError(f"{self.path} is not a GGUF file (it is empty)") from None
        self._at = 0
        try:
            if self._map[:4] != MAGIC:
                raise GGUFError(f"{self.path} is not a GGUF file (no GGUF magic number)")
            self._at = 4
            version, n_tensors, n_fields = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
            if version not in (2, 3):
                raise GGUFError(f"{self.path}: GGUF version {version} is not read (2, 3; a big-endian file?)")
            self.fields = {}
            for _ in range(n_fields):
                key = self._string()
                self.fields[key] = self._value(self._unpack("<I"))
            infos = [(self._string(), [self._unpack("<Q") for _ in range(self._unpack("<I"))], self._unpack("<I"),
                      self._unpack("<Q")) for _ in range(n_tensors)]
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise GGUFError(f"{self.path} is not a readable GGUF file (cut short or damaged: {e})") from None
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // align) * align
        self.tensors = []
        for name, dims, kind, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise GGUFError(f"{self.path}: {name} has an unknown tensor type {kind}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            shape = tuple(reversed(dims))  # numpy's order
            count = int(np.prod(dims))
            nbytes = count // block * size
            if start + offset + nbytes > len(self._map) or count % block or (dims and dims[0] % block):
                raise GGUFError(f"{self.path} is cut short or damaged: {name} does not fit in the file")
            raw = np.frombuffer(self._map, np.uint8, nbytes, start + offset)
            if qtype.name in _NUMPY:  # the values themselves
                data = raw.view(_NUMPY[qtype.name]).reshape(shape)
            else:  # blocks (BF16 too, as GGUFReader gives it)
                data = raw.reshape(*shape[:-1], shape[-1] // block * size)
            self.tensors.append(Tensor(name, qtype, tuple(dims), data))

    def _unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self._map, self._at)[0]
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self._at + n > len(self._map):
            raise struct.error("a string runs past the end of the file")
        text = self._map[self._at:self._at + n].decode("utf-8")
        self._at += n
        return text

    def _value(self, kind: int):
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, n = self._unpack("<I"), self._unpack("<Q")
            if item in _SCALARS:  # numbers: one unpack for the lot
                fmt = f"<{n}{_SCALARS[item][1]}"
                values = list(struct.unpack_from(fmt, self._map, self._at))
                self._at += struct.calcsize(fmt)
                return values
            return [self._value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise struct.error(f"unknown metadata type {kind}")
        return self._unpack(_SCALARS[kind])



ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3")
WEIGHTS = ("auto", "int8", "int4", "fp32")  # how read() keeps the file's weight matrices
NATIVE = {"Q8_0": 8, "Q4_0": 4}  # GGML types whose blocks are gptkit's int8 / int4 (groups of 32) as they are
FLOAT = {"F32", "F16", "BF16", "F64"}
# quantized types of 5 bits or more a weight go to int8, the rest (Q4_1, Q4_K, Q3_K, Q2_K, IQ*...) to int4
EIGHT_BIT = {"Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18}
ROWS = 4096  # rows of a lone matrix converted at a time (a multiple of 8: the kernels' row groups)  # an fp16 scale, then 32 int8 or 16 bytes of nibble pairs


def _read(path: Path) -> GGUFFile:
    if not Path(path).is_file():
        raise GGUFError(f"no such file: {path}")
    return GGUFFile(path)


def _field(reader: GGUFFile, key: str, default=None, path: Path | str = "the GGUF file"):
    value = reader.fields.get(key)
    if value is None:
        if default is not None:
            return default
        raise GGUFError(f"{path} has no {key}")
    return value


def _f32(value) -> float:
    return float(f"{float(value):.7g}")  # GGUF stores float32: 1e-5 comes back as 9.99999974738e-06


def _config(reader, arch: str, vocab_size: int, path: Path) -> GPTConfig:
    a = arch
    get = lambda key, default=None: _field(reader, f"{a}.{key}", default, path)  # noqa: E731
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    hidden = int(get("feed_forward_length"))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    _require(int(get("attention.value_length", head_dim)) == head_dim,
             f"{path}: keys and values of different widths are not read")
    common = dict(vocab_size=vocab_size, context=int(get("context_length")), n_head=n_head,
                  n_layer=int(get("block_count")), n_embd=n_embd,
                  mlp_hidden=None if hidden == 4 * n_embd else hidden,  # None: the default width, as presets say it
                  head_size=None if head_dim == n_embd // n_head else head_dim,
                  tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
    try:
        if arch == "gpt2":
            return GPTConfig(**common, norm_eps=_f32(get("attention.layer_norm_epsilon")))
        scaling = reader.fields.get(f"{a}.rope.scaling.type")
        _require(scaling in (None, "none", ""), f"{path}: RoPE scaling {scaling!r} is not read")
        _require(int(get("rope.dimension_count", head_dim)) == head_dim,
                 f"{path}: rotary embeddings over part of each head are not read")
        kv = int(get("attention.head_count_kv", n_head))
        return GPTConfig(**common, n_kv_head=None if kv == n_head else kv, norm="rmsnorm", pos="rope",
                         norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
                         rope_theta=_f32(get("rope.freq_base", 10000.0)), activation="swiglu",
                         bias=arch == "qwen2",  # its q/k/v biases; the other biases are zeros
                         qk_norm=arch == "qwen3")
    except ConfigError as e:
        raise GGUFError(f"{path} describes no valid model: {e}") from None


def _tokenizer(reader, path: Path) -> Tokenizer:
    kind = _field(reader, "tokenizer.ggml.model", path=path)
    _require(kind != "llama", f"{path}: SentencePiece vocabularies (tokenizer.ggml.model = llama: Llama 2, TinyLlama, "
             f"Mistral) are not read; only byte-level BPE (gpt2)")
    _require(kind == "gpt2", f"{path}: only byte-level BPE vocabularies (tokenizer.ggml.model = gpt2) are read, not "
             f"{kind!r}")
    pre = _field(reader, "tokenizer.ggml.pre", "default", path)  # llama.cpp's default when a file names none
    tokens, types = _field(reader, "tokenizer.ggml.tokens", path=path), _field(reader, "tokenizer.ggml.token_type", path=path)
    _require(len(tokens) == len(types), f"{path}: {len(tokens)} tokens but {len(types)} token types")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path=path)]
    by_kind = {k: {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in k} for k in ((1, 6), (2, 3, 5), (4,))}
    roles = {}
    for role in ("bos", "eos", "eot"):
        field = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            i = int(field)
            _require(0 <= i < len(tokens), f"{path}: tokenizer.ggml.{role}_token_id {i} is outside the vocabulary")
            roles[role] = tokens[i]
    default_bos = pre in ("llama-bpe", "llama3", "llama-v3")  # as llama.cpp decides for a file that does not say
    roles["add_bos"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", default_bos, path)) and "bos" in roles
    roles["chat_template"] = reader.fields.get("tokenizer.chat_template")
    if roles["chat_template"] is not None:
        ChatTemplate(roles["chat_template"], origin=f"{path}: tokenizer.chat_template")  # compiles, or says why
    try:
        return Tokenizer.from_bpe(by_kind[(1, 6)], merges, pre, by_kind[(2, 3, 5)], by_kind[(4,)], **roles)
    except GptkitError as e:
        raise GGUFError(f"{path}: {e}") from None
    except Exception as e:  # the Rust side: a merge naming a token that is not in the vocabulary...
        raise GGUFError(f"{path}: its vocabulary cannot be read ({e})") from None


def read_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a GGUF file alone (its vocabulary, pre-tokenizer, special tokens and chat template)."""
    return _tokenizer(_read(Path(path)), Path(path))


def _dequantized(tensor, path: Path, rows: slice = slice(None)) -> torch.Tensor:
    """A tensor's values (rows `rows` of a matrix) as float32, never a view of the mapped file."""
    import gguf

    data = tensor.data[rows]
    K = _shape(tensor)[-1]
    if tensor.tensor_type.name == "Q4_1":  # the common download: in torch, fast and without numpy's temporaries
        raw = np.asarray(data).reshape(-1, K // 32, 20)  # fp16 scale, fp16 minimum, 16 bytes of nibbles
        d, m = (torch.from_numpy(np.ascontiguousarray(raw[..., i:i + 2]).view(np.float16)).float() for i in (0, 2))
        qs = torch.from_numpy(np.ascontiguousarray(raw[..., 4:]))
        return (torch.cat([qs & 15, qs >> 4], -1).float() * d + m).reshape(-1, K)
    try:
        values = gguf.quants.dequantize(data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"{path}: {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
                        f"cannot dequantize") from None
    values = np.asarray(values, dtype=np.float32)
    shape = _shape(tensor) if rows == slice(None) else (-1, K)
    return torch.from_numpy(values if values.flags.writeable else values.copy()).reshape(shape)


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))


def _blocks(tensor, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a Q8_0 / Q4_0 matrix (rows `rows`) in gptkit's form (quantize.quantize_weight's): the bytes as
    they are."""
    K = _shape(tensor)[-1]
    raw = np.asarray(tensor.data[rows]).reshape(-1, K // quantize.BLOCK, BLOCK_BYTES[tensor.tensor_type.name])
    scales = torch.from_numpy(np.ascontiguousarray(raw[..., :2]).view(np.float16).reshape(raw.shape[0], -1))
    q = np.ascontiguousarray(raw[..., 2:]).reshape(raw.shape[0], -1)
    return torch.from_numpy(q.view(np.int8) if tensor.tensor_type.name == "Q8_0" else q), scales


class _Source:
    """The tensors of one GGUF file, turned into what gptkit's modules hold."""

    def __init__(self, reader, path: Path):
        self.tensors, self.path, self.used = {t.name: t for t in reader.tensors}, path, set()

    def get(self, name: str):
        if name not in self.tensors:
            raise GGUFError(f"{self.path} has no {name}")
        self.used.add(name)
        return self.tensors[name]

    def float(self, names: list[str], heads: list[int | None]) -> torch.Tensor:
        parts = [_rows(_dequantized(self.get(n), self.path), h) for n, h in zip(names, heads)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def quantized(self, names: list[str], heads: list[int | None], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scales) of the row-wise concatenation in the kernels' layout, each part's blocks copied where they
        are gptkit's type and re-quantized from its values otherwise. A lone matrix (the embedding, a projection)
        goes a few thousand rows at a time into its final buffers: no full-size temporary."""
        if len(names) == 1 and heads[0] is None:
            t = self.get(names[0])
            N = _shape(t)[0]
            q_out = d_out = None
            for a in range(0, N, ROWS):
                b = N if N - (a + ROWS) < 8 else a + ROWS  # whole groups of 8 rows; the last chunk takes the rest
                q, d = quantize.interleave(*self._part(t, bits, slice(a, b)))
                if q_out is None:
                    q_out, d_out = q.new_empty(N, q.shape[1]), d.new_empty(N, d.shape[1])
                q_out[a:b], d_out[a:b] = q, d
                if b == N:
                    break
            return q_out, d_out
        qs, ds = [], []
        for name, h in zip(names, heads):
            q, d = self._part(self.get(name), bits)
            qs.append(_rows(q, h))
            ds.append(_rows(d, h))
        return quantize.interleave(torch.cat(qs), torch.cat(ds))

    def _part(self, t, bits: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        if NATIVE.get(t.tensor_type.name) == bits:
            return _blocks(t, rows)
        if bits == 4:
            return fit_int4(_dequantized(t, self.path, rows))
        return quantize.quantize_weight(_dequantized(t, self.path, rows), bits, quantize.BLOCK)


@torch.no_grad()
def fit_int4(w: torch.Tensor, tries: int = 9, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """gptkit's int4 blocks (d * (q - 8), groups of 32, as quantize.quantize_weight packs them) for weights already
    on another grid (Q4_1's d * q + m, the K-quants'): the scale of each block chosen for the least squared error
    among `tries` candidates around max-magnitude / -8, each refitted by least squares, instead of max-magnitude / -8
    alone (which lands half a step off an asymmetric grid)."""
    if w.shape[0] > rows:  # a few rows at a time: the candidates' temporaries stay small
        parts = [fit_int4(w[i:i + rows], tries, rows) for i in range(0, w.shape[0], rows)]
        return torch.cat([q for q, _ in parts]), torch.cat([d for _, d in parts])
    N, K = w.shape
    x = w.float().reshape(N, K // quantize.BLOCK, 1, quantize.BLOCK)
    biggest = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    divisors = torch.linspace(-8.0, -6.0, tries).reshape(1, 1, tries, 1)
    d = biggest / divisors  # [N, B, tries, 1]
    for _ in range(2):  # pick levels for the scale, then the scale for the levels
        inv = torch.where(d != 0, 1 / d, 0)
        levels = (torch.floor(x * inv + 8.5).clamp(0, 15) - 8)
        d = torch.where((levels * levels).sum(-1, keepdim=True) > 0,
                        (x * levels).sum(-1, keepdim=True) / (levels * levels).sum(-1, keepdim=True).clamp_min(1e-30), d)
        d = d.half().float()  # the error the stored fp16 scale gives
    inv = torch.where(d != 0, 1 / d, 0)
    levels = torch.floor(x * inv + 8.5).clamp(0, 15)
    error = ((levels - 8) * d - x).square().sum(-1)  # [N, B, tries]
    best = error.argmin(-1, keepdim=True)
    q = levels.squeeze(-1).gather(2, best[..., None].expand(-1, -1, 1, quantize.BLOCK)).reshape(N, K // quantize.BLOCK, quantize.BLOCK)
    q = q.to(torch.uint8)
    scales = d.squeeze(-1).gather(2, best).reshape(N, K // quantize.BLOCK).half()
    return (q[..., :16] | q[..., 16:] << 4).reshape(N, K // 2), scales


def _rows(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    """Rows of a llama q/k projection (or of its blocks and scales) back from llama.cpp's rotary order."""
    return t if heads is None else _unpermute(t, heads)


def _layout(c: GPTConfig, arch: str) -> dict[str, tuple[list[str], list[int | None]]]:
    """gptkit linear (or embedding) module -> the GGUF matrices stacked into its weight, with the heads whose rotary
    order each is in (None: rows as they are)."""
    rope_order = arch == "llama"  # qwen2/qwen3 files keep transformers' rotate-half order
    layout = {"wte": (["token_embd.weight"], [None])}
    if not c.tie_embeddings:
        layout["lm_head"] = (["output.weight"], [None])
    for i in range(c.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        if arch == "gpt2":
            layout[b + "attn.qkv"] = ([g + "attn_qkv.weight"], [None])
            layout[b + "mlp.fc"] = ([g + "ffn_up.weight"], [None])
        else:
            layout[b + "attn.qkv"] = ([g + "attn_q.weight", g + "attn_k.weight", g + "attn_v.weight"],
                                      [c.n_head, c.kv_heads, None] if rope_order else [None] * 3)
            layout[b + "mlp.fc"] = ([g + "ffn_gate.weight", g + "ffn_up.weight"], [None, None])
        layout[b + "attn.proj"] = ([g + "attn_output.weight"], [None])
        layout[b + "mlp.proj"] = ([g + "ffn_down.weight"], [None])
    return layout


def _vectors(c: GPTConfig, arch: str) -> dict[str, list[str]]:
    """gptkit parameter -> the GGUF vectors (or position table) it is, concatenated; [] for a zero bias."""
    names = {"norm_f.weight": ["output_norm.weight"]}
    parts = {"norm1": "attn_norm", "norm2": "ffn_norm"}
    if arch == "gpt2":
        names |= {"wpe.weight": ["position_embd.weight"], "norm_f.bias": ["output_norm.bias"]}
    for i in range(c.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for ours, theirs in parts.items():
            names[f"{b}{ours}.weight"] = [f"{g}{theirs}.weight"]
            if arch == "gpt2":
                names[f"{b}{ours}.bias"] = [f"{g}{theirs}.bias"]
        if arch == "gpt2":
            names |= {b + "attn.qkv.bias": [g + "attn_qkv.bias"], b + "attn.proj.bias": [g + "attn_output.bias"],
                      b + "mlp.fc.bias": [g + "ffn_up.bias"], b + "mlp.proj.bias": [g + "ffn_down.bias"]}
        elif arch == "qwen2":
            names |= {b + "attn.qkv.bias": [g + "attn_q.bias", g + "attn_k.bias", g + "attn_v.bias"],
                      b + "attn.proj.bias": [], b + "mlp.fc.bias": [], b + "mlp.proj.bias": []}
        elif arch == "qwen3":
            names |= {b + "attn.q_norm.weight": [g + "attn_q_norm.weight"], b + "attn.k_norm.weight": [g + "attn_k_norm.weight"]}
    return names


def _scheme(source: _Source, layout: dict, weights: str) -> quantize.Scheme | None:
    """How the file's weight matrices are kept: their own blocks where they are gptkit's (Q8_0 as int8, Q4_0 as
    int4), the other quantized types re-quantized to the nearest of int8 / int4 (`auto`), or every one to `weights`;
    matrices stored as floats stay floats."""
    if weights == "fp32":
        return None
    kinds = {m: {source.tensors[n].tensor_type.name for n in names if n in source.tensors}
             for m, (names, _) in layout.items()}
    linears = {m: k for m, k in kinds.items() if m != "wte"}
    quantized = [t for k in linears.values() for t in k if t not in FLOAT]
    if not quantized:
        return None
    bits = {"int8": 8, "int4": 4}.get(weights) or (8 if all(t in EIGHT_BIT for t in quantized) else 4)
    skip = tuple(m for m, k in linears.items() if k <= FLOAT)
    return quantize.Scheme(bits, quantize.BLOCK, 8 if kinds["wte"] - FLOAT else None, skip)


def describe(path: Path, weights: str = "auto") -> list[str]:
    """`gptkit info FILE.gguf`: the model, its tokenizer, and how gptkit keeps each tensor type (as it is, or
    re-quantized to what)."""
    from collections import Counter

    model, tokenizer = read(path, weights)
    reader = _read(Path(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    record = model.records.quantization
    lines = [f"{k:>16}: {v}" for k, v in model.config.to_dict().items()]
    lines.append(f"{'parameters':>16}: {model.num_params():,}")
    for kind, n in sorted(types.items()):
        if kind in FLOAT:
            how = "floating point (float32)"
        elif not record:
            how = "dequantized to float32"
        elif NATIVE.get(kind) == record["bits"] or (kind == "Q8_0" and record["embedding_bits"]):
            how = f"kept as it is (gptkit's int{NATIVE[kind]} blocks)"
        else:
            how = f"re-quantized at load to int{record['bits']} (int8 for the embedding)"
        lines.append(f"{kind:>16}: {n} tensors, {how}")
    lines.append(f"{'in memory':>16}: {quantize.nbytes(model) / 1e6:,.1f} MB ({Path(path).stat().st_size / 1e6:,.1f} MB file)")
    lines.append(f"{'tokenizer':>16}: {tokenizer.describe()}, pre-tokenizer {tokenizer.pre_tokenizer_name()}, "
                 f"BOS {tokenizer.bos!r} (added: {tokenizer.add_bos}), EOS {tokenizer.eos!r}, "
                 f"chat template: {'its own' if tokenizer.chat_template else 'none (ChatML)'}")
    return lines


def read(path: Path, weights: str = "auto") -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a gpt2, llama, qwen2 or qwen3 GGUF file. `weights`: "auto" keeps Q8_0 / Q4_0
    blocks as gptkit's int8 / int4 as they are (no floating-point matrix is built) and re-quantizes other quantized
    types to the nearest of them; "int8" / "int4" every quantized matrix to that; "fp32" dequantizes all."""
    path = Path(path)
    _require(weights in WEIGHTS, f"unknown weights {weights!r}; choose {', '.join(WEIGHTS)}")
    reader = _read(path)
    arch = _field(reader, "general.architecture", path=path)
    _require(arch in ARCHITECTURES, f"{path}: architecture {arch!r} is not read ({', '.join(ARCHITECTURES)})")
    source = _Source(reader, path)
    _require("token_embd.weight" in source.tensors, f"{path} has no token_embd.weight")
    _require("rope_freqs.weight" not in source.tensors, f"{path}: RoPE frequency factors (rope_freqs.weight, Llama "
             f"3.1's long-context scaling) are not read")
    vocab_size = _shape(source.tensors["token_embd.weight"])[0]
    n_tokens = len(_field(reader, "tokenizer.ggml.tokens", path=path))
    _require(n_tokens == vocab_size, f"{path}: {n_tokens} tokens in the vocabulary but {vocab_size} rows in "
             f"token_embd.weight")
    config = _config(reader, arch, vocab_size, path)
    tokenizer = _tokenizer(reader, path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        reader.fields.pop(key, None)  # tens of MB of Python strings, now in the tokenizer
    layout = _layout(config, arch)
    scheme = _scheme(source, layout, weights)
    with torch.device("meta"):
        model = GPT(config)
    if scheme is not None:
        quantize.skeleton(model, scheme.to_dict())
    modules = dict(model.named_modules())
    state = {}
    for name, (names, heads) in layout.items():
        module = modules[name]
        if isinstance(module, quantize.QuantLinear):
            state[name + ".qweight"], state[name + ".scales"] = source.quantized(names, heads, module.bits)
        else:
            state[name + ".weight"] = source.float(names, heads)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, names in _vectors(config, arch).items():
        state[name] = source.float(names, [None] * len(names)) if names else torch.zeros(shapes[name])
    leftover = sorted(set(source.tensors) - source.used)
    _require(not leftover, f"{path}: unexpected tensor {leftover[0] if leftover else ''}")
    try:
        checkpoint.check_state(model, state, path)
    except checkpoint.CheckpointError as e:
        raise GGUFError(str(e)) from None
    model.load_state_dict(state, assign=True)
    if scheme is not None:
        quantize.check_loaded(model)
    if config.pos == "rope":
        from .model import rope_tables

        model.rope_cos, model.rope_sin = rope_tables(config)
    try:
        checkpoint.check_tokenizer(model, tokenizer, path)
    except checkpoint.CheckpointError as e:
        raise GGUFError(str(e)) from None
    return model.eval(), tokenizer


def import_gguf(path: Path, out: Path, weights: str = "auto") -> Path:
    """Read a GGUF file (see `read`) into a gptkit checkpoint directory `out`."""
    model, tokenizer = read(path, weights)
    checkpoint.save(Path(out), model, tokenizer)
    return Path(out)
