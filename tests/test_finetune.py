"""Fine-tuning proof on CPU: sentiment with negations, where pre-training matters and LoRA nearly matches."""

import dataclasses
import json
import random

import pytest

from gptkit.cli import main
from gptkit.data import prepare, read_sources
from gptkit.finetune import (FinetuneConfig, FinetuneError, LoRAError, TaskDataError, apply_lora, finetune,
                             load_examples, load_task, merge, predict)
from gptkit.train import load_recipe, train

POS = ["good", "great", "wonderful", "fun", "moving", "brilliant", "charming", "superb"]
NEG = ["bad", "boring", "awful", "dull", "weak", "terrible", "tedious", "clumsy"]
NOUNS = ["movie", "film", "story", "plot", "cast", "script", "ending", "show"]


def unlabelled(rng):
    """Raw text where polarity shows only through what people say next ("loved" / "hated")."""
    pos, neg = rng.random() < 0.5, rng.random() < 0.4
    a, n, v = rng.choice(POS if pos else NEG), rng.choice(NOUNS), "loved" if pos != neg else "hated"
    if neg:
        return rng.choice(["the {n} was not {a} so i {v} it", "the {n} was not {a} and i {v} it"]).format(n=n, a=a, v=v)
    return rng.choice(["the {n} was {a} and i {v} it", "i {v} the {a} {n}", "what a {a} {n} , i {v} it",
                       "everyone {v} this {a} {n}"]).format(n=n, a=a, v=v)


def labelled(rng):
    """A review and its sentiment; half are negated, so the words alone do not decide the label."""
    pos, neg = rng.random() < 0.5, rng.random() < 0.5
    a, n = rng.choice(POS if pos else NEG), rng.choice(NOUNS)
    t = rng.choice(["the {n} was not {a}", "this {n} is not {a}", "not a {a} {n} at all"]) if neg else \
        rng.choice(["the {n} was {a}", "this {n} is {a}", "a {a} {n} overall"])
    return {"text": t.format(n=n, a=a), "label": "positive" if pos != neg else "negative"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    (d / "raw.txt").write_text("\n".join(unlabelled(rng) for _ in range(4000)))
    for name, n in (("train", 300), ("val", 300)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(labelled(rng)) + "\n" for _ in range(n)))
    prepare(read_sources(texts=[str(d / "raw.txt")]), d / "data", tokenizer="bpe", vocab_size=320)
    cfg = load_recipe(None, ["model={n_layer=2,n_head=2,n_embd=64,context=64}", "batch_size=16", "lr=3e-3",
                             "warmup_steps=20", "eval_interval=1000", "ckpt_interval=1000", "log_interval=100"],
                      preset="tiny-gpt2", data=str(d / "data"), out=str(d / "base"), max_steps=800)
    train(cfg, quiet=True)
    return d


def run(world, name, **kw):
    cfg = FinetuneConfig(**{"epochs": 30, "lr": 3e-4, "batch_size": 32, "patience": 30, **kw})
    train_set = load_examples(world / "train.jsonl", "classify")
    val_set = load_examples(world / "val.jsonl", "classify")
    return finetune(world / "base", train_set, val_set, world / name, cfg, quiet=True)


@pytest.fixture(scope="module")
def results(world):
    return {"full": run(world, "full"), "scratch": run(world, "scratch", from_scratch=True),
            "lora": run(world, "lora", lora_rank=4, lora_targets=("attn.qkv", "attn.proj"), lr=3e-3),
            "mean": run(world, "mean", pool="mean"), "sampled": run(world, "sampled", sampled_softmax=True)}


def test_bag_of_words_fails_on_negations(world):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    rows = {s: [json.loads(line) for line in (world / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "val")}
    vec = CountVectorizer().fit([r["text"] for r in rows["train"]])
    clf = LogisticRegression(max_iter=1000).fit(vec.transform([r["text"] for r in rows["train"]]),
                                                [r["label"] for r in rows["train"]])
    assert clf.score(vec.transform([r["text"] for r in rows["val"]]), [r["label"] for r in rows["val"]]) < 0.8


def test_pretrained_fine_tuning_reaches_90_percent_and_beats_scratch(results):
    assert results["full"]["val_accuracy"] >= 0.90
    assert results["scratch"]["val_accuracy"] <= results["full"]["val_accuracy"] - 0.15


def test_auxiliary_lm_loss_as_a_sampled_softmax_fine_tunes_as_well(results):
    assert results["sampled"]["val_accuracy"] >= 0.90


def test_mean_pooled_features_learn_and_reload(world, results):
    # an average blurs word order, so negations are harder than from the extract token, but it still learns
    assert results["mean"]["val_accuracy"] >= 0.70
    model, tok = load_task(world / "mean")
    assert model.spec.pool == "mean"
    val = load_examples(world / "val.jsonl", "classify")
    right = sum(predict(model, tok, e.fields)[0] == e.label for e in val) / len(val)
    assert right == pytest.approx(results["mean"]["val_accuracy"])


def test_lora_nearly_matches_full_fine_tuning_with_few_parameters(results):
    lora = results["lora"]
    assert lora["val_accuracy"] >= results["full"]["val_accuracy"] - 0.08
    assert lora["trainable_params"] < 0.05 * lora["total_params"]


def test_saved_models_classify_and_adapters_merge(world, results, tmp_path):
    model, tok = load_task(world / "full")
    label, probs = predict(model, tok, {"text": "the film was not dull"})
    assert set(probs) == {"negative", "positive"} and abs(sum(probs.values()) - 1) < 1e-5
    adapter, tok = load_task(world / "lora")
    merge(world / "lora", tmp_path / "merged")
    merged, tok2 = load_task(tmp_path / "merged")
    for text in ("the plot was not boring", "a charming cast overall", "this show is weak"):
        a, b = predict(adapter, tok, {"text": text})[1], predict(merged, tok2, {"text": text})[1]
        assert a == pytest.approx(b, abs=1e-4)


def test_classify_cli(world, results, capsys):
    assert main(["classify", str(world / "full"), "--text", "the story was superb"]) == 0
    out = capsys.readouterr().out
    assert "label:" in out and "positive" in out and "negative" in out


def test_entail_similar_choice_train_and_predict(world, tmp_path):
    rng = random.Random(1)
    data = {
        "entail": [{"premise": f"the {n} was {a}", "hypothesis": f"the {n} was {b}", "label": str(a == b)}
                   for n, a, b in ((rng.choice(NOUNS), rng.choice(POS), rng.choice(POS)) for _ in range(40))],
        "similar": [{"text_a": f"a {a} {n}", "text_b": f"the {n} was {b}", "label": int(a == b)}
                    for n, a, b in ((rng.choice(NOUNS), rng.choice(POS), rng.choice(POS)) for _ in range(40))],
        "choice": [{"context": f"the {n} was", "options": [rng.choice(POS), rng.choice(NEG), "the"], "label": 0}
                   for n in (rng.choice(NOUNS) for _ in range(40))],
    }
    for task, rows in data.items():
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        examples = load_examples(path, task)
        result = finetune(world / "base", examples, examples, tmp_path / task,
                          FinetuneConfig(task=task, epochs=2, lr=1e-3), quiet=True)
        assert 0 <= result["val_accuracy"] <= 1
        model, tok = load_task(tmp_path / task)
        label, probs = predict(model, tok, examples[0].fields)
        assert len(probs) == (3 if task == "choice" else 2)


def test_bad_inputs(world, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": "positive"}\n{broken\n{"text": "x"}\n')
    with pytest.raises(TaskDataError, match="bad.jsonl:2"):
        load_examples(tmp_path / "bad.jsonl", "classify")
    assert len(load_examples(tmp_path / "bad.jsonl", "classify", skip_bad=True)) == 1
    (tmp_path / "c.jsonl").write_text('{"context": "x", "options": ["a"], "label": 0}\n')
    with pytest.raises(TaskDataError, match="at least two"):
        load_examples(tmp_path / "c.jsonl", "choice")
    with pytest.raises(FinetuneError, match="pool must be one of"):
        run(world, "bad-pool", pool="max")
    from gptkit import GPT, preset

    with pytest.raises(LoRAError, match="match no linear layer"):
        apply_lora(GPT(preset("tiny-gpt2", vocab_size=10)), ("attn.q_proj",), 4, 8)


def test_choice_columns_are_ordered_by_their_number(tmp_path):
    """option_10 and option_11 come after option_9 (a text sort would put them after option_1)."""
    header = ["context", *(f"option_{i}" for i in range(12)), "label"]
    (tmp_path / "c.csv").write_text(",".join(header) + "\n" + ",".join(["x", *(f"o{i}" for i in range(12)), "11"]) + "\n")
    [example] = load_examples(tmp_path / "c.csv", "choice")
    assert example.fields["options"] == [f"o{i}" for i in range(12)] and example.label == "11"
    (tmp_path / "d.csv").write_text("context,option_0,option_x,label\nx,a,b,0\n")
    with pytest.raises(TaskDataError, match="'option_x' is not option_ and a number"):
        load_examples(tmp_path / "d.csv", "choice")


def reviews(n, seed):
    rng = random.Random(seed)
    return [labelled(rng) for _ in range(n)]


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_a_killed_fine_tuning_run_resumes_exactly(tiny_ckpt, tmp_path, monkeypatch, task):
    """Every epoch is checkpointed; a run killed in epoch 2 resumes to the same weights as an unbroken run."""
    import torch

    from gptkit import checkpoint
    from gptkit.finetune import fit as fit_module
    from gptkit.finetune.data import Example
    from gptkit.finetune.sft import sft

    cfg = FinetuneConfig(task=task, epochs=3, batch_size=8, lr=1e-3, patience=5)
    if task == "sft":
        data = [[{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]
                for r in reviews(40, 0)]
    else:
        data = [Example({"text": r["text"]}, r["label"]) for r in reviews(40, 0)]

    def run(out, resume=False, cfg=cfg):
        return (sft if task == "sft" else finetune)(tiny_ckpt, data[8:], data[:8], out, cfg, quiet=True, resume=resume)
    whole = run(tmp_path / "whole")
    assert not (tmp_path / "whole" / fit_module.STATE_FILE).exists()  # a finished run keeps no loop state

    real_save, saves = fit_module.files.atomic_write, []

    def killed_after_first_epoch(path, content):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process dies while epoch 2 is being saved
        return real_save(path, content)

    monkeypatch.setattr(fit_module.files, "atomic_write", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "broken")
    monkeypatch.setattr(fit_module.files, "atomic_write", real_save)
    assert torch.load(tmp_path / "broken" / fit_module.STATE_FILE, weights_only=True)["epoch"] == 1
    other = dataclasses.replace(cfg, lr=5e-4)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        run(tmp_path / "broken", resume=True, cfg=other)
    resumed = run(tmp_path / "broken", resume=True)
    assert resumed["epochs"] == whole["epochs"]
    a, b = checkpoint.load_model(tmp_path / "whole"), checkpoint.load_model(tmp_path / "broken")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="nothing to resume"):
        run(tmp_path / "broken", resume=True)


def test_lora_trains_task_tokens_in_a_padded_vocabulary_and_knows_its_base(bpe, tmp_path):
    """With a model vocabulary padded past the tokenizer's, the task tokens take padding rows; LoRA must
    train those rows. The adapter also refuses a base whose weights changed since."""
    import torch
    from safetensors.torch import load_file

    from gptkit import GPT, checkpoint, preset
    from gptkit.finetune.data import Example

    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", GPT(preset("tiny-gpt2", vocab_size=bpe.vocab_size + 64, context=64)), bpe)
    data = [Example({"text": r["text"]}, r["label"]) for r in reviews(48, 1)]
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=1e-2, lora_rank=4)
    finetune(tmp_path / "base", data[8:], data[:8], tmp_path / "lora", cfg, quiet=True)
    rows = load_file(str(tmp_path / "lora" / "adapter.safetensors"))["task_token_rows"]
    base = checkpoint.load_model(tmp_path / "base").wte.weight[bpe.vocab_size:bpe.vocab_size + 3]
    assert rows.shape[0] >= 3 and not torch.allclose(rows[:3], base)  # the three task tokens trained
    load_task(tmp_path / "lora")
    model = checkpoint.load_model(tmp_path / "base")
    with torch.no_grad():
        model.wte.weight.mul_(1.01)
    checkpoint.save(tmp_path / "base", model, bpe)
    with pytest.raises(FinetuneError, match="trained on other weights"):
        load_task(tmp_path / "lora")
