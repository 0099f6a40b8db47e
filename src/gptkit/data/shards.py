"""Token shards: read a prepared data directory's splits as memory-mapped arrays and batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .corpora import DataError

META = "meta.json"
FORMAT = 3  # bump when shards or their tokenization change: directories of an older format are made again


def read_meta(directory: Path) -> dict:
    try:
        return json.loads((Path(directory) / META).read_text())
    except FileNotFoundError:
        raise DataError(f"{directory} is not a prepared data directory (no {META}); run `gptkit prepare`") from None
    except (OSError, ValueError):
        raise DataError(f"{Path(directory) / META} is corrupt; run `gptkit prepare` again") from None


def verify_files(directory: Path, meta: dict) -> None:
    """Every shard file meta.json names has the tokens it says (format 3 lists them; older ones, per split)."""
    listed = meta.get("files") or {s["file"]: s["tokens"] for split in meta["splits"].values() for s in split["shards"]}
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name, tokens in listed.items():
        path = Path(directory) / name
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"{path}, a shard of {Path(directory) / META}, is missing; run `gptkit prepare` "
                            f"again") from None
        if size != tokens * itemsize:
            raise DataError(f"{path} has {size // itemsize} tokens, {META} says {tokens}")


class TokenShards:
    """One split of a prepared data directory, memory-mapped. `part=(rank, world)` keeps a disjoint slice
    of every shard, for data-parallel ranks."""

    def __init__(self, directory: Path, split: str, part: tuple[int, int] = (0, 1)):
        directory = Path(directory)
        self.meta = read_meta(directory)
        verify_files(directory, self.meta)
        rank, world = part
        self.arrays = []
        files: dict[str, np.memmap] = {}  # a shard split between train and val is mapped once
        for s in self.meta["splits"][split]["shards"]:
            if s["file"] not in files:
                files[s["file"]] = np.memmap(directory / s["file"], dtype=self.meta["dtype"], mode="r")
            offset = s.get("offset", 0)
            arr = files[s["file"]][offset:offset + s["tokens"]]
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
