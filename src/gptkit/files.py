"""The one atomic write (temporary file, fsync, rename, fsync the folder), and the commit of a set of files as one act.

A checkpoint is several files; renaming them one by one leaves a window where a kill mixes step N+1's weights with
step N's optimizer state. `commit` closes it with a journal: every file is written under a temporary name, then a
pending manifest (each file's temporary name and hash) is written atomically, then the files are renamed, then the
manifest is. `verify` rolls an interrupted commit forward (every temporary file is already whole) and checks each
listed file against its hash, so a reader sees one whole commit or is told which file does not belong. (Loading
a model only recovers: a config.json edited by hand on purpose still loads; resuming a run verifies.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import GptkitError

Writer = Callable[[Path], None]  # writes one file's full contents to the path it is given
MANIFEST = "commit.json"
PENDING = ".commit.json.pending"
LOCK = ".commit.lock"  # one committer or recoverer of a directory at a time (several processes may load it)


class DiskFullError(GptkitError):
    """No space left where files were being written (the previous files are intact)."""


class CommitError(GptkitError):
    """A set of files that is not one whole commit."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: Exception, directory: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left" in text:
        return True
    # torch.save and safetensors report a short write in words of their own; only a near-empty disk explains it
    short_write = "unexpected pos" in text or "file write failed" in text
    return short_write and shutil.disk_usage(directory).free < (1 << 20)


def _as_writer(content: bytes | str | Writer) -> Writer:
    if isinstance(content, bytes):
        return lambda path: path.write_bytes(content)
    if isinstance(content, str):
        return lambda path: path.write_text(content, encoding="utf-8")
    return content


def _write_temp(directory: Path, name: str, content: bytes | str | Writer) -> Path:
    """`content` written whole and fsynced under a temporary name beside `name`, with the umask's permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp)
    try:
        _as_writer(content)(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after writing: some writers (safetensors) replace the file they are given
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _remove_stale(directory: Path, names) -> None:
    for name in names:  # temporaries a killed writer left behind
        for stale in directory.glob(f".{glob.escape(name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def _as_disk_full(e: Exception, directory: Path, names) -> DiskFullError | None:
    """`e` as the full disk it reports, naming what could not be written (None: some other error)."""
    if not _disk_full(e, directory):
        return None
    return DiskFullError(f"the disk is full: could not write {', '.join(names)} in {directory} "
                         f"({shutil.disk_usage(directory).free:,} bytes free)")


def atomic_write(path: Path | str, content: bytes | str | Writer) -> Path:
    """Write one file so that a reader sees the old contents or the new, never a part: a crash or a full disk
    leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent, [path.name])
    try:
        tmp = _write_temp(path.parent, path.name, content)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:
        error = _as_disk_full(e, path.parent, [path.name])
        if error is not None:
            raise error from None
        raise
    return path


def sha256(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _locked(directory: Path):
    with open(directory / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def commit(directory: Path | str, files: dict[str, bytes | str | Writer], meta: dict | None = None) -> None:
    """Write `files` into `directory` as one commit, recorded in its manifest with `meta` (e.g. the step)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        _recover(directory)  # an earlier commit a kill interrupted comes first: its files are the newest whole ones
        _commit(directory, files, meta)


def _commit(directory: Path, files: dict, meta: dict | None) -> None:
    _remove_stale(directory, list(files) + [MANIFEST])
    temps: dict[str, Path] = {}
    try:
        for name, content in files.items():
            temps[name] = _write_temp(directory, name, content)
        journal = {"files": {n: {"tmp": t.name, "sha256": sha256(t), "bytes": t.stat().st_size}
                             for n, t in temps.items()}, **(meta or {})}
        atomic_write(directory / PENDING, json.dumps(journal, indent=1) + "\n")
    except Exception as e:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        error = _as_disk_full(e, directory, files)
        if error is not None:
            raise error from None
        raise
    _roll_forward(directory, journal)  # from here on the commit happens: `verify` finishes it after a kill


def _roll_forward(directory: Path, journal: dict) -> None:
    for name, entry in journal["files"].items():
        tmp = directory / entry["tmp"]
        if tmp.exists():
            os.replace(tmp, directory / name)
    _fsync_dir(directory)
    manifest = {"files": {n: {"sha256": e["sha256"], "bytes": e["bytes"]} for n, e in journal["files"].items()},
                **{k: v for k, v in journal.items() if k != "files"}}
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    (directory / PENDING).unlink(missing_ok=True)
    _fsync_dir(directory)


def recover(directory: Path | str) -> None:
    """Finish a commit that a kill interrupted (every one of its files was written whole before its journal)."""
    directory = Path(directory)
    if (directory / PENDING).exists():
        with _locked(directory):
            _recover(directory)


def _recover(directory: Path) -> None:
    pending = directory / PENDING
    if not pending.exists():
        return
    try:
        journal = json.loads(pending.read_text())
    except (OSError, ValueError):
        journal = None  # written atomically, so only an unfinished write of the journal itself: no commit

    def ready(name: str, entry: dict) -> bool:  # still its temporary file, or already renamed to its name
        final = directory / name
        return (directory / entry["tmp"]).exists() or (final.exists() and final.stat().st_size == entry["bytes"]
                                                       and sha256(final) == entry["sha256"])

    if journal is not None and all(ready(n, e) for n, e in journal["files"].items()):
        _roll_forward(directory, journal)
    else:  # not a commit that can be finished: the previous one stays as it was
        pending.unlink(missing_ok=True)


def verify(directory: Path | str, names=None) -> dict | None:
    """The manifest of the directory's last commit (None where it has none: written before commits existed), after
    `recover`. Each listed file among `names` (default: all) that exists must have the hash it was committed with."""
    directory = Path(directory)
    recover(directory)
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CommitError(f"{path} is not valid JSON: {e}") from None
    for name, entry in manifest["files"].items():
        file = directory / name
        if names is not None and name not in names or not file.exists():
            continue
        if file.stat().st_size != entry["bytes"]:
            raise CommitError(f"{file} does not belong to the checkpoint committed in {path}: truncated or corrupt, "
                              f"or another's ({file.stat().st_size:,} bytes where it committed {entry['bytes']:,})")
        if sha256(file) != entry["sha256"]:
            raise CommitError(f"{file} does not belong to the checkpoint committed in {path} (its contents changed "
                              f"since); restore it or remove {MANIFEST} to accept it")
    return manifest
