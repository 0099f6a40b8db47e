"""gptkit: build, train, fine-tune, evaluate and serve GPT-family models."""

from pathlib import Path

from . import checkpoint
from .checkpoint import CheckpointError, load_model, load_tokenizer
from .config import PRESETS, ConfigError, GPTConfig, preset
from .engine import LM
from .generate import GenerationError, SamplingParams
from .model import GPT
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["GPT", "GPTConfig", "PRESETS", "preset", "Tokenizer", "LM", "SamplingParams", "load", "checkpoint",
           "CheckpointError", "ConfigError", "GenerationError", "TokenizerError"]


def load(path: str | Path, device: str = "cpu", dtype: str = "fp32") -> LM:
    """A checkpoint directory, or a llama.cpp GGUF file, as a ready-to-use language model:
    `gptkit.load(path).generate("Hello")`. On CPU its engine decodes with the native kernels where the model's
    layers allow. `dtype`: fp32, bf16 or fp16 for the floating-point weights and activations, where the device
    computes in it natively (quantized weights stay integers: a GGUF's Q8_0 / Q4_0 blocks as they are, see
    `gguf.read`)."""
    compute = checkpoint.check_dtype(dtype, checkpoint.check_device(device))  # before reading a large file
    if Path(path).suffix.lower() == ".gguf":
        from . import gguf

        model, tokenizer = gguf.read(Path(path))
        return LM(model.to(device).to(compute), tokenizer)
    tokenizer = load_tokenizer(path) if Path(path).is_dir() else None
    model = load_model(path, device).to(compute)
    if tokenizer is None:
        raise CheckpointError(f"{path} has no tokenizer file, so it cannot turn text into tokens")
    checkpoint.check_tokenizer(model, tokenizer, path)
    return LM(model, tokenizer)
