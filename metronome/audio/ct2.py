"""Read a CTranslate2 `model.bin` without ctranslate2.

The file is a flat little-endian record stream: a uint32 binary version, the spec name (a string), a uint32
spec revision, a uint32 variable count, then per variable its name, a uint8 rank, `rank` uint32 dimensions,
a uint8 type id, a uint32 byte count and the raw bytes; then a uint32 alias count and (alias, target) name
pairs. A string is a uint16 length that counts a trailing NUL, then the bytes and the NUL. Type ids follow
CTranslate2's DataType enum. Tensors come back as zero-copy numpy views over one memory map.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# CTranslate2's DataType enum, in order; bfloat16 has no numpy dtype and is read as raw uint16 bits.
_DTYPES: tuple[tuple[str, np.dtype], ...] = (
    ("float32", np.dtype("<f4")),
    ("int8", np.dtype("i1")),
    ("int16", np.dtype("<i2")),
    ("int32", np.dtype("<i4")),
    ("float16", np.dtype("<f2")),
    ("bfloat16", np.dtype("<u2")),
)
# Version 4 introduced the type id; older files store an item size instead, which this reader does not handle.
_MIN_VERSION = 4
_MAX_VERSION = 6


class Ct2FormatError(ValueError):
    """model.bin is not a CTranslate2 model file this reader understands."""


@dataclass(frozen=True)
class Ct2Model:
    spec: str  # e.g. "WhisperSpec"
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]  # aliases resolved: an alias maps to its target's array
    dtypes: dict[str, str]  # CTranslate2 type name per variable

    def get(self, name: str) -> np.ndarray:
        try:
            return self.variables[name]
        except KeyError:
            raise KeyError(f"model.bin has no variable {name!r} (spec {self.spec})") from None


class _Cursor:
    def __init__(self, buf: np.ndarray, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> np.ndarray:
        if self.pos + n > len(self.buf):
            raise Ct2FormatError(f"{self.path}: truncated at byte {self.pos} (wanted {n} more bytes)")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2).tobytes())[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4).tobytes())[0]

    def string(self) -> str:
        n = self.u16()
        raw = self.take(n).tobytes()
        if n == 0 or raw[-1] != 0:
            raise Ct2FormatError(f"{self.path}: malformed string at byte {self.pos - n}")
        return raw[:-1].decode("utf-8")


def read_model_bin(path: str | Path) -> Ct2Model:
    """Map `path` (a CTranslate2 model.bin) and return its variables as numpy views (read-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.bin not found: {path}")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    version = cur.u32()
    if not _MIN_VERSION <= version <= _MAX_VERSION:
        raise Ct2FormatError(
            f"{path}: binary version {version} is not supported (this reader reads {_MIN_VERSION}..{_MAX_VERSION})"
        )
    spec = cur.string()
    revision = cur.u32()
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(cur.u32()):
        name = cur.string()
        rank = cur.u8()
        shape = tuple(cur.u32() for _ in range(rank))
        type_id = cur.u8()
        if type_id >= len(_DTYPES):
            raise Ct2FormatError(f"{path}: variable {name!r} has unknown type id {type_id}")
        type_name, dtype = _DTYPES[type_id]
        nbytes = cur.u32()
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if nbytes != count * dtype.itemsize:
            raise Ct2FormatError(
                f"{path}: variable {name!r} has {nbytes} bytes, its shape {shape} needs {count * dtype.itemsize}"
            )
        variables[name] = cur.take(nbytes).view(dtype).reshape(shape)
        dtypes[name] = type_name
    for _ in range(cur.u32()):
        alias, target = cur.string(), cur.string()
        if target not in variables:
            raise Ct2FormatError(f"{path}: alias {alias!r} points at missing variable {target!r}")
        variables[alias] = variables[target]
        dtypes[alias] = dtypes[target]
    if cur.pos != len(buf):
        raise Ct2FormatError(f"{path}: {len(buf) - cur.pos} trailing bytes after the alias table")
    return Ct2Model(spec=spec, revision=revision, binary_version=version, variables=variables, dtypes=dtypes)
