import pytest
import torch

from gptkit import GPT, CheckpointError, checkpoint, files, load, preset


def test_save_load_round_trip(tiny_ckpt):
    model = checkpoint.load_model(tiny_ckpt)
    again = GPT(model.config)
    again.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert sorted(p.name for p in tiny_ckpt.iterdir() if p.name != files.LOCK) == [
        "commit.json", "config.json", "model.safetensors", "tokenizer.json"]


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

    with pytest.raises(files.DiskFullError, match="the disk is full"):
        files.commit(tiny_ckpt, {"model.safetensors": disk_full})
    assert (tiny_ckpt / "model.safetensors").read_bytes() == before
    assert not [p for p in tiny_ckpt.iterdir() if p.name.endswith(".tmp")]


def test_rope_model_loads_with_its_tables(tmp_path):
    model = GPT(preset("tiny-modern", vocab_size=50, context=32)).eval()
    checkpoint.save(tmp_path, model)
    loaded = checkpoint.load_model(tmp_path)
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_full_disk_in_any_library_words_is_named(tiny_ckpt, monkeypatch):
    import shutil
    from collections import namedtuple

    from safetensors import SafetensorError

    def failing(error):
        def write(path):
            raise error
        return {"config.json": write}

    full = SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")
    with pytest.raises(files.DiskFullError, match=f"the disk is full: could not write config.json in {tiny_ckpt}"):
        files.commit(tiny_ckpt, failing(full))
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # torch.save's
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room on the disk: not a full disk
        files.commit(tiny_ckpt, failing(short_write))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1000))
    with pytest.raises(files.DiskFullError):
        files.commit(tiny_ckpt, failing(short_write))
    with pytest.raises(ValueError, match="a bug"):  # any other error stays itself, however full the disk
        files.commit(tiny_ckpt, failing(ValueError("a bug")))


def test_stale_temporaries_of_a_killed_writer_are_removed(tiny_ckpt):
    stale = [tiny_ckpt / ".model.safetensors.k1ll3d.tmp", tiny_ckpt / ".config.json.x.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    unrelated = tiny_ckpt / ".notes.txt.tmp"
    unrelated.write_text("mine")
    checkpoint.save(tiny_ckpt, checkpoint.load_model(tiny_ckpt))
    assert not any(p.exists() for p in stale) and unrelated.exists()


def test_files_are_created_with_the_users_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        checkpoint.save(tmp_path / "c", GPT(preset("tiny-gpt2", vocab_size=20, context=16)))
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "c").iterdir() if p.name != files.LOCK} == {
        "commit.json": "0o644", "config.json": "0o644", "model.safetensors": "0o644"}


def test_a_tokenizer_larger_than_the_model_is_refused_at_load(tiny_ckpt, tmp_path):
    from gptkit import Tokenizer

    big = Tokenizer.char("".join(chr(c) for c in range(0x100, 0x100 + 919)))
    (tiny_ckpt / "tokenizer.json").unlink()
    for name, text in big.files().items():
        (tiny_ckpt / name).write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError, match="the tokenizer has 920 tokens but the model only"):
        load(tiny_ckpt)


@pytest.mark.parametrize("edit, message", [
    (lambda d: {k: v for k, v in d.items() if k != "n_layer"}, "missing config field(s): n_layer"),
    (lambda d: [1, 2], "must be a JSON object"),
    (lambda d: d | {"n_head": "four"}, "n_head must be an integer"),
    (lambda d: d | {"dropout": None}, "dropout must be a number"),
])
def test_a_config_with_a_missing_or_ill_typed_field_is_named(tiny_ckpt, edit, message):
    import json

    path = tiny_ckpt / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(tiny_ckpt)


def test_a_device_this_torch_lacks_is_one_line(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CheckpointError, match="no CUDA GPU"):
        load(tiny_ckpt, device="cuda")


def test_a_commit_killed_between_its_renames_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    """Before, files were renamed one by one: a kill between two renames left step 2's weights beside step 1's
    train state, and resume carried on silently."""
    import os

    files.commit(tmp_path, {"a.bin": b"step 1 a", "b.bin": b"step 1 b"}, {"step": 1})
    real, renames = os.replace, []

    def killed_after_first_rename(src, dst):
        if str(dst).endswith(".bin"):
            renames.append(dst)
            if len(renames) == 2:
                raise KeyboardInterrupt  # the process dies here: a.bin is new, b.bin old
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        files.commit(tmp_path, {"a.bin": b"step 2 a", "b.bin": b"step 2 b"}, {"step": 2})
    monkeypatch.setattr(os, "replace", real)
    assert (tmp_path / "a.bin").read_bytes() == b"step 2 a" and (tmp_path / "b.bin").read_bytes() == b"step 1 b"
    manifest = files.verify(tmp_path)  # rolls the journal forward: every new file was already whole
    assert manifest["step"] == 2 and (tmp_path / "b.bin").read_bytes() == b"step 2 b"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != files.LOCK]


def test_a_file_that_does_not_belong_to_the_checkpoint_is_named(tiny_ckpt):
    """What resume checks: every file of the last commit as it was committed."""
    assert checkpoint.verify(tiny_ckpt)["files"].keys() == {"config.json", "model.safetensors", "tokenizer.json"}
    from safetensors.torch import save_file
    save_file(GPT(checkpoint.load_config(tiny_ckpt)).state_dict(), str(tiny_ckpt / "model.safetensors"))  # another time's
    with pytest.raises(CheckpointError, match="model.safetensors does not belong to the checkpoint"):
        checkpoint.verify(tiny_ckpt)


def test_a_later_commit_after_an_unfinished_one_keeps_a_whole_checkpoint(tmp_path, monkeypatch):
    """Step 2's commit killed after its journal, before any rename; step 3's killed while writing its files: the
    directory must still hold one whole commit (before, step 3 removed step 2's temporaries and the manifest
    ended up naming files that were gone)."""
    import os

    files.commit(tmp_path, {"a": b"step 1 a", "b": b"step 1 b"}, {"step": 1})
    real = os.replace

    def killed_at_first_rename(src, dst):
        if not str(dst).endswith(files.PENDING) and "commit.json" not in str(dst):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_first_rename)
    with pytest.raises(KeyboardInterrupt):
        files.commit(tmp_path, {"a": b"step 2 a", "b": b"step 2 b"}, {"step": 2})
    monkeypatch.setattr(os, "replace", real)

    def killed_while_writing(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.commit(tmp_path, {"a": b"step 3 a", "b": killed_while_writing}, {"step": 3})
    manifest = files.verify(tmp_path)
    assert manifest["step"] == 2 and (tmp_path / "a").read_bytes() == b"step 2 a"  # the newest whole commit
