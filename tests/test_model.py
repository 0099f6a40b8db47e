import pytest
import torch

from gptkit import GPT, SamplingParams, preset
from gptkit.engine import generate_tokens
from gptkit.train.loss import IGNORE_INDEX, LanguageModelLoss, model_loss

FAMILIES = ["tiny-gpt1", "tiny-gpt2", "tiny-gpt3", "tiny-modern"]  # post-norm, learned/MHA, banded, RoPE/GQA


def model_for(name, **kw):
    torch.manual_seed(0)
    return GPT(preset(name, vocab_size=97, context=96, **kw)).eval()


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_greedy_equals_uncached(name):
    model = model_for(name, **({"window": 8} if name == "tiny-gpt3" else {}))
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
    cached = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=40, temperature=0))[0]
    assert cached == greedy_without_cache(model, prompt, 40)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_generation_equals_one_by_one(name):
    model = model_for(name)
    prompts = [[1, 2, 3], [5, 8, 13, 21, 34, 55, 89], [7]]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    batched = generate_tokens(model, prompts, params)
    alone = [generate_tokens(model, [p], params)[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("name", FAMILIES)
def test_right_padded_prefill_onto_rows_of_different_lengths(name):
    """A cache row's tokens follow its own length: prefilling two rows at once (one padded), then more tokens
    onto rows of different lengths, gives the logits of each sequence alone."""
    model = model_for(name, **({"window": 4} if name == "tiny-gpt3" else {}))
    a, b = [4, 5, 6, 7, 8, 9], [10, 11]
    more = [[12, 13, 14], [15, 16, 17]]
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(torch.tensor([a, b + [0] * 4]), cache)
        cache.set_length(0, len(a)), cache.set_length(1, len(b))
        step = model(torch.tensor(more), cache)
        for row, seq in enumerate([a, b]):
            alone = model(torch.tensor([seq + more[row]]))[0, len(seq):]
            torch.testing.assert_close(step[row], alone, atol=1e-5, rtol=1e-5)


def test_banded_layers_only_see_their_window():
    model = model_for("tiny-gpt3", window=4)
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    with torch.no_grad():  # layers 0 and 2 are dense: the first token still reaches the last position
        assert not torch.allclose(model(ids)[0, -1], model(changed)[0, -1])
    all_local = model_for("tiny-gpt3", window=4, local_layers=(0, 1, 2, 3))
    with torch.no_grad():  # 4 banded layers of width 4 reach back at most 12 positions
        torch.testing.assert_close(all_local(ids)[0, -1], all_local(changed)[0, -1])


def test_init_scales_residual_projections():
    model = GPT(preset("gpt2", n_layer=8, vocab_size=100, context=64))
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / 4) < 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_per_row_cache_decoding_equals_separate_generation(name):
    """Serving rows: rows at different lengths, one batched single-token step each."""
    model = model_for(name)
    prompts = [[1, 2, 3], [5, 8, 13, 21, 34, 55, 89], [7, 7]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    alone = [generate_tokens(model, [p], params)[0] for p in prompts]
    cache = model.new_cache(4, 32)
    logits = []
    with torch.no_grad():
        for row, p in enumerate(prompts):
            logits.append(model(torch.tensor([p]), cache.select(row, row + 1))[0, -1])
            cache.set_length(row, len(p))
        out = [[] for _ in prompts]
        for _ in range(12):
            tokens = [int(lg.argmax()) for lg in logits]
            for o, t in zip(out, tokens):
                o.append(t)
            view = cache.select(0, 3)
            logits = list(model(torch.tensor(tokens)[:, None], view)[:, -1])
            view.advance(1)
    assert out == alone


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_training_loss_equals_plain_cross_entropy(tie):
    """The CPU training loss (head and loss in cache-sized chunks, several here) gives the same loss and
    gradients as logits + cross_entropy, ignored targets included."""
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=16384, context=96, tie_embeddings=tie)).train()
    idx = torch.randint(0, 16384, (4, 96))
    targets = torch.randint(0, 16384, (4, 96))
    targets[1, 10:50] = -100

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    chunked, g1 = loss_and_grads(lambda: model_loss(model, idx, targets))
    plain, g2 = loss_and_grads(lambda: torch.nn.functional.cross_entropy(
        model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100))
    assert chunked == pytest.approx(plain, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sampled_training_loss_is_the_full_loss_when_every_token_is_in_the_batch():
    """Every vocabulary token among the targets and frequent enough to be in every batch (log q = 0): the
    in-batch sampled softmax is exactly the full cross-entropy."""
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=16, context=32)).train()
    idx, targets = torch.randint(0, 16, (4, 32)), torch.randperm(128).remainder(16).view(4, 32)
    uniform = torch.full((16,), 1 / 16)
    full = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert model_loss(model, idx, targets, uniform).item() == pytest.approx(full.item(), rel=1e-5)


def test_sampled_training_loss_covers_only_the_batch_targets_with_log_q_correction():
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=64, context=8)).train()
    idx, targets = torch.randint(0, 64, (1, 8)), torch.tensor([[5, 5, 9, 9, 9, 30, 30, -100]])
    unigram = torch.rand(64)
    unigram /= unigram.sum()
    logits = model(idx)[0, :7][:, [5, 9, 30]]
    log_q = torch.log(1 - (1 - unigram[[5, 9, 30]]) ** 7)  # 7 targets, -100 ignored
    expected = torch.nn.functional.cross_entropy(logits - log_q, torch.tensor([0, 0, 1, 1, 1, 2, 2]))
    assert model_loss(model, idx, targets, unigram).item() == pytest.approx(expected.item(), rel=1e-5)


def test_attention_dropout_apart_from_residual_dropout():
    torch.manual_seed(0)

    def attention_is_random(**dropout):
        model = GPT(preset("tiny-modern", vocab_size=16, context=8, **dropout)).train()
        x = torch.randn(2, 8, model.config.n_embd)
        attn = model.blocks[0].attn
        return not torch.equal(attn(x, None, None, None), attn(x, None, None, None))

    assert attention_is_random(dropout=0.3) and attention_is_random(dropout=0.0, attn_dropout=0.3)
    assert not attention_is_random(dropout=0.3, attn_dropout=0.0)


@pytest.mark.parametrize("path", ["chunked", "plain", "sampled"])
def test_a_batch_with_every_target_ignored_costs_zero_on_every_path(path):
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=64, context=16)).train()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.full((2, 16), IGNORE_INDEX)
    unigram = torch.full((64,), 1 / 64) if path == "sampled" else None
    with torch.set_grad_enabled(path != "plain"):  # the chunked path is the CPU training one
        loss = model_loss(model, idx, targets, unigram)
    assert loss.item() == 0.0 and not loss.isnan()


def test_the_loss_module_runs_the_model_forward(monkeypatch):
    """What the trainer wraps: a DDP/FSDP body's forward runs (its hooks), the loss is the model's."""
    torch.manual_seed(0)
    model = GPT(preset("tiny-gpt2", vocab_size=64, context=16)).train()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert LanguageModelLoss(model)(idx, targets).item() == pytest.approx(model_loss(model, idx, targets).item())
    assert calls == [1]
