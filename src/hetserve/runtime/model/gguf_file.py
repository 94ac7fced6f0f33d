"""A GGUF file's metadata and tensor table, read in one pass over its header with ``struct``.

``gguf.GGUFReader`` makes a NumPy view for every element of every metadata array, which costs seconds
for a tokenizer's ~100k strings and every worker process of a plan pays it. This reader decodes the
header directly (GGUF v2/v3, little-endian) and memory-maps the tensor data; tensor types, block sizes
and dequantisation stay ``gguf``'s (``GGMLQuantizationType``, ``GGML_QUANT_SIZES``, ``gguf.quants``).
With ``arrays=False`` long arrays are skipped and only their length is kept (``SkippedArray``), which
is all a worker needs of the tokenizer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: Arrays up to this many elements are always decoded (rope factors, small lists); longer ones only
#: when asked for.
SMALL_ARRAY = 64

# GGUF value types (the format's numbering, as in gguf.GGUFValueType): strings, arrays, and numbers
# stored little-endian as these NumPy types
_STRING, _ARRAY = 8, 9
_NUMBERS = {
    k: np.dtype(t).newbyteorder("<")
    for k, t in {
        0: np.uint8,
        1: np.int8,
        2: np.uint16,
        3: np.int16,
        4: np.uint32,
        5: np.int32,
        6: np.float32,
        7: np.bool_,
        10: np.uint64,
        11: np.int64,
        12: np.float64,
    }.items()
}
# unquantised tensor types and their element dtypes (ggml numbering, as in gguf.GGMLQuantizationType)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array that was not decoded: its element type and length."""

    value_type: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # dimensions fastest-first, as GGUF lists them
    data: np.ndarray  # memory-mapped: typed elements, or raw bytes per row for quantised types


class GGUFFile:
    """``meta``: {key: value}; ``tensors``: the tensor table with memory-mapped data."""

    def __init__(self, path: str | Path, *, arrays: bool = True):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = memoryview(buf)
        if bytes(raw[:4]) != MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (no GGUF magic)")
        self._raw, self._pos, self._arrays = raw, 24, arrays
        self.meta: dict[str, Any] = {}
        try:
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
            if version not in (2, 3):
                raise GGUFFormatError(
                    f"{self.path}: GGUF version {version} is not supported (2 or 3; a "
                    "big-endian file reads as a huge version)"
                )
            for _ in range(n_kv):
                key = self._string()
                self.meta[key] = self._value(self._u32())
            table = []
            for _ in range(n_tensors):
                name = self._string()
                dims = struct.unpack_from(f"<{self._u32()}Q", raw, self._pos)
                self._pos += 8 * len(dims)
                kind, offset = struct.unpack_from("<IQ", raw, self._pos)
                self._pos += 12
                table.append((name, tuple(int(d) for d in dims), kind, offset))
        except struct.error as exc:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header ({exc})") from exc
        align = int(self.meta.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensor] = []
        for name, dims, kind, offset in table:
            qtype = GGMLQuantizationType(kind)
            elems = int(np.prod(dims)) if dims else 1
            rows = tuple(reversed(dims))  # slowest-first, as NumPy lays them out
            first = start + offset
            if kind in _PLAIN:
                dtype = np.dtype(_PLAIN[kind])
                nbytes, shape = elems * dtype.itemsize, rows
            else:
                block, size = GGML_QUANT_SIZES[qtype]
                dtype = np.dtype(np.uint8)
                nbytes, shape = elems * size // block, (*rows[:-1], rows[-1] * size // block)
            if first + nbytes > len(buf):
                raise GGUFFormatError(f"{self.path}: tensor {name} runs past the end of the file")
            data = buf[first : first + nbytes].view(dtype).reshape(shape)
            self.tensors.append(GGUFTensor(name, qtype, dims, data))
        del self._raw

    # ---- header decoding ------------------------------------------------------------------------
    def _u32(self) -> int:
        return int(self._numbers(4, 1)[0])

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._raw, self._pos)
        start = self._pos + 8
        self._pos = start + n
        if self._pos > len(self._raw):
            raise struct.error("a string runs past the end of the file")
        return bytes(self._raw[start : self._pos]).decode("utf-8", errors="replace")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, n = struct.unpack_from("<IQ", self._raw, self._pos)
            self._pos += 12
            if item in _NUMBERS:
                values = self._numbers(item, n)
                return values.tolist() if self._arrays or n <= SMALL_ARRAY else SkippedArray(item, n)
            if self._arrays or n <= SMALL_ARRAY:
                return [self._value(item) for _ in range(n)]
            if item == _STRING:  # walk past the strings without decoding them
                raw, pos = self._raw, self._pos
                for _ in range(n):
                    pos += 8 + struct.unpack_from("<Q", raw, pos)[0]
                if pos > len(raw):
                    raise struct.error("an array runs past the end of the file")
                self._pos = pos
            else:
                for _ in range(n):
                    self._value(item)
            return SkippedArray(item, n)
        if kind not in _NUMBERS:
            raise GGUFFormatError(f"{self.path}: unknown metadata value type {kind}")
        return self._numbers(kind, 1)[0].item()

    def _numbers(self, kind: int, n: int) -> np.ndarray:
        """``n`` numbers of value type ``kind`` at the read position."""
        dtype = _NUMBERS[kind]
        end = self._pos + n * dtype.itemsize
        if end > len(self._raw):
            raise struct.error("a value runs past the end of the file")
        values = np.frombuffer(self._raw[self._pos : end], dtype=dtype)
        self._pos = end
        return values
