"""prepare at scale, on small generated corpora: streamed pieces, fixed-size shards, any number of workers,
resume, parts and merge, bad input."""

import errno
import json

import numpy as np
import pytest

from gptkit.data import DataError, TokenShards, corpora, merge, pipeline, prepare, read_sources
from gptkit.data.pipeline import parse_part
from gptkit.tokenizer import Tokenizer

WORDS = "the cat sat on a mat while dogs ran past old trees near quiet rivers under grey skies".split()


def paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["\n".join(" ".join(rng.choice(WORDS, 8)) + "." for _ in range(rng.integers(1, 6))) for _ in range(n)]


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    """Three text files (one a 'book' of many pieces) and a JSONL file; small pieces and chunks, so that even a
    small corpus is many pieces, chunks and shards."""
    monkeypatch.setattr(corpora, "PIECE_BYTES", 512)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 2048)
    d = tmp_path / "in"
    d.mkdir()
    (d / "a_book.txt").write_text("\n\n".join(paragraphs(300, 1)))
    (d / "b.txt").write_text("\n\n".join(paragraphs(20, 2)))
    (d / "c.txt").write_text("Ünïcödé 中文 🙂\n" * 40)
    (d / "d.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs(200, 3)))
    return d


def sources(d):
    return read_sources(texts=[str(d / "*.txt")], jsonl=[str(d / "d.jsonl")])


def all_tokens(path):
    return np.concatenate([np.asarray(a) for split in ("train", "val") for a in TokenShards(path, split).arrays])


def shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.bin"))}


def test_long_documents_are_cut_where_the_tokens_do_not_change(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "PIECE_BYTES", 300)
    text = "\n\n".join(paragraphs(40)) + "\n  indented line\n" + "x" * 1000 + "\n" + "é🙂" * 400  # no newline: cut between characters
    (tmp_path / "book.txt").write_text(text)
    pieces = list(read_sources(texts=[str(tmp_path / "book.txt")]).pieces())
    assert len(pieces) > 10 and all(p.nbytes <= 300 for p in pieces) and "".join(p.text for p in pieces) == text
    assert [p.starts for p in pieces] == [True] + [False] * (len(pieces) - 1)
    tok = Tokenizer.train_bpe([text], 400)
    body = "".join(p.text for p in pieces[:-12])  # the cuts between words: the same tokens as the text whole
    assert sum((tok.encode(p.text) for p in pieces[:-12]), []) == tok.encode(body)


def test_positions_resume_and_parts_cover_the_stream(corpus_dir):
    corpus = sources(corpus_dir)
    pieces = list(corpus.pieces())
    assert sum(p.starts for p in pieces) == 3 + 200
    for k in range(0, len(pieces), 7):  # the stream restarted from any piece's position goes on as before
        assert list(corpus.pieces(start=pieces[k].after)) == pieces[k + 1:]
    whole = "".join(p.text for p in pieces)
    for n in (2, 3, 7):
        assert "".join(p.text for i in range(n) for p in corpus.pieces(part=(i, n))) == whole


@pytest.mark.parametrize("kind", ["char", "bpe", "cl100k"])
def test_output_is_identical_for_any_number_of_workers(corpus_dir, tmp_path, kind):
    metas = [prepare(sources(corpus_dir), tmp_path / f"w{w}", tokenizer=kind, vocab_size=300, shard_tokens=3000,
                     workers=w, quiet=True) for w in (1, 3)]
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w3") and len(shard_bytes(tmp_path / "w1")) > 3
    assert metas[0] == metas[1]
    # documents in input order, one end-of-text between each two
    ids = all_tokens(tmp_path / "w1")
    tok = Tokenizer.load(tmp_path / "w1")
    docs = tok.decode(ids).split("<|endoftext|>")
    assert len(docs) == 203 and docs[0].startswith((corpus_dir / "a_book.txt").read_text()[:50])
    assert docs[-1] == json.loads((corpus_dir / "d.jsonl").read_text().splitlines()[-1])["text"]


def test_fixed_size_shards_and_the_split_by_tokens(corpus_dir, tmp_path):
    meta = prepare(sources(corpus_dir), tmp_path / "d", tokenizer="char", shard_tokens=5000, quiet=True)
    sizes = list(meta["files"].values())
    assert len(sizes) > 4 and set(sizes[:-1]) == {5000} and 0 < sizes[-1] <= 5000
    total = sum(sizes)
    assert meta["splits"]["train"]["tokens"] == int(total * 0.9) and meta["splits"]["val"]["tokens"] == total - int(total * 0.9)
    train, val = TokenShards(tmp_path / "d", "train"), TokenShards(tmp_path / "d", "val")
    assert len(train.arrays) + len(val.arrays) == len(sizes) + 1  # one shard holds the end of train and the start of val
    joined = np.concatenate([np.fromfile(tmp_path / "d" / f, dtype=np.uint16) for f in meta["files"]])
    assert np.array_equal(np.concatenate([*train.arrays, *val.arrays]), joined)


def test_killed_prepare_continues_from_its_last_shard(corpus_dir, tmp_path, monkeypatch, capsys):
    whole = prepare(sources(corpus_dir), tmp_path / "whole", tokenizer="bpe", vocab_size=300, shard_tokens=3000,
                    quiet=True)
    original, calls = pipeline.write_tokens, {"n": 0}

    def dies_in_the_fourth_shard(f, ids):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        original(f, ids)

    monkeypatch.setattr(pipeline, "write_tokens", dies_in_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(sources(corpus_dir), tmp_path / "d", tokenizer="bpe", vocab_size=300, shard_tokens=3000, quiet=True)
    assert not (tmp_path / "d" / "meta.json").exists() and (tmp_path / "d" / "prepare.json").exists()
    assert not list((tmp_path / "d").glob(".*.tmp"))  # the unfinished shard never lands
    done = json.loads((tmp_path / "d" / "prepare.json").read_text())["shards"]
    assert 0 < len(done) < len(whole["files"])
    monkeypatch.setattr(pipeline, "write_tokens", original)
    monkeypatch.setattr(pipeline, "build_tokenizer", lambda *a: pytest.fail("the tokenizer is trained once"))
    meta = prepare(sources(corpus_dir), tmp_path / "d", tokenizer="bpe", vocab_size=300, shard_tokens=3000)
    assert f"continuing after shard {len(done)}" in capsys.readouterr().out
    assert meta == whole and shard_bytes(tmp_path / "d") == shard_bytes(tmp_path / "whole")
    assert not (tmp_path / "d" / "prepare.json").exists()


def test_a_bpe_tokenizer_is_trained_on_the_sample(corpus_dir, tmp_path):
    meta = prepare(sources(corpus_dir), tmp_path / "d", tokenizer="bpe", vocab_size=300, tokenizer_sample=4000,
                   quiet=True)
    assert 4000 <= meta["tokenizer"]["sample_bytes"] < 4000 + 512 and meta["settings"]["tokenizer_sample"] == 4000
    full = prepare(sources(corpus_dir), tmp_path / "full", tokenizer="bpe", vocab_size=300, quiet=True)
    assert full["tokenizer"]["sample_bytes"] == full["bytes"] and full["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]


def test_parts_merge_into_one_directory_without_copying(corpus_dir, tmp_path):
    single = prepare(sources(corpus_dir), tmp_path / "single", tokenizer="bpe", vocab_size=300, shard_tokens=3000,
                     quiet=True)
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i in (2, 0, 1):  # any order, as a job array runs them
        prepare(sources(corpus_dir), parts[i], tokenizer="bpe", vocab_size=300, shard_tokens=3000, part=(i, 3),
                quiet=True)
    meta = merge([parts[1], parts[2], parts[0]], tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("*.bin")) and meta["documents"] == single["documents"]
    assert meta["tokenizer"]["sha256"] == single["tokenizer"]["sha256"]  # each part trained the same one
    tok = Tokenizer.load(tmp_path / "merged")
    merged_text = "".join(tok.decode(all_tokens(p)) for p in parts).replace("<|endoftext|>", "")
    assert merged_text == tok.decode(all_tokens(tmp_path / "single")).replace("<|endoftext|>", "")
    train = TokenShards(tmp_path / "merged", "train")
    assert train.tokens == sum(TokenShards(p, "train").tokens for p in parts)
    assert merge(parts, tmp_path / "merged") == meta  # again: a no-op


def test_merge_refuses_parts_that_do_not_belong_together(corpus_dir, tmp_path):
    for i in range(2):
        prepare(sources(corpus_dir), tmp_path / f"p{i}", tokenizer="char", part=(i, 2), quiet=True)
    prepare(sources(corpus_dir), tmp_path / "other", tokenizer="char", val_fraction=0.2, part=(1, 2), quiet=True)
    with pytest.raises(DataError, match=r"other \(part 1/2\) was prepared with setting val_fraction 0.2"):
        merge([tmp_path / "p0", tmp_path / "other"], tmp_path / "m")
    prepare(sources(corpus_dir), tmp_path / "bpe", tokenizer="bpe", vocab_size=300, part=(1, 2), quiet=True)
    with pytest.raises(DataError, match=r"bpe \(part 1/2\) was prepared with another tokenizer"):
        merge([tmp_path / "p0", tmp_path / "bpe"], tmp_path / "m")
    with pytest.raises(DataError, match="part 1/2 is missing"):
        merge([tmp_path / "p0"], tmp_path / "m")
    with pytest.raises(DataError, match="part 0/2 is given twice"):
        merge([tmp_path / "p0", tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")
    with pytest.raises(DataError, match="not a prepared data directory"):
        merge([tmp_path / "p0", tmp_path / "nowhere"], tmp_path / "m")
    assert not (tmp_path / "m" / "meta.json").exists()


@pytest.mark.parametrize("text, message", [("3/3", "out of range"), ("-1/2", "out of range"), ("1", "takes i/n")])
def test_part_out_of_range(text, message):
    with pytest.raises(DataError, match=message):
        parse_part(text)


def test_a_full_disk_keeps_the_finished_shards_and_the_same_command_continues(corpus_dir, tmp_path, monkeypatch):
    whole = prepare(sources(corpus_dir), tmp_path / "whole", tokenizer="char", shard_tokens=3000, quiet=True)
    original, calls = pipeline.write_tokens, {"n": 0}

    def disk_fills(f, ids):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(f, ids)

    monkeypatch.setattr(pipeline, "write_tokens", disk_fills)
    with pytest.raises(DataError, match=r"disk is full.*finished shards are kept \(the last: .*shard_000001.bin\)"):
        prepare(sources(corpus_dir), tmp_path / "d", tokenizer="char", shard_tokens=3000, quiet=True)
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenShards(tmp_path / "d", "train")
    monkeypatch.setattr(pipeline, "write_tokens", original)
    assert prepare(sources(corpus_dir), tmp_path / "d", tokenizer="char", shard_tokens=3000, quiet=True) == whole


def test_bad_files_are_named_or_skipped(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("fine text here\n" * 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 10)
    (tmp_path / "zeros.txt").write_bytes(b"\x00\x01" * 100)
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte 3\).*--skip-bad"):
        prepare(read_sources(texts=[str(tmp_path / "latin1.txt")]), tmp_path / "d", tokenizer="char", quiet=True)
    with pytest.raises(DataError, match="zeros.txt looks binary"):
        read_sources(texts=[str(tmp_path)])
    meta = prepare(read_sources(texts=[str(tmp_path)], skip_bad=True), tmp_path / "d", tokenizer="char", quiet=True)
    err = capsys.readouterr().err
    assert "skipping" in err and "latin1.txt" in err and "zeros.txt" in err and meta["documents"] == 1


def test_parts_leave_out_the_same_bad_file(corpus_dir, tmp_path):
    (corpus_dir / "b_bad.txt").write_bytes(b"fine\n" * 300 + b"caf\xe9\n")  # bad past its first piece
    for i in range(2):
        prepare(read_sources(texts=[str(corpus_dir / "*.txt")], skip_bad=True), tmp_path / f"p{i}", tokenizer="char",
                part=(i, 2), quiet=True)
    meta = merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m", quiet=True)
    assert meta["documents"] == 3 and "caf" not in Tokenizer.load(tmp_path / "m").decode(all_tokens(tmp_path / "m"))


def test_an_empty_corpus_or_part_leaves_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="the input text is empty"):
        prepare(read_sources(texts=[str(tmp_path / "empty.txt")]), tmp_path / "d", tokenizer="char")
    (tmp_path / "one.txt").write_text("one line\n")
    with pytest.raises(DataError, match=r"empty \(in part 3/4\)"):  # the only line belongs to the first part
        prepare(read_sources(texts=[str(tmp_path / "one.txt")]), tmp_path / "d", tokenizer="char", part=(3, 4))
    assert not (tmp_path / "d").exists()


def test_data_directories_of_the_older_format_still_load(tmp_path):
    """Format 2: train_*.bin and val_*.bin, each listed whole in its split."""
    d = tmp_path / "old"
    d.mkdir()
    for name, text in Tokenizer.char("abc").files().items():
        (d / name).write_text(text, encoding="utf-8")
    train, val = np.arange(300, dtype=np.uint16) % 3, np.arange(40, dtype=np.uint16) % 3
    train[:150].tofile(d / "train_000000.bin")
    train[150:].tofile(d / "train_000001.bin")
    val.tofile(d / "val_000000.bin")
    meta = {"format": 2, "dtype": "uint16", "vocab_size": 4, "eot_id": 3, "tokenizer": {"kind": "char",
            "file": "tokenizer.json", "sha256": "x"}, "splits": {
            "train": {"tokens": 300, "shards": [{"file": "train_000000.bin", "tokens": 150},
                                                {"file": "train_000001.bin", "tokens": 150}]},
            "val": {"tokens": 40, "shards": [{"file": "val_000000.bin", "tokens": 40}]}}}
    (d / "meta.json").write_text(json.dumps(meta))
    data = TokenShards(d, "train")
    assert data.tokens == 300 and np.array_equal(np.concatenate(data.arrays), train)
    assert TokenShards(d, "val").tokens == 40


def cli(capsys, *argv):
    from gptkit.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_parts_and_merge(corpus_dir, tmp_path, capsys):
    common = ["prepare", "--text", corpus_dir / "*.txt", "--tokenizer", "char", "--shard-tokens", 4000, "--workers", 2]
    for i in range(2):
        code, out, _ = cli(capsys, *common, "--part", f"{i}/2", "--out", tmp_path / f"p{i}")
        assert code == 0 and "shard files" in out
    code, out, _ = cli(capsys, "prepare", "--merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "m")
    assert code == 0 and f"{tmp_path / 'm'}: 3 documents" in out
    code, _, err = cli(capsys, *common, "--part", "2/2", "--out", tmp_path / "p2")
    assert code == 1 and err.count("\n") == 1 and "out of range" in err and not (tmp_path / "p2").exists()
