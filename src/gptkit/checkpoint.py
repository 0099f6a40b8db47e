"""Checkpoint directories: config.json + model.safetensors + tokenizer file(s), written as one commit (files.py):
a reader sees the whole of one checkpoint, or is told which file does not belong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import files
from .config import ConfigError, GPTConfig
from .errors import GptkitError
from .model import GPT, Records, rope_tables
from .chat_template import ChatTemplate
from .tokenizer import Tokenizer, TokenizerError, TokenizerNotFound

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class CheckpointError(GptkitError):
    """A checkpoint directory that is missing, corrupt, or does not match its config."""


def model_files(model: GPT, tokenizer: Tokenizer | None = None,
                state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, str | files.Writer]:
    """The writers for a model's (and its tokenizer's) files in a checkpoint directory. `state_dict`: the
    full weights when the model's own are sharded."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    written = {
        WEIGHTS_FILE: lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        CONFIG_FILE: json.dumps(config_record(model), indent=2) + "\n",
    }
    if tokenizer is not None:
        written |= tokenizer.files()
    return written


RECORDS = tuple(f.name for f in dataclasses.fields(Records))  # what config.json says of the weights beside the config


def config_record(model: GPT) -> dict:
    """What config.json holds: the model's config, and the records of what was done to its weights (how they
    are quantized, how they were pruned)."""
    records = {k: v for k, v in dataclasses.asdict(model.records).items() if v}
    return {**model.config.to_dict(), **records}


def save(directory: Path, model: GPT, tokenizer: Tokenizer | None = None,
         extra: dict[str, str | bytes | files.Writer] | None = None, meta: dict | None = None) -> None:
    """The model (and its tokenizer, and `extra` files) as one commit; `meta` (e.g. the step) goes in its manifest."""
    files.commit(directory, {**model_files(model, tokenizer), **(extra or {})}, meta)


def verify(directory: Path, names=None) -> dict | None:
    """The directory's last commit (finished if a kill interrupted it), its files checked: CheckpointError naming
    a file that does not belong."""
    try:
        return files.verify(directory, names)
    except files.CommitError as e:
        raise CheckpointError(str(e)) from None


def weights_sha256(directory: Path) -> str:
    """The content hash of a checkpoint's weights file (what an adapter records of its base)."""
    try:
        return files.sha256(Path(directory) / WEIGHTS_FILE)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}") from None


def _config_json(directory: Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a gptkit checkpoint")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: a config must be a JSON object of fields")
    return record


def load_config(directory: Path) -> GPTConfig:
    return _config(_config_json(directory), directory)


def _config(record: dict, directory: Path) -> GPTConfig:
    record = {k: v for k, v in record.items() if k not in RECORDS}
    try:
        return GPTConfig.from_dict(record, complete=True)
    except ConfigError as e:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: {e}") from None


def quantization(directory: Path) -> dict | None:
    """The checkpoint's quantization record (bits, group size, ...), None for floating-point weights."""
    return _config_json(directory).get("quantization")


def load_model(directory: Path, device: str | torch.device = "cpu", **overrides) -> GPT:
    """The checkpoint's model, in eval mode. `overrides` change config fields that the weights do not
    depend on (e.g. the dropout to fine-tune with)."""
    directory = Path(directory)
    device = check_device(device)
    if directory.is_dir():
        files.recover(directory)
    records = _config_json(directory)  # read once: the config and what was done to the weights
    config = _config(records, directory)
    if overrides:
        config = config.replace(**overrides)
    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    with torch.device("meta"):
        model = GPT(config)
    model.records = Records(pruning=records.get("pruning"))
    record = records.get("quantization")
    if record:  # quantized modules in place before the weights arrive: the fp32 ones never exist
        from . import quantize

        try:
            quantize.skeleton(model, record)
        except quantize.QuantizeError as e:
            raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    check_state(model, state, path)
    if record:
        state = quantize.arrange(state, record)
    model.load_state_dict(state, assign=True)
    if record:
        try:
            quantize.check_loaded(model)
        except quantize.QuantizeError as e:
            raise CheckpointError(f"{path} is corrupt: {e}") from None
    if config.pos == "rope":  # buffers are not saved: rebuild them on the real device
        model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(config))
    return model.eval()


def check_tokenizer(model: GPT, tokenizer: Tokenizer, source: object) -> None:
    """Every id the tokenizer can emit must have a row in the model's embedding."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; they do not belong together")


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine and this PyTorch build have it."""
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise CheckpointError(f"unknown device {str(device)!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device} asked for, but this PyTorch has no CUDA GPU to use "
                              f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU found'}); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CheckpointError("device mps asked for, but MPS is not available here; use --device cpu")
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` multiplies `dtype` in hardware: CUDA GPUs that support it, CPUs with AVX512-BF16 / AMX
    (bf16) or AVX512-FP16 / AMX-FP16 (fp16). Elsewhere it is emulated: bf16 autocast ran 17x slower than fp32 on
    an AVX2-only EPYC (330 vs 5,560 tokens/s training a 4 x 128 model)."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities() if device.type == "cpu" and hasattr(torch.cpu, "get_capabilities") else {}
    names = ("avx512_bf16", "amx_bf16") if dtype == torch.bfloat16 else ("avx512_fp16", "amx_fp16")
    return any(caps.get(n) for n in names)


def check_dtype(name: str, device: torch.device) -> torch.dtype:
    """The inference dtype called `name` (fp32, bf16, fp16), if `device` computes in it natively."""
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if not is_native(dtype, torch.device(device)):
        raise CheckpointError(f"{name} on this {torch.device(device).type.upper()} would be emulated, slower than "
                              f"fp32 (it has no native {name} arithmetic); use --dtype fp32")
    return dtype


def check_state(model: GPT, state: dict[str, torch.Tensor], source: object) -> None:
    """One-line error naming the first mismatches between a state dict and the model's parameters."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k} has shape {got[k]}, config expects {expected[k]}"
                 for k in expected if k in got and got[k] != expected[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source} does not match its config: {'; '.join(problems[:3])}{more}")


def load_tokenizer(directory: Path) -> Tokenizer | None:
    if Path(directory).is_dir():
        files.recover(directory)
    try:
        tokenizer = Tokenizer.load(directory)
        if tokenizer.chat_template is not None:  # compiled now: a broken template fails at load, naming the file
            ChatTemplate(tokenizer.chat_template, origin=f"{directory}'s chat template")
        return tokenizer
    except TokenizerNotFound:
        return None
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
