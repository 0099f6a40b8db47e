"""Where text comes from: the embedded default corpus, local files, JSONL, named downloads, HF datasets."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from ..errors import GptkitError


class DataError(GptkitError):
    """Input text that cannot be used: missing, empty, binary, malformed, or not downloadable."""


@dataclass(frozen=True)
class Document:
    source: str  # where it came from (path, URL, corpus name), for the metadata and error messages
    text: str


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


def read_text_file(path: Path) -> Document:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary (it contains NUL bytes); give a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
    return Document(str(path), text)


def read_jsonl(path: Path, field: str = "text", skip_bad: bool = False) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                if skip_bad:
                    continue
                raise DataError(f"{path}:{n}: not a JSON object with a string {field!r} field") from None
            yield Document(f"{path}:{n}", text)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def hf_dataset(name: str, field: str = "text", split: str = "train") -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset: the library raises many types
        raise DataError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        yield Document(f"hf:{name}:{i}", row[field])


def read_sources(texts: list[str] = (), jsonl: list[str] = (), corpora: list[str] = (), hf: list[str] = (),
                 field: str = "text") -> Iterator[Document]:
    """All documents of the given sources, in order. With no source: the embedded corpus."""
    if not (texts or jsonl or corpora or hf):
        corpora = ["python"]
    for name in corpora:
        yield from embedded_corpus() if name == "python" else [read_text_file(download(name))]
    for pattern in texts:
        for path in expand_paths(pattern):
            yield read_text_file(path)
    for pattern in jsonl:
        for path in expand_paths(pattern):
            yield from read_jsonl(path, field)
    for name in hf:
        yield from hf_dataset(name, field)
