"""A GGUF file's metadata and tensor table, parsed lean; its tensors mapped, not read.

The `gguf` package's GGUFReader keeps every array item of the metadata as numpy views of the file: a BPE vocabulary
of 49k tokens and 49k merges costs it ~160 MB of Python objects (a 128k one with 280k merges, ~600 MB), more than
SmolLM2's weights. Here the metadata becomes plain Python values (one pass with `struct`) and each tensor a numpy
view of a memory map, in the layout GGUFReader gives it, so `gguf.quants.dequantize` reads it unchanged.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GptkitError

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


class GGUFFileError(GptkitError):
    """A file that is not a GGUF file, or one cut short."""


@dataclass
class Tensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's order: the row length first
    data: np.ndarray  # float types: the values; quantized: uint8 rows of blocks (as GGUFReader gives them)


class GGUFFile:
    def __init__(self, path: Path | str):
        import gguf

        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFFileError(f"{self.path} is not a GGUF file (it is empty)") from None
        self._at = 0
        try:
            if self._map[:4] != MAGIC:
                raise GGUFFileError(f"{self.path} is not a GGUF file (no GGUF magic number)")
            self._at = 4
            version, n_tensors, n_fields = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
            if version not in (2, 3):
                raise GGUFFileError(f"{self.path}: GGUF version {version} is not read (2, 3; a big-endian file?)")
            self.fields = {}
            for _ in range(n_fields):
                key = self._string()
                self.fields[key] = self._value(self._unpack("<I"))
            infos = [(self._string(), [self._unpack("<Q") for _ in range(self._unpack("<I"))], self._unpack("<I"),
                      self._unpack("<Q")) for _ in range(n_tensors)]
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise GGUFFileError(f"{self.path} is not a readable GGUF file (cut short or damaged: {e})") from None
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // align) * align
        self.tensors = []
        for name, dims, kind, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise GGUFFileError(f"{self.path}: {name} has an unknown tensor type {kind}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            shape = tuple(reversed(dims))  # numpy's order
            count = int(np.prod(dims))
            nbytes = count // block * size
            if start + offset + nbytes > len(self._map) or count % block or (dims and dims[0] % block):
                raise GGUFFileError(f"{self.path} is cut short or damaged: {name} does not fit in the file")
            raw = np.frombuffer(self._map, np.uint8, nbytes, start + offset)
            if qtype.name in _NUMPY:  # the values themselves
                data = raw.view(_NUMPY[qtype.name]).reshape(shape)
            else:  # blocks (BF16 too, as GGUFReader gives it)
                data = raw.reshape(*shape[:-1], shape[-1] // block * size)
            self.tensors.append(Tensor(name, qtype, tuple(dims), data))

    def _unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self._map, self._at)[0]
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self._at + n > len(self._map):
            raise struct.error("a string runs past the end of the file")
        text = self._map[self._at:self._at + n].decode("utf-8")
        self._at += n
        return text

    def _value(self, kind: int):
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, n = self._unpack("<I"), self._unpack("<Q")
            if item in _SCALARS:  # numbers: one unpack for the lot
                fmt = f"<{n}{_SCALARS[item][1]}"
                values = list(struct.unpack_from(fmt, self._map, self._at))
                self._at += struct.calcsize(fmt)
                return values
            return [self._value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise struct.error(f"unknown metadata type {kind}")
        return self._unpack(_SCALARS[kind])
