"""Training losses of a language model: next-token cross-entropy (on CPU in fp32, the LM head and the loss in
cache-sized chunks), the in-batch sampled softmax, knowledge distillation, and `LanguageModelLoss` /
`DistillationLoss`, the modules the trainer wraps (DDP, FSDP) and compiles so that the loss runs inside the
wrapped forward. One ignore index for every caller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import GPT

IGNORE_INDEX = -100  # a target position that does not count (padding, a prompt SFT does not learn)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ w.T` against `targets`, a chunk of rows at a time, each chunk's logits
    turned into their gradient (softmax - one-hot) while still in cache: the [tokens, vocab] logits never
    reach memory, which makes the head and loss of a small model 1.6x faster on CPU. Backward only scales
    the gradients formed here."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, ignore_index: int, rows: int) -> Tensor:
        keep = targets != ignore_index
        count = keep.sum().clamp_min(1)
        want_w = ctx.needs_input_grad[1]  # not for a frozen head (LoRA)
        grad_h, grad_w, loss = torch.empty_like(h), torch.zeros_like(w) if want_w else None, h.new_zeros(())
        buffer = h.new_empty(min(rows, len(h)), len(w))  # reused: a fresh block page-faults on every chunk
        for s in range(0, len(h), rows):
            hc, kc = h[s:s + rows], keep[s:s + rows]
            yc = targets[s:s + rows].where(kc, 0)
            z = torch.mm(hc, w.t(), out=buffer[:len(hc)])
            picked = z.gather(1, yc[:, None]).squeeze(1)
            top = z.amax(1, keepdim=True)
            total = z.sub_(top).exp_().sum(1, keepdim=True)  # z: softmax once divided by total
            loss += ((total.log() + top).squeeze(1) - picked).mul(kc).sum()
            z.div_(total)
            z[torch.arange(len(yc)), yc] -= 1
            if not kc.all():
                z[~kc] = 0
            torch.mm(z, w, out=grad_h[s:s + rows])
            if want_w:
                grad_w.addmm_(z.t(), hc)
        ctx.save_for_backward(grad_h / count, grad_w / count if want_w else None)
        return loss / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, None if grad_w is None else grad_w * grad, None, None, None


def sampled_lm_loss(h: Tensor, w: Tensor, targets: Tensor, unigram: Tensor) -> Tensor:
    """Cross-entropy over the batch's own targets only, not the whole vocabulary (in-batch sampled softmax,
    the negatives of retrieval models). A token of frequency f is in a batch of N targets with probability
    q = 1 - (1 - f)^N; subtracting log q from its logit makes up for the batches it misses (logQ correction,
    Bengio & Senecal 2008; Yi et al. 2019). For a small model the full head is most of the step: on CPU
    with 8k tokens and 2k targets per batch (about 900 distinct) this pre-trains 1.6x the tokens per second
    and reaches a lower full-softmax validation loss in the same time."""
    keep = targets != IGNORE_INDEX
    h, targets = h[keep], targets[keep]
    candidates, picked = torch.unique(targets, return_inverse=True)
    log_q = torch.log(-torch.expm1(len(targets) * torch.log1p(-unigram[candidates].clamp(0, 1 - 1e-7))))
    logits = F.linear(h, w[candidates]).float() - log_q.clamp_min(-30)
    return F.cross_entropy(logits, picked)



def lm_loss(h: Tensor, w: Tensor, targets: Tensor, unigram: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy of hidden states `h` [..., n_embd] under the head `w` [vocab, n_embd]
    against `targets` [...] (IGNORE_INDEX = ignored; all ignored: 0). CPU fp32 training takes the chunked
    path; elsewhere the plain one. With `unigram` (the training tokens' frequencies), a sampled softmax
    instead: see `sampled_lm_loss`."""
    h, targets = h.flatten(0, -2), targets.flatten()
    if not (targets != IGNORE_INDEX).any():  # nothing to learn here: 0, never NaN, on every path
        return (h.sum() + w.sum()) * 0.0
    if unigram is not None:
        return sampled_lm_loss(h, w, targets, unigram)
    if (h.device.type == "cpu" and torch.is_grad_enabled() and h.dtype == w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        rows = max(64, (1 << 21) // w.shape[0])  # about 8 MB of logits per chunk: fits in cache
        return ChunkedLinearCrossEntropy.apply(h, w, targets, IGNORE_INDEX, rows)
    return F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=IGNORE_INDEX)


def model_loss(model: GPT, idx: Tensor, targets: Tensor, unigram: Tensor | None = None) -> Tensor:
    """The mean next-token loss of `model` reading `idx` [B, T] against `targets` [B, T]."""
    return lm_loss(model.hidden_states(idx), model.head_weight(), targets, unigram)


class LanguageModelLoss(nn.Module):
    """A GPT with its training loss as its forward: `LanguageModelLoss(gpt)(idx, targets)`. `body` is what
    computes the hidden states: the GPT itself, or its DDP / FSDP wrapper (whose forward must run for the
    wrapper's hooks; FSDP keeps the root's parameters, the head among them, gathered after it)."""

    def __init__(self, model: GPT, body: nn.Module | None = None):
        super().__init__()
        self.model, self.body = model, body if body is not None else model

    def forward(self, idx: Tensor, targets: Tensor, unigram: Tensor | None = None) -> Tensor:
        return lm_loss(self.body(idx, hidden=True), self.model.head_weight(), targets, unigram)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the softened distributions, per position, times T² so that its gradients keep
    their size as T changes (Hinton et al. 2015; DistilGPT2's loss)."""
    t = temperature
    student = F.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


class DistillationLoss(LanguageModelLoss):
    """alpha x KL(teacher || student) at `temperature` + beta x the LM loss (+ cosine x (1 - cos) between the
    final hidden states, where the widths match): DistilGPT2's objective. The teacher runs without gradients and
    is not a submodule (DDP must not see it)."""

    def __init__(self, model: GPT, body: nn.Module | None, teacher: GPT, temperature: float = 2.0,
                 alpha: float = 5.0, beta: float = 2.0, cosine: float = 0.0):
        super().__init__(model, body)
        self.teacher = (teacher,)
        self.temperature, self.alpha, self.beta, self.cosine = temperature, alpha, beta, cosine

    def forward(self, idx: Tensor, targets: Tensor, unigram: Tensor | None = None) -> Tensor:
        h, w = self.body(idx, hidden=True), self.model.head_weight()
        teacher = self.teacher[0]
        with torch.no_grad():
            h_teacher = teacher(idx, hidden=True)
            teacher_logits = teacher.logits(h_teacher)
        loss = self.alpha * distillation_loss(F.linear(h, w), teacher_logits, self.temperature)
        if self.beta:
            loss = loss + self.beta * lm_loss(h, w, targets, unigram)
        if self.cosine:
            loss = loss + self.cosine * (1 - F.cosine_similarity(h.float(), h_teacher.float(), dim=-1)).mean()
        return loss
