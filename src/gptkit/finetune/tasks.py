"""GPT-1's task fine-tuning: input transformations, a linear head on the extract token, auxiliary LM loss.

  classify: <start> text <extract>                       entail: <start> premise <delim> hypothesis <extract>
  similar:  both orders of <start> a <delim> b <extract>, hidden states summed
  choice:   <start> context <delim> option <extract> per option, one shared scalar head, softmax over options
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import GptkitError
from .. import checkpoint, files
from ..config import check_fields
from ..model import GPT
from ..tokenizer import Tokenizer
from ..train.loss import IGNORE_INDEX
from ..train.loss import lm_loss as language_model_loss
from .data import Example
from .fit import finetune_loop, finished
from .lora import apply_lora, lora_state, merge_lora

POOLS = ("last", "mean")
SPECIAL = ("<|start|>", "<|delim|>", "<|extract|>")
TASK_FILE, HEAD_FILE, ADAPTER_FILE, ADAPTER_META = "task.json", "head.safetensors", "adapter.safetensors", "adapter.json"


class FinetuneError(GptkitError):
    """Fine-tuning settings or inputs that cannot work."""


@dataclass(frozen=True)
class TaskSpec:
    task: str
    labels: tuple[str, ...] = ()  # class names in head order (empty for choice)
    pool: str = "last"  # features: the extract token's hidden state (GPT-1), or the mean over the sequence

    @property
    def outputs(self) -> int:
        return 1 if self.task == "choice" else len(self.labels)


class TaskModel(nn.Module):
    def __init__(self, gpt: GPT, spec: TaskSpec):
        super().__init__()
        self.gpt, self.spec = gpt, spec
        self.head = nn.Linear(gpt.config.n_embd, spec.outputs, device=gpt.wte.weight.device)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: list[list[list[int]]], lm: bool = True,
                unigram: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Task logits [B, classes or options] and the LM loss over all input tokens (None unless `lm`;
        a sampled softmax given the `unigram` token frequencies)."""
        seqs = [s for example in batch for s in example]
        device = self.gpt.wte.weight.device
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        h = self.gpt.hidden_states(ids)  # right padding: a causal model's real positions never see it
        real = torch.arange(T, device=device)[None] < lengths[:, None]  # [B, T]: not padding
        if self.spec.pool == "mean":
            feats = (h * real.unsqueeze(-1)).sum(1) / lengths[:, None]
        else:
            feats = h[torch.arange(len(seqs), device=device), lengths - 1]
        lm_loss = None
        if lm:  # the vocabulary-sized projection is most of a small model's cost: skip it when unused
            targets = ids[:, 1:].masked_fill(~real[:, 1:], IGNORE_INDEX)
            lm_loss = language_model_loss(h[:, :-1], self.gpt.head_weight(), targets, unigram)
        counts = [len(example) for example in batch]
        if self.spec.task == "similar":  # both orders, summed
            return self.head(feats.view(len(batch), 2, -1).sum(1)), lm_loss
        if self.spec.task == "choice":
            scores = self.head(feats).squeeze(-1).split(counts)
            k = max(counts)
            return torch.stack([F.pad(s, (0, k - len(s)), value=-math.inf) for s in scores]), lm_loss
        return self.head(feats), lm_loss


def grow_vocab(gpt: GPT, tokenizer: Tokenizer, tokens: tuple[str, ...]) -> tuple[GPT, Tokenizer, int]:
    """Append special `tokens` to the vocabulary; new embedding rows start at N(0, 0.02). Returns the model,
    the tokenizer and the first new token id (earlier rows are the pre-trained ones; with a vocabulary padded
    past the tokenizer's, the new tokens take padding rows, which are not pre-trained either)."""
    first_new = tokenizer.vocab_size
    tokenizer = tokenizer.add_special_tokens(tokens)
    old = gpt.config.vocab_size
    if tokenizer.vocab_size > old:
        grown = GPT(gpt.config.replace(vocab_size=tokenizer.vocab_size)).to(gpt.wte.weight.device)
        state = gpt.state_dict()
        for name in ("wte.weight", "lm_head.weight"):
            if name in state:
                rows = grown.state_dict()[name].clone()
                rows[:old] = state[name]
                state[name] = rows
        grown.load_state_dict(state)
        gpt = grown.train(gpt.training)
    return gpt, tokenizer, first_new


def prepare_base(base: str | Path, cfg: TuneConfig, tokens: tuple[str, ...]) -> tuple[GPT, Tokenizer, int]:
    """The base checkpoint ready to fine-tune: seeded, `tokens` added to its vocabulary, and with LoRA
    (cfg.lora_rank > 0) only the adapters and the new tokens' embedding rows left trainable."""
    record = checkpoint.quantization(base)
    if record:
        raise FinetuneError(f"{base} is quantized ({record['bits']}-bit) and training needs floating-point weights: "
                            f"fine-tune the checkpoint it was quantized from (LoRA keeps that cheap: --lora-rank 8), "
                            f"then quantize the result")
    torch.manual_seed(cfg.seed)
    gpt = checkpoint.load_model(base, cfg.device, **({} if cfg.dropout is None else {"dropout": cfg.dropout}))
    gpt.train()
    tokenizer = checkpoint.load_tokenizer(base)
    if tokenizer is None:
        raise FinetuneError(f"{base} has no tokenizer")
    if cfg.from_scratch:
        gpt.init_weights(cfg.seed)
    gpt, tokenizer, first_new = grow_vocab(gpt, tokenizer, tokens)
    if cfg.lora_rank:
        apply_lora(gpt, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
        wte = gpt.wte.weight
        wte.requires_grad_(True)
        wte.register_hook(lambda g: torch.cat([torch.zeros_like(g[:first_new]), g[first_new:]]))
    return gpt, tokenizer, first_new


def encode(tokenizer: Tokenizer, spec: TaskSpec, fields: dict, context: int) -> list[list[int]]:
    s, d, x = (tokenizer.special[t] for t in SPECIAL)

    def framed(first: list[int], rest: list[int]) -> list[int]:  # <start> first rest <extract>, first cut to fit
        room = context - len(rest) - 2
        return [s] + first[-room:] + rest + [x] if room > 0 else [s] + rest[-(context - 2):] + [x]

    enc = tokenizer.encode
    if spec.task == "classify":
        return [framed(enc(fields["text"]), [])]
    if spec.task == "entail":
        return [framed(enc(fields["premise"]), [d] + enc(fields["hypothesis"]))]
    if spec.task == "similar":
        a, b = enc(fields["text_a"]), enc(fields["text_b"])
        return [framed(a, [d] + b), framed(b, [d] + a)]
    return [framed(enc(fields["context"]), [d] + enc(o)) for o in fields["options"]]


def label_index(spec: TaskSpec, example: Example) -> int:
    if spec.task == "choice":
        return int(example.label)
    if example.label not in spec.labels:
        raise FinetuneError(f"label {example.label!r} is not one of the trained labels: {', '.join(spec.labels)}")
    return spec.labels.index(example.label)


@torch.no_grad()
def accuracy(model: TaskModel, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32) -> float:
    model.eval()
    right = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        seqs = [encode(tokenizer, model.spec, e.fields, model.gpt.config.context) for e in chunk]
        logits, _ = model(seqs, lm=False)
        right += sum(int(p) == label_index(model.spec, e) for p, e in zip(logits.argmax(-1).tolist(), chunk))
    model.train()
    return right / len(examples)


def length_batches(items: list[tuple[list[list[int]], int]], batch_size: int, rng: random.Random,
                   window: int = 50) -> list[list]:
    """Batches in random order, each of similar-length examples (sorted within windows of `window` batches):
    little padding, so far less compute than purely random batches, with nearly the same randomness."""
    items = items[:]
    rng.shuffle(items)
    batches = []
    for i in range(0, len(items), batch_size * window):
        group = sorted(items[i:i + batch_size * window], key=lambda item: max(map(len, item[0])))
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class TuneConfig:
    """What every fine-tuning run has, task heads and SFT alike (the CLI's flags are made from these fields)."""
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    dropout: float | None = None  # None: the base model's (GPT-1 fine-tuned with 0.1)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    patience: int = 2  # epochs without a better validation score before stopping
    clip_norm: float = 1.0  # gradient clipping
    eval_batch: int = 32  # sequences per validation batch
    from_scratch: bool = False  # re-initialise the base weights (a baseline)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        check_fields(self, FinetuneError)
        checks = [(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
                  (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
                  (self.eval_batch >= 1, f"eval_batch must be at least 1, got {self.eval_batch}"),
                  (self.lr > 0, f"lr must be positive, got {self.lr}"),
                  (self.patience >= 1, f"patience must be at least 1, got {self.patience}"),
                  (self.clip_norm > 0, f"clip_norm must be positive, got {self.clip_norm}"),
                  (self.lora_rank >= 0, f"lora_rank must be 0 or more, got {self.lora_rank}"),
                  (self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")]
        for ok, msg in checks:
            if not ok:
                raise FinetuneError(msg)


@dataclass
class FinetuneConfig(TuneConfig):
    """A GPT-1 task head's fine-tuning."""
    task: str = "classify"
    lm_weight: float = 0.5  # GPT-1's auxiliary language-modelling loss
    sampled_softmax: bool = False  # that loss over each batch's own targets only (cheaper for small models)
    pool: str = "last"  # "last": GPT-1's extract token; "mean": the average hidden state


@dataclass
class SFTConfig(TuneConfig):
    """Instruction / chat fine-tuning: the shared fields only."""


HELP = {  # the CLI's help for the fields above
    "epochs": "passes over the training examples", "batch_size": "examples per step", "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay", "dropout": "dropout while fine-tuning (default: the base model's)",
    "lora_rank": "> 0: train LoRA adapters of this rank instead of all weights", "lora_alpha": "LoRA scale",
    "lora_targets": "comma-separated linear layers LoRA adapts", "patience": "epochs without improvement before "
    "stopping", "clip_norm": "gradient clipping norm", "eval_batch": "sequences per validation batch",
    "from_scratch": "re-initialise the base weights (a baseline)", "seed": "random seed", "device": "cpu, cuda, ...",
    "lm_weight": "auxiliary LM loss weight (GPT-1: 0.5)", "sampled_softmax": "the auxiliary LM loss over each "
    "batch's own tokens only (cheaper for small models)", "pool": "classifier features: the extract token's hidden "
    "state (GPT-1: last) or the sequence mean"}


def finetune(base: str | Path, train: list[Example], val: list[Example], out: str | Path,
             cfg: FinetuneConfig, quiet: bool = False, resume: bool = False) -> dict:
    """Fine-tune the checkpoint `base` for a task; keep the best validation epoch in `out`. Every epoch is
    checkpointed: `resume=True` continues a killed run from its last epoch."""
    rng = random.Random(cfg.seed)
    labels = () if cfg.task == "choice" else tuple(sorted({e.label for e in train}))
    if cfg.pool not in POOLS:
        raise FinetuneError(f"pool must be one of {', '.join(POOLS)}, not {cfg.pool!r}")
    spec = TaskSpec(cfg.task, labels, cfg.pool)
    if cfg.task != "choice" and len(labels) < 2:
        raise FinetuneError("the training data has fewer than two labels")
    gpt, tokenizer, first_new = prepare_base(base, cfg, SPECIAL)
    model = TaskModel(gpt, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable) - (first_new * gpt.config.n_embd if cfg.lora_rank else 0)
    decay = [p for p in trainable if p.dim() == 2 and not (cfg.lora_rank and p is gpt.wte.weight)]
    rest = [p for p in trainable if not any(p is q for q in decay)]
    ctx = gpt.config.context
    encoded = [(encode(tokenizer, spec, e.fields, ctx), label_index(spec, e)) for e in train]
    unigram = None
    if cfg.sampled_softmax:
        counts = torch.bincount(torch.tensor([t for seqs, _ in encoded for s in seqs for t in s[1:]]),
                                minlength=gpt.config.vocab_size).float()
        unigram = (counts / counts.sum()).to(gpt.wte.weight.device)

    def loss(chunk) -> Tensor:
        logits, lm_loss = model([seqs for seqs, _ in chunk], lm=cfg.lm_weight > 0, unigram=unigram)
        value = F.cross_entropy(logits, torch.tensor([y for _, y in chunk], device=logits.device))
        return value if lm_loss is None else value + cfg.lm_weight * lm_loss

    result = finetune_loop(model, [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                 cfg.lr, cfg.epochs, cfg.patience, lambda r: length_batches(encoded, cfg.batch_size, r), loss,
                 lambda: {"val_accuracy": accuracy(model, tokenizer, val, cfg.eval_batch)}, "val_accuracy", rng,
                 Path(out), run_identity(base, cfg, labels), warmup=0.02, clip=cfg.clip_norm, resume=resume, quiet=quiet)
    save_task(model, tokenizer, Path(out), base=Path(base), lora=cfg if cfg.lora_rank else None, first_new=first_new)
    finished(out)
    return {"val_accuracy": result.best, "epochs": result.history, "trainable_params": n_trainable,
            "total_params": sum(p.numel() for p in model.parameters())}


def run_identity(base: str | Path, cfg: TuneConfig, labels: tuple = ()) -> dict:
    """What a resumed fine-tuning run must share with the one it continues (more epochs are fine)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("epochs", "patience", "device")}
    return {"base": str(Path(base).resolve()), "labels": list(labels), **settings}


def save_task(model: TaskModel, tokenizer: Tokenizer, out: Path, base: Path | None = None,
              lora: FinetuneConfig | None = None, first_new: int = 0) -> None:
    task = json.dumps({"task": model.spec.task, "labels": list(model.spec.labels), "pool": model.spec.pool}) + "\n"
    head = {f"head.{k}": v.contiguous() for k, v in model.head.state_dict().items()}
    if lora is None:
        checkpoint.save(out, model.gpt, tokenizer, extra={TASK_FILE: task, HEAD_FILE: lambda p: save_file(head, str(p))})
        return
    adapter = {**{f"gpt.{k}": v.contiguous() for k, v in lora_state(model.gpt).items()}, **head,
               "task_token_rows": model.gpt.wte.weight[first_new:].detach().contiguous()}
    meta = {"base": str(base.resolve()), "base_sha256": checkpoint.weights_sha256(base), "rank": lora.lora_rank,
            "alpha": lora.lora_alpha,
            "targets": list(lora.lora_targets), "first_task_token": first_new}
    files.commit(out, {ADAPTER_FILE: lambda p: save_file(adapter, str(p)), ADAPTER_META: json.dumps(meta),
                       TASK_FILE: task, **tokenizer.files()})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{path} is not valid JSON: {e}") from None


def load_task(path: str | Path, device: str = "cpu") -> tuple[TaskModel, Tokenizer]:
    """A fine-tuned task model: a full checkpoint with task.json, or a LoRA adapter directory."""
    path = Path(path)
    if not (path / TASK_FILE).exists():
        raise FinetuneError(f"{path} is not a fine-tuned task model (no {TASK_FILE})")
    d = _read_json(path / TASK_FILE)
    spec = TaskSpec(d["task"], tuple(d["labels"]), d.get("pool", "last"))
    tokenizer = Tokenizer.load(path)
    if (path / ADAPTER_META).exists():
        meta = _read_json(path / ADAPTER_META)
        if meta.get("base_sha256") not in (None, checkpoint.weights_sha256(meta["base"])):
            raise FinetuneError(f"{path} was trained on other weights than those now in {meta['base']}; "
                                f"restore that base, or fine-tune again")
        gpt = checkpoint.load_model(meta["base"], device)
        gpt, _, _ = grow_vocab(gpt, checkpoint.load_tokenizer(meta["base"]), SPECIAL)
        apply_lora(gpt, tuple(meta["targets"]), meta["rank"], meta["alpha"])
        weights = load_file(str(path / ADAPTER_FILE), device=device)
        with torch.no_grad():
            gpt.wte.weight[meta["first_task_token"]:] = weights.pop("task_token_rows")
    else:
        gpt = checkpoint.load_model(path, device)
        weights = load_file(str(path / HEAD_FILE), device=device)
    model = TaskModel(gpt, spec)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(k.startswith("head.") or ".lora_" in k for k in missing):
        raise FinetuneError(f"{path}: task weights do not match the model")
    return model.eval(), tokenizer


def merge(adapter_dir: str | Path, out: str | Path) -> Path:
    """A LoRA adapter folded into its base: a plain task checkpoint."""
    model, tokenizer = load_task(adapter_dir)
    merge_lora(model.gpt)
    save_task(model, tokenizer, Path(out))
    return Path(out)


@torch.no_grad()
def predict(model: TaskModel, tokenizer: Tokenizer, fields: dict) -> tuple[str, dict[str, float]]:
    """(predicted label, probability of each label or option)."""
    logits, _ = model([encode(tokenizer, model.spec, fields, model.gpt.config.context)], lm=False)
    probs = logits[0].softmax(-1).tolist()
    names = model.spec.labels or tuple(str(i) for i in range(len(probs)))
    best = max(range(len(probs)), key=probs.__getitem__)
    return names[best], dict(zip(names, probs))

