"""Conversion to and from Hugging Face transformers checkpoints (GPT-1, GPT-2, Llama, and Qwen3 for RoPE models
with QK-norm).

`transformers` is imported lazily here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import GptkitError
from . import checkpoint
from .config import ConfigError, GPTConfig
from .model import GPT
from .chat_template import ChatTemplate
from .tokenizer import EOT, Tokenizer

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "openai-gpt": "OpenAIGPTLMHeadModel", "llama": "LlamaForCausalLM",
             "qwen3": "Qwen3ForCausalLM"}
ROPE_FAMILY = ("llama", "qwen3")  # Qwen3 is Llama's layout plus an RMSNorm of each head's queries and keys


class ConversionError(GptkitError):
    """A transformers checkpoint that gptkit cannot represent, or a gptkit model transformers cannot."""


def _require(ok: bool, msg: str):
    if not ok:
        raise ConversionError(msg)


def _hf_config_to_ours(c) -> GPTConfig:
    t = c.model_type
    if t in ("gpt2", "openai-gpt"):
        act = c.activation_function if t == "gpt2" else c.afn
        acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
        _require(act in acts, f"activation {act!r} is not supported")
        if t == "gpt2":
            _require(not c.scale_attn_by_inverse_layer_idx and not c.reorder_and_upcast_attn and c.scale_attn_weights,
                     "GPT-2 attention scaling variants are not supported")
        return GPTConfig(vocab_size=c.vocab_size, context=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                         n_embd=c.n_embd, mlp_hidden=getattr(c, "n_inner", None), norm_eps=c.layer_norm_epsilon,
                         prenorm=t == "gpt2", activation=acts[act], tie_embeddings=c.tie_word_embeddings)
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    _require(rope.get("rope_type", "default") == "default", f"RoPE scaling {rope.get('rope_type')!r} is not supported")
    _require(c.hidden_act == "silu", f"{t} activation {c.hidden_act!r} is not supported")
    _require(getattr(c, "attention_bias", False) == getattr(c, "mlp_bias", False),
             f"{t} with bias in attention but not in the MLP (or the reverse) is not supported")
    _require(c.head_dim == c.hidden_size // c.num_attention_heads, f"{t} head_dim other than hidden/heads is not supported")
    _require(not getattr(c, "use_sliding_window", False), "sliding-window attention is not supported")
    return GPTConfig(vocab_size=c.vocab_size, context=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                     n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size,
                     mlp_hidden=c.intermediate_size, norm="rmsnorm", norm_eps=c.rms_norm_eps, pos="rope",
                     rope_theta=float(rope["rope_theta"]), activation="swiglu", bias=bool(c.attention_bias),
                     tie_embeddings=c.tie_word_embeddings, qk_norm=t == "qwen3")


def _key_map(model_type: str, config: GPTConfig) -> dict[str, str]:
    """Our parameter name -> theirs, for everything that maps one to one."""
    if model_type in ROPE_FAMILY:
        m = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
        for i in range(config.n_layer):
            a, b = f"blocks.{i}.", f"model.layers.{i}."
            m |= {a + "norm1.weight": b + "input_layernorm.weight", a + "norm2.weight": b + "post_attention_layernorm.weight",
                  a + "attn.proj.weight": b + "self_attn.o_proj.weight", a + "mlp.proj.weight": b + "mlp.down_proj.weight"}
            if model_type == "qwen3":
                m |= {a + "attn.q_norm.weight": b + "self_attn.q_norm.weight",
                      a + "attn.k_norm.weight": b + "self_attn.k_norm.weight"}
        if not config.tie_embeddings:
            m["lm_head.weight"] = "lm_head.weight"
        return m
    gpt1 = model_type == "openai-gpt"
    m = {"wte.weight": "transformer." + ("tokens_embed" if gpt1 else "wte") + ".weight",
         "wpe.weight": "transformer." + ("positions_embed" if gpt1 else "wpe") + ".weight"}
    if not gpt1:
        m |= {"norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}
    for i in range(config.n_layer):
        a, b = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"),
                             ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
            m |= {f"{a}{ours}.weight": f"{b}{theirs}.weight", f"{a}{ours}.bias": f"{b}{theirs}.bias"}
    if not config.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


# GPT-1/2 store linear weights as Conv1D, [in, out]: the transpose of ours.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _to_ours(model_type: str, config: GPTConfig, theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for ours, name in _key_map(model_type, config).items():
        t = theirs[name]
        state[ours] = t.t().contiguous() if name.endswith(_CONV1D) else t
    if model_type in ROPE_FAMILY:  # fuse q/k/v and gate/up into one matmul each
        for i in range(config.n_layer):
            b = f"model.layers.{i}."
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([theirs[b + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            state[f"blocks.{i}.mlp.fc.weight"] = torch.cat([theirs[b + "mlp.gate_proj.weight"], theirs[b + "mlp.up_proj.weight"]])
            if config.bias:
                state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([theirs[b + f"self_attn.{x}_proj.bias"] for x in "qkv"])
                state[f"blocks.{i}.attn.proj.bias"] = theirs[b + "self_attn.o_proj.bias"]
                state[f"blocks.{i}.mlp.fc.bias"] = torch.cat([theirs[b + "mlp.gate_proj.bias"], theirs[b + "mlp.up_proj.bias"]])
                state[f"blocks.{i}.mlp.proj.bias"] = theirs[b + "mlp.down_proj.bias"]
    return state


def _to_theirs(model_type: str, config: GPTConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, theirs in _key_map(model_type, config).items():
        t = ours[name]
        state[theirs] = t.t().contiguous() if theirs.endswith(_CONV1D) else t
    if model_type in ROPE_FAMILY:
        q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
        for i in range(config.n_layer):
            a, b = f"blocks.{i}.", f"model.layers.{i}."
            for suffix in ("weight", "bias") if config.bias else ("weight",):
                for x, part in zip("qkv", ours[f"{a}attn.qkv.{suffix}"].split([q, kv, kv])):
                    state[f"{b}self_attn.{x}_proj.{suffix}"] = part.contiguous()
                gate, up = ours[f"{a}mlp.fc.{suffix}"].chunk(2)
                state[f"{b}mlp.gate_proj.{suffix}"], state[f"{b}mlp.up_proj.{suffix}"] = gate.contiguous(), up.contiguous()
            if config.bias:
                state[f"{b}self_attn.o_proj.bias"] = ours[f"{a}attn.proj.bias"]
                state[f"{b}mlp.down_proj.bias"] = ours[f"{a}mlp.proj.bias"]
    return state


def load(src: str | Path) -> GPT:
    """A gptkit GPT holding the weights of a transformers checkpoint (directory, or hub name when online)."""
    return _load(src)[0]


def looks_local(src: str | Path) -> bool:
    """A path, not a hub name ("gpt2", "org/name"): absolute, relative with ./ ../ ~, or deeper than org/name."""
    text = str(src)
    return isinstance(src, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def _load(src: str | Path) -> tuple[GPT, Tokenizer | None]:
    if looks_local(src) and not Path(src).expanduser().exists():
        raise ConversionError(f"no such directory: {src}")  # before transformers tries the network
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read a transformers config from {src}: {str(e).splitlines()[0]}") from None
    t = hf_config.model_type
    _require(t in SUPPORTED, f"unsupported transformers architecture {t!r}; supported: {', '.join(SUPPORTED.values())}")
    try:
        config = _hf_config_to_ours(hf_config)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    tokenizer = _load_tokenizer(src)  # before the weights: a broken tokenizer fails fast
    hf_model = getattr(transformers, SUPPORTED[t]).from_pretrained(str(src), dtype=torch.float32)
    model = GPT(config)
    state = _to_ours(t, config, hf_model.state_dict())
    checkpoint.check_state(model, state, src)
    model.load_state_dict(state)
    return model.eval(), tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt", "special_tokens_map.json")


def _load_tokenizer(src) -> Tokenizer | None:
    """The checkpoint's tokenizer with its BOS / EOS, whether documents start with BOS, and its chat template; None
    only where a local directory has no tokenizer file at all. Any other failure is an error naming the file."""
    present = [f for f in TOKENIZER_FILES if (Path(src).expanduser() / f).exists()] if looks_local(src) else None
    if present == []:
        return None
    where = Path(src) / present[0] if present else src
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # transformers and the Rust side raise anything from OSError to plain Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{where}: the tokenizer cannot be read ({first})") from None
    if not getattr(tok, "is_fast", False):
        raise ConversionError(f"{where}: a {type(tok).__name__} without tokenizer.json; gptkit reads the fast "
                              f"(tokenizers) form only")
    template = tok.chat_template
    if isinstance(template, dict):  # several named templates: transformers' default is "default"
        template = template.get("default")
    if template is not None:
        ChatTemplate(template, origin=f"{src}'s chat template")  # compiles, or says why, before anything is written
    bos = tok.bos_token if tok.bos_token_id is not None else None
    add_bos = bos is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]  # what its post-processor does
    try:
        return Tokenizer(tok.backend_tokenizer, bos=bos, eos=tok.eos_token if tok.eos_token_id is not None else None,
                         add_bos=add_bos, chat_template=template)
    except GptkitError as e:
        raise ConversionError(f"{where}: {e}") from None


def convert_from_hf(src: str | Path, out: Path) -> Path:
    model, tokenizer = _load(src)
    if tokenizer is not None:
        try:
            checkpoint.check_tokenizer(model, tokenizer, src)  # before writing: gptkit.load would refuse the pair
        except checkpoint.CheckpointError as e:
            raise ConversionError(str(e)) from None
    checkpoint.save(out, model, tokenizer)
    return Path(out)


def _architecture(c: GPTConfig) -> str:
    _require(not c.local_layers, "banded attention layers have no transformers equivalent among GPT-2/GPT-1/Llama")
    if c.pos == "rope":
        _require(c.norm == "rmsnorm" and c.prenorm and c.activation == "swiglu",
                 "a RoPE model converts to Llama or Qwen3 only with RMSNorm, pre-norm and SwiGLU")
        _require(not (c.qk_norm and c.bias), "a QK-norm model converts to Qwen3 only without biases")
        return "qwen3" if c.qk_norm else "llama"
    _require(not c.qk_norm, "QK-norm with learned positions has no transformers equivalent")
    _require(c.head_size is None, "GPT-2 and GPT-1 in transformers have no head size other than n_embd / n_head")
    _require(c.norm == "layernorm" and c.bias and c.activation in ("gelu", "gelu_tanh"),
             "a learned-position model converts to GPT-2/GPT-1 only with LayerNorm, biases and GELU")
    return "gpt2" if c.prenorm else "openai-gpt"


def convert_to_hf(src: Path, out: Path, dequantize: bool = False) -> Path:
    """Write a gptkit checkpoint as a transformers checkpoint directory (`from_pretrained` loads it). A quantized
    checkpoint is refused unless `dequantize`: transformers has no loader for gptkit's integer blocks."""
    import transformers

    record = checkpoint.quantization(src)
    _require(not record or dequantize, f"{src} is quantized ({record and record['bits']}-bit) and transformers "
             "cannot read its integer weights: convert the floating-point checkpoint it came from, or pass "
             "--dequantize to write the quantized values as floats")
    model = checkpoint.load_model(src)
    if record:
        from . import quantize

        quantize.dequantize(model)
    tokenizer = checkpoint.load_tokenizer(src)
    c = model.config
    t = _architecture(c)
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(c.activation)
    eot_id = tokenizer.special.get(EOT) if tokenizer is not None else None  # never a default id past the vocabulary
    common = dict(vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings, bos_token_id=eot_id,
                  eos_token_id=eot_id, pad_token_id=None)
    if t == "llama":
        hf_config = transformers.LlamaConfig(
            **common, hidden_size=c.n_embd, intermediate_size=c.hidden, num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, head_dim=c.head_dim,
            max_position_embeddings=c.context, rms_norm_eps=c.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attention_bias=c.bias, mlp_bias=c.bias)
    elif t == "qwen3":
        hf_config = transformers.Qwen3Config(
            **common, hidden_size=c.n_embd, intermediate_size=c.hidden, num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, head_dim=c.head_dim,
            max_position_embeddings=c.context, rms_norm_eps=c.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attention_bias=False,
            use_sliding_window=False)
    elif t == "gpt2":
        hf_config = transformers.GPT2Config(**common, n_positions=c.context, n_embd=c.n_embd, n_layer=c.n_layer,
                                            n_head=c.n_head, n_inner=c.mlp_hidden, activation_function=act,
                                            layer_norm_epsilon=c.norm_eps)
    else:
        hf_config = transformers.OpenAIGPTConfig(**common, n_positions=c.context, n_embd=c.n_embd, n_layer=c.n_layer,
                                                 n_head=c.n_head, afn=act, layer_norm_epsilon=c.norm_eps)
        _require(c.mlp_hidden in (None, 4 * c.n_embd), "GPT-1 in transformers has a fixed 4x MLP width")
    hf_model = getattr(transformers, SUPPORTED[t])(hf_config)
    missing, unexpected = hf_model.load_state_dict(_to_theirs(t, c, model.state_dict()), strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]  # tied to the embedding
    _require(not missing and not unexpected, f"conversion left {missing or unexpected} unmatched")
    hf_model.save_pretrained(str(out))
    if tokenizer is not None:
        eot = EOT if EOT in tokenizer.special else None
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.engine, eos_token=tokenizer.eos or eot, bos_token=tokenizer.bos or eot)
        if tokenizer.chat_template is not None:
            fast.chat_template = tokenizer.chat_template
        fast.save_pretrained(str(out))
    return Path(out)
