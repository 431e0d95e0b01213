"""A GGUF header for planning: scalar metadata, array lengths and tensor infos, never tensor data.

The parsing is ``llama_shard.gguf_meta``'s (the project's one GGUF parser, torch-free) with ``arrays=False``: the
tokenizer arrays are skipped by their length prefixes, so a 128K-token vocabulary costs the planner nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_shard.gguf_meta import ArrayInfo, GGUFMetaError, read_gguf

__all__ = ["ArrayInfo", "GGUFHeader", "GGUFHeaderError", "TensorInfo", "read_gguf_header"]


class GGUFHeaderError(ValueError):
    """Not a GGUF file, or a truncated / corrupt header."""


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


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Read metadata and tensor infos of a GGUF (v2/v3, little-endian) file.

    Raises:
        GGUFHeaderError: not GGUF, an unsupported version, or a truncated/corrupt header.
        OSError: the file cannot be opened.
    """
    try:
        meta = read_gguf(path, arrays=False)
    except GGUFMetaError as e:
        raise GGUFHeaderError(f"{path}: {e}") from None
    tensors = tuple(TensorInfo(t.name, t.shape, t.ggml_type, t.n_bytes) for t in meta.tensors)
    return GGUFHeader(meta.version, meta.metadata, tensors)
