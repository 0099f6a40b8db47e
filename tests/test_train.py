import pytest
import torch

import gptkit
from gptkit import checkpoint, files
from gptkit.data import TokenShards, prepare, read_sources
from gptkit.train import TrainError, load_recipe, train
from gptkit.train.metrics import read_metrics
from gptkit.train.optim import lr_factor, orthogonalize
from gptkit.train.recipe import RecipeError
from gptkit.train.trainer import TrainingRun

TEXT = "the cat sat on the mat. the dog sat on the log. " * 200
MODEL = "model={n_layer=2, n_head=2, n_embd=32, context=32}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    (out / "t.txt").write_text(TEXT)
    prepare(read_sources(texts=[str(out / "t.txt")]), out / "char", tokenizer="char")
    return out / "char"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same text in shards of 1,000 tokens: batches are drawn across all of them."""
    out = tmp_path_factory.mktemp("sharded")
    (out / "t.txt").write_text(TEXT)
    prepare(read_sources(texts=[str(out / "t.txt")]), out / "char", tokenizer="char", shard_tokens=1000, quiet=True)
    assert len(TokenShards(out / "char", "train").arrays) >= 8
    return out / "char"


def recipe(data, out, *overrides):
    return load_recipe(None, [MODEL, "batch_size=4", "warmup_steps=5", "eval_interval=10", "ckpt_interval=10",
                              "log_interval=1", *overrides], data=str(data), out=str(out), preset="tiny-gpt2")


def test_training_learns_and_leaves_a_usable_run_directory(data, tmp_path):
    result = train(recipe(data, tmp_path / "run", "max_steps=60", "lr=3e-3"), quiet=True)
    assert result["val_loss"] < 2.2  # from ln(12 chars) = 2.5 at the start
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "metrics.jsonl", "loss.png"} <= names
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = gptkit.load(tmp_path / "run").generate("the ", max_new_tokens=20, temperature=0)
    assert len(text) == 20


def test_sampled_softmax_training_learns(data, tmp_path):
    result = train(recipe(data, tmp_path / "run", "max_steps=60", "lr=3e-3", "sampled_softmax=true"), quiet=True)
    assert result["val_loss"] < 2.2  # the full loss, from ln(12 chars) = 2.5 at the start


@pytest.mark.parametrize("optimizer, shards", [("adamw", "data"), ("muon", "data"), ("adamw", "sharded")])
def test_interrupted_and_resumed_run_equals_uninterrupted(request, tmp_path, monkeypatch, optimizer, shards):
    data = request.getfixturevalue(shards)
    cfg = recipe(data, tmp_path / "full", "max_steps=20", f"optimizer=\"{optimizer}\"", "model.dropout=0.1")
    train(cfg, quiet=True)

    original = TrainingRun.save

    def save_then_die(self):
        original(self)
        raise KeyboardInterrupt  # killed right after the step-10 checkpoint

    monkeypatch.setattr(TrainingRun, "save", save_then_die)
    resumed = cfg.replace(out=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        train(resumed, quiet=True)
    monkeypatch.setattr(TrainingRun, "save", original)
    train(resumed, resume=True, quiet=True)

    a = checkpoint.load_model(tmp_path / "full").state_dict()
    b = checkpoint.load_model(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    curves = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / d / "metrics.jsonl")]
              for d in ("full", "resumed")]
    assert curves[0] == curves[1] and len(curves[0]) == 22  # 20 steps + 2 evaluations


def test_refuses_to_overwrite_or_resume_incompatibly(data, tmp_path):
    cfg = recipe(data, tmp_path / "run", "max_steps=10")
    train(cfg, quiet=True)
    with pytest.raises(TrainError, match="already holds a run"):
        train(cfg, quiet=True)
    with pytest.raises(TrainError, match="model differs: n_layer=3"):
        train(cfg.replace(model={**cfg.model, "n_layer": 3}), resume=True, quiet=True)
    with pytest.raises(TrainError, match="nothing to resume"):
        train(cfg.replace(out=str(tmp_path / "empty")), resume=True, quiet=True)


def test_resume_with_data_from_another_tokenizer(data, tmp_path):
    train(recipe(data, tmp_path / "run", "max_steps=10"), quiet=True)
    (tmp_path / "other.txt").write_text(TEXT.upper())
    prepare(read_sources(texts=[str(tmp_path / "other.txt")]), tmp_path / "other", tokenizer="char")
    with pytest.raises(TrainError, match="different tokenizer"):
        train(recipe(tmp_path / "other", tmp_path / "run", "max_steps=20"), resume=True, quiet=True)


def test_full_disk_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    cfg = recipe(data, tmp_path / "run", "max_steps=20")
    calls = []
    real = files.commit

    def disk_full_on_second(directory, written, meta=None):
        calls.append(1)
        if len(calls) == 2:
            def fail(path):
                raise OSError(28, "No space left on device")
            written = {**written, "model.safetensors": fail}
        return real(directory, written, meta)

    monkeypatch.setattr(files, "commit", disk_full_on_second)
    with pytest.raises(TrainError, match="the disk is full.* the last good checkpoint in .* is step 10"):
        train(cfg, quiet=True)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 10
    checkpoint.load_model(tmp_path / "run")


def test_recipe_file_and_overrides(tmp_path):
    (tmp_path / "r.toml").write_text('preset = "tiny-modern"\nlr = 1\nmodel = {n_layer = 2}\n')
    cfg = load_recipe(tmp_path / "r.toml", ["lr=3e-4", "model.n_embd=64", "schedule=wsd"], max_steps=5)
    assert (cfg.preset, cfg.lr, cfg.model, cfg.schedule, cfg.max_steps) == (
        "tiny-modern", 3e-4, {"n_layer": 2, "n_embd": 64}, "wsd", 5)
    with pytest.raises(RecipeError, match="unknown recipe field"):
        load_recipe(None, ["learning_rate=1"])
    with pytest.raises(RecipeError, match="batch_size must be an integer, got .big."):
        load_recipe(None, ["batch_size=big"])
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "missing.toml")
    assert load_recipe(None, ["dtype=auto"]).dtype == "auto"
    with pytest.raises(RecipeError, match="dtype must be fp32, bf16 or auto"):
        load_recipe(None, ["dtype=fp16"])


def test_schedules():
    cfg = load_recipe(None, ["warmup_steps=10", "min_lr_ratio=0.1"])
    assert lr_factor(0, 0.0, cfg) == pytest.approx(0.1) and lr_factor(9, 0.01, cfg) == 1.0
    assert lr_factor(500, 1.0, cfg) == pytest.approx(0.1)
    wsd = cfg.replace(schedule="wsd", decay_fraction=0.2)
    assert lr_factor(50, 0.5, wsd) == 1.0 and lr_factor(90, 0.9, wsd) == pytest.approx(0.55)


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(3, 64, 32) * torch.logspace(-2, 1, 32)  # condition number in the thousands
    s = torch.linalg.svdvals(orthogonalize(g))
    assert (s.max(-1).values / s.min(-1).values).max() < 10 and s.max() < 1.5


def test_a_full_disk_names_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real, calls = torch.save, []

    def fills_up(obj, path, *a, **kw):  # the second checkpoint meets a full disk
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(TrainError, match=f"the disk is full.*the last good checkpoint in {tmp_path / 'run'} is step 10"):
        train(recipe(data, tmp_path / "run", "max_steps=30"), quiet=True)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == 10
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_data_too_short_for_the_block_leaves_nothing(tmp_path):
    (tmp_path / "t.txt").write_text("tiny text")
    prepare(read_sources(texts=[str(tmp_path / "t.txt")]), tmp_path / "d", tokenizer="char")
    with pytest.raises(TrainError, match="too little data"):
        train(recipe(tmp_path / "d", tmp_path / "run", "max_steps=5"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_failure_before_the_first_checkpoint_leaves_no_run_directory(data, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("a bug in the first step")

    monkeypatch.setattr(torch.optim.AdamW, "step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train(recipe(data, tmp_path / "run", "max_steps=5"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_short_budgets_warm_up_briefly_and_end_decayed():
    cfg = load_recipe(None, ["warmup_steps=100", "min_lr_ratio=0.1", "time_limit=20", "max_steps=0"])
    steps = 30  # a 20-second run that manages 30 steps
    factors = [lr_factor(s, (s + 1) / steps, cfg) for s in range(steps)]
    assert max(factors) == 1.0 and factors.index(1.0) <= 3  # warmup within a tenth of the run
    assert factors[-1] == pytest.approx(0.1)


def test_plain_progress_lines_when_stderr_is_not_a_terminal(data, tmp_path, capsys):
    train(recipe(data, tmp_path / "run", "max_steps=12", "progress_seconds=0"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) >= 12 and "tok/s" in lines[0] and "ETA" in lines[0]


def test_first_sigint_checkpoints_and_exits_then_resume_continues(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(out), "--preset", "tiny-gpt2",
           MODEL.replace(" ", ""), "batch_size=4", "warmup_steps=5", "log_interval=1", "ckpt_interval=100000",
           "eval_interval=100000", "time_limit=600", "max_steps=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    for _ in range(600):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "checkpoint written" in stderr and "Traceback" not in stderr
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert step >= 3
    resumed = train(load_recipe(None, [MODEL, "batch_size=4", "warmup_steps=5", f"max_steps={step + 2}"],
                                data=str(data), out=str(out), preset="tiny-gpt2"), resume=True, quiet=True)
    assert resumed["step"] == step + 2


def test_a_truncated_train_state_is_one_line(data, tmp_path):
    train(recipe(data, tmp_path / "run", "max_steps=10"), quiet=True)
    state = tmp_path / "run" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(TrainError, match="truncated or corrupt"):
        train(recipe(data, tmp_path / "run", "max_steps=20"), resume=True, quiet=True)


def test_loss_plot_leaves_the_matplotlib_backend_alone(data, tmp_path, monkeypatch):
    import matplotlib

    from gptkit.train.metrics import plot_losses

    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("plot_losses switched the backend"))
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "val_loss": 2.1}\n')
    plot_losses(tmp_path / "m.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_a_checkpoint_whose_files_come_from_different_steps(data, tmp_path):
    """Before, the files were renamed one by one: step N+1's weights beside step N's train_state.pt resumed
    silently. Now a checkpoint is one commit and resume names the file that does not belong."""
    import shutil

    train(recipe(data, tmp_path / "a", "max_steps=10"), quiet=True)
    train(recipe(data, tmp_path / "b", "max_steps=20"), quiet=True)
    shutil.copy(tmp_path / "b" / "train_state.pt", tmp_path / "a" / "train_state.pt")  # step 20's, beside step 10's
    with pytest.raises(TrainError, match="train_state.pt does not belong to the checkpoint"):
        train(recipe(data, tmp_path / "a", "max_steps=30"), resume=True, quiet=True)
