"""A fast reader of GGUF headers: metadata and tensor records, with tensor data as zero-copy views.

The `gguf` package supplies the format's constants and the dequantizers; its own reader walks every
array element through memory-map slicing (seconds for a 262k-token vocabulary), so the header is
parsed here with `struct` in one pass."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (the message says where)."""


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]  # outermost first: (rows, cols) for a matrix
    qtype: str  # GGML type name
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"the header ends early at byte {self.pos} (wanted {size} more bytes)")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"a string of {n} bytes at byte {self.pos} runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype == gguf.GGUFValueType.STRING:
                return [self.string() for _ in range(n)]
            fmt = _SCALARS.get(etype)
            if fmt is None:
                raise GGUFFormatError(f"unknown array element type {etype} at byte {self.pos}")
            size = struct.calcsize(fmt) * n
            if self.pos + size > len(self.buf):
                raise GGUFFormatError(f"an array of {n} values at byte {self.pos} runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.pos).tolist()
            self.pos += size
            return arr
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFFormatError(f"unknown value type {vtype} at byte {self.pos}")
        return self.take(fmt)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, TensorRecord]
    data: np.memmap  # the whole file, read-only

    def array(self, record: TensorRecord) -> np.ndarray:
        """The tensor's stored bytes/values, shaped for `gguf.quants.dequantize` (a view, no copy)."""
        kind = gguf.GGMLQuantizationType[record.qtype]
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        raw = self.data[record.offset : record.offset + record.nbytes]
        rows = int(np.prod(record.shape[:-1])) if len(record.shape) > 1 else 1
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return raw.view(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16).reshape(record.shape)
        return raw.reshape(rows, -1) if len(record.shape) > 1 else raw


def read(path: Path) -> GGUFFile:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    if bytes(data[:4]) != b"GGUF":
        raise GGUFFormatError(f"starts with {bytes(data[:4])!r}, expected b'GGUF'")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise GGUFFormatError(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        qtype, offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, dims, qtype, offset))
    align = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise GGUFFormatError(f"general.alignment={align!r}: must be a power of two")
    start = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        try:
            kind = gguf.GGMLQuantizationType(qtype)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {qtype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        n = int(np.prod(dims)) if dims else 1
        if dims and dims[0] % block:
            raise GGUFFormatError(
                f"tensor {name!r}: {dims[0]} values per row is not a whole number of {kind.name} blocks"
            )
        tensors[name] = TensorRecord(
            name, tuple(int(d) for d in reversed(dims)), kind.name, start + offset, n // block * type_size
        )
    return GGUFFile(path, metadata, tensors, data)
