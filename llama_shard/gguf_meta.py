"""The one GGUF parser: header, key/value metadata (arrays included) and tensor infos, from a memory map.

``gguf.GGUFReader`` turns every element of every metadata array into its own numpy view (5-6 s for SmolLM2's
49K-token vocabulary on a 2-core machine); this reader walks the same bytes with ``struct`` and decodes numeric
arrays with one ``numpy.frombuffer`` each, string arrays in a tight loop: about 0.1 s for the same file. It
gives the values ``GGUFReader``'s ``field.contents()`` gives (``tests/test_gguf_meta.py`` checks every key of
the packaged SmolLM2 file and of files covering every value type), with one deliberate difference: a nested
array keeps its nesting (a list of lists) where gguf-py flattens it.

Torch-free (numpy only for numeric arrays, ``gguf.constants`` for the ggml type sizes): the planner reads
headers with it too.
Tensor data is never touched here; ``TensorInfo.offset`` says where it lies.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ArrayInfo", "GGUFMeta", "GGUFMetaError", "TensorInfo", "parse_gguf", "read_gguf"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUFValueType (gguf.constants) -> little-endian struct format and numpy dtype of a scalar.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_FORMATS = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}
_SCALARS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}
_U32, _U64 = _SCALARS[UINT32], _SCALARS[UINT64]
_MIN_ITEM_BYTES = {STRING: 8, ARRAY: 12}  # a length prefix; an item type and a count


@cache
def _dtypes() -> dict[int, np.dtype[Any]]:
    """numpy dtypes of the scalar types, built on first use: the planner (``arrays=False``) never needs numpy."""
    import numpy as np

    return {t: np.dtype(f.replace("?", "b1")) for t, f in _SCALAR_FORMATS.items()}


def _numeric_array(buf: Any, item: int, count: int, start: int) -> list[Any]:
    import numpy as np

    return list(np.frombuffer(buf, _dtypes()[item], count, start).tolist())


class GGUFMetaError(ValueError):
    """Not a GGUF file, an unsupported one, or a truncated / corrupt header. The message is one sentence."""


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """An array-valued field read with ``arrays=False``: its element type and length, not its elements."""

    item_type: int
    length: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's entry in the header.

    Attributes:
        name: the GGUF tensor name (``blk.3.attn_q.weight``).
        shape: ggml order, ``shape[0]`` (ne0) is the row length.
        ggml_type: the ``GGMLQuantizationType`` value.
        offset: absolute byte offset of its data in the file.
        n_elements: product of ``shape``.
        n_bytes: bytes of its data.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFMeta:
    """A parsed header. ``metadata`` also holds ``GGUF.version``/``GGUF.tensor_count``/``GGUF.kv_count``, as
    ``GGUFReader.fields`` does."""

    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int  # start of the tensor data section


class _Reader:
    """A cursor over the header bytes; every read checks the bounds first."""

    def __init__(self, buf: Any, size: int, arrays: bool) -> None:
        self.buf, self.size, self.pos, self.arrays = buf, size, 0, arrays

    def fail(self, what: str) -> GGUFMetaError:
        return GGUFMetaError(f"{what} at byte {self.pos} runs past the end of the {self.size}-byte file (truncated)")

    def scalar(self, vtype: int) -> Any:
        s = _SCALARS[vtype]
        if self.pos + s.size > self.size:
            raise self.fail("a value")
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def u32(self) -> int:
        return int(self.scalar(UINT32))

    def u64(self) -> int:
        return int(self.scalar(UINT64))

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > self.size:
            raise self.fail(f"a {n}-byte string")
        try:
            text = str(self.buf[self.pos : end], "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFMetaError(f"the string at byte {self.pos} is not UTF-8 ({e.reason})") from None
        self.pos = end
        return text

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            return self.array()
        raise GGUFMetaError(f"unknown metadata value type {vtype} at byte {self.pos - 4}")

    def array(self) -> Any:
        item, count = self.u32(), self.u64()
        least = _SCALARS[item].size if item in _SCALARS else _MIN_ITEM_BYTES.get(item)
        if least is None:
            raise GGUFMetaError(f"unknown array element type {item} at byte {self.pos - 12}")
        if self.pos + least * count > self.size:
            raise self.fail(f"an array of {count} elements")
        if item in _SCALARS:
            start = self.pos
            self.pos += least * count
            if not self.arrays:
                return ArrayInfo(item, count)
            return _numeric_array(self.buf, item, count, start)
        if item == STRING:
            if not self.arrays:
                self.skip_strings(count)
                return ArrayInfo(item, count)
            return self.strings(count)
        values = [self.array() for _ in range(count)]  # nested arrays
        return values if self.arrays else ArrayInfo(item, count)

    def strings(self, count: int) -> list[str]:
        # The hot loop of a tokenizer vocabulary: locals only, bounds checked once per string.
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                end = pos + n
                if end > size:
                    break
                append(str(buf[pos:end], "utf-8"))
                pos = end
        except struct.error:
            pass  # a length prefix past the end; reported below
        except UnicodeDecodeError as e:
            self.pos = pos
            raise GGUFMetaError(f"the string at byte {pos} is not UTF-8 ({e.reason})") from None
        self.pos = pos
        if len(out) < count:
            raise self.fail(f"string {len(out)} of an array of {count}")
        return out

    def skip_strings(self, count: int) -> None:
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"string {i} of an array of {count}")
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos
        if pos > size:
            raise self.fail(f"the last string of an array of {count}")


def parse_gguf(buf: Any, size: int | None = None, *, arrays: bool = True) -> GGUFMeta:
    """Parse a GGUF (v2/v3, little-endian) header from a buffer (``bytes``, ``mmap``...).

    Args:
        buf: the file's bytes, or at least its header; tensor data is not read, only checked to lie within
            ``size``.
        size: the file's size (default ``len(buf)``).
        arrays: read array elements; False gives ``ArrayInfo`` (type and length) instead, which is all a
            planner needs and skips decoding the vocabulary.

    Raises:
        GGUFMetaError: not GGUF, a version or byte order this reader does not handle, a truncated or corrupt
            header, a duplicate key or tensor name, an unknown tensor type, or tensor data past the end.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = len(buf) if size is None else size
    r = _Reader(buf, size, arrays)
    if size < 4 or bytes(buf[:4]) != MAGIC:
        raise GGUFMetaError(f"not a GGUF file (it starts with {bytes(buf[:4])!r}, not {MAGIC!r})")
    r.pos = 4
    version = r.u32()
    if version & 0xFFFF == 0 and version:
        raise GGUFMetaError("a big-endian GGUF file; only little-endian files are supported")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFMetaError(f"GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors, n_kv = r.u64(), r.u64()
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        at = r.pos
        key = r.string()
        if key in metadata:
            raise GGUFMetaError(f"metadata key {key!r} at byte {at} appears twice")
        try:
            metadata[key] = r.value(r.u32())
        except RecursionError:
            raise GGUFMetaError(f"metadata key {key!r} nests arrays too deeply to be a real file") from None
    alignment = _alignment(metadata)
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if r.pos + 8 * n_dims > size:
            raise r.fail(f"tensor {name!r}'s {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, r.pos)
        r.pos += 8 * n_dims
        raw.append((name, dims, r.u32(), r.u64()))
    data_offset = -(-r.pos // alignment) * alignment
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, dims, gtype, rel in raw:
        if name in seen:
            raise GGUFMetaError(f"tensor {name!r} appears twice")
        seen.add(name)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise GGUFMetaError(f"tensor {name!r} has unknown ggml type {gtype}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements * type_size // block
        offset = data_offset + rel
        if offset + n_bytes > size:
            raise GGUFMetaError(
                f"tensor {name!r} needs bytes {offset}..{offset + n_bytes} of a {size}-byte file (truncated)"
            )
        tensors.append(TensorInfo(name, tuple(dims), gtype, offset, n_elements, n_bytes))
    return GGUFMeta(version, metadata, tuple(tensors), alignment, data_offset)


def _alignment(metadata: dict[str, Any]) -> int:
    value = metadata.get("general.alignment")
    if value is None:
        return DEFAULT_ALIGNMENT
    if type(value) is not int or not 0 < value < 2**32 or value & (value - 1):
        raise GGUFMetaError(f"general.alignment = {value!r} is not a power of two")
    return value


def read_gguf(path: str | Path, *, arrays: bool = True) -> GGUFMeta:
    """``parse_gguf`` over a read-only memory map of ``path``: only the header's pages are read.

    Raises:
        GGUFMetaError: see ``parse_gguf`` (the message does not name the file).
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        if size == 0:
            raise GGUFMetaError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return parse_gguf(mm, size, arrays=arrays)
