"""Where text comes from: the embedded default corpus, local files, JSONL, named downloads, HF datasets.

A `Corpus` is an ordered list of sources read as a stream of pieces: a document longer than `PIECE_BYTES` is cut
at line boundaries into pieces the tokenizer handles alone, so memory stays flat in the corpus's size. Every
piece carries the position after it (source, offset, offset within its document), from which the stream can be
started again: what lets `prepare` resume and split the inputs into parts.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sys
import sysconfig
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import GptkitError
from ..files import atomic_write


class DataError(GptkitError):
    """Input text that cannot be used: missing, empty, binary, malformed, or not downloadable."""


@dataclass(frozen=True)
class Document:
    source: str  # where it came from (path, URL, corpus name), for the metadata and error messages
    text: str


@dataclass(frozen=True)
class Piece:
    """Consecutive text of one document; `starts` when it is a document's first piece."""
    text: str
    starts: bool
    nbytes: int  # UTF-8 bytes of the text, for progress and the tokenizer sample
    after: tuple[int, int, int]  # the stream position after it: (source, offset, offset within the document)


PIECE_BYTES = 32 << 10  # the tokenizers encode pieces of tens of kB fastest
READ_BYTES = 16 << 20
WHITESPACE = b" \t\r\n\x0b\x0c"

# Named corpora: URL and sha256, downloaded once into the cache.
NAMED = {
    "tinyshakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
CACHE = Path(os.environ.get("GPTKIT_CACHE", Path.home() / ".cache" / "gptkit"))


def embedded_corpus() -> Iterator[Document]:
    """Text present wherever Python is: the interpreter's bundled documentation (pydoc topics) and the
    top-level modules of the standard library, in a fixed order (about 5 MB)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"pydoc:{name}", topics[name])
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        yield Document(f"stdlib:{path.name}", path.read_text(encoding="utf-8", errors="replace"))


def cut(window: bytes) -> int:
    """Where to end a piece that starts `window`: after a newline between two non-space characters (where a
    GPT-2 or cl100k split pattern splits too, so the tokens are the same as uncut), else after any newline,
    else at a character boundary."""
    at = len(window)
    for _ in range(4096):
        at = window.rfind(b"\n", 0, at)
        if at <= 0 or at + 1 >= len(window):
            break
        if window[at - 1] not in WHITESPACE and window[at + 1] not in WHITESPACE:
            return at + 1
    at = window.rfind(b"\n")
    if at >= 0:
        return at + 1
    at = len(window)
    while at > 1 and window[at - 1] & 0xC0 == 0x80:  # back off a continuation byte
        at -= 1
    at = at - 1 if window[at - 1] >= 0xC0 else at  # and the lead byte they follow
    return at if at > 0 else len(window)  # not UTF-8 at all: decoding it says so


def split_text(data: bytes, start: int = 0) -> Iterator[tuple[bytes, int]]:
    """(piece, offset after it) for the bytes of one document, from `start`."""
    while start < len(data):
        end = len(data) if len(data) - start <= PIECE_BYTES else start + cut(data[start:start + PIECE_BYTES])
        yield data[start:end], end
        start = end


def decode(raw: bytes, where: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte {offset + e.start}); convert it first, or pass "
                        f"--skip-bad to leave it out") from None


def _skip(error: DataError, skip_bad: bool) -> None:
    """Leave a bad input out with a warning (--skip-bad), or stop on it."""
    if not skip_bad:
        raise error
    print(f"skipping: {error}", file=sys.stderr)


class Source:
    """One input, addressed by offset: bytes for a text file, a document's address (a JSONL line's offset, an
    index) otherwise. `pieces(begin, end, within)` streams its range [begin, end), from `within` bytes into the
    document at `begin`; each piece carries the position after it (a document's last: the next document's)."""
    name: str
    index: int = 0  # its place in the corpus, for the positions its pieces carry

    def size(self) -> int:
        raise NotImplementedError

    def identity(self) -> list[dict]:
        raise NotImplementedError

    def align(self, offset: int) -> int:
        """The first document boundary at or after `offset` (where a part may begin)."""
        return offset

    def pieces(self, begin: int, end: int, within: int = 0) -> Iterator[Piece]:
        raise NotImplementedError


class FileSource(Source):
    """A file read in blocks; unreadable (or, for text, binary or not UTF-8 with `skip_bad`) files are refused
    or left out whole, before anything of them is read into the stream."""

    def __init__(self, path: Path, skip_bad: bool = False):
        self.path, self.name, self.skip_bad = Path(path), str(path), skip_bad
        self.skipped: str | None = None
        self._size, self._identity = 0, None
        try:
            self._size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                self._check_head(f.read(8192))
        except OSError as e:
            self._leave_out(DataError(f"cannot read {path}: {e.strerror}"))
        except DataError as e:
            self._leave_out(e)

    def _check_head(self, head: bytes) -> None:
        pass

    def _leave_out(self, error: DataError) -> None:
        _skip(error, self.skip_bad)
        self.skipped = str(error)  # its size stays: the parts' byte ranges are the same whatever a part checked

    def size(self) -> int:
        return self._size

    def identity(self) -> list[dict]:
        """Its bytes and hash (one read of the whole file; with `skip_bad`, a text file is checked then too)."""
        if self._identity is None and self.skipped is None:
            digest, check = hashlib.sha256(), self._validator()
            try:
                with open(self.path, "rb") as f:
                    at = 0
                    while block := f.read(READ_BYTES):
                        digest.update(block)
                        if check is not None:
                            check(block, at)
                        at += len(block)
                self._identity = [{"source": self.name, "bytes": self._size, "sha256": digest.hexdigest()}]
            except OSError as e:
                self._leave_out(DataError(f"cannot read {self.path}: {e.strerror}"))
            except DataError as e:
                self._leave_out(e)
        return self._identity or [{"source": self.name, "skipped": self.skipped}]

    def _validator(self):
        return None

    def align(self, offset: int) -> int:
        """The start of the line at or after `offset`."""
        if self.skipped is not None or offset <= 0 or offset >= self._size:
            return min(max(offset, 0), self._size)
        with self._open() as f:
            f.seek(offset - 1)
            at = offset - 1
            while block := f.read(1 << 16):
                nl = block.find(b"\n")
                if nl >= 0:
                    return at + nl + 1
                at += len(block)
        return self._size

    def _open(self):
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror}") from None


class TextFile(FileSource):
    """A text file: one document, cut into pieces."""

    def _check_head(self, head: bytes) -> None:
        if b"\x00" in head:
            raise DataError(f"{self.path} looks binary (it contains NUL bytes); give a text file")

    def _validator(self):
        if not self.skip_bad:
            return None  # checked as it is read
        decoder = codecs.getincrementaldecoder("utf-8")()

        def check(block: bytes, at: int) -> None:
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise DataError(f"{self.path} is not UTF-8 text (byte {at + e.start})") from None
        return check

    def pieces(self, begin: int, end: int, within: int = 0) -> Iterator[Piece]:
        if self.skip_bad:
            self.identity()  # checks the whole file first, so that a bad one is left out whole
        if self.skipped is not None:
            return
        at = begin
        with self._open() as f:
            f.seek(at)
            buffer, buffer_at = b"", at
            while at < end:
                if len(buffer) - (at - buffer_at) < min(PIECE_BYTES, end - at):
                    buffer = buffer[at - buffer_at:] + f.read(min(READ_BYTES, end - at))
                    buffer_at = at
                window = buffer[at - buffer_at:at - buffer_at + min(PIECE_BYTES, end - at)]
                if not window:
                    break  # the file shrank while being read
                n = len(window) if end - at <= PIECE_BYTES else cut(window)
                yield Piece(decode(window[:n], str(self.path), at), at == 0, n, (self.index, at + n, 0))
                at += n


class JsonlFile(FileSource):
    """JSON lines, one document each in `field`; a bad line stops the run, or is left out with `skip_bad`."""

    def __init__(self, path: Path, field: str = "text", skip_bad: bool = False):
        super().__init__(path, skip_bad)
        self.field = field

    def _line_number(self, offset: int) -> int:
        lines, at = 1, 0
        with self._open() as f:
            while at < offset and (block := f.read(min(READ_BYTES, offset - at))):
                lines, at = lines + block.count(b"\n"), at + len(block)
        return lines

    def pieces(self, begin: int, end: int, within: int = 0) -> Iterator[Piece]:
        if self.skipped is not None:
            return
        with self._open() as f:
            f.seek(begin)
            at = begin
            while at < end and (line := f.readline()):
                line_at, at = at, at + len(line)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[self.field]
                    if not isinstance(text, str):
                        raise TypeError
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    _skip(DataError(f"{self.path}:{self._line_number(line_at)}: not a JSON object with a "
                                    f"string {self.field!r} field"), self.skip_bad)
                    continue
                yield from _document_pieces(text, self.index, line_at, at, within)
                within = 0


class Documents(Source):
    """Documents in memory or in a dataset, by index."""

    def __init__(self, name: str, docs, identity: list[dict] | None = None):
        self.name, self.docs, self._identity = name, docs, identity

    def size(self) -> int:
        return len(self.docs)

    def identity(self) -> list[dict]:
        if self._identity is None:
            self._identity = [{"source": d.source, "sha256": hashlib.sha256(d.text.encode("utf-8")).hexdigest()}
                              for d in self.docs]
        return self._identity

    def pieces(self, begin: int, end: int, within: int = 0) -> Iterator[Piece]:
        for i in range(begin, end):
            doc = self.docs[i]
            text = doc.text if isinstance(doc, Document) else doc
            if not isinstance(text, str):
                raise DataError(f"{self.name}: document {i} is not text")
            yield from _document_pieces(text, self.index, i, i + 1, within)
            within = 0


def _document_pieces(text: str, source: int, address: int, following: int, within: int) -> Iterator[Piece]:
    """One document's pieces from `within` bytes in: each carries (source, address, bytes in) after it, the last
    one the next document's (source, following, 0)."""
    data = text.encode("utf-8")
    for raw, after in split_text(data, within):
        position = (source, following, 0) if after == len(data) else (source, address, after)
        yield Piece(raw.decode("utf-8"), after == len(raw), len(raw), position)


class Corpus:
    """The ordered sources of one `prepare`; iterating it gives its documents' pieces (as `Document`s)."""

    def __init__(self, sources: list[Source]):
        self.sources = sources
        for i, s in enumerate(sources):
            s.index = i

    def __iter__(self) -> Iterator[Document]:
        for piece in self.pieces():
            yield Document(self.sources[piece.after[0]].name, piece.text)

    def identity(self, part: tuple[int, int] = (0, 1)) -> list[dict]:
        """What the part's text is: each file it reads (its bytes and hash), each collection's documents."""
        return [entry for s, (begin, end) in zip(self.sources, self.ranges(part))
                if begin < end or not isinstance(s, FileSource) for entry in s.identity()]

    def ranges(self, part: tuple[int, int] = (0, 1)) -> list[tuple[int, int]]:
        """Each source's [begin, end) in the i-th of n disjoint parts: files by their bytes together (aligned to
        line starts, so a JSONL document is never cut), collections by document index."""
        i, n = part
        total = sum(s.size() for s in self.sources if isinstance(s, FileSource))
        lo, hi = total * i // n, total * (i + 1) // n
        ranges, at = [], 0
        for s in self.sources:
            if isinstance(s, FileSource):
                ranges.append(tuple(s.align(min(max(x - at, 0), s.size())) for x in (lo, hi)))
                at += s.size()
            else:
                ranges.append((s.size() * i // n, s.size() * (i + 1) // n))
        return ranges

    def pieces(self, part: tuple[int, int] = (0, 1), start: tuple[int, int, int] | None = None) -> Iterator[Piece]:
        """The part's pieces in order, from `start` (a position a piece carried) or its beginning."""
        for s, (begin, end) in zip(self.sources, self.ranges(part)):
            within = 0
            if start is not None:
                if s.index < start[0]:
                    continue
                if s.index == start[0]:
                    begin, within = max(begin, start[1]), start[2]
            yield from s.pieces(begin, end, within)

    def total_bytes(self, part: tuple[int, int] = (0, 1)) -> int | None:
        """The part's size in bytes, where every source is a file."""
        if not all(isinstance(s, FileSource) for s in self.sources):
            return None
        return sum(end - begin for begin, end in self.ranges(part))


def expand_paths(pattern: str) -> list[Path]:
    """A file, a directory (its files, recursively, sorted) or a glob."""
    p = Path(pattern)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
    if p.is_file():
        return [p]
    matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
    if not matches:
        raise DataError(f"no such file, directory or glob match: {pattern}")
    return matches


def download(name: str) -> Path:
    """A named corpus, from the cache or downloaded and checked against its checksum."""
    if name not in NAMED:
        raise DataError(f"unknown corpus {name!r}; named corpora: {', '.join(NAMED)}, or 'python' (embedded)")
    url, sha = NAMED[name]
    path = CACHE / f"{name}.txt"
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
        return path
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise DataError(f"cannot download {name} ({e}); offline, use the embedded corpus (--corpus python) "
                        f"or a local file (--text FILE)") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise DataError(f"download of {name} does not match its checksum")
    return atomic_write(path, data)


def hf_dataset(name: str, field: str = "text", split: str = "train") -> Documents:
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split)  # memory-mapped Arrow: rows are read as asked for
    except Exception as e:  # network, missing dataset: the library raises many types
        raise DataError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
    if field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no field {field!r} (it has {', '.join(ds.column_names)})")
    return Documents(f"hf:{name}", ds[field] if len(ds) < 100_000 else _Column(ds, field),
                     [{"source": f"hf:{name}", "rows": len(ds), "fingerprint": ds._fingerprint}])


class _Column:
    """One field of a dataset, row by row (the whole column would be read into memory)."""

    def __init__(self, ds, field: str):
        self.ds, self.field = ds, field

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i][self.field]


def read_sources(texts: Iterable[str] = (), jsonl: Iterable[str] = (), corpora: Iterable[str] = (),
                 hf: Iterable[str] = (), field: str = "text", skip_bad: bool = False) -> Corpus:
    """The given sources, in order. With no source: the embedded corpus. `skip_bad`: leave out (with a
    warning) files that are unreadable, binary or not UTF-8, and JSONL lines without the field."""
    texts, jsonl, corpora, hf = list(texts), list(jsonl), list(corpora), list(hf)
    if not (texts or jsonl or corpora or hf):
        corpora = ["python"]
    sources: list[Source] = []
    for name in corpora:
        sources.append(Documents("python", list(embedded_corpus())) if name == "python"
                       else TextFile(download(name), skip_bad))
    for pattern in texts:
        for path in expand_paths(pattern):
            sources.append(TextFile(path, skip_bad))
    for pattern in jsonl:
        for path in expand_paths(pattern):
            sources.append(JsonlFile(path, field, skip_bad))
    for name in hf:
        sources.append(hf_dataset(name, field))
    return Corpus(sources)


def as_corpus(docs: Corpus | Iterable[Document]) -> Corpus:
    """A corpus, or documents in memory as one."""
    if isinstance(docs, Corpus):
        return docs
    return Corpus([Documents("documents", list(docs))])
