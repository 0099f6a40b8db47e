"""Instruction / chat fine-tuning (SFT): conversations in the tokenizer's chat template, loss on the
assistant's tokens only, right padding with a loss mask."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import torch

from .. import checkpoint
from ..model import GPT
from ..tokenizer import CHAT_TOKENS, Tokenizer
from .data import read_text
from .lora import merge_lora
from .tasks import FinetuneConfig, FinetuneError, prepare_base


def load_conversations(path: str | Path, skip_bad: bool = False) -> list[list[dict]]:
    """JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line, with an assistant turn."""
    conversations = []
    for n, line in enumerate(read_text(Path(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            ok = isinstance(messages, list) and all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and
                isinstance(m.get("content"), str) for m in messages)
            if not ok:
                raise ValueError("messages must be a list of {role: system|user|assistant, content: text}")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError("the conversation has no assistant turn to learn from")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if skip_bad:
                continue
            reason = str(e) if isinstance(e, ValueError) and not isinstance(e, json.JSONDecodeError) else \
                "not a JSON object with a messages list"
            raise FinetuneError(f"{path}:{n}: {reason}") from None
        conversations.append(messages)
    if not conversations:
        raise FinetuneError(f"{path} has no conversations")
    return conversations


def encode_conversation(tokenizer: Tokenizer, messages: list[dict], context: int) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 on the assistant's content and its end token), cut to the context."""
    start, end = (tokenizer.special[t] for t in CHAT_TOKENS)
    ids, mask = [], []
    for m in messages:
        head = [start] + tokenizer.encode(m["role"] + "\n")
        body = tokenizer.encode(m["content"]) + [end]
        learn = m["role"] == "assistant"
        ids += head + body + tokenizer.encode("\n")
        mask += [0] * len(head) + [int(learn)] * len(body) + [0]
    return ids[:context + 1], mask[:context + 1]


def sft_loss(gpt: GPT, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    T = max(len(ids) for ids, _ in batch)
    device = gpt.wte.weight.device
    ids = torch.tensor([i + [0] * (T - len(i)) for i, _ in batch], device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for _, m in batch], device=device)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # predict assistant tokens only
    return gpt(ids[:, :-1], targets=targets)


def sft(base: str | Path, train: list[list[dict]], val: list[list[dict]], out: str | Path,
        cfg: FinetuneConfig, quiet: bool = False) -> dict:
    """Fine-tune `base` on conversations; the best validation epoch is saved as a plain checkpoint (LoRA
    adapters are merged in, so `gptkit chat` and `gptkit serve` use it as it is)."""
    rng = random.Random(cfg.seed)
    gpt, tokenizer, _ = prepare_base(base, cfg, CHAT_TOKENS)
    trainable = [p for p in gpt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0 if cfg.lora_rank else cfg.weight_decay)
    ctx = gpt.config.context
    data = [encode_conversation(tokenizer, m, ctx) for m in train]
    held = [encode_conversation(tokenizer, m, ctx) for m in val]
    steps = cfg.epochs * math.ceil(len(data) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    best, best_state, history, stale = math.inf, None, [], 0
    for epoch in range(cfg.epochs):
        rng.shuffle(data)
        for i in range(0, len(data), cfg.batch_size):
            sft_loss(gpt, data[i:i + cfg.batch_size]).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
        gpt.eval()
        with torch.no_grad():
            val_loss = sum(sft_loss(gpt, held[i:i + 32]).item() * len(held[i:i + 32])
                           for i in range(0, len(held), 32)) / len(held)
        gpt.train()
        history.append({"epoch": epoch + 1, "val_loss": val_loss})
        if not quiet:
            print(f"epoch {epoch + 1}: val loss on assistant tokens {val_loss:.4f}")
        if val_loss < best:
            best, stale, best_state = val_loss, 0, copy.deepcopy(gpt.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    gpt.load_state_dict(best_state)
    merge_lora(gpt)
    checkpoint.save(out, gpt.eval(), tokenizer)
    return {"val_loss": best, "epochs": history}
