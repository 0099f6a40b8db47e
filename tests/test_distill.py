"""Distillation: the loss against a hand computation, the student's DistilGPT2 start, a distilled student beating
the same student trained alone, and mismatched teachers refused."""

import math

import pytest
import torch

from gptkit import checkpoint
from gptkit.cli import main
from gptkit.train.loss import distillation_loss


def test_distillation_loss_equals_a_hand_computation():
    student, teacher, t = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.5, 0.0, 3.0]]), 2.0
    p = [math.exp(z / t) for z in teacher[0].tolist()]
    p = [x / sum(p) for x in p]
    q = [math.exp(z / t) for z in student[0].tolist()]
    q = [x / sum(q) for x in q]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert distillation_loss(student, teacher, t).item() == pytest.approx(kl * t * t, rel=1e-6)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0, abs=1e-6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import textwrap

    from gptkit.data import prepare, read_sources

    d = tmp_path_factory.mktemp("distill")
    (d / "t.txt").write_text(open(textwrap.__file__, encoding="utf-8").read() * 2)
    prepare(read_sources(texts=[str(d / "t.txt")]), d / "data", tokenizer="char")
    assert main(["train", "--preset", "tiny-gpt2", "--data", str(d / "data"), "--out", str(d / "teacher"),
                 "--max-steps", "200", "block_size=64", "batch_size=16", "lr=3e-3", "warmup_steps=10",
                 "eval_interval=1000"]) == 0
    return d


def val_loss(run):
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def test_a_distilled_student_beats_the_same_student_alone(teacher, tmp_path):
    d = teacher
    common = ["--data", str(d / "data"), "--max-steps", "40", "block_size=64", "batch_size=16", "lr=3e-3",
              "warmup_steps=5", "eval_interval=1000", "model.n_layer=2"]
    assert main(["train", "--preset", "tiny-gpt2", "--out", str(tmp_path / "alone"), *common]) == 0
    assert main(["distill", "--teacher", str(d / "teacher"), "--student", "tiny-gpt2", "--out",
                 str(tmp_path / "distilled"), *common]) == 0
    assert val_loss(tmp_path / "distilled") < val_loss(tmp_path / "alone")
    # it started from teacher blocks 0 and 2 (every other one), but trained on from there
    student, big = checkpoint.load_model(tmp_path / "distilled"), checkpoint.load_model(d / "teacher")
    assert student.config.n_layer == 2 and not torch.equal(student.blocks[1].mlp.fc.weight, big.blocks[2].mlp.fc.weight)
    assert (tmp_path / "distilled" / "loss.png").exists()


def test_a_teacher_that_does_not_fit_is_refused(teacher, tmp_path, capsys, bpe):
    d = teacher
    from gptkit import GPT, preset

    other = GPT(preset("tiny-gpt2", vocab_size=bpe.vocab_size, context=64))
    checkpoint.save(tmp_path / "other", other, bpe)
    assert main(["distill", "--teacher", str(tmp_path / "other"), "--student", "tiny-gpt2", "--data",
                 str(d / "data"), "--out", str(tmp_path / "x"), "--max-steps", "2"]) == 1
    assert "vocabulary" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["distill", "--teacher", str(d / "teacher"), "--student", "tiny-gpt2", "--data", str(d / "data"),
                 "--out", str(tmp_path / "y"), "--max-steps", "2", "--temperature", "0"]) == 1
    assert "temperature" in capsys.readouterr().err
