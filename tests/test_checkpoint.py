import pytest
import torch

from gptkit import GPT, CheckpointError, checkpoint, load, preset


def test_save_load_round_trip(tiny_ckpt):
    model = checkpoint.load_model(tiny_ckpt)
    again = GPT(model.config)
    again.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert sorted(p.name for p in tiny_ckpt.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_load_with_overrides_changes_only_those_fields(tiny_ckpt):
    plain = checkpoint.load_model(tiny_ckpt)
    tuned = checkpoint.load_model(tiny_ckpt, dropout=0.1)
    assert tuned.config == plain.config.replace(dropout=0.1)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), tuned.state_dict().values()))
    with pytest.raises(CheckpointError, match="does not match its config"):
        checkpoint.load_model(tiny_ckpt, n_embd=plain.config.n_embd * 2)


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
    (tiny_ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(tiny_ckpt)


def test_config_weights_mismatch_is_one_line(tiny_ckpt):
    config = checkpoint.load_config(tiny_ckpt)
    config.replace(n_embd=64).save(tiny_ckpt / "config.json")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(tiny_ckpt)
    assert "does not match its config" in str(e.value) and "\n" not in str(e.value)
    assert "config expects" in str(e.value)


def test_failed_write_keeps_previous_files(tiny_ckpt):
    before = (tiny_ckpt / "model.safetensors").read_bytes()

    def disk_full(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        checkpoint.write_atomically(tiny_ckpt, {"model.safetensors": disk_full})
    assert (tiny_ckpt / "model.safetensors").read_bytes() == before
    assert not [p for p in tiny_ckpt.iterdir() if p.name.endswith(".tmp")]


def test_rope_model_loads_with_its_tables(tmp_path):
    model = GPT(preset("tiny-modern", vocab_size=50, context=32)).eval()
    checkpoint.save(tmp_path, model)
    loaded = checkpoint.load_model(tmp_path)
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
