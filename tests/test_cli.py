"""The CLI in-process: output on success, one line and exit 1 on bad input."""

import pytest

from gptkit.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_config_and_parameter_count(capsys):
    code, out, _ = run(capsys, "info", "gpt2")
    assert code == 0 and "124,439,808" in out and "n_layer: 12" in out


def test_info_on_checkpoint(capsys, tiny_ckpt):
    code, out, _ = run(capsys, "info", tiny_ckpt)
    assert code == 0 and "byte-level BPE" in out


def test_generate_streams_to_stdout(capsys, tiny_ckpt):
    code, out, _ = run(capsys, "generate", tiny_ckpt, "--prompt", "The quick", "--max-new-tokens", "10", "--seed", "1")
    assert code == 0 and out.startswith("The quick") and len(out) > len("The quick\n")


@pytest.mark.parametrize("argv, message", [
    (["info", "gpt9"], "neither a preset"),
    (["generate", "/nonexistent", "--prompt", "x"], "no checkpoint directory"),
    (["generate", "CKPT", "--prompt", "x", "--temperature", "-1"], "temperature must be"),
    (["generate", "CKPT", "--prompt", "x", "--top-p", "1.5"], "top_p must be in"),
    (["generate", "CKPT", "--prompt", "x " * 200], "exceeds the model's context"),
    (["convert", "--from-hf", "/nonexistent", "--out", "/tmp/x"], "no such directory"),
])
def test_bad_input_gives_one_line_and_exit_1(capsys, tiny_ckpt, argv, message):
    code, _, err = run(capsys, *[str(tiny_ckpt) if a == "CKPT" else a for a in argv])
    assert code == 1
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_checkpoint(capsys, tiny_ckpt):
    (tiny_ckpt / "config.json").write_text("{broken")
    code, _, err = run(capsys, "generate", tiny_ckpt, "--prompt", "x")
    assert code == 1 and "not valid JSON" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--max-steps", "1", "model.n_layer=abc"], "n_layer must be an integer, got 'abc'"),
    (["train", "--max-steps", "1", "model.n_layer=2.5"], "n_layer must be an integer, got 2.5"),
    (["train", "--max-steps", "1", "model.dropout=abc"], "dropout must be a number, got 'abc'"),
    (["generate", "CKPT", "--prompt", "x", "--seed", str(10**23)], "seed must be an integer that fits in 64 bits"),
    (["generate", "CKPT", "--prompt", "x", "--num-samples", "0"], "--num-samples must be at least 1"),
    (["eval", "CKPT", "--task", "ppl", "--data", "CKPT/config.json", "--stride", "0"], "stride must be in"),
    (["convert", "--from-hf", "./no/such/model", "--out", "/tmp/x"], "no such directory: ./no/such/model"),
])
def test_more_bad_input_is_one_line(capsys, tiny_ckpt, argv, message):
    code, out, err = run(capsys, *[a.replace("CKPT", str(tiny_ckpt)) for a in argv])
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert out == ""  # nothing printed before the error (a too-long prompt is not echoed)


def test_device_the_machine_lacks(capsys, tiny_ckpt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "generate", tiny_ckpt, "--prompt", "x", "--device", "cuda")
    assert code == 1 and "no CUDA GPU" in err and err.count("\n") == 1


def test_too_long_prompt_is_not_printed_before_the_error(capsys, tiny_ckpt):
    code, out, err = run(capsys, "generate", tiny_ckpt, "--prompt", "x " * 200)
    assert code == 1 and out == "" and "exceeds the model's context" in err


def test_help_shows_defaults_presets_and_recipe_fields(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 200)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tiny-modern" in text and "gpt2-medium" in text and "batch_size=16" in text and "warmup_steps=100" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("gptkit ")


def test_prepare_with_a_bad_setting_leaves_nothing(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("some text " * 50)
    code, _, err = run(capsys, "prepare", "--text", tmp_path / "t.txt", "--vocab-size", "10", "--out", tmp_path / "d")
    assert code == 1 and err.count("\n") == 1 and not (tmp_path / "d").exists()


def sentiment_file(path, n=20):
    path.write_text("".join(f"{'good' if i % 2 else 'bad'} film {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(n)))
    return path


def test_finetune_refuses_to_write_into_its_base_or_over_a_run(capsys, tiny_ckpt, tmp_path):
    train_file = sentiment_file(tmp_path / "t.tsv")
    common = ["finetune", tiny_ckpt, "--task", "classify", "--train", train_file, "--epochs", "1"]
    code, _, err = run(capsys, *common, "--out", tiny_ckpt)
    assert code == 1 and "is the base checkpoint itself" in err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_state.pt").write_bytes(b"a stale run")
    code, _, err = run(capsys, *common, "--out", tmp_path / "old")
    assert code == 1 and "already exists and is not empty" in err and "--overwrite" in err
    code, _, err = run(capsys, *common, "--out", tmp_path / "old", "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "old" / "train_state.pt").exists() and (tmp_path / "old" / "model.safetensors").exists()


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size"])
def test_finetune_zero_epochs_or_batch_is_one_line(capsys, tiny_ckpt, tmp_path, flag):
    code, _, err = run(capsys, "finetune", tiny_ckpt, "--task", "classify", "--train", sentiment_file(tmp_path / "t.tsv"),
                       "--out", tmp_path / "o", flag, "0")
    assert code == 1 and "must be at least 1" in err and err.count("\n") == 1


def test_finetune_names_a_file_that_is_not_utf8(capsys, tiny_ckpt, tmp_path):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("caf\xe9 film\tpos\n".encode("latin-1") * 5)
    code, _, err = run(capsys, "finetune", tiny_ckpt, "--task", "classify", "--train", bad, "--out", tmp_path / "o")
    assert code == 1 and f"{bad} is not UTF-8 text" in err


def test_sft_with_one_usable_conversation_is_one_line(capsys, tiny_ckpt, tmp_path):
    chats = tmp_path / "c.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                     "not json\n")
    code, _, err = run(capsys, "finetune", tiny_ckpt, "--task", "sft", "--train", chats, "--skip-bad",
                       "--out", tmp_path / "o")
    assert code == 1 and "too few to hold out" in err and err.count("\n") == 1


def every_parser(parser, name="gptkit"):
    """The parser and each subcommand's (lab's own subcommands too), with their names."""
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from every_parser(child, f"{name} {sub}")


def test_no_help_shows_a_default_of_none_or_a_second_default():
    from gptkit.cli import build_parser

    seen = 0
    for name, parser in every_parser(build_parser()):
        for action in parser._actions:
            text = parser._get_formatter()._expand_help(action) if action.help else ""
            assert "(default: None)" not in text and text.count("default") <= 1, (name, action.option_strings, text)
            seen += 1
    helps = {name: " ".join(p.format_help().split()) for name, p in every_parser(build_parser())}
    assert len(helps) > 15 and seen > 100
    assert "validation file (default: a tenth of --train)" in helps["gptkit finetune"]
    assert "(default: the base model's) --lora-rank" in helps["gptkit finetune"]  # and nothing after it
    assert "random seed (default: 0)" in helps["gptkit finetune"]  # a default of 0 is one to show
    assert "--from-scratch re-initialise the base weights (a baseline) --seed" in helps["gptkit finetune"]
    assert "(default: 200)" in helps["gptkit generate"] and "(default: 2000000.0)" in helps["gptkit lab evolution"]


@pytest.mark.parametrize("text, expected", [("600", 600), ("600s", 600), ("10m", 600), ("1h", 3600), ("1.5h", 5400),
                                            (" 90 ", 90), ("1e3", 1000)])
def test_durations_take_units(text, expected):
    from gptkit.cli.flags import seconds

    assert seconds(text, "--budget") == expected


@pytest.mark.parametrize("budget", ["10 minutes", "-5", "0", "1d", "m", "inf", "nan", "5 m"])
def test_a_budget_that_is_no_duration_is_one_line(capsys, tmp_path, monkeypatch, budget):
    import gptkit.lab

    monkeypatch.setattr(gptkit.lab, "evolution", lambda *a, **kw: pytest.fail(f"{budget!r} was accepted"))
    code, _, err = run(capsys, "lab", "evolution", "--budget", budget, "--out", tmp_path / "lab")
    assert code == 1 and "--budget must be a positive duration" in err and err.count("\n") == 1
    assert not (tmp_path / "lab").exists()


def test_the_evolution_budget_reaches_the_lab_in_seconds(capsys, tmp_path, monkeypatch):
    import gptkit.lab

    budgets = []

    def evolution(data, out, budget, **kw):
        budgets.append(budget)
        (out / "table.md").write_text("| table |\n")

    monkeypatch.setattr(gptkit.lab, "evolution", evolution)
    code, out, err = run(capsys, "lab", "evolution", "--data", tmp_path, "--budget", "10m", "--out", tmp_path / "lab")
    assert code == 0 and budgets == [{"time_limit": 600.0}] and "| table |" in out, err


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_a_bug_inside_a_command_keeps_its_traceback(monkeypatch, error):
    from gptkit.cli import build

    def broken(args):
        raise error

    monkeypatch.setattr(build, "cmd_info", broken)
    with pytest.raises(type(error), match="a bug"):
        main(["info", "gpt2"])


def test_gptkit_errors_and_file_errors_are_one_line(monkeypatch, capsys):
    from gptkit.cli import build
    from gptkit.errors import GptkitError

    for error in (GptkitError("bad input\nmore detail"), FileNotFoundError("no file x")):
        def broken(args, error=error):
            raise error

        monkeypatch.setattr(build, "cmd_info", broken)
        code, _, err = run(capsys, "info", "gpt2")
        assert code == 1 and err.count("\n") == 1 and str(error).splitlines()[0] in err


@pytest.mark.parametrize("flag, value, message", [("--epochs", "x", "epochs must be an integer, got 'x'"),
                                                  ("--dropout", "lots", "dropout must be a number or null, got 'lots'"),
                                                  ("--lora-rank", "2.5", "lora_rank must be an integer, got 2.5")])
def test_a_fine_tuning_flag_of_the_wrong_type_is_one_line_naming_the_field(capsys, tiny_ckpt, tmp_path, flag, value,
                                                                          message):
    code, _, err = run(capsys, "finetune", tiny_ckpt, "--task", "classify", "--train", tmp_path / "none.tsv",
                       "--out", tmp_path / "o", flag, value)
    assert code == 1 and message in err and err.count("\n") == 1  # before the data is read (there is none)


def test_fine_tuning_flags_are_read_as_their_fields(tiny_ckpt, tmp_path):
    from gptkit.cli import build_parser
    from gptkit.cli.tune import config_from_flags
    from gptkit.finetune import FinetuneConfig

    args = build_parser().parse_args(["finetune", str(tiny_ckpt), "--task", "choice", "--train", "t", "--out", "o",
                                      "--lora-targets", "attn.qkv,mlp.fc", "--dropout", "0.1", "--lr", "1e-3",
                                      "--seed", "7", "--sampled-softmax"])
    cfg = config_from_flags(FinetuneConfig, args)
    assert (cfg.task, cfg.lora_targets, cfg.dropout, cfg.lr, cfg.seed, cfg.sampled_softmax, cfg.epochs) == (
        "choice", ("attn.qkv", "mlp.fc"), 0.1, 1e-3, 7, True, 3)
    assert config_from_flags(FinetuneConfig, build_parser().parse_args(
        ["finetune", "b", "--task", "classify", "--train", "t", "--out", "o"])) == FinetuneConfig()


def test_train_and_distill_hand_the_recipe_typed_values(monkeypatch, capsys, tmp_path):
    import gptkit.train

    recipes = []

    def train(cfg, resume=False):
        recipes.append(cfg)
        return {"interrupted": None, "step": 0, "tokens": 0, "elapsed_s": 0.0, "val_loss": None, "out": cfg.out}

    monkeypatch.setattr(gptkit.train, "train", train)
    assert main(["train", "--out", str(tmp_path / "a"), "lr=3e-4"]) == 0
    assert "training for 120 seconds" in capsys.readouterr().out
    assert (recipes[-1].time_limit, recipes[-1].max_steps, recipes[-1].lr) == (120.0, 0, 3e-4)
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--student", "tiny-gpt2", "--alpha", "1",
                 "--max-steps", "5", "model.n_layer=2"]) == 0
    cfg = recipes[-1]
    assert (cfg.teacher, cfg.preset, cfg.init, cfg.distill_alpha, cfg.distill_beta, cfg.max_steps, cfg.model) == (
        str(tmp_path / "t"), "tiny-gpt2", "", 1.0, 2.0, 5, {"n_layer": 2})
    assert main(["train", "--out", str(tmp_path / "b"), "--time-limit", "2m"]) == 0 and recipes[-1].time_limit == 120
