"""Evaluation: perplexity / bits per byte, zero-shot multiple choice, LAMBADA, classifier metrics, and
generation metrics (ROUGE-L via rouge-score, BLEU via sacrebleu)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import files
from .data import TokenShards
from .errors import GptkitError
from .model import GPT
from .tokenizer import Tokenizer


class EvalError(GptkitError):
    """An evaluation file that cannot be read, or does not fit the model."""


@torch.no_grad()
def perplexity(model: GPT, tokenizer: Tokenizer, text: str, stride: int | None = None) -> dict:
    """Sliding windows of the model's context, moved by `stride` (default: half a context); every token is
    scored once, with as much context as the window gives it."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise EvalError("the text has fewer than two tokens")
    context = model.config.context
    stride = max(1, context // 2) if stride is None else stride
    if not 0 < stride <= context:
        raise EvalError(f"stride must be in [1, {context}]")
    device = model.device
    nll, scored, start = 0.0, 1, 0  # the first token has nothing to be predicted from
    while scored < len(ids):
        end = min(len(ids), start + context)
        window = torch.tensor([ids[start:end]], device=device)
        logp = model(window)[0, :-1].float().log_softmax(-1)
        targets = window[0, 1:]
        new = end - scored  # tokens of this window not scored before
        nll -= logp[-new:].gather(1, targets[-new:, None]).sum().item()
        scored = end
        start = min(start + stride, end - 1)  # the next window still predicts its first new token
    n = len(ids) - 1
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": n, "nll_per_token": nll / n, "perplexity": math.exp(nll / n),
            "bits_per_byte": nll / math.log(2) / n_bytes}


@torch.no_grad()
def continuation_logprob(model: GPT, context_ids: list[int], continuation_ids: list[int]) -> float:
    """log P(continuation | context), summed over the continuation's tokens."""
    ids = (context_ids + continuation_ids)[-(model.config.context + 1):]
    x = torch.tensor([ids[:-1]], device=model.device)
    logp = model(x)[0].float().log_softmax(-1)
    n = len(continuation_ids)
    targets = torch.tensor(ids[-n:], device=logp.device)
    return logp[-n:].gather(1, targets[:, None]).sum().item()


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EvalError(f"{path}:{n}: not valid JSON") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise EvalError(f"{path}:{n}: missing {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path} has no rows")
    return rows


def multiple_choice(model: GPT, tokenizer: Tokenizer, rows: list[dict]) -> dict:
    """HellaSwag-style rows {ctx, endings, label}: pick the ending with the highest log-likelihood, raw and
    normalised by the ending's length in bytes (lm-evaluation-harness's acc_norm)."""
    right = right_norm = 0
    for row in rows:
        ctx = tokenizer.encode(row["ctx"])
        scores = [continuation_logprob(model, ctx, tokenizer.encode(" " + e.strip())) for e in row["endings"]]
        norm = [s / len((" " + e.strip()).encode()) for s, e in zip(scores, row["endings"])]
        right += max(range(len(scores)), key=scores.__getitem__) == int(row["label"])
        right_norm += max(range(len(norm)), key=norm.__getitem__) == int(row["label"])
    return {"examples": len(rows), "accuracy": right / len(rows), "accuracy_norm": right_norm / len(rows)}


@torch.no_grad()
def lambada(model: GPT, tokenizer: Tokenizer, lines: list[str]) -> dict:
    """Last-word accuracy: greedy decoding from all but the last word must give exactly the last word."""
    right, total = 0, 0
    for line in lines:
        context, _, word = line.strip().rpartition(" ")
        if not context:
            continue
        ctx, target = tokenizer.encode(context), tokenizer.encode(" " + word)
        ids = (ctx + target)[-(model.config.context + 1):]
        logits = model(torch.tensor([ids[:-1]], device=model.device))[0, -len(target):]
        right += logits.argmax(-1).tolist() == target
        total += 1
    if not total:
        raise EvalError("no line has a context and a last word")
    return {"examples": total, "accuracy": right / total}


def classification_report(gold: list[str], predicted: list[str], labels: tuple[str, ...]) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: gold, columns: predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        matrix[index[g]][index[p]] += 1
    f1s = []
    for i in range(len(labels)):
        tp = matrix[i][i]
        fp = sum(matrix[r][i] for r in range(len(labels))) - tp
        fn = sum(matrix[i]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"examples": len(gold), "accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold),
            "macro_f1": sum(f1s) / len(f1s), "labels": list(labels), "confusion": matrix}


def generation_scores(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score)."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise EvalError("generation metrics need `pip install 'gptkit[eval]'` (sacrebleu, rouge-score)") from None

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"examples": len(hypotheses), "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "rougeL": sum(rouge) / len(rouge)}


@torch.no_grad()
def split_perplexity(model: GPT, tokenizer: Tokenizer, data_dir: Path, split: str = "val") -> dict:
    """Perplexity over a prepared data directory's split, which must come from the model's tokenizer."""
    data = TokenShards(data_dir, split)
    if data.tokenizer_sha256() != tokenizer.fingerprint():
        raise EvalError(f"{data_dir} was tokenized with a different tokenizer than the model's")
    nll, n = 0.0, 0
    for x, y in data.windows(model.config.context, 8):
        logits = model(x.to(model.device)).float()
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten().to(logits.device), reduction="sum").item()
        n += y.numel()
    return {"tokens": n, "nll_per_token": nll / n, "perplexity": math.exp(nll / n)}


TASKS = ("ppl", "choice", "lambada", "classify", "generate")


def run(task: str, ckpt: str | Path, data: str | Path, stride: int | None = None, max_new_tokens: int = 64,
        skip_bad: bool = False, device: str = "cpu", dtype: str = "fp32") -> tuple[dict, Path]:
    """Evaluate the checkpoint `ckpt` on `data` for `task`; the result is also written, as JSON, to
    `ckpt/eval/TASK-DATA.json` (for a GGUF file, `FILE.gguf.eval/TASK-DATA.json`; returned beside it)."""
    from . import checkpoint

    data, ckpt = Path(data), Path(ckpt)
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    if not data.exists():
        raise EvalError(f"no such file or directory: {data}")
    if task == "classify":
        result = _classify(ckpt, data, skip_bad)
    else:
        from . import load

        lm = load(ckpt, device, dtype)
        model, tokenizer = lm.model, lm.tokenizer
        if task == "ppl":
            result = (split_perplexity(model, tokenizer, data) if data.is_dir()
                      else perplexity(model, tokenizer, data.read_text(encoding="utf-8"), stride))
        elif task == "choice":
            result = multiple_choice(model, tokenizer, read_jsonl(data, ("ctx", "endings", "label")))
        elif task == "lambada":
            result = lambada(model, tokenizer, data.read_text(encoding="utf-8").splitlines())
        else:
            rows = read_jsonl(data, ("prompt", "reference"))
            hyps = [lm.generate(r["prompt"], max_new_tokens=max_new_tokens, temperature=0, stop=("\n",)).strip()
                    for r in rows]
            result = generation_scores(hyps, [r["reference"] for r in rows])
    result = {"task": task, "data": str(data), **result}
    where = ckpt / "eval" if ckpt.is_dir() else ckpt.with_name(ckpt.name + ".eval")  # a .gguf file: beside it
    out = where / f"{task}-{data.stem}.json"
    files.atomic_write(out, json.dumps(result, indent=1) + "\n")
    return result, out


def _classify(ckpt: Path, data: Path, skip_bad: bool) -> dict:
    from .finetune import load_examples, load_task, predict

    model, tokenizer = load_task(ckpt)
    examples = load_examples(data, model.spec.task, skip_bad=skip_bad)
    unknown = sorted({e.label for e in examples} - set(model.spec.labels)) if model.spec.labels else []
    if unknown:
        raise EvalError(f"{data} has labels the model was not trained on: {', '.join(unknown)}")
    predicted = [predict(model, tokenizer, e.fields)[0] for e in examples]
    labels = model.spec.labels or tuple(sorted({e.label for e in examples}))
    return classification_report([e.label for e in examples], predicted, labels)
