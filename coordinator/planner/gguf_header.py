"""A GGUF header reader for planning: scalar metadata, array lengths and tensor infos, never tensor data.

``gguf.GGUFReader`` also never reads tensor data, but it turns every element of the tokenizer arrays into its own
numpy view: 6 s for SmolLM2-135M's header on a 2-core machine, far more for Llama 3's 128K-token vocabulary. The
planner needs none of those elements, so this reader skips arrays (string arrays by their length prefixes) over a
memory map, which pages in only the header. Type sizes come from ``gguf.constants``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAGIC = b"GGUF"
# GGUFValueType -> struct format of a scalar
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """Not a GGUF file, or a truncated / corrupt header."""


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """An array-valued metadata field, by its element type and length only."""

    item_type: int
    length: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] (ne0) is the row length
    ggml_type: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars and strings as values, arrays as ArrayInfo
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFHeaderError(f"header truncated at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise GGUFHeaderError(f"string of {n} bytes runs past the end at byte {self.pos}")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.take("Q")
            self.pos += n
        if self.pos > len(self.buf):
            raise GGUFHeaderError("string array runs past the end of the file")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALAR:
                self.pos += struct.calcsize("<" + _SCALAR[item]) * count
                if self.pos > len(self.buf):
                    raise GGUFHeaderError("array runs past the end of the file")
            elif item == _STRING:
                self.skip_strings(count)
            else:
                raise GGUFHeaderError(f"unsupported array element type {item}")
            return ArrayInfo(item, count)
        raise GGUFHeaderError(f"unknown metadata value type {vtype} at byte {self.pos}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Read metadata and tensor infos of a GGUF (v2/v3, little-endian) file.

    Raises:
        GGUFHeaderError: not GGUF, an unsupported version, or a truncated/corrupt header.
        OSError: the file cannot be opened.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        if size < 24:
            raise GGUFHeaderError(f"{path}: {size} bytes is too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                cur = _Cursor(view)
                if bytes(view[:4]) != _MAGIC:
                    raise GGUFHeaderError(f"{path}: not a GGUF file (magic {bytes(view[:4])!r})")
                cur.pos = 4
                version = cur.take("I")
                if version not in (2, 3):
                    raise GGUFHeaderError(f"{path}: GGUF version {version} (supported: 2, 3)")
                n_tensors, n_kv = cur.take("Q"), cur.take("Q")
                metadata: dict[str, Any] = {}
                for _ in range(n_kv):
                    key = cur.string()
                    metadata[key] = cur.value(cur.take("I"))
                tensors = []
                for _ in range(n_tensors):
                    name = cur.string()
                    dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
                    gtype = cur.take("I")
                    cur.take("Q")  # offset into the data section
                    try:
                        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
                    except (ValueError, KeyError):
                        raise GGUFHeaderError(f"{path}: tensor {name!r} has unknown type {gtype}") from None
                    count = 1
                    for d in dims:
                        count *= d
                    tensors.append(TensorInfo(name, dims, gtype, count // block * type_size))
            finally:
                del cur
                view.release()
    return GGUFHeader(version, metadata, tuple(tensors))
