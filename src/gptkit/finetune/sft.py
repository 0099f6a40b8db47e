"""Instruction / chat fine-tuning (SFT): conversations in the tokenizer's chat template, loss on the
assistant's tokens only, right padding with a loss mask."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .. import checkpoint
from .. import chat_template
from ..model import GPT
from ..tokenizer import CHAT_TOKENS, Tokenizer
from ..train.loss import IGNORE_INDEX, model_loss
from .data import read_text
from .fit import finetune_loop, finished
from .lora import merge_lora
from .tasks import FinetuneError, TuneConfig, prepare_base, run_identity


def _messages(line: str) -> list[dict]:
    """One JSONL line's conversation, or a FinetuneError saying what is wrong with it."""
    try:
        messages = json.loads(line)["messages"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise FinetuneError("not a JSON object with a messages list") from None
    if not (isinstance(messages, list) and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                               and isinstance(m.get("content"), str) for m in messages)):
        raise FinetuneError("messages must be a list of {role: system|user|assistant, content: text}")
    if not any(m["role"] == "assistant" for m in messages):
        raise FinetuneError("the conversation has no assistant turn to learn from")
    return messages


def load_conversations(path: str | Path, skip_bad: bool = False) -> list[list[dict]]:
    """JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line, with an assistant turn."""
    conversations = []
    for n, line in enumerate(read_text(Path(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            conversations.append(_messages(line))
        except FinetuneError as e:
            if not skip_bad:
                raise FinetuneError(f"{path}:{n}: {e}") from None
    if not conversations:
        raise FinetuneError(f"{path} has no conversations")
    return conversations


def encode_conversation(tokenizer: Tokenizer, messages: list[dict], context: int) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 on the assistant's content and its end token), cut to the context:
    the tokenizer's chat template, the same one serving uses."""
    ids, mask = chat_template.encode_chat(tokenizer, messages, with_mask=True, reply=False)
    return ids[:context + 1], mask[:context + 1]


def sft_loss(gpt: GPT, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    T = max(len(ids) for ids, _ in batch)
    device = gpt.wte.weight.device
    ids = torch.tensor([i + [0] * (T - len(i)) for i, _ in batch], device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for _, m in batch], device=device)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)  # predict assistant tokens only
    return model_loss(gpt, ids[:, :-1], targets)


def sft(base: str | Path, train: list[list[dict]], val: list[list[dict]], out: str | Path,
        cfg: TuneConfig, quiet: bool = False, resume: bool = False) -> dict:
    """Fine-tune `base` on conversations; the best validation epoch is saved as a plain checkpoint (LoRA
    adapters are merged in, so `gptkit chat` and `gptkit serve` use it as it is). Every epoch is
    checkpointed: `resume=True` continues a killed run from its last epoch."""
    rng = random.Random(cfg.seed)
    gpt, tokenizer, _ = prepare_base(base, cfg, CHAT_TOKENS)
    trainable = [p for p in gpt.parameters() if p.requires_grad]
    ctx = gpt.config.context
    data = [encode_conversation(tokenizer, m, ctx) for m in train]
    held = [encode_conversation(tokenizer, m, ctx) for m in val]

    def batches(r: random.Random) -> list:
        order = data[:]
        r.shuffle(order)
        return [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]

    def evaluate() -> dict:
        n = cfg.eval_batch
        loss = sum(sft_loss(gpt, held[i:i + n]).item() * len(held[i:i + n]) for i in range(0, len(held), n))
        return {"val_loss": loss / len(held)}

    group = {"params": trainable, "weight_decay": 0.0 if cfg.lora_rank else cfg.weight_decay}
    result = finetune_loop(gpt, [group], cfg.lr, cfg.epochs, cfg.patience, batches, lambda b: sft_loss(gpt, b), evaluate,
                 "val_loss", rng, Path(out), run_identity(base, cfg), lower_is_better=True, clip=cfg.clip_norm,
                 resume=resume, quiet=quiet)
    merge_lora(gpt)
    checkpoint.save(out, gpt.eval(), tokenizer)
    finished(out)
    return {"val_loss": result.best, "epochs": result.history}
