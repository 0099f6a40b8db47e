import json
import math

import pytest
import torch
import torch.nn.functional as F

import gptkit
from gptkit import evaluate as ev
from gptkit.cli import main
from gptkit.data import prepare, read_sources


@pytest.fixture
def lm(tiny_ckpt):
    return gptkit.load(tiny_ckpt)


def test_choice_matches_hand_computed_log_likelihood(lm):
    model, tok = lm.model, lm.tokenizer
    ctx, ending = tok.encode("The quick brown"), tok.encode(" fox jumps")
    ids = torch.tensor([ctx + ending])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0], -1)
    by_hand = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(ending))
    assert ev.continuation_logprob(model, ctx, ending) == pytest.approx(by_hand, abs=1e-4)
    rows = [{"ctx": "The quick brown", "endings": ["fox jumps", "def add", "tabs"], "label": 0}]
    scores = [ev.continuation_logprob(model, ctx, tok.encode(" " + e)) for e in rows[0]["endings"]]
    result = ev.multiple_choice(model, tok, rows)
    assert result["accuracy"] == float(max(range(3), key=scores.__getitem__) == 0)


def test_perplexity_window_and_stride_agree_when_text_fits(lm):
    text = "The quick brown fox jumps over the lazy dog."
    one = ev.perplexity(lm.model, lm.tokenizer, text, stride=64)
    ids = torch.tensor(lm.tokenizer.encode(text))
    assert len(ids) <= 64
    with torch.no_grad():
        nll = F.cross_entropy(lm.model(ids[None, :-1])[0], ids[1:]).item()
    assert one["nll_per_token"] == pytest.approx(nll, rel=1e-5)
    assert one["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    long = "The quick brown fox jumps over the lazy dog. " * 30
    r = ev.perplexity(lm.model, lm.tokenizer, long, stride=16)
    assert r["tokens"] == len(lm.tokenizer.encode(long)) - 1 and r["bits_per_byte"] > 0


def test_classification_report():
    r = ev.classification_report(["a", "a", "b", "b"], ["a", "b", "b", "b"], ("a", "b"))
    assert r["accuracy"] == 0.75 and r["confusion"] == [[1, 1], [0, 2]]
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_generation_scores_use_the_libraries():
    r = ev.generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert r["bleu"] == pytest.approx(100.0) and r["rougeL"] == pytest.approx(1.0)


def test_eval_cli_writes_json(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "hs.jsonl").write_text(json.dumps({"ctx": "def add", "endings": ["(a, b):", "fox"], "label": 0}) + "\n")
    assert main(["eval", str(tiny_ckpt), "--task", "choice", "--data", str(tmp_path / "hs.jsonl")]) == 0
    saved = json.loads((tiny_ckpt / "eval" / "choice-hs.json").read_text())
    assert saved["examples"] == 1 and "accuracy_norm" in saved
    (tmp_path / "lam.txt").write_text("the quick brown fox\nthe lazy dog sleeps\n")
    assert main(["eval", str(tiny_ckpt), "--task", "lambada", "--data", str(tmp_path / "lam.txt")]) == 0
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "The", "reference": "quick brown fox"}) + "\n")
    assert main(["eval", str(tiny_ckpt), "--task", "generate", "--data", str(tmp_path / "gen.jsonl"),
                 "--max-new-tokens", "8"]) == 0
    assert "bleu" in capsys.readouterr().out


def test_eval_refuses_data_from_another_tokenizer(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some other text " * 50)
    prepare(read_sources(texts=[str(tmp_path / "t.txt")]), tmp_path / "d", tokenizer="char")
    assert main(["eval", str(tiny_ckpt), "--task", "ppl", "--data", str(tmp_path / "d")]) == 1
    assert "different tokenizer" in capsys.readouterr().err


def test_malformed_eval_file(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "hs.jsonl").write_text('{"ctx": "x", "endings": ["a"], "label": 0}\n{oops\n')
    assert main(["eval", str(tiny_ckpt), "--task", "choice", "--data", str(tmp_path / "hs.jsonl")]) == 1
    assert "hs.jsonl:2" in capsys.readouterr().err
