"""The KV blocks of an engine's paged cache under a fixed budget: which blocks are free, who holds each (reference
counts), and which full blocks are known by their contents, so a new request reuses the longest prefix already
computed (multi-turn chat, a shared system prompt). As vLLM's prefix cache: a full block is named by a hash of its
tokens and of every token before it; blocks nobody holds stay cached until space is needed, least recently used
first. Only full blocks are shared, and a full block is never written again, so sharing needs no copies.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np


def block_hashes(tokens: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The names of the full blocks of `tokens` (each hash covers the block and everything before it)."""
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + np.asarray(tokens[start:start + block_size], dtype=np.int64).tobytes()).digest()
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.free: deque[int] = deque(range(n_blocks))  # never filled, or released without a name
        self.refs = [0] * n_blocks
        self.name: dict[int, bytes] = {}  # block -> its hash, for full blocks known by their contents
        self.by_name: dict[bytes, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, least recently used first
        self.evictions = 0
        self.reused_blocks = 0

    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and idle)."""
        return len(self.free) + len(self.idle)

    @property
    def in_use(self) -> int:
        return self.n_blocks - self.available()

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)  # evict the least recently used cached block
            del self.by_name[self.name.pop(block)]
            self.evictions += 1
        else:
            raise MemoryError("no KV block is free")  # the engine reserves blocks before it admits a request
        self.refs[block] = 1
        return block

    def cached(self, names: list[bytes]) -> list[int]:
        """The longest run of blocks named `names` from the start that the cache holds, each now held once more."""
        found = []
        for name in names:
            block = self.by_name.get(name)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.idle[block]
            self.refs[block] += 1
            found.append(block)
        self.reused_blocks += len(found)
        return found

    def probe(self, names: list[bytes]) -> tuple[int, int]:
        """How many blocks named `names` from the start the cache holds, and how many of those are idle (reusing
        them takes them out of what is available)."""
        hits = idle = 0
        for name in names:
            block = self.by_name.get(name)
            if block is None:
                break
            hits, idle = hits + 1, idle + (self.refs[block] == 0)
        return hits, idle

    def remember(self, block: int, name: bytes) -> None:
        """A block just filled: known by its contents from now on (unless another block already holds them)."""
        if name not in self.by_name and block not in self.name:
            self.by_name[name], self.name[block] = block, name

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.name:
                self.idle[block] = None
            else:
                self.free.append(block)
