"""The labs: matched sizes, a ladder of single changes, a fit that recovers known exponents, resumable runs."""

import dataclasses
import json
import math

import numpy as np
import pytest

from gptkit import GPTConfig
from gptkit.cli import main
from gptkit.lab import fit_scaling_law, generations, ladder, shape
from gptkit.lab.evolution import write_table
from gptkit.lab.runs import body_params

pytest.importorskip("scipy")
BASE = GPTConfig(vocab_size=512, context=64, **shape(1e6))


def test_every_architecture_has_the_same_size_within_5_percent():
    runs = [*generations(BASE), *ladder(BASE)]
    target = body_params(runs[1].config)  # GPT-2
    for r in runs:
        assert abs(body_params(r.config) / target - 1) < 0.05, r.name


def test_each_rung_changes_exactly_one_thing():
    rungs = ladder(BASE)
    for before, after in zip(rungs, rungs[1:]):
        model = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "mlp_hidden"  # the size matching
                 and getattr(before.config, f.name) != getattr(after.config, f.name)]
        recipe = [k for k in {**before.recipe, **after.recipe} if before.recipe.get(k) != after.recipe.get(k)]
        assert len(model) + len(recipe) == 1, (after.name, model, recipe)
    assert rungs[0].config.prenorm is False and rungs[-1].config.pos == "rope"
    gpt1, gpt1_own_lr, _, gpt3, modern = generations(BASE)
    assert gpt1_own_lr.config == gpt1.config and gpt1_own_lr.recipe == {**gpt1.recipe, "lr": 2.5e-4}
    assert gpt3.name == "GPT-3-style (banded)" and gpt3.config.local_layers and modern.config == rungs[-1].config


def test_the_fit_recovers_known_exponents():
    rng = np.random.default_rng(0)
    N, D = np.meshgrid([1e5, 3e5, 1e6, 3e6], [1e6, 3e6, 1e7, 3e7])
    N, D = N.ravel(), D.ravel()
    L = (1.7 + 400 / N ** 0.34 + 410 / D ** 0.28) * np.exp(rng.normal(0, 1e-3, N.shape))
    law = fit_scaling_law(N, D, L)
    assert law.alpha == pytest.approx(0.34, abs=0.03) and law.beta == pytest.approx(0.28, abs=0.03)
    assert law.E == pytest.approx(1.7, rel=0.05)
    n, d = law.optimal(1e18)
    assert 6 * n * d == pytest.approx(1e18, rel=1e-6)


@pytest.fixture
def data(cat_data):
    return cat_data


def test_the_evolution_lab_writes_its_table_and_resumes(data, tmp_path, capsys):
    argv = ["lab", "evolution", "--data", str(data), "--tokens", "2048", "--params", "2e4", "--context", "32",
            "--out", str(tmp_path / "lab")]
    assert main(argv) == 0
    table = (tmp_path / "lab" / "table.md").read_text()
    for row in ("GPT-1 (post-norm)", "GPT-1 at its paper's lr", "GPT-3-style (banded)", "+ SwiGLU",
                "+ WSD schedule = modern"):
        assert row in table
    assert (tmp_path / "lab" / "evolution.png").stat().st_size > 10_000
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "lab").glob("*/model.safetensors")}
    assert len(finished) == 12  # GPT-1, GPT-2 and modern are rungs of the ladder too: trained once
    stopped = next(iter(finished)).parent
    (stopped / "result.json").unlink()  # as if the lab had been stopped before that run's summary
    capsys.readouterr()
    assert main(argv) == 0
    assert (stopped / "result.json").exists() and "GPT-1 (post-norm)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items() if p.parent != stopped)  # none retrained


def test_the_table_times_each_run_to_gpt2s_final_loss(tmp_path):
    def result(name, *losses):
        curve = [{"tokens": 100 * i, "val_loss": v, "elapsed_s": 10.0 * i} for i, v in enumerate(losses, 1)]
        return {"name": name, "params": 1000, "tokens": 300, "tokens_per_s": 10.0, "val_loss": losses[-1],
                "curve": curve}

    results = [result("GPT-2", 5.0, 4.0, 3.0), result("stuck", 6.0, 6.0, 6.0), result("fast", 4.0, 2.5, 2.0),
               result("overfits", 4.0, 2.0, 3.5)]
    table = write_table(results, tmp_path / "table.md", token_bytes=2.0, reference="GPT-2")
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in table.splitlines()[2:6])}
    assert "seconds to 3.000" in table and rows["GPT-2"][-1] == "30" and rows["stuck"][-1] == "—"
    assert rows["fast"][-1] == "17"  # 4.0 at 10 s, 2.5 at 20 s: 3.0 two thirds of the way
    assert rows["overfits"][4:6] == ["3.5000", "2.0000"]  # the last evaluation's loss, and the best
    assert rows["GPT-2"][6] == f"{3.0 / math.log(2) / 2.0:.3f}"  # bits per byte at 2 bytes a token
    assert (tmp_path / "table.md").read_text() == table


def test_the_scaling_lab_fits_and_predicts(data, tmp_path, capsys):
    out = str(tmp_path / "scaling")
    assert main(["lab", "scaling", "--data", str(data), "--sizes", "1e4,3e4", "--tokens", "1024,2048,4096",
                 "--context", "32", "--out", out]) == 0
    record = json.loads((tmp_path / "scaling" / "fit.json").read_text())
    assert len(record["points"]) == 6 and record["compute_optimal"]["tokens_per_param"] > 0
    assert (tmp_path / "scaling" / "scaling.png").exists()
    assert main(["lab", "scaling", "--predict", "1e6,1e8", "--out", out]) == 0
    assert "predicted validation loss" in capsys.readouterr().out


def test_a_lab_needs_one_budget(tmp_path, capsys):
    assert main(["lab", "evolution", "--out", str(tmp_path / "x")]) == 1
    assert "--budget SECONDS or --tokens N" in capsys.readouterr().err


def test_the_scaling_grid_has_one_model_per_size_within_5_percent():
    from gptkit.lab.scaling import grid_config

    sizes = [1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6]
    counts = [body_params(grid_config(512, 64, n)) for n in sizes]
    assert all(abs(c / n - 1) < 0.05 for c, n in zip(counts, sizes)), counts


@pytest.mark.parametrize("text", ["{", '{"E": 1}', "[]"])
def test_a_fit_that_is_not_one_is_one_line(tmp_path, capsys, text):
    (tmp_path / "fit.json").write_text(text)
    assert main(["lab", "scaling", "--predict", "1e6,1e8", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "fit.json is not a fit written by `gptkit lab scaling`" in err and err.count("\n") == 1


@pytest.mark.parametrize("predict", ["1e6", "1e6,x", "1e6,1e8,3", "0,5"])
def test_predict_needs_two_positive_numbers(tmp_path, capsys, predict):
    assert main(["lab", "scaling", "--predict", predict, "--out", str(tmp_path)]) == 1
    assert "--predict" in capsys.readouterr().err


def test_a_lab_run_trains_its_config_and_recipe_as_they_are(tmp_path):
    from gptkit import preset

    for lab_run in [*generations(BASE), *ladder(BASE)]:
        cfg = lab_run.train_config(tmp_path / "r", "data-dir", {"time_limit": 60}, seed=3)
        assert preset(cfg.preset, **cfg.model) == lab_run.config, lab_run.name
        assert all(getattr(cfg, k) == v for k, v in lab_run.recipe.items())
        assert (cfg.time_limit, cfg.max_steps, cfg.seed, cfg.out, cfg.data) == (60.0, 0, 3, str(tmp_path / "r"),
                                                                                "data-dir")


@pytest.mark.parametrize("marker", [None, b'{"name": "tiny", "seed": 0, "params": 1', b"", b"\xff\xfe", b"{}"])
def test_a_missing_or_cut_short_marker_resumes_the_run_without_training_it_again(data, tmp_path, marker):
    """result.json says a lab run finished; one cut short (as a plain write killed midway leaves it) or missing
    counts as not finished: the run resumes from its checkpoint, which had reached the budget, so nothing trains
    again and the marker is written whole from the run's metrics."""
    import torch

    from gptkit.lab.runs import RESULT_FILE, LabRun, complete
    from gptkit.train.trainer import STATE_FILE

    lab_run = LabRun("tiny", GPTConfig(vocab_size=512, context=32, n_layer=2, n_head=2, n_embd=32),
                     {"warmup_steps": 2, "batch_size": 4})
    first = complete(lab_run, tmp_path, str(data), {"max_tokens": 1024}, 0)
    directory = tmp_path / "tiny-seed0"
    steps = torch.load(directory / STATE_FILE, weights_only=True)["step"]
    if marker is None:
        (directory / RESULT_FILE).unlink()
    else:
        (directory / RESULT_FILE).write_bytes(marker)
    again = complete(lab_run, tmp_path, str(data), {"max_tokens": 1024}, 0)
    assert torch.load(directory / STATE_FILE, weights_only=True)["step"] == steps  # no step trained again
    assert (again["tokens"], again["val_loss"], again["params"]) == (first["tokens"], first["val_loss"], first["params"])
    assert json.loads((directory / RESULT_FILE).read_text()) == again
    assert complete(lab_run, tmp_path, str(data), {"max_tokens": 1024}, 0) == again  # finished: read, not run
