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
    (["convert", "--from-hf", "/nonexistent", "--out", "/tmp/x"], "cannot read a transformers config"),
])
def test_bad_input_gives_one_line_and_exit_1(capsys, tiny_ckpt, argv, message):
    code, _, err = run(capsys, *[str(tiny_ckpt) if a == "CKPT" else a for a in argv])
    assert code == 1
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_checkpoint(capsys, tiny_ckpt):
    (tiny_ckpt / "config.json").write_text("{broken")
    code, _, err = run(capsys, "generate", tiny_ckpt, "--prompt", "x")
    assert code == 1 and "not valid JSON" in err
