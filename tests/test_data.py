import json

import numpy as np
import pytest
import torch

from gptkit.data import DataError, TokenShards, embedded_corpus, prepare, read_sources
from gptkit.data import corpora

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(TEXT)
    return path


def test_char_prepare_splits_like_nanogpt(tmp_path, text_file):
    meta = prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    n = len(TEXT)
    assert meta["splits"]["train"]["tokens"] == int(n * 0.9)
    assert meta["splits"]["val"]["tokens"] == n - int(n * 0.9)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(TEXT)) + 1
    train = TokenShards(tmp_path / "d", "train").arrays[0]
    chars = sorted(set(TEXT))
    assert "".join(chars[i] for i in train[:20]) == TEXT[:20]


def test_batches_are_shifted_windows(tmp_path, text_file):
    prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    data = TokenShards(tmp_path / "d", "train")
    x, y = data.batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_validation_windows_cover_the_split_once(tmp_path, text_file):
    prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    val = TokenShards(tmp_path / "d", "val")
    targets = torch.cat([y.flatten() for _, y in val.windows(block=32, batch_size=3)])
    assert torch.equal(targets, torch.from_numpy(np.asarray(val.arrays[0][1:], dtype=np.int64)))


def test_documents_are_separated_by_end_of_text(tmp_path):
    for name in "ab":
        (tmp_path / f"{name}.txt").write_text(f"document {name} " * 20)
    meta = prepare(read_sources(texts=[str(tmp_path / "*.txt")]), tmp_path / "d", tokenizer="char",
                   val_fraction=0.05)
    ids = np.concatenate(TokenShards(tmp_path / "d", "train").arrays + TokenShards(tmp_path / "d", "val").arrays)
    assert (ids == meta["eot_id"]).sum() == 1 and meta["documents"] == 2


def test_rerun_is_a_no_op(tmp_path, text_file, capsys):
    prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    shard = tmp_path / "d" / "shard_000000.bin"
    before = shard.stat().st_mtime_ns
    prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    assert shard.stat().st_mtime_ns == before and "up to date" in capsys.readouterr().out


def test_interrupted_prepare_is_not_trusted(tmp_path, text_file, monkeypatch):
    prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    text_file.write_text(TEXT + "more")  # new inputs: prepare must redo the work

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gptkit.data.pipeline.write_tokens", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenShards(tmp_path / "d", "train")


def test_bpe_prepare_and_tokenizer_file(tmp_path, text_file):
    meta = prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="bpe", vocab_size=300)
    assert meta["tokenizer"]["file"] == "tokenizer.json" and (tmp_path / "d" / "tokenizer.json").exists()
    assert meta["splits"]["train"]["tokens"] < len(TEXT)  # merges compress


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x00\x01binary", "binary"),
                                              (b"\xff\xfe\xfa not utf8", "not UTF-8")])
def test_bad_text_files(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare(read_sources(texts=[str(tmp_path / "bad.txt")]), tmp_path / "d", tokenizer="char")


def test_missing_path_and_malformed_jsonl(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_sources(texts=[str(tmp_path / "nope.txt")]))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:2"):
        list(read_sources(jsonl=[str(tmp_path / "d.jsonl")]))


def test_vocabulary_too_large_for_uint16(tmp_path, text_file):
    with pytest.raises(DataError, match="does not fit uint16"):
        prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="cl100k", dtype="uint16")


def test_named_download_offline_names_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "CACHE", tmp_path)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(corpora.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="embedded corpus"):
        list(read_sources(corpora=["tinyshakespeare"]))


def test_embedded_corpus_needs_nothing_but_python():
    docs = list(embedded_corpus())
    assert any(d.source.startswith("pydoc:") for d in docs) and any(d.source.startswith("stdlib:") for d in docs)
    assert sum(len(d.text) for d in docs) > 1_000_000
    assert [d.source for d in docs] == [d.source for d in embedded_corpus()]  # fixed order


def test_directories_of_an_older_format_are_made_again(tmp_path, text_file, monkeypatch, capsys):
    from gptkit.data import shards

    prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    assert "up to date" in capsys.readouterr().out
    monkeypatch.setattr(shards, "FORMAT", shards.FORMAT + 1)  # what a newer build sees
    meta = prepare(read_sources(texts=[str(text_file)]), tmp_path / "d", tokenizer="char")
    assert "up to date" not in capsys.readouterr().out and meta["format"] == shards.FORMAT
